"""The ONNX decode form: functional past -> present tensors [B, G, S, D] (the optimum layout). A
K=V layer takes and returns ONE tensor and attends with it as keys and values.

PastPresent (plain ops or MultiHeadAttention), QuantizedPastPresent (int8 cache + scales),
RotaryPastPresent (a RoPE K=V present rotated by onnxruntime's RotaryEmbedding), CachedPastPresent
(append + attend in qkvx's onnxruntime op). OnnxDecodeModel wires one per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qkvx.decode.onnx_ops import (
    attention_bias,
    cached_attention,
    cached_attention_kv,
    fused_attention,
    grouped_attention,
    key_positions_of,
    rotary_rows,
)
from qkvx.errors import QkvxError
from qkvx.models.transformer import Transformer
from qkvx.quant.kv import quantize_int8
from qkvx.recipes import ATTENTION
from qkvx.spec import CacheLayout, cache_layout


class PastPresent:
    """One layer's CacheStrategy for one ONNX call: past tensors [B, G, P, D] in (one for k = v, key
    and value otherwise), present [B, G, P + T, D] out. The optimum layout: kv heads before tokens.

    int8 (QuantizedPastPresent): each cache tensor travels as int8 [B, G, P, D] plus its fp32
    `_scale` [B, G, P, 1]; only the new tokens are quantized, and attention reads the dequantized
    present (one layer's fp32 transient)."""

    width = 1  # graph tensors per cache tensor

    def __init__(
        self,
        past: tuple[Tensor, ...],
        bias: Tensor,
        key_positions: Tensor,
        fused: bool = False,
        attention_mask: Tensor | None = None,
    ):
        self.past, self.bias, self.key_positions = past, bias, key_positions  # bias [B, 1, R * T, S]
        self.attention_mask = attention_mask  # [B, S]
        self.attention = fused_attention if fused else grouped_attention
        self.present: tuple[Tensor, ...] = ()

    def update(self, k: Tensor, v: Tensor | None, positions: Tensor):
        new = (k,) if v is None else (k, v)  # [B, T, G, D] each
        w = self.width
        groups = [self.past[i : i + w] for i in range(0, len(self.past), w)]
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
        out = self._attend(query, k.transpose(1, 2), v.transpose(1, 2), D**-0.5)
        return out.view(B, R, T, G, D).permute(0, 2, 3, 1, 4).reshape(B, T, H, D)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        return self.attention(query, key, value, self.bias, scale)


class QuantizedPastPresent(PastPresent):
    """PastPresent with an int8 cache (the ONNX contract): per cache tensor int8 [B, G, P, D] and its fp32
    scale [B, G, P, 1] in, the same with P + T out. Symmetric, one scale per token and kv head
    (qkvx.quant.kv): the new tokens are quantized on write, the past is concatenated as stored
    (never requantized). Attention reads the int8 present cast to float WITHOUT its scales and
    applies them to the scores (keys) and to the softmax weights (values): a per-token factor
    commutes with the dot product and with RoPE's rotation (linear within a token), so the cache
    is never multiplied through (dequantizing the present made decode much slower than fp32; this
    way it is as fast). A K=V layer's one int8 tensor serves as keys
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
    (MultiHeadAttention): faster than plain-op attention after the rotation at long contexts."""

    def update_and_attend(self, q: Tensor, k: Tensor, v: Tensor | None, rope) -> Tensor:
        k_all, v_all, key_positions = self.update(k, v, None)
        if v_all is None:
            v_all = k_all
            if rope is not None:
                k_all = rotary_rows(k_all.transpose(1, 2), key_positions, rope.cos, rope.sin).transpose(1, 2)
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
            tables = (rope.cos, rope.sin) if rope is not None else (None, None)
            out, present = cached_attention_kv(
                query, self.past[0], k, self.attention_mask, *tables, H, D**-0.5
            )
            self.present = (present,)
        else:
            out, present_k, present_v = cached_attention(
                query, self.past[0], k, self.past[1], v, self.attention_mask, H, D**-0.5
            )
            self.present = (present_k, present_v)
        return out.view(B, T, H, D)


def cache_io_names(layout: CacheLayout) -> tuple[list[str], list[str]]:
    """The ONNX cache inputs and outputs (the optimum convention), layer-major; an
    int8 cache tensor is followed by its `_scale` tensor."""
    names = [
        n for name in layout.names for n in ((name, f"{name}_scale") if layout.dtype == "int8" else (name,))
    ]
    suffixes = [f"{i}.{name}" for i in range(layout.n_layer) for name in names]
    return [f"past_key_values.{s}" for s in suffixes], [f"present.{s}" for s in suffixes]


class OnnxDecodeModel(nn.Module):
    """forward(input_ids [B, T], attention_mask [B, P + T], position_ids [B, T], *past) ->
    (logits [B, T, vocab], *present): the ONNX contract (docs/architecture.md), one graph for prefill (P = 0)
    and decode. Past / present per layer: one [B, G, P, D] tensor where k = v, key + value otherwise.

    attention_mask (1 = real token, 0 = padding) masks padded keys; the caller gives position_ids
    as Hugging Face does, cumsum(attention_mask) - 1 at real tokens. Where k = v with RoPE the cache
    holds un-rotated keys and their positions are derived the same way, cumsum(attention_mask) - 1,
    so query and key positions follow one convention and left padding shifts neither.
    attention (recipes.ATTENTION["onnx"]; the same math every way): "plain" ONNX ops; "mha"
    attends through the opaque qkvx::grouped_attention op, exported as onnxruntime's
    MultiHeadAttention; "rotary" is "mha" where a RoPE K=V layer's present is rotated into keys by
    qkvx::rotary_rows (onnxruntime's RotaryEmbedding); "custom" runs each layer's append + attention
    as qkvx::cached_attention[_kv] (qkvx.CachedAttention, qkvx/export/ortops).
    kv_cache: "fp32", or "int8" (QuantizedPastPresent: each cache tensor int8 with a `_scale` beside it).
    """

    def __init__(self, model: Transformer, kv_cache: str = "fp32", attention: str = "plain"):
        super().__init__()
        if kv_cache not in ONNX_CACHES:
            raise QkvxError(f"ONNX cache dtype {kv_cache!r} unsupported; known: {', '.join(ONNX_CACHES)}")
        if attention not in ATTENTION["onnx"]:
            raise QkvxError(f"ONNX attention {attention!r} unknown; known: {', '.join(ATTENTION['onnx'])}")
        if attention not in ("plain", "mha") and kv_cache != "fp32":
            raise QkvxError(f"ONNX attention {attention!r} needs an fp32 cache, not {kv_cache}")
        self.model, self.spec, self.attention = model, model.spec, attention
        self.fused = attention in ("mha", "rotary")
        self.layout = cache_layout(model.spec, kv_cache)
        self.cache_cls = {"rotary": RotaryPastPresent, "custom": CachedPastPresent}.get(
            attention, ONNX_CACHES[kv_cache]
        )
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
            bias = attention_bias(
                attention_mask, T, self.spec.n_head // self.spec.n_kv_head
            )  # [B, 1, R * T, S]
            key_positions = key_positions_of(attention_mask)  # [B, S]
        caches = [
            self.cache_cls(past[i * n : (i + 1) * n], bias, key_positions, self.fused, attention_mask)
            for i in range(self.spec.n_layer)
        ]
        logits = self.model(input_ids, position_ids, caches)
        return (logits, *(t for c in caches for t in c.present))
