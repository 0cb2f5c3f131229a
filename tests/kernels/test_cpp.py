"""The C++ unit tests (csrc/test, float64 reference) built by the same CMake: on the host, and
cross-built for aarch64 and run under qemu-aarch64-static (the NEON path)."""

import re
import shutil
import subprocess

import pytest


def summary(text: str) -> tuple[int, int]:
    m = re.search(r"^(\d+) passed, (\d+) failed$", text, re.M)
    assert m, text[-2000:]
    return int(m.group(1)), int(m.group(2))


def test_cpp_unit_tests_on_host(kernels):
    lib = kernels.build(tests=True)
    run = subprocess.run([str(lib.parent / "qkvx_kernels_test")], capture_output=True, text=True, timeout=300)
    passed, failed = summary(run.stdout)
    assert run.returncode == 0 and failed == 0 and passed > 150, run.stdout[-3000:]
    assert f"simd path {kernels.simd_path()}" in run.stdout
    # every path this CPU has is compared with the reference, not only the one it picks
    compared = run.stdout.split("paths compared:")[1].split("\n")[0].split()
    assert compared[0] == "portable" and kernels.simd_path() in compared, run.stdout[:300]
    if kernels.simd_path() == "avx512":
        assert "avx2" in compared


@pytest.mark.slow
def test_cpp_unit_tests_on_emulated_aarch64_neon(kernels):
    from qkvx.harness import emulator
    from qkvx.kernels import aarch64

    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
    if not emulator.status().ready and (blockers := emulator.tool_problems(need_debootstrap=True)):
        pytest.skip(f"arm64 emulator not set up and this machine cannot set it up: {'; '.join(blockers)}")
    emulator.setup()
    binary = aarch64.build_tests()
    run = aarch64.run_tests(binary, emulator.rootfs(), cpu="cortex-a76")
    passed, failed = summary(run.stdout)
    assert run.returncode == 0 and failed == 0 and passed > 150, run.stdout[-3000:]
    assert "simd path neon" in run.stdout
