"""The decoder built from a ModelSpec: GPT-2 family (learned positions, LayerNorm, GELU, biases) and
Llama family (RoPE, RMSNorm, SwiGLU) are the same module with different spec fields."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkvx.models.attention import FULL_RECOMPUTE, Attention, CacheStrategy, Rope
from qkvx.spec import ModelSpec


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (as HF Llama)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def gelu_tanh(x: Tensor) -> Tensor:
    # Spelled out on purpose: XNNPACK lowers F.gelu(approximate="tanh") as exact erf GELU.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def make_norm(spec: ModelSpec) -> nn.Module:
    if spec.norm == "rmsnorm":
        return RMSNorm(spec.n_embd, spec.norm_eps)
    return nn.LayerNorm(spec.n_embd, eps=spec.norm_eps, bias=spec.norm_bias)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        C, inner, b = spec.n_embd, spec.n_inner, spec.bias
        self.kind = spec.mlp
        self.fc = nn.Linear(C, inner, bias=b)  # GELU: the input projection; SwiGLU: the "up" projection
        self.gate = nn.Linear(C, inner, bias=b) if spec.mlp == "swiglu" else None
        self.proj = nn.Linear(inner, C, bias=b)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            return self.proj(F.silu(self.gate(x)) * self.fc(x))
        h = self.fc(x)
        return self.proj(gelu_tanh(h) if self.kind == "gelu_tanh" else F.gelu(h))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.norm1 = make_norm(spec)
        self.attn = Attention(spec)
        self.norm2 = make_norm(spec)
        self.mlp = MLP(spec)

    def forward(self, x: Tensor, positions: Tensor, rope: Rope | None, cache: CacheStrategy) -> Tensor:
        x = x + self.attn(self.norm1(x), positions, rope, cache)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """tokens int64 [B, T] -> logits float32 [B, T, vocab]."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.tok_emb = nn.Embedding(spec.vocab_size, spec.n_embd)
        self.pos_emb = nn.Embedding(spec.max_positions, spec.n_embd) if spec.positions == "learned" else None
        self.rope = (
            Rope(spec.head_dim, spec.max_positions, spec.rope_theta) if spec.positions == "rope" else None
        )
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.n_layer))
        self.norm_f = make_norm(spec)
        self.lm_head = nn.Linear(spec.n_embd, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(
        self, tokens: Tensor, positions: Tensor | None = None, caches: Sequence[CacheStrategy] | None = None
    ) -> Tensor:
        """positions: [T] or [B, T] absolute positions (default 0..T-1); caches: one strategy per
        layer (default: full recompute, no cache)."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, self.rope, caches[i] if caches is not None else FULL_RECOMPUTE)
        return self.lm_head(self.norm_f(x))

    @classmethod
    def from_state(cls, spec: ModelSpec, state: dict[str, Tensor]) -> "Transformer":
        """The model owning `state`'s tensors (fp32): built on the meta device and handed the
        tensors as they are, so a 1.2B model costs one copy of its weights, not three (init,
        loaded file, load_state_dict copy). The caller has checked keys and shapes."""
        with torch.device("meta"):
            model = cls(spec)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
        if spec.tie_embeddings:  # assign replaced tok_emb.weight: tie the head to the new tensor
            model.lm_head.weight = model.tok_emb.weight
        if model.rope is not None:  # computed buffers (not in any state dict): build them for real
            model.rope = Rope(spec.head_dim, spec.max_positions, spec.rope_theta)
        meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if meta:
            raise ValueError(f"tensors missing from the state: {meta[:3]}")
        return model

    def init_weights(self, seed: int | None = None, std: float = 0.02) -> "Transformer":
        """GPT-2 style init (normal(0, std), zero biases, scaled residual projections)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                s = (
                    std / math.sqrt(2 * self.spec.n_layer)
                    if name.endswith(("o_proj.weight", "mlp.proj.weight"))
                    else std
                )
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * s)
            elif "norm" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        return self
