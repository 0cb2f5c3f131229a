"""Build csrc/ with CMake and the system compiler: qkvx's kernel library, its tests, the runner
qkvx-run, and the onnxruntime op library (build_ortops). Outside qkvx.kernels, whose import loads
the kernel library, so building the onnxruntime op needs no ExecuTorch.

The library lands in a cache directory keyed by the sources, the ExecuTorch prefix and the target,
so an edited kernel is rebuilt and a stale one is never loaded:
  ~/.cache/qkvx/kernels/<arch>-<hash>/libqkvx_kernels.so   (QKVX_KERNELS_CACHE overrides the root)

    python -m qkvx.kernels [--tests] [--runner]   # host library (+ qkvx_kernels_test, + qkvx-run)
    python -m qkvx.kernels --aarch64 [--tests] [--runner]   # cross build against the aarch64 wheel

qkvx-run (csrc/runner/) is ExecuTorch's C++ runtime driving a .pte, linked with XNNPACK,
ExecuTorch's kernels and this library: `runner_path()` builds it on first use. The onnxruntime op
library is built the same way under ~/.cache/qkvx/kernels/ortops-<arch>-<hash>/.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from qkvx.errors import QkvxError

LIBRARY = "libqkvx_kernels.so"
TEST_BINARY = "qkvx_kernels_test"
RUNNER = "qkvx-run"
CSRC = Path(__file__).resolve().parents[1] / "csrc"
CROSS_COMPILER = "aarch64-linux-gnu-g++"


class KernelsBuildError(QkvxError):
    """The kernel library cannot be built here (missing tool, failed compile)."""


def executorch_prefix() -> Path:
    """The installed executorch package directory: it holds include/ and lib/."""
    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise KernelsBuildError("executorch is not installed (pip install executorch)")
    return Path(list(spec.submodule_search_locations)[0])


def _source_hash(*extra: str) -> str:
    h = hashlib.sha256()
    for p in sorted(CSRC.rglob("*")):
        if p.is_file() and p.suffix in {".h", ".cpp", ".txt", ".cmake"}:
            h.update(str(p.relative_to(CSRC)).encode())
            h.update(p.read_bytes())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:12]


def _cache_root() -> Path:
    return Path(os.environ.get("QKVX_KERNELS_CACHE", Path.home() / ".cache" / "qkvx" / "kernels"))


def build_dir(aarch64: bool = False, prefix: Path | None = None) -> Path:
    """Where build() puts (and the loader looks for) the library for this source tree."""
    if not CSRC.is_dir():
        raise KernelsBuildError(f"kernel sources not found at {CSRC} (a qkvx source checkout has csrc/)")
    prefix = prefix or executorch_prefix()
    arch = "aarch64" if aarch64 else platform.machine()
    return _cache_root() / f"{arch}-{_source_hash(str(prefix.resolve()), arch)}"


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise KernelsBuildError(
            f"{tool} not found: install the Debian package {package} (apt-get install {package})"
        )
    return path


def build(
    aarch64: bool = False,
    executorch_prefix_dir: str | Path | None = None,
    tests: bool = False,
    jobs: int = 2,
    out: str | Path | None = None,
    verbose: bool = False,
    runner: bool = False,
) -> Path:
    """Configure and build csrc/ with the system compiler; returns the library's path.

    aarch64: cross-compile with aarch64-linux-gnu-g++ (executorch_prefix_dir must then be an
    aarch64 wheel's unpacked executorch/ directory). tests: also build qkvx_kernels_test; runner:
    also build qkvx-run (beside the library)."""
    compiler = _require(CROSS_COMPILER, "g++-aarch64-linux-gnu") if aarch64 else _require("g++", "g++")
    prefix = Path(executorch_prefix_dir) if executorch_prefix_dir else executorch_prefix()
    if not (prefix / "include" / "executorch").is_dir() or not (prefix / "lib").is_dir():
        raise KernelsBuildError(f"{prefix}: not an ExecuTorch prefix (no include/executorch and lib/)")
    bdir = Path(out) if out else build_dir(aarch64, prefix)
    configure = [
        f"-DEXECUTORCH_PREFIX={prefix}",
        f"-DQKVX_BUILD_TESTS={'ON' if tests else 'OFF'}",
        "-DQKVX_BUILD_RUNNER=ON",  # configures a target; built only when asked for below
        f"-DCMAKE_CXX_COMPILER={compiler}",
    ]
    if aarch64:
        configure.append(f"-DCMAKE_TOOLCHAIN_FILE={CSRC / 'cmake' / 'aarch64-linux-gnu.cmake'}")
    targets = {"qkvx_kernels": True, TEST_BINARY: tests, RUNNER: runner}
    _cmake_build(
        bdir, configure, [t for t, on in targets.items() if on], jobs, verbose, force=out is not None
    )
    return bdir / LIBRARY


def _cmake_build(
    bdir: Path, configure: list[str], targets: list[str], jobs: int, verbose: bool, force: bool = False
) -> None:
    """Configure csrc/ into bdir and build targets, once per target set (a stamp per target is
    written after a whole build). Concurrent callers (pytest workers) wait on a lock instead of
    building twice."""
    cmake = _require("cmake", "cmake")
    bdir.mkdir(parents=True, exist_ok=True)
    with open(bdir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamps = [bdir / f".built-{t}" for t in targets]
        if not force and all(s.exists() for s in stamps):
            return
        print(f"qkvx.kernels: building {bdir} ...", file=sys.stderr, flush=True)
        cmds = (
            [cmake, "-S", str(CSRC), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release", *configure],
            [cmake, "--build", str(bdir), "-j", str(jobs), "--target", *targets],
        )
        for cmd in cmds:
            run = subprocess.run(cmd, capture_output=not verbose, text=True)
            if run.returncode != 0:
                tail = (run.stderr or run.stdout or "").strip().splitlines()[-15:] if not verbose else []
                raise KernelsBuildError(
                    f"building the qkvx kernels failed ({' '.join(cmd[:2])} ...):\n" + "\n".join(tail)
                )
        for stamp in stamps:
            stamp.touch()


def build_ortops(ort_include: Path, jobs: int = 2) -> Path:
    """onnxruntime's custom-op library over these kernels (csrc/ortops/, target qkvx_ortops), for
    the host, against the API headers in ort_include; built once per source tree and headers."""
    compiler = _require("g++", "g++")
    header = (ort_include / "onnxruntime_c_api.h").read_bytes()
    digest = hashlib.sha256(header).hexdigest()[:8]
    bdir = _cache_root() / f"ortops-{platform.machine()}-{_source_hash(str(ort_include.resolve()), digest)}"
    configure = [
        f"-DQKVX_ORT_INCLUDE={ort_include}",
        "-DQKVX_WITH_EXECUTORCH=OFF",
        "-DQKVX_USE_THREADPOOL=OFF",  # onnxruntime's threads split the work
        "-DQKVX_BUILD_TESTS=OFF",
        "-DQKVX_BUILD_RUNNER=OFF",
        f"-DCMAKE_CXX_COMPILER={compiler}",
    ]
    _cmake_build(bdir, configure, ["qkvx_ortops"], jobs, verbose=False)
    return bdir / "libqkvx_ortops.so"


def runner_path(aarch64: bool = False, executorch_prefix_dir: str | Path | None = None) -> Path:
    """qkvx-run for this source tree: $QKVX_RUN when set (host only), else built now if missing
    (beside the kernel library, under build()'s lock)."""
    env = os.environ.get("QKVX_RUN")
    if env and not aarch64:
        return Path(env)
    return build(aarch64, executorch_prefix_dir, runner=True).parent / RUNNER
