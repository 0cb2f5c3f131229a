"""The one attention implementation, for every projection-sharing variant and kv-head count.

Variants are data (ModelSpec.sharing, n_kv_head): which projections exist and which tensors alias.
What happens to keys and values after projection is a cache strategy's business:

  FullRecompute (here)      no cache: causal attention over the current sequence (the reference)
  StaticCache (decode)      in-place buffers written at input_pos (ExecuTorch)
  PastPresent (decode)      functional past -> present tensors (ONNX)

Where k = v the layer projects the shared tensor once and hands the strategy ONE tensor (v=None).
With RoPE and k = v, the stored tensor is un-rotated: keys are rotated on read, values used as stored.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkvx.spec import ModelSpec


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF rotate_half RoPE of x [..., D] with half-table rows cos / sin broadcastable to
    [..., D/2]: the same products and sums as HF's x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Rope(nn.Module):
    """Rotary position embedding, HF Llama convention (rotate_half over two halves of head_dim).
    Holds the half tables cos/sin [P, D/2]: HF's full tables repeat them over both halves, and
    the kernels and ONNX graphs read the halves."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, D/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [B, T, heads, D]; positions [B, T] or [T] (int64)."""
        # [B, T, 1, D/2] or [T, 1, D/2]
        return rotate(x, self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2))


class CacheStrategy(Protocol):
    """Where keys/values go after projection and how attention reads them back."""

    def update(self, k: Tensor, v: Tensor | None, positions: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Store new k [B, T, G, D] and v (None: v is k). Return all keys, all values (None: the
        values are the keys as stored) and the positions of all keys ([S] or [B, S])."""
        ...

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [B, T, H, D], k/v [B, S, G, D] -> [B, T, H, D]."""
        ...

    # Optional: update_and_attend(q, k, v, rope) -> [B, T, H, D] replaces update + attend, for a
    # strategy that appends and attends in one operation. k is un-rotated where k = v (v None) and
    # rope is given: the strategy rotates the keys it reads.


def expand_kv(x: Tensor, n_head: int) -> Tensor:
    """[B, S, G, D] -> [B, S, H, D]: query head h reads kv head h // (H / G)."""
    groups = x.shape[2]
    return x if groups == n_head else x.repeat_interleave(n_head // groups, dim=2)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """Softmax attention with scale 1/sqrt(D). q [B,T,H,D], k/v [B,S,G,D], mask broadcastable to
    [B, H, T, S] (bool, True = attend) -> [B, T, H, D]."""
    n_head = q.shape[2]
    k, v = expand_kv(k, n_head), expand_kv(v, n_head)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal
    )
    return out.transpose(1, 2)


class FullRecompute:
    """No cache: every forward attends causally over the tokens it is given (the eager reference)."""

    def update(self, k, v, positions):
        return k, v, positions

    def attend(self, q, k, v):
        return sdpa(q, k, v, causal=True)


FULL_RECOMPUTE = FullRecompute()


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        C, b = spec.n_embd, spec.bias
        self.n_head, self.n_kv_head, self.head_dim = spec.n_head, spec.n_kv_head, spec.head_dim
        self.kv_shared = spec.kv_shared
        # Projections that exist for this sharing mode; a missing one aliases another tensor.
        self.q_proj = nn.Linear(C, spec.q_dim, bias=b) if spec.has_q_proj else None  # None: q = k
        self.k_proj = nn.Linear(C, spec.kv_dim, bias=b)
        self.v_proj = nn.Linear(C, spec.kv_dim, bias=b) if spec.has_v_proj else None  # None: v = k
        self.o_proj = nn.Linear(spec.q_dim, C, bias=b)

    def forward(
        self, x: Tensor, positions: Tensor, rope: Rope | None, cache: CacheStrategy = FULL_RECOMPUTE
    ) -> Tensor:
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # [B, T, G, D]
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim) if self.q_proj is not None else k
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim) if self.v_proj is not None else None
        if rope is not None:
            q = rope(q, positions)
            if not self.kv_shared:
                k = rope(k, positions)  # rotate on write; with k = v the cache keeps it un-rotated
        fused = getattr(cache, "update_and_attend", None)
        if fused is not None:  # the strategy stores and attends in one step (and rotates on read)
            y = fused(q, k, v, rope)
        else:
            k_all, v_all, key_positions = cache.update(k, v, positions)
            if v_all is None:  # k = v: the one stored tensor serves as values ...
                v_all = k_all
                if rope is not None:  # ... and, rotated, as keys (a one-layer transient)
                    k_all = rope(k_all, key_positions)
            y = cache.attend(q, k_all, v_all)  # [B, T, H, D]
        return self.o_proj(y.reshape(B, T, self.n_head * self.head_dim))
