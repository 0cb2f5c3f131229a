"""Decode form: the trained model plus a KV cache, one tensor per layer where k = v.

The attention code is the model's own (qkvx.models.attention.Attention); only the cache strategy
differs from the reference:

  StaticCache / DecodeModel  in-place buffers [1, max_seq_len, G, D] written at input_pos with
                             ExecuTorch's LLM custom ops (llama::update_cache, llama::custom_sdpa).
                             A K=V layer registers ONE buffer and passes it as key and value cache.
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
