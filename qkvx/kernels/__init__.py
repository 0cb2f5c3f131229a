"""qkvx's own attention and KV-cache kernels (C++ in csrc/), for PyTorch eager, torch.export and
the ExecuTorch runtime, with no libtorch in the native code.

Contract: once `qkvx.kernels` is imported, `executorch.runtime.Runtime` runs a qkvx .pte
directly. Importing it
  (a) locates the kernel library built for this source tree (qkvx.native_build.build_dir; built
      on first import with cmake and g++ when missing, unless QKVX_KERNELS_NO_BUILD=1, or taken
      from QKVX_KERNELS_LIB),
  (b) loads it with ctypes and RTLD_GLOBAL: its static initializers register the ExecuTorch
      operators qkvx::update_cache.out, qkvx::update_cache_int8.out and qkvx::attend.out,
  (c) defines torch.ops.qkvx.update_cache / update_cache_int8 / attend (functional + .out, Meta
      kernels for export, CPU kernels calling the same C++ through the C ABI).

Ops (caches are [1, G, S, D]: kv heads before tokens):
  update_cache(value fp32 [1,T,G,D], cache(a!) fp32|fp16, start_pos) -> placeholder
  update_cache_int8(value, cache(a!) int8, scale(b!) fp32 [1,G,S,1], start_pos) -> placeholder
      symmetric per (token, kv head), exactly qkvx.quant.kv.quantize_int8
  attend(q fp32 [1,T,H,D], k_cache, v_cache?, k_scale?, v_scale?, rope_cos?, rope_sin?, start_pos)
      -> fp32 [1,T,H,D]; v_cache None = K=V; RoPE half tables [P, D/2] rotate keys while reading.
"""

from __future__ import annotations

import os
from pathlib import Path

from qkvx.kernels import _abi, ops
from qkvx.native_build import KernelsBuildError, build, build_dir

__all__ = [
    "build",
    "build_dir",
    "KernelsBuildError",
    "library_path",
    "set_num_threads",
    "num_threads",
    "simd_path",
]


def library_path() -> Path:
    """The library this process loads: QKVX_KERNELS_LIB, else the build for this source tree
    (built now if missing; under build()'s lock, so a concurrent build is never half-read)."""
    env = os.environ.get("QKVX_KERNELS_LIB")
    if env:
        return Path(env)
    if os.environ.get("QKVX_KERNELS_NO_BUILD") == "1":
        lib = build_dir() / "libqkvx_kernels.so"
        if not lib.exists():
            raise KernelsBuildError(f"{lib} is not built (python -m qkvx.kernels)")
        return lib
    return build()


_clib = _abi.load(library_path())
ops.register(_clib)


def set_num_threads(n: int) -> int:
    """Size of ExecuTorch's threadpool (shared with XNNPACK in this process); returns it. Call it
    before loading a program: XNNPACK keeps the pool it was created with, and resizing replaces
    the pool, so a program loaded earlier would run on a freed one."""
    return int(_clib.qkvx_set_num_threads(int(n)))


def num_threads() -> int:
    return int(_clib.qkvx_num_threads())


def simd_path() -> str:
    """ "avx512", "avx2", "neon" or "portable": the attention path this CPU takes (for D % 16 == 0)."""
    return _clib.qkvx_simd_path().decode()
