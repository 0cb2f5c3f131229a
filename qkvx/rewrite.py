"""Decode form: the trained model plus a KV cache, one tensor per layer where k = v.

The attention code is the model's own (qkvx.models.attention.Attention); only the cache strategy
differs from the reference:

  StaticCache / DecodeModel  in-place buffers [1, max_seq_len, G, D] written at input_pos with
                             ExecuTorch's LLM custom ops (llama::update_cache, llama::custom_sdpa).
                             A K=V layer registers ONE buffer and passes it as key and value cache.
                             int8: int8 buffer(s) + fp32 scales, read by llama::custom_quantized_sdpa.
  PastPresent / OnnxDecodeModel  functional past -> present tensors [B, G, S, D] (ONNX); a K=V
                             layer takes and returns ONE tensor and attends with it as keys and
                             values (grouped_attention; optionally onnxruntime's fused kernel).
                             RotaryPastPresent: a RoPE K=V present rotated by onnxruntime's
                             RotaryEmbedding; CachedPastPresent: append + attend in qkvx's custom op.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from qkvx.errors import QkvxError
from qkvx.models.transformer import Transformer
from qkvx.quant.kv import dequantize_int8, quantize_int8
from qkvx.spec import CacheLayout, ModelSpec, cache_layout


def load_custom_ops() -> None:
    """Register torch.ops.llama.* (eager CPU kernels and the Meta kernels export needs)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


STATIC_CACHE_DTYPES = {"fp32": torch.float32, "int8": torch.int8}


class StaticCache(nn.Module):
    """One layer's cache: buffer `kv` (k = v) or `key` + `value`, each [1, max_seq_len, G, D]
    (the custom ops' layout: tokens before heads). int8 (layout.dtype): each int8 buffer has an
    fp32 scale buffer `<name>_scale` [1, max_seq_len, G, 1] beside it (symmetric, one scale per
    token and kv head)."""

    def __init__(self, layout: CacheLayout, max_seq_len: int):
        super().__init__()
        if layout.dtype not in STATIC_CACHE_DTYPES:
            raise QkvxError(f"static cache dtype {layout.dtype!r} unsupported; known: {', '.join(STATIC_CACHE_DTYPES)}")
        self.names, self.quantized = layout.names, layout.dtype == "int8"
        shape = (1, max_seq_len, layout.kv_heads, layout.head_dim)
        for name in layout.names:
            self.register_buffer(name, torch.zeros(shape, dtype=STATIC_CACHE_DTYPES[layout.dtype]), persistent=False)
            if self.quantized:
                self.register_buffer(f"{name}_scale", torch.zeros(shape[:3] + (1,)), persistent=False)

    def view(self, start_pos, seq_len: int, rotate_on_read: bool, zero_point: Tensor | None = None) -> "_StaticView":
        return _StaticView(self, start_pos, seq_len, rotate_on_read, zero_point)


class _StaticView:
    """The CacheStrategy for one forward call: writes at start_pos, attends over [0, start_pos + T).

    int8 cache: quantize on write; attention reads the int8 buffer(s) through
    llama::custom_quantized_sdpa (a K=V layer passes the SAME int8 tensor and scales as keys and
    values). The kernel wants int8 zero points shaped like the scales: symmetric quantization
    makes them all zero, so one shared constant (`zero_point`, from DecodeModel) serves every
    layer. RoPE with k = v: keys must be rotated after dequantization, so the valid prefix is
    dequantized (a one-layer fp32 transient) and attended with llama::custom_sdpa."""

    def __init__(self, cache: StaticCache, start_pos, seq_len: int, rotate_on_read: bool,
                 zero_point: Tensor | None = None):
        self.cache, self.start_pos, self.seq_len, self.rotate_on_read = cache, start_pos, seq_len, rotate_on_read
        self.zero_point = zero_point

    def update(self, k: Tensor, v: Tensor | None, positions: Tensor):
        if self.cache.quantized:
            return self._update_int8(k, v)
        names = self.cache.names
        torch.ops.llama.update_cache(k, getattr(self.cache, names[0]), self.start_pos)
        if v is None:  # k = v: one buffer serves as keys and values
            buf = getattr(self.cache, names[0])
            if not self.rotate_on_read:
                return buf, None, None
            # RoPE with k = v: the buffer holds un-rotated keys; rotate the valid prefix (a transient
            # of one layer's cache) and hand the same prefix over as values.
            n = self.start_pos + self.seq_len
            return buf[:, :n], None, torch.arange(n, device=k.device)
        torch.ops.llama.update_cache(v, getattr(self.cache, names[1]), self.start_pos)
        return getattr(self.cache, names[0]), getattr(self.cache, names[1]), None

    def _update_int8(self, k: Tensor, v: Tensor | None):
        cache, names = self.cache, self.cache.names
        for name, x in zip(names, (k,) if v is None else (k, v), strict=True):
            q, scale = quantize_int8(x)
            torch.ops.llama.update_cache(q, getattr(cache, name), self.start_pos)
            torch.ops.llama.update_cache(scale, getattr(cache, f"{name}_scale"), self.start_pos)
        if v is None and self.rotate_on_read:
            # RoPE with k = v: dequantize the valid prefix; the attention rotates it into keys and
            # uses it as stored for values (fp32, so attend() takes the float kernel).
            n = self.start_pos + self.seq_len
            kv = dequantize_int8(getattr(cache, names[0])[:, :n], getattr(cache, f"{names[0]}_scale")[:, :n])
            return kv, None, torch.arange(n, device=k.device)
        # int8 buffers; with k = v the attention passes the same one as values
        return getattr(cache, names[0]), (None if v is None else getattr(cache, names[1])), None

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # is_causal with start_pos: query i (position start_pos + i) sees keys [0, start_pos + i];
        # the kernel never reads slots at or past start_pos + T. Scale defaults to 1/sqrt(D).
        if k.dtype != torch.int8:
            return torch.ops.llama.custom_sdpa(q, k, v, self.start_pos, None, 0.0, True)
        # int8 cache: the kernel takes an int8 query too (quantized per token and head here).
        # k = v: names[-1] is names[0], the same scales for keys and values.
        names, zp = self.cache.names, self.zero_point
        k_scale, v_scale = getattr(self.cache, f"{names[0]}_scale"), getattr(self.cache, f"{names[-1]}_scale")
        q8, q_scale = quantize_int8(q)
        q_zp = torch.zeros_like(q_scale, dtype=torch.int8)
        return torch.ops.llama.custom_quantized_sdpa(q8, k, v, self.start_pos, None, 0.0, True, None,
                                                     q_zp, q_scale, zp, k_scale, zp, v_scale)


class DecodeModel(nn.Module):
    """forward(tokens int64 [1, T], input_pos int64 [1]) -> logits [1, T, vocab], caching in place.

    The ExecuTorch method contract (DESIGN.md 4). Tokens are written at input_pos .. input_pos + T - 1.
    kv_dtype: "fp32" or "int8" (symmetric, one fp32 scale per token and kv head; cache_layout).
    """

    def __init__(self, model: Transformer, max_seq_len: int, kv_dtype: str = "fp32"):
        super().__init__()
        spec: ModelSpec = model.spec
        if not 1 <= max_seq_len <= spec.max_positions:
            raise QkvxError(f"max_seq_len {max_seq_len} must be between 1 and the model's "
                            f"max_positions ({spec.max_positions})")
        load_custom_ops()
        self.model, self.spec, self.max_seq_len = model, spec, max_seq_len
        self.layout = cache_layout(spec, kv_dtype)
        self.caches = nn.ModuleList(StaticCache(self.layout, max_seq_len) for _ in range(spec.n_layer))
        self.rotate_on_read = spec.kv_shared and spec.positions == "rope"
        # int8 read through llama::custom_quantized_sdpa needs zero points shaped like the scales;
        # symmetric ones are all zero: ONE constant (never written, so not cache state) for every
        # layer, key and value. RoPE with k = v dequantizes instead and needs none.
        needs_zp = kv_dtype == "int8" and not self.rotate_on_read
        self.register_buffer("zero_point", torch.zeros(1, max_seq_len, spec.n_kv_head, 1, dtype=torch.int8)
                             if needs_zp else None, persistent=False)

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        seq_len = tokens.shape[1]
        start_pos = input_pos[0].item()
        torch._check(start_pos >= 0)
        torch._check(start_pos + seq_len <= self.max_seq_len)
        positions = torch.arange(seq_len, device=tokens.device) + input_pos  # [T]
        views = [c.view(start_pos, seq_len, self.rotate_on_read, self.zero_point) for c in self.caches]
        return self.model(tokens, positions, views)

    def reset(self) -> None:
        for cache in self.caches:
            for buf in cache.buffers():
                buf.zero_()


# ---- functional past / present (ONNX) ------------------------------------------------------------

def grouped_attention(query: Tensor, key: Tensor, value: Tensor, bias: Tensor, scale: float,
                      key_scale: Tensor | None = None, value_scale: Tensor | None = None) -> Tensor:
    """Softmax attention in the contract of onnxruntime's MultiHeadAttention with G heads: query
    [B, M, G * D] (M = R * T rows: the R = H / G query heads of one kv head attend together, so a
    GQA / MQA cache is read as stored, never expanded to H heads), key / value [B, G, S, D] as
    cached, bias [B, 1, M, S] additive -> [B, M, G * D]. Exported as plain ops, k^T is a Transpose
    feeding a MatMul, which onnxruntime fuses (no copy of the cache).
    key_scale / value_scale [B, G, S, 1]: per-token factors of an int8 cache read unscaled (the real
    keys are key * key_scale); applied to the [M, S] scores and weights, never to the cache."""
    B, M, _ = query.shape
    G, S, D = key.shape[1:]
    q = query.view(B, M, G, D).transpose(1, 2)  # [B, G, M, D]
    factor = scale if key_scale is None else key_scale.transpose(-1, -2) * scale  # [B, G, 1, S]
    weights = torch.softmax(q @ key.transpose(-1, -2) * factor + bias, dim=-1)  # [B, G, M, S]
    if value_scale is not None:
        weights = weights * value_scale.transpose(-1, -2)
    return (weights @ value).transpose(1, 2).reshape(B, M, G * D)


@torch.library.custom_op("qkvx::grouped_attention", mutates_args=())
def fused_attention(query: Tensor, key: Tensor, value: Tensor, bias: Tensor, scale: float) -> Tensor:
    """grouped_attention as one opaque op: the ONNX export writes it as com.microsoft
    MultiHeadAttention (qkvx.export.onnx), eager runs the same math."""
    return grouped_attention(query, key, value, bias, scale)


@fused_attention.register_fake
def _(query, key, value, bias, scale):
    return torch.empty_like(query)


def rotate_rows(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE (HF rotate_half) of cache rows x [B, G, S, D] at positions [B, S], with half tables
    cos / sin [max_positions, D / 2]: the same numbers as Rope.forward."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [B, 1, S, D / 2]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


@torch.library.custom_op("qkvx::rotary_rows", mutates_args=())
def rotary_rows(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """rotate_rows as one opaque op: the ONNX export writes it as com.microsoft RotaryEmbedding
    (one pass over the cache instead of a Gather, Slices, Neg, Concat, Muls and an Add)."""
    return rotate_rows(x, positions, cos, sin)


@rotary_rows.register_fake
def _(x, positions, cos, sin):
    return torch.empty_like(x)


def key_positions_of(attention_mask: Tensor) -> Tensor:
    """Rotary positions of the cache slots [B, S]: cumsum(mask) - 1, padding clamped at 0."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def attention_bias(attention_mask: Tensor, T: int, R: int) -> Tensor:
    """The additive mask [B, 1, R * T, S] (rows m = r * T + t) of the last T slots' queries: a query
    sees real keys at or before its slot, and always itself (a padding query would otherwise see no
    key at all, and its softmax NaN would reach the next layer's cache). -inf is safe: every row
    keeps its own slot."""
    S = attention_mask.shape[1]
    key = torch.arange(S, device=attention_mask.device)[None, :]  # [1, S] cache slots
    query = torch.arange(T, device=attention_mask.device)[:, None] + (S - T)  # [T, 1]: slot of query i
    mask = ((key <= query)[None] & attention_mask.bool()[:, None, :]) | (key == query)[None]  # [B, T, S]
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    return bias[:, None].repeat(1, R, 1, 1).view(-1, 1, R * T, S)


def _cached_attention_reference(query: Tensor, present_k: Tensor, present_v: Tensor, attention_mask: Tensor,
                                num_heads: int, scale: float, cos: Tensor | None = None,
                                sin: Tensor | None = None) -> Tensor:
    """What qkvx.CachedAttention computes, in torch: query [B, T, H * D] (head h = g * R + r), the
    presents [B, G, S, D] -> [B, T, H * D]; keys rotated on read when cos / sin are given."""
    B, T, _ = query.shape
    G, D = present_k.shape[1], present_k.shape[3]
    R = num_heads // G
    keys = present_k if cos is None else rotate_rows(present_k, key_positions_of(attention_mask), cos, sin)
    q = query.view(B, T, G, R, D).permute(0, 3, 1, 2, 4).reshape(B, R * T, G * D)
    out = grouped_attention(q, keys, present_v, attention_bias(attention_mask, T, R), scale)
    return out.view(B, R, T, G, D).permute(0, 2, 3, 1, 4).reshape(B, T, num_heads * D)


@torch.library.custom_op("qkvx::cached_attention_kv", mutates_args=())
def cached_attention_kv(query: Tensor, past: Tensor, key: Tensor, attention_mask: Tensor, cos: Tensor | None,
                        sin: Tensor | None, num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    """One K=V layer's cache step as one op (exported as qkvx.CachedAttention, qkvx.export.ortops):
    query [B, T, H * D], past [B, G, P, D], the new rows key [B, T, G, D] (un-rotated), attention_mask
    [B, P + T], RoPE half tables cos / sin [max_positions, D / 2] or None -> (output [B, T, H * D],
    present [B, G, P + T, D]). The present serves as values and, rotated on read, as keys."""
    present = torch.cat([past, key.transpose(1, 2)], dim=2)
    out = _cached_attention_reference(query, present, present, attention_mask, num_heads, scale, cos, sin)
    return out, present


@cached_attention_kv.register_fake
def _(query, past, key, attention_mask, cos, sin, num_heads, scale):
    B, G, P, D = past.shape
    return torch.empty_like(query), past.new_empty(B, G, P + key.shape[1], D)


@torch.library.custom_op("qkvx::cached_attention", mutates_args=())
def cached_attention(query: Tensor, past_key: Tensor, key: Tensor, past_value: Tensor, value: Tensor,
                     attention_mask: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """cached_attention_kv with separate keys (rotated on write where RoPE) and values."""
    present_k = torch.cat([past_key, key.transpose(1, 2)], dim=2)
    present_v = torch.cat([past_value, value.transpose(1, 2)], dim=2)
    out = _cached_attention_reference(query, present_k, present_v, attention_mask, num_heads, scale)
    return out, present_k, present_v


@cached_attention.register_fake
def _(query, past_key, key, past_value, value, attention_mask, num_heads, scale):
    B, G, P, D = past_key.shape
    shape = (B, G, P + key.shape[1], D)
    return torch.empty_like(query), past_key.new_empty(shape), past_value.new_empty(shape)


class PastPresent:
    """One layer's CacheStrategy for one ONNX call: past tensors [B, G, P, D] in (one for k = v, key
    and value otherwise), present [B, G, P + T, D] out. The optimum layout: kv heads before tokens.

    int8 (QuantizedPastPresent): each cache tensor travels as int8 [B, G, P, D] plus its fp32
    `_scale` [B, G, P, 1]; only the new tokens are quantized, and attention reads the dequantized
    present (one layer's fp32 transient)."""

    width = 1  # graph tensors per cache tensor

    def __init__(self, past: tuple[Tensor, ...], bias: Tensor, key_positions: Tensor, fused: bool = False,
                 attention_mask: Tensor | None = None):
        self.past, self.bias, self.key_positions = past, bias, key_positions  # bias [B, 1, R * T, S]
        self.attention_mask = attention_mask  # [B, S]
        self.attention = fused_attention if fused else grouped_attention
        self.present: tuple[Tensor, ...] = ()

    def update(self, k: Tensor, v: Tensor | None, positions: Tensor):
        new = (k,) if v is None else (k, v)  # [B, T, G, D] each
        w = self.width
        groups = [self.past[i:i + w] for i in range(0, len(self.past), w)]
        stored = [self._append(g, x.transpose(1, 2)) for g, x in zip(groups, new, strict=True)]
        self.present = tuple(t for present, _ in stored for t in present)
        k_all, *v_all = (full.transpose(1, 2) for _, full in stored)  # [B, S, G, D]
        # v_all empty: k = v, the attention uses the one tensor as values and (rotated) as keys
        return k_all, (v_all[0] if v_all else None), self.key_positions

    def _append(self, past: tuple[Tensor, ...], x: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        """past graph tensors of one cache tensor + new x [B, G, T, D] -> (present graph tensors,
        the whole present in fp32 [B, G, S, D])."""
        present = torch.cat([past[0], x], dim=2)
        return (present,), present

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, T, H, D = q.shape
        G = k.shape[2]
        R = H // G
        # head h = g * R + r; query rows m = r * T + t
        query = q.view(B, T, G, R, D).permute(0, 3, 1, 2, 4).reshape(B, R * T, G * D)
        # [B, S, G, D] -> [B, G, S, D]: the inverse of update()'s transposes (the export folds the pair)
        out = self._attend(query, k.transpose(1, 2), v.transpose(1, 2), D ** -0.5)
        return out.view(B, R, T, G, D).permute(0, 2, 3, 1, 4).reshape(B, T, H, D)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        return self.attention(query, key, value, self.bias, scale)


class QuantizedPastPresent(PastPresent):
    """PastPresent with an int8 cache (DESIGN.md 4): per cache tensor int8 [B, G, P, D] and its fp32
    scale [B, G, P, 1] in, the same with P + T out. Symmetric, one scale per token and kv head
    (qkvx.quant.kv): the new tokens are quantized on write, the past is concatenated as stored
    (never requantized). Attention reads the int8 present cast to float WITHOUT its scales and
    applies them to the scores (keys) and to the softmax weights (values): a per-token factor
    commutes with the dot product and with RoPE's rotation (linear within a token), so the cache
    is never multiplied through (measured at 1024 tokens: dequantizing the present made decode
    ~1.9x slower than fp32; this way it is as fast). A K=V layer's one int8 tensor serves as keys
    and values, both scaled by its one scale; with RoPE its cast prefix is rotated on read. The
    fused attention (an opaque MultiHeadAttention) takes no scales: there the present is
    dequantized."""

    width = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scales: list[Tensor] = []  # [B, G, S, 1] per cache tensor: key (= value where k = v), value

    def _append(self, past, x):
        q, scale = quantize_int8(x)
        present = torch.cat([past[0], q], dim=2), torch.cat([past[1], scale], dim=2)
        self.scales.append(present[1])
        return present, present[0].to(torch.float32)

    def _attend(self, query, key, value, scale):
        key_scale, value_scale = self.scales[0], self.scales[-1]
        if self.attention is fused_attention:
            return self.attention(query, key * key_scale, value * value_scale, self.bias, scale)
        return grouped_attention(query, key, value, self.bias, scale, key_scale, value_scale)


ONNX_CACHES = {"fp32": PastPresent, "int8": QuantizedPastPresent}


class RotaryPastPresent(PastPresent):
    """PastPresent whose RoPE K=V layer rotates its present into keys with ONE opaque op
    (qkvx::rotary_rows, exported as com.microsoft RotaryEmbedding: a read and a write of the layer's
    cache) instead of the plain-op rotation (Gather, Slice, Neg, Concat, Mul, Add: several passes).
    Every other layer is PastPresent's. OnnxDecodeModel pairs it with the fused attention
    (MultiHeadAttention): measured faster than plain-op attention after the rotation at 4k and 16k."""

    def update_and_attend(self, q: Tensor, k: Tensor, v: Tensor | None, rope) -> Tensor:
        k_all, v_all, key_positions = self.update(k, v, None)
        if v_all is None:
            v_all = k_all
            if rope is not None:
                half = k.shape[-1] // 2
                k_all = rotary_rows(k_all.transpose(1, 2), key_positions, rope.cos[:, :half],
                                    rope.sin[:, :half]).transpose(1, 2)
        return self.attend(q, k_all, v_all)


class CachedPastPresent(PastPresent):
    """PastPresent through ONE custom op per layer (qkvx::cached_attention[_kv], exported as
    qkvx.CachedAttention, built from qkvx/export/ortops): it copies the past into the present and
    attends in the same pass, reading each cached row once; a RoPE K=V layer's keys are rotated
    row by row as they are read, never written out."""

    def update_and_attend(self, q: Tensor, k: Tensor, v: Tensor | None, rope) -> Tensor:
        B, T, H, D = q.shape
        query = q.reshape(B, T, H * D)
        if v is None:
            tables = (rope.cos[:, :D // 2], rope.sin[:, :D // 2]) if rope is not None else (None, None)
            out, present = cached_attention_kv(query, self.past[0], k, self.attention_mask, *tables, H, D ** -0.5)
            self.present = (present,)
        else:
            out, present_k, present_v = cached_attention(query, self.past[0], k, self.past[1], v,
                                                         self.attention_mask, H, D ** -0.5)
            self.present = (present_k, present_v)
        return out.view(B, T, H, D)


# ONNX attention graphs (OnnxDecodeModel(attention=...)): plain ONNX ops; onnxruntime's
# MultiHeadAttention; RoPE K=V keys rotated by onnxruntime's RotaryEmbedding; qkvx's custom op.
ONNX_ATTENTION = ("plain", "mha", "rotary", "custom")


def cache_io_names(layout: CacheLayout) -> tuple[list[str], list[str]]:
    """The ONNX cache inputs and outputs (DESIGN.md 4, the optimum convention), layer-major; an
    int8 cache tensor is followed by its `_scale` tensor."""
    names = [n for name in layout.names for n in ((name, f"{name}_scale") if layout.dtype == "int8" else (name,))]
    suffixes = [f"{i}.{name}" for i in range(layout.n_layer) for name in names]
    return [f"past_key_values.{s}" for s in suffixes], [f"present.{s}" for s in suffixes]


class OnnxDecodeModel(nn.Module):
    """forward(input_ids [B, T], attention_mask [B, P + T], position_ids [B, T], *past) ->
    (logits [B, T, vocab], *present): the ONNX contract (DESIGN.md 4), one graph for prefill (P = 0)
    and decode. Past / present per layer: one [B, G, P, D] tensor where k = v, key + value otherwise.

    attention_mask (1 = real token, 0 = padding) masks padded keys; the caller gives position_ids
    as Hugging Face does, cumsum(attention_mask) - 1 at real tokens. Where k = v with RoPE the cache
    holds un-rotated keys and their positions are derived the same way, cumsum(attention_mask) - 1,
    so query and key positions follow one convention and left padding shifts neither.
    attention (ONNX_ATTENTION; the same math every way): "plain" ONNX ops; "mha" (= fused_attention)
    attends through the opaque qkvx::grouped_attention op, exported as onnxruntime's
    MultiHeadAttention; "rotary" is "mha" where a RoPE K=V layer's present is rotated into keys by
    qkvx::rotary_rows (onnxruntime's RotaryEmbedding); "custom" runs each layer's append + attention
    as qkvx::cached_attention[_kv] (qkvx.CachedAttention, qkvx/export/ortops).
    kv_cache: "fp32", or "int8" (QuantizedPastPresent: each cache tensor int8 with a `_scale` beside it).
    """

    def __init__(self, model: Transformer, fused_attention: bool = False, kv_cache: str = "fp32",
                 attention: str | None = None):
        super().__init__()
        if kv_cache not in ONNX_CACHES:
            raise QkvxError(f"ONNX cache dtype {kv_cache!r} unsupported; known: {', '.join(ONNX_CACHES)}")
        attention = attention or ("mha" if fused_attention else "plain")
        if attention not in ONNX_ATTENTION:
            raise QkvxError(f"ONNX attention {attention!r} unknown; known: {', '.join(ONNX_ATTENTION)}")
        if attention not in ("plain", "mha") and kv_cache != "fp32":
            raise QkvxError(f"ONNX attention {attention!r} needs an fp32 cache, not {kv_cache}")
        self.model, self.spec, self.attention = model, model.spec, attention
        self.fused = attention in ("mha", "rotary")
        self.layout = cache_layout(model.spec, kv_cache)
        self.cache_cls = {"rotary": RotaryPastPresent, "custom": CachedPastPresent}.get(attention, ONNX_CACHES[kv_cache])
        past, present = cache_io_names(self.layout)
        self.input_names = ["input_ids", "attention_mask", "position_ids", *past]
        self.output_names = ["logits", *present]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor):
        n = self.layout.tensors_per_layer * self.cache_cls.width
        if len(past) != self.spec.n_layer * n:
            raise QkvxError(f"expected {self.spec.n_layer * n} past tensors, got {len(past)}")
        T = input_ids.shape[1]
        if self.attention == "custom":  # the op masks and positions its keys itself
            bias = key_positions = None
        else:
            bias = attention_bias(attention_mask, T, self.spec.n_head // self.spec.n_kv_head)  # [B, 1, R * T, S]
            key_positions = key_positions_of(attention_mask)  # [B, S]
        caches = [self.cache_cls(past[i * n:(i + 1) * n], bias, key_positions, self.fused, attention_mask)
                  for i in range(self.spec.n_layer)]
        logits = self.model(input_ids, position_ids, caches)
        return (logits, *(t for c in caches for t in c.present))
