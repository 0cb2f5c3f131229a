"""The aarch64 side of the kernels: ExecuTorch's aarch64 wheel (its lib/ and include/ only) to
cross-link against, the C++ unit tests run under qemu-aarch64-static in the arm64 user land of
qkvx.harness.emulator, and qkvx-run cross-built for it (the emulator's .pte runtime)."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from qkvx.native_build import RUNNER, KernelsBuildError, build, build_dir, runner_path

CACHE = Path("~/.cache/qkvx/arm64").expanduser()


def prefix_dir(cache: Path = CACHE) -> Path:
    """Where executorch_prefix() puts the aarch64 prefix of the installed executorch's version
    (nothing is fetched)."""
    return cache / f"executorch-{metadata.version('executorch')}-aarch64" / "executorch"


def executorch_prefix(cache: Path = CACHE) -> Path:
    """An aarch64 ExecuTorch prefix (include/ + lib/) of the installed executorch's version, fetched
    once with pip from the manylinux aarch64 wheel and unpacked under `cache`."""
    version = metadata.version("executorch")
    prefix = prefix_dir(cache)
    root = prefix.parent
    if (prefix / "lib" / "libexecutorch.so").exists():
        return prefix
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (prefix / "lib" / "libexecutorch.so").exists():
            return prefix
        dl = root / "download"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--platform",
            "manylinux_2_28_aarch64",
            "--python-version",
            "3.11",
            "--only-binary=:all:",
            f"executorch=={version}",
            "-d",
            str(dl),
        ]
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(dl.glob("executorch-*.whl"))
        if run.returncode or not wheels:
            last = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise KernelsBuildError(f"cannot fetch the aarch64 executorch=={version} wheel: {last[0]}")
        with zipfile.ZipFile(wheels[0]) as z:
            members = [n for n in z.namelist() if n.startswith(("executorch/lib/", "executorch/include/"))]
            z.extractall(root, members)
        shutil.rmtree(dl, ignore_errors=True)
    return prefix


def build_tests(cache: Path = CACHE) -> Path:
    """Cross-build qkvx_kernels_test for aarch64; returns the binary."""
    lib = build(aarch64=True, executorch_prefix_dir=executorch_prefix(cache), tests=True)
    return lib.parent / "qkvx_kernels_test"


def runner_binary(cache: Path = CACHE) -> Path:
    """Where build_runner() puts qkvx-run for aarch64 and this source tree (nothing is built)."""
    return build_dir(aarch64=True, prefix=prefix_dir(cache)) / RUNNER


def build_runner(cache: Path = CACHE) -> Path:
    """Cross-build qkvx-run (and the kernel library it links) for aarch64; returns the binary."""
    return runner_path(aarch64=True, executorch_prefix_dir=executorch_prefix(cache))


def run_tests(
    binary: Path, rootfs: Path, cpu: str = "cortex-a76", timeout: float = 600
) -> subprocess.CompletedProcess:
    """The test binary on an emulated `cpu` (not qemu's `max`: its SME gave wrong int8 results
    for other kernels here)."""
    qemu = shutil.which("qemu-aarch64-static")
    if qemu is None:
        raise KernelsBuildError("qemu-aarch64-static not found: install the Debian package qemu-user-static")
    return subprocess.run(
        [qemu, "-cpu", cpu, "-L", str(rootfs), str(binary)], capture_output=True, text=True, timeout=timeout
    )
