"""Attention pieces of the ONNX decode form, in torch: the plain-op math and the opaque ops the
exporter writes as onnxruntime's fused kernels (com.microsoft MultiHeadAttention, RotaryEmbedding)
or as qkvx's own onnxruntime op (qkvx.CachedAttention, qkvx/export/ortops). Eager runs the same math."""

from __future__ import annotations

import torch
from torch import Tensor

from qkvx.models.attention import rotate


def grouped_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    bias: Tensor,
    scale: float,
    key_scale: Tensor | None = None,
    value_scale: Tensor | None = None,
) -> Tensor:
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
    return rotate(x, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))  # tables [B, 1, S, D / 2]


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


def _cached_attention_reference(
    query: Tensor,
    present_k: Tensor,
    present_v: Tensor,
    attention_mask: Tensor,
    num_heads: int,
    scale: float,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
) -> Tensor:
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
def cached_attention_kv(
    query: Tensor,
    past: Tensor,
    key: Tensor,
    attention_mask: Tensor,
    cos: Tensor | None,
    sin: Tensor | None,
    num_heads: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
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
def cached_attention(
    query: Tensor,
    past_key: Tensor,
    key: Tensor,
    past_value: Tensor,
    value: Tensor,
    attention_mask: Tensor,
    num_heads: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
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
