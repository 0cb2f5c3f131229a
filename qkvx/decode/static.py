"""The ExecuTorch decode form: the cache as in-place buffers written at input_pos, one per layer
where k = v (passed as key and value cache), with the attention ops of one of two kernel sets:

  qkvx (default)  KernelCache: buffers [1, G, S, D] (kv heads before tokens, so a head's rows are
                  contiguous) in fp32, fp16 or int8 (+ fp32 scales [1, G, S, 1]), written by
                  qkvx::update_cache(_int8) and read by qkvx::attend (qkvx.kernels): each row is read
                  once for its score and its value, and with RoPE and k = v the kernel rotates each
                  key as it reads it, so no rotated copy of the cache is ever written.
  llama           StaticCache: buffers [1, S, G, D] with ExecuTorch's LLM custom ops
                  (llama::update_cache, llama::custom_sdpa; int8: llama::custom_quantized_sdpa), for
                  apps that link only ExecuTorch's own LLM kernels. RoPE with k = v rotates the valid
                  prefix into a transient at every step.
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


def load_kernels() -> None:
    """Both kernel sets a .pte may use, in PyTorch and in ExecuTorch's Python runtime: qkvx's
    (qkvx.kernels) and ExecuTorch's LLM custom ops."""
    import qkvx.kernels  # noqa: F401

    load_custom_ops()


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


class KernelCache(nn.Module):
    """One layer's cache for qkvx's kernels: buffer `kv` (k = v) or `key` + `value`, each
    [1, G, max_seq_len, D] in the layout's dtype; int8 with an fp32 `<name>_scale` [1, G, S, 1]."""

    DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}

    def __init__(self, layout: CacheLayout, max_seq_len: int):
        super().__init__()
        if layout.dtype not in self.DTYPES:
            raise QkvxError(
                f"qkvx kernel cache dtype {layout.dtype!r} unsupported; known: {', '.join(self.DTYPES)}"
            )
        self.names, self.quantized = layout.names, layout.dtype == "int8"
        shape = (1, layout.kv_heads, max_seq_len, layout.head_dim)
        for name in layout.names:
            self.register_buffer(name, torch.zeros(shape, dtype=self.DTYPES[layout.dtype]), persistent=False)
            if self.quantized:
                self.register_buffer(f"{name}_scale", torch.zeros(shape[:3] + (1,)), persistent=False)

    def view(self, start_pos, seq_len: int) -> "_KernelView":
        return _KernelView(self, start_pos)


class _KernelView:
    """The CacheStrategy of one forward call: update_and_attend writes the new rows and attends in
    one qkvx::attend over rows [0, start_pos + T). Where k = v the same buffer (and scales) serve as
    keys and values; with RoPE the kernel gets the tables and rotates keys as it reads them."""

    def __init__(self, cache: KernelCache, start_pos):
        self.cache, self.start_pos = cache, start_pos

    def _write(self, x: Tensor, name: str) -> None:
        if self.cache.quantized:
            torch.ops.qkvx.update_cache_int8(
                x, getattr(self.cache, name), getattr(self.cache, f"{name}_scale"), self.start_pos
            )
        else:
            torch.ops.qkvx.update_cache(x, getattr(self.cache, name), self.start_pos)

    def update_and_attend(self, q: Tensor, k: Tensor, v: Tensor | None, rope) -> Tensor:
        """q [1, T, H, D] (rotated), k / v [1, T, G, D] (k un-rotated where v is None) -> [1, T, H, D]."""
        names = self.cache.names
        self._write(k, names[0])
        if v is not None:
            self._write(v, names[1])
        buf = lambda i: getattr(self.cache, names[i])  # noqa: E731
        scale = lambda i: getattr(self.cache, f"{names[i]}_scale") if self.cache.quantized else None  # noqa: E731
        shared = v is None
        tables = (rope.cos, rope.sin) if shared and rope is not None else (None, None)
        return torch.ops.qkvx.attend(
            q,
            buf(0),
            None if shared else buf(1),
            scale(0),
            None if shared else scale(1),
            *tables,
            self.start_pos,
        )


KERNELS = ("qkvx", "llama")  # the ExecuTorch attention kernel sets (recipes.ATTENTION["pte"])


class DecodeModel(nn.Module):
    """forward(tokens int64 [1, T], input_pos int64 [1]) -> logits [1, T, vocab], caching in place.

    The ExecuTorch method contract (docs/architecture.md). Tokens are written at
    input_pos .. input_pos + T - 1.
    kv_dtype: "fp32", "fp16" (qkvx kernels) or "int8" (symmetric, one fp32 scale per token and kv
    head; cache_layout). kernels: "qkvx" (qkvx.kernels) or "llama" (ExecuTorch's LLM custom ops).
    """

    def __init__(self, model: Transformer, max_seq_len: int, kv_dtype: str = "fp32", kernels: str = "qkvx"):
        super().__init__()
        spec: ModelSpec = model.spec
        check_max_seq_len(max_seq_len, spec.max_positions)
        if kernels not in KERNELS:
            raise QkvxError(f"unknown ExecuTorch kernels {kernels!r}; known: {', '.join(KERNELS)}")
        if kernels == "qkvx":
            import qkvx.kernels  # noqa: F401  (registers torch.ops.qkvx.* and the runtime's kernels)
        else:
            load_custom_ops()
        self.model, self.spec, self.max_seq_len, self.kernels = model, spec, max_seq_len, kernels
        self.layout = cache_layout(spec, kv_dtype)
        cache = KernelCache if kernels == "qkvx" else StaticCache
        self.caches = nn.ModuleList(cache(self.layout, max_seq_len) for _ in range(spec.n_layer))
        self.rotate_on_read = spec.kv_shared and spec.positions == "rope"
        # int8 read through llama::custom_quantized_sdpa needs zero points shaped like the scales;
        # symmetric ones are all zero: ONE constant (never written, so not cache state) for every
        # layer, key and value. RoPE with k = v dequantizes instead and needs none; qkvx's kernels none.
        needs_zp = kv_dtype == "int8" and not self.rotate_on_read and kernels == "llama"
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
        if self.kernels == "qkvx":
            views = [c.view(start_pos, seq_len) for c in self.caches]
        else:
            views = [c.view(start_pos, seq_len, self.rotate_on_read, self.zero_point) for c in self.caches]
        return self.model(tokens, positions, views)

    def reset(self) -> None:
        for cache in self.caches:
            for buf in cache.buffers():
                buf.zero_()


# ---- functional past / present (ONNX) ------------------------------------------------------------
