"""The ExecuTorch decode form: the cache as in-place buffers written at input_pos.

StaticCache / DecodeModel: buffers [1, max_seq_len, G, D] written with ExecuTorch's LLM custom ops
(llama::update_cache, llama::custom_sdpa). A K=V layer registers ONE buffer and passes it as key and
value cache. int8: int8 buffer(s) + fp32 scales, read by llama::custom_quantized_sdpa.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qkvx.errors import QkvxError
from qkvx.models.transformer import Transformer
from qkvx.quant.kv import dequantize_int8, quantize_int8
from qkvx.spec import CacheLayout, ModelSpec, cache_layout
from qkvx.util import check_max_seq_len


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
            raise QkvxError(
                f"static cache dtype {layout.dtype!r} unsupported; known: {', '.join(STATIC_CACHE_DTYPES)}"
            )
        self.names, self.quantized = layout.names, layout.dtype == "int8"
        shape = (1, max_seq_len, layout.kv_heads, layout.head_dim)
        for name in layout.names:
            self.register_buffer(
                name, torch.zeros(shape, dtype=STATIC_CACHE_DTYPES[layout.dtype]), persistent=False
            )
            if self.quantized:
                self.register_buffer(f"{name}_scale", torch.zeros(shape[:3] + (1,)), persistent=False)

    def view(
        self, start_pos, seq_len: int, rotate_on_read: bool, zero_point: Tensor | None = None
    ) -> "_StaticView":
        return _StaticView(self, start_pos, seq_len, rotate_on_read, zero_point)


class _StaticView:
    """The CacheStrategy for one forward call: writes at start_pos, attends over [0, start_pos + T).

    int8 cache: quantize on write; attention reads the int8 buffer(s) through
    llama::custom_quantized_sdpa (a K=V layer passes the SAME int8 tensor and scales as keys and
    values). The kernel wants int8 zero points shaped like the scales: symmetric quantization
    makes them all zero, so one shared constant (`zero_point`, from DecodeModel) serves every
    layer. RoPE with k = v: keys must be rotated after dequantization, so the valid prefix is
    dequantized (a one-layer fp32 transient) and attended with llama::custom_sdpa."""

    def __init__(
        self,
        cache: StaticCache,
        start_pos,
        seq_len: int,
        rotate_on_read: bool,
        zero_point: Tensor | None = None,
    ):
        self.cache, self.start_pos, self.seq_len, self.rotate_on_read = (
            cache,
            start_pos,
            seq_len,
            rotate_on_read,
        )
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
        return torch.ops.llama.custom_quantized_sdpa(
            q8, k, v, self.start_pos, None, 0.0, True, None, q_zp, q_scale, zp, k_scale, zp, v_scale
        )


class DecodeModel(nn.Module):
    """forward(tokens int64 [1, T], input_pos int64 [1]) -> logits [1, T, vocab], caching in place.

    The ExecuTorch method contract (docs/architecture.md). Tokens are written at
    input_pos .. input_pos + T - 1.
    kv_dtype: "fp32" or "int8" (symmetric, one fp32 scale per token and kv head; cache_layout).
    """

    def __init__(self, model: Transformer, max_seq_len: int, kv_dtype: str = "fp32"):
        super().__init__()
        spec: ModelSpec = model.spec
        check_max_seq_len(max_seq_len, spec.max_positions)
        load_custom_ops()
        self.model, self.spec, self.max_seq_len = model, spec, max_seq_len
        self.layout = cache_layout(spec, kv_dtype)
        self.caches = nn.ModuleList(StaticCache(self.layout, max_seq_len) for _ in range(spec.n_layer))
        self.rotate_on_read = spec.kv_shared and spec.positions == "rope"
        # int8 read through llama::custom_quantized_sdpa needs zero points shaped like the scales;
        # symmetric ones are all zero: ONE constant (never written, so not cache state) for every
        # layer, key and value. RoPE with k = v dequantizes instead and needs none.
        needs_zp = kv_dtype == "int8" and not self.rotate_on_read
        self.register_buffer(
            "zero_point",
            torch.zeros(1, max_seq_len, spec.n_kv_head, 1, dtype=torch.int8) if needs_zp else None,
            persistent=False,
        )

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
