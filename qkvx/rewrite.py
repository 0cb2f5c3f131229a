"""Decode form: the trained model plus a KV cache, one tensor per layer where k = v.

The attention code is the model's own (qkvx.models.attention.Attention); only the cache strategy
differs from the reference:

  StaticCache / DecodeModel  in-place buffers [1, max_seq_len, G, D] written at input_pos with
                             ExecuTorch's LLM custom ops (llama::update_cache, llama::custom_sdpa).
                             A K=V layer registers ONE buffer and passes it as key and value cache.
  PastPresent / OnnxDecodeModel  functional past -> present tensors [B, G, S, D] (ONNX); a K=V
                             layer takes and returns ONE tensor and attends with it as keys and
                             values (grouped_attention; optionally onnxruntime's fused kernel).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from qkvx.errors import QkvxError
from qkvx.models.transformer import Transformer
from qkvx.spec import CacheLayout, ModelSpec, cache_layout


def load_custom_ops() -> None:
    """Register torch.ops.llama.* (eager CPU kernels and the Meta kernels export needs)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


class StaticCache(nn.Module):
    """One layer's cache: buffer `kv` (k = v) or `key` + `value`, each [1, max_seq_len, G, D]
    (the custom ops' layout: tokens before heads)."""

    def __init__(self, layout: CacheLayout, max_seq_len: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.names = layout.names
        shape = (1, max_seq_len, layout.kv_heads, layout.head_dim)
        for name in layout.names:
            self.register_buffer(name, torch.zeros(shape, dtype=dtype), persistent=False)

    def view(self, start_pos, seq_len: int, rotate_on_read: bool) -> "_StaticView":
        return _StaticView(self, start_pos, seq_len, rotate_on_read)


class _StaticView:
    """The CacheStrategy for one forward call: writes at start_pos, attends over [0, start_pos + T)."""

    def __init__(self, cache: StaticCache, start_pos, seq_len: int, rotate_on_read: bool):
        self.cache, self.start_pos, self.seq_len, self.rotate_on_read = cache, start_pos, seq_len, rotate_on_read

    def update(self, k: Tensor, v: Tensor | None, positions: Tensor):
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

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # is_causal with start_pos: query i (position start_pos + i) sees keys [0, start_pos + i];
        # the kernel never reads slots at or past start_pos + T. Scale defaults to 1/sqrt(D).
        return torch.ops.llama.custom_sdpa(q, k, v, self.start_pos, None, 0.0, True)


class DecodeModel(nn.Module):
    """forward(tokens int64 [1, T], input_pos int64 [1]) -> logits [1, T, vocab], caching in place.

    The ExecuTorch method contract (DESIGN.md 4). Tokens are written at input_pos .. input_pos + T - 1.
    """

    def __init__(self, model: Transformer, max_seq_len: int):
        super().__init__()
        spec: ModelSpec = model.spec
        if not 1 <= max_seq_len <= spec.max_positions:
            raise QkvxError(f"max_seq_len {max_seq_len} must be between 1 and the model's "
                            f"max_positions ({spec.max_positions})")
        load_custom_ops()
        self.model, self.spec, self.max_seq_len = model, spec, max_seq_len
        self.layout = cache_layout(spec, "fp32")
        self.caches = nn.ModuleList(StaticCache(self.layout, max_seq_len) for _ in range(spec.n_layer))
        self.rotate_on_read = spec.kv_shared and spec.positions == "rope"

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        seq_len = tokens.shape[1]
        start_pos = input_pos[0].item()
        torch._check(start_pos >= 0)
        torch._check(start_pos + seq_len <= self.max_seq_len)
        positions = torch.arange(seq_len, device=tokens.device) + input_pos  # [T]
        views = [c.view(start_pos, seq_len, self.rotate_on_read) for c in self.caches]
        return self.model(tokens, positions, views)

    def reset(self) -> None:
        for cache in self.caches:
            for buf in cache.buffers():
                buf.zero_()


# ---- functional past / present (ONNX) ------------------------------------------------------------

def grouped_attention(query: Tensor, key: Tensor, value: Tensor, bias: Tensor, scale: float) -> Tensor:
    """Softmax attention in the contract of onnxruntime's MultiHeadAttention with G heads: query
    [B, M, G * D] (M = R * T rows: the R = H / G query heads of one kv head attend together, so a
    GQA / MQA cache is read as stored, never expanded to H heads), key / value [B, G, S, D] as
    cached, bias [B, 1, M, S] additive -> [B, M, G * D]. Exported as plain ops, k^T is a Transpose
    feeding a MatMul, which onnxruntime fuses (no copy of the cache)."""
    B, M, _ = query.shape
    G, S, D = key.shape[1:]
    q = query.view(B, M, G, D).transpose(1, 2)  # [B, G, M, D]
    weights = torch.softmax(q @ key.transpose(-1, -2) * scale + bias, dim=-1)  # [B, G, M, S]
    return (weights @ value).transpose(1, 2).reshape(B, M, G * D)


@torch.library.custom_op("qkvx::grouped_attention", mutates_args=())
def fused_attention(query: Tensor, key: Tensor, value: Tensor, bias: Tensor, scale: float) -> Tensor:
    """grouped_attention as one opaque op: the ONNX export writes it as com.microsoft
    MultiHeadAttention (qkvx.export.onnx), eager runs the same math."""
    return grouped_attention(query, key, value, bias, scale)


@fused_attention.register_fake
def _(query, key, value, bias, scale):
    return torch.empty_like(query)


class PastPresent:
    """One layer's CacheStrategy for one ONNX call: past tensors [B, G, P, D] in (one for k = v, key
    and value otherwise), present [B, G, P + T, D] out. The optimum layout: kv heads before tokens."""

    def __init__(self, past: tuple[Tensor, ...], bias: Tensor, key_positions: Tensor, fused: bool = False):
        self.past, self.bias, self.key_positions = past, bias, key_positions  # bias [B, 1, R * T, S]
        self.attention = fused_attention if fused else grouped_attention
        self.present: tuple[Tensor, ...] = ()

    def update(self, k: Tensor, v: Tensor | None, positions: Tensor):
        new = (k,) if v is None else (k, v)  # [B, T, G, D] each
        self.present = tuple(torch.cat([p, x.transpose(1, 2)], dim=2) for p, x in zip(self.past, new, strict=True))
        k_all, *v_all = (t.transpose(1, 2) for t in self.present)  # [B, S, G, D]
        # v_all empty: k = v, the attention uses the one tensor as values and (rotated) as keys
        return k_all, (v_all[0] if v_all else None), self.key_positions

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        B, T, H, D = q.shape
        G = k.shape[2]
        R = H // G
        # head h = g * R + r; query rows m = r * T + t
        query = q.view(B, T, G, R, D).permute(0, 3, 1, 2, 4).reshape(B, R * T, G * D)
        # [B, S, G, D] -> [B, G, S, D]: the inverse of update()'s transposes (the export folds the pair)
        out = self.attention(query, k.transpose(1, 2), v.transpose(1, 2), self.bias, D ** -0.5)
        return out.view(B, R, T, G, D).permute(0, 2, 3, 1, 4).reshape(B, T, H, D)


def cache_io_names(layout: CacheLayout) -> tuple[list[str], list[str]]:
    """The ONNX cache inputs and outputs (DESIGN.md 4, the optimum convention), layer-major."""
    suffixes = [f"{i}.{name}" for i in range(layout.n_layer) for name in layout.names]
    return [f"past_key_values.{s}" for s in suffixes], [f"present.{s}" for s in suffixes]


class OnnxDecodeModel(nn.Module):
    """forward(input_ids [B, T], attention_mask [B, P + T], position_ids [B, T], *past) ->
    (logits [B, T, vocab], *present): the ONNX contract (DESIGN.md 4), one graph for prefill (P = 0)
    and decode. Past / present per layer: one [B, G, P, D] tensor where k = v, key + value otherwise.

    attention_mask (1 = real token, 0 = padding) masks padded keys; the caller gives position_ids
    as Hugging Face does, cumsum(attention_mask) - 1 at real tokens. Where k = v with RoPE the cache
    holds un-rotated keys and their positions are derived the same way, cumsum(attention_mask) - 1,
    so query and key positions follow one convention and left padding shifts neither.
    fused_attention: attend through the opaque qkvx::grouped_attention op (exported as onnxruntime's
    MultiHeadAttention); the same math either way.
    """

    def __init__(self, model: Transformer, fused_attention: bool = False):
        super().__init__()
        self.model, self.spec, self.fused = model, model.spec, fused_attention
        self.layout = cache_layout(model.spec, "fp32")
        past, present = cache_io_names(self.layout)
        self.input_names = ["input_ids", "attention_mask", "position_ids", *past]
        self.output_names = ["logits", *present]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor):
        n = self.layout.tensors_per_layer
        if len(past) != self.spec.n_layer * n:
            raise QkvxError(f"expected {self.spec.n_layer * n} past tensors, got {len(past)}")
        T, S = input_ids.shape[1], attention_mask.shape[1]
        key = torch.arange(S, device=input_ids.device)[None, :]  # [1, S] cache slots
        query = torch.arange(T, device=input_ids.device)[:, None] + (S - T)  # [T, 1]: slot of query i
        # A query sees real keys at or before its slot, and always itself: a padding query would
        # otherwise see no key at all, and its softmax NaN would reach the cache of the next layer.
        mask = ((key <= query)[None] & attention_mask.bool()[:, None, :]) | (key == query)[None]  # [B, T, S]
        # additive; -inf is safe: every row keeps its own slot
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
        R = self.spec.n_head // self.spec.n_kv_head
        bias = bias[:, None].repeat(1, R, 1, 1).view(-1, 1, R * T, S)  # [B, 1, R * T, S]: rows m = r * T + t
        key_positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
        caches = [PastPresent(past[i * n:(i + 1) * n], bias, key_positions, self.fused)
                  for i in range(self.spec.n_layer)]
        logits = self.model(input_ids, position_ids, caches)
        return (logits, *(t for c in caches for t in c.present))
