"""ctypes binding of the kernels' C ABI (csrc/include/qkvx/kernels.h)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

INVALID_ARGUMENT, OUT_OF_MEMORY = 1, 2
DTYPE_CODES = {torch.float32: 6, torch.float16: 5, torch.int8: 1}  # ScalarType numbers


class CTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("sizes", ctypes.c_int64 * 4),
    ]


_P = ctypes.POINTER(CTensor)


def load(path: Path) -> ctypes.CDLL:
    """dlopen with RTLD_GLOBAL: its static initializers register the qkvx::*.out operators with
    the ExecuTorch runtime already loaded in (or later loaded into) this process."""
    lib = ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL | getattr(os, "RTLD_NOW", 2))
    lib.qkvx_update_cache.argtypes = [_P, _P, ctypes.c_int64]
    lib.qkvx_update_cache_int8.argtypes = [_P, _P, _P, ctypes.c_int64]
    lib.qkvx_attend.argtypes = [_P] * 7 + [ctypes.c_int64, _P]
    for f in (lib.qkvx_update_cache, lib.qkvx_update_cache_int8, lib.qkvx_attend):
        f.restype = ctypes.c_int
    lib.qkvx_last_error.restype = ctypes.c_char_p
    lib.qkvx_set_num_threads.argtypes = [ctypes.c_int]
    lib.qkvx_simd_path.restype = ctypes.c_char_p
    lib.qkvx_force_simd_path.argtypes = [ctypes.c_char_p]
    lib.qkvx_set_chunk_rows.argtypes = [ctypes.c_int64]
    lib.qkvx_set_chunk_rows.restype = ctypes.c_int64
    return lib


def view(op: str, name: str, t: torch.Tensor | None) -> CTensor | None:
    """A tensor as the C ABI sees it. Device and memory layout are checked here (the C side
    cannot see them); ranks, sizes and dtypes are checked by the C core."""
    if t is None:
        return None
    if t.device.type != "cpu":
        raise ValueError(f"{op}: {name} {list(t.shape)} is on {t.device}; the qkvx kernels run on the CPU")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} {list(t.shape)} must be contiguous (strides {list(t.stride())})")
    c = CTensor()
    c.data = t.data_ptr() if t.numel() else None
    c.dtype = DTYPE_CODES.get(t.dtype, -1)
    c.ndim = t.dim()
    for i, s in enumerate(t.shape[:4]):
        c.sizes[i] = s
    return c


def ref(c: CTensor | None):
    return None if c is None else ctypes.byref(c)


def check(lib: ctypes.CDLL, rc: int) -> None:
    if rc == 0:
        return
    msg = (lib.qkvx_last_error() or b"").decode()
    raise MemoryError(msg) if rc == OUT_OF_MEMORY else ValueError(msg)
