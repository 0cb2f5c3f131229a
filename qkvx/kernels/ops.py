"""torch.library declarations of qkvx::update_cache, qkvx::update_cache_int8 and qkvx::attend:
functional + .out schemas, Meta kernels for export (shapes only), CPU kernels that call the C ABI.

The schemas mirror ExecuTorch's llama::update_cache: the cache is a mutated argument (Tensor(a!))
and the functional op returns a placeholder tensor. torch.export then records the in-place write
on the cache buffer, ExecuTorch's to_executorch swaps in the .out variant the runtime registers
(csrc/src/et_ops.cpp), and reinplacing keeps the buffer mutated in place across calls.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from qkvx.kernels import _abi

NAMESPACE = "qkvx"

SCHEMAS = {
    "update_cache": "(Tensor value, Tensor(a!) cache, SymInt start_pos)",
    "update_cache_int8": "(Tensor value, Tensor(a!) cache, Tensor(b!) scale, SymInt start_pos)",
    "attend": "(Tensor q, Tensor k_cache, Tensor? v_cache, Tensor? k_scale, Tensor? v_scale, "
    "Tensor? rope_cos, Tensor? rope_sin, SymInt start_pos)",
}
_OUT_ALIAS = {"update_cache": "b", "update_cache_int8": "c", "attend": "a"}

_lib: torch.library.Library | None = None


def register(clib: ctypes.CDLL) -> None:
    """Define the ops (once per process) with CPU kernels calling `clib`."""
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")  # the namespace also holds other qkvx ops
    for name, args in SCHEMAS.items():
        a = _OUT_ALIAS[name]
        lib.define(f"{name}{args} -> Tensor")
        lib.define(f"{name}.out{args[:-1]}, *, Tensor({a}!) out) -> Tensor({a}!)")

    def update_cache(value: Tensor, cache: Tensor, start_pos: int) -> Tensor:
        op = "qkvx::update_cache"
        _abi.check(
            clib,
            clib.qkvx_update_cache(
                _abi.ref(_abi.view(op, "value", value)),
                _abi.ref(_abi.view(op, "cache", cache)),
                int(start_pos),
            ),
        )
        return value.new_empty((1,))

    def update_cache_int8(value: Tensor, cache: Tensor, scale: Tensor, start_pos: int) -> Tensor:
        op = "qkvx::update_cache_int8"
        _abi.check(
            clib,
            clib.qkvx_update_cache_int8(
                _abi.ref(_abi.view(op, "value", value)),
                _abi.ref(_abi.view(op, "cache", cache)),
                _abi.ref(_abi.view(op, "scale", scale)),
                int(start_pos),
            ),
        )
        return value.new_empty((1,))

    def attend_into(out: Tensor, q, k_cache, v_cache, k_scale, v_scale, rope_cos, rope_sin, start_pos):
        op = "qkvx::attend"
        names = ("q", "k_cache", "v_cache", "k_scale", "v_scale", "rope_cos", "rope_sin")
        views = [
            _abi.view(op, n, t)
            for n, t in zip(names, (q, k_cache, v_cache, k_scale, v_scale, rope_cos, rope_sin), strict=False)
        ]
        ov = _abi.view(op, "out", out)
        _abi.check(clib, clib.qkvx_attend(*[_abi.ref(v) for v in views], int(start_pos), _abi.ref(ov)))
        return out

    def attend(q, k_cache, v_cache, k_scale, v_scale, rope_cos, rope_sin, start_pos):
        out = torch.empty(q.shape, dtype=torch.float32)
        return attend_into(out, q, k_cache, v_cache, k_scale, v_scale, rope_cos, rope_sin, start_pos)

    def attend_out(q, k_cache, v_cache, k_scale, v_scale, rope_cos, rope_sin, start_pos, *, out):
        out.resize_(q.shape)
        return attend_into(out, q, k_cache, v_cache, k_scale, v_scale, rope_cos, rope_sin, start_pos)

    lib.impl("update_cache", update_cache, "CPU")
    lib.impl("update_cache.out", lambda v, c, p, *, out: (update_cache(v, c, p), out)[1], "CPU")
    lib.impl("update_cache_int8", update_cache_int8, "CPU")
    lib.impl(
        "update_cache_int8.out", lambda v, c, s, p, *, out: (update_cache_int8(v, c, s, p), out)[1], "CPU"
    )
    lib.impl("attend", attend, "CPU")
    lib.impl("attend.out", attend_out, "CPU")

    # Meta: shapes for torch.export. The checks bound start_pos for the exporter (as llama's do).
    def meta_update(value, cache, start_pos):
        torch._check(start_pos >= 0)
        torch._check(start_pos + value.shape[1] <= cache.shape[2])
        return value.new_empty((1,))

    def meta_update_int8(value, cache, scale, start_pos):
        return meta_update(value, cache, start_pos)

    def meta_attend(q, k_cache, v_cache, k_scale, v_scale, rope_cos, rope_sin, start_pos):
        torch._check(start_pos >= 0)
        torch._check(start_pos + q.shape[1] <= k_cache.shape[2])
        return q.new_empty(q.shape, dtype=torch.float32)

    lib.impl("update_cache", meta_update, "Meta")
    lib.impl("update_cache.out", lambda v, c, p, *, out: out, "Meta")
    lib.impl("update_cache_int8", meta_update_int8, "Meta")
    lib.impl("update_cache_int8.out", lambda v, c, s, p, *, out: out, "Meta")
    lib.impl("attend", meta_attend, "Meta")
    lib.impl("attend.out", lambda *args, out: out, "Meta")
    _lib = lib
