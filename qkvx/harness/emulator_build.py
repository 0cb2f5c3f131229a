"""Building the arm64 emulator of qkvx.harness.emulator (its setup() calls these): the Debian arm64
user land with the onnxruntime and numpy wheels, and the .pte runtime (qkvx-run cross-built against
ExecuTorch's aarch64 wheel, qkvx.kernels.aarch64). Each returns the stamp fields it vouches for
after an emulated smoke test; every failure is one QkvxError line saying how to fix it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

from qkvx.errors import QkvxError
from qkvx.harness.emulator import (
    FIX_SETUP,
    PINS,
    PYTHON,
    QEMU,
    SITE,
    SUITE,
    command,
    debian_mirror,
    env,
    rootfs,
    wanted,
)


def run(
    cmd: list[str],
    what: str,
    fix: str,
    log: Path | None = None,
    timeout: float = 600,
    environ: dict | None = None,
) -> str:
    try:
        p = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=environ or {**os.environ, "LC_ALL": "C"}
        )  # C: errors to match on
    except subprocess.TimeoutExpired:
        raise QkvxError(f"{what} timed out after {timeout:.0f} s: {fix}") from None
    if log:
        log.write_text(p.stdout + p.stderr)
    if p.returncode:
        lines = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
        why = next(
            (ln for ln in reversed(lines) if ln.startswith(("E:", "ERROR"))), lines[-1] if lines else ""
        )
        raise QkvxError(f"{what} failed ({why.strip()[:200]}): {fix}" + (f" (log: {log})" if log else ""))
    return p.stdout


def build_rootfs(cache: Path, mirror: str) -> None:
    part = cache / "rootfs.partial"
    shutil.rmtree(part, ignore_errors=True)
    run(
        [
            "debootstrap",
            "--arch=arm64",
            "--variant=minbase",
            "--foreign",
            "--include=python3",
            SUITE,
            str(part),
            mirror,
        ],
        f"debootstrap {SUITE} arm64 from {mirror}",
        "check the network, or set QKVX_DEBIAN_MIRROR to a reachable Debian mirror",
        cache / "debootstrap.log",
    )
    archives = part / "var/cache/apt/archives"
    for deb in sorted(archives.glob("*.deb")):  # the second stage's unpacking, done on the host
        # --skip-old-files: the first stage already unpacked the required set; --keep-directory-
        # symlink: keep the merged-/usr links (/bin -> usr/bin) that packages still ship paths under
        dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        tar = subprocess.run(
            ["tar", "--skip-old-files", "--keep-directory-symlink", "-xf", "-", "-C", str(part)],
            stdin=dpkg.stdout,
            capture_output=True,
            text=True,
        )
        dpkg.stdout.close()
        if dpkg.wait() or tar.returncode:
            raise QkvxError(f"unpacking {deb.name} failed ({tar.stderr.strip()[:200]}): {FIX_SETUP} --force")
        deb.unlink()
    if not (part / "usr/bin/python3").exists():
        raise QkvxError(f"debootstrap left no usr/bin/python3 in {part}: {FIX_SETUP} --force")
    shutil.rmtree(cache / "rootfs", ignore_errors=True)
    part.rename(cache / "rootfs")


def install_wheels(cache: Path, want: dict) -> None:
    wheels = cache / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    plats = [
        a
        for p in (
            "manylinux2014_aarch64",
            "manylinux_2_28_aarch64",
            "manylinux_2_27_aarch64",
            "manylinux_2_17_aarch64",
        )
        for a in ("--platform", p)
    ]
    reqs = [f"{d}=={want[d]}" for d in PINS]
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            *plats,
            "--python-version",
            PYTHON.replace(".", ""),
            "--implementation",
            "cp",
            "-d",
            str(wheels),
            *reqs,
        ],
        f"pip download of aarch64 wheels ({', '.join(reqs)})",
        "check access to PyPI (pip config / proxy)",
        cache / "pip.log",
    )
    site = rootfs(cache) / SITE
    shutil.rmtree(site, ignore_errors=True)  # ours alone: Debian's own packages live in usr/lib
    for whl in sorted(wheels.glob("*.whl")):  # a wheel is its site-packages tree, zipped
        zipfile.ZipFile(whl).extractall(site)
    shutil.rmtree(wheels)  # unpacked above; pip's own cache keeps them for a rebuild


def user_land(cache: Path, force: bool) -> dict:
    """Debian's arm64 python3 with the onnxruntime and numpy wheels; the stamp's fields."""
    t0 = time.perf_counter()
    want, mirror = wanted(), debian_mirror()
    if force or not (rootfs(cache) / "usr/bin/python3").exists():
        build_rootfs(cache, mirror)
    install_wheels(cache, want)
    probe = (
        "import json, platform, numpy, onnxruntime as o; print(json.dumps([platform.machine(), "
        "platform.python_version(), o.__version__, numpy.__version__]))"
    )
    out = run(
        command(["-c", probe], "cortex-a76", cache),
        "the emulated smoke test (import onnxruntime)",
        f"check that `unshare -m` works here (root with CAP_SYS_ADMIN), then {FIX_SETUP} --force",
        timeout=300,
        environ=env(),
    )
    machine, pyver, ort_v, np_v = json.loads(out.strip().splitlines()[-1])
    if machine != "aarch64" or (ort_v, np_v) != (want["onnxruntime"], want["numpy"]):
        raise QkvxError(
            f"emulated smoke test reports {machine} onnxruntime {ort_v} numpy {np_v}, "
            f"want aarch64 {want['onnxruntime']} {want['numpy']}: {FIX_SETUP} --force"
        )
    qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return {
        **want,
        "python": ".".join(pyver.split(".")[:2]),
        "python_full": pyver,
        "mirror": mirror,
        "qemu": qemu,
        "setup_seconds": round(time.perf_counter() - t0, 1),
    }


def pte_runtime(cache: Path, force: bool) -> dict:
    """The .pte runtime: ExecuTorch's aarch64 wheel (lib/ and include/ only, fetched with pip),
    qkvx's kernels and qkvx-run cross-built against it, then started under qemu; the stamp's
    fields."""
    from qkvx.kernels import aarch64  # its build errors are QkvxErrors: one line each

    t0 = time.perf_counter()
    if force:  # from scratch: the wheel's unpacked prefix and this tree's aarch64 build
        shutil.rmtree(aarch64.prefix_dir(cache).parent, ignore_errors=True)
        shutil.rmtree(aarch64.runner_binary(cache).parent, ignore_errors=True)
    binary = aarch64.build_runner(cache)
    out = run(
        command(["--help"], "cortex-a76", cache, program=binary),
        "the emulated smoke test (qkvx-run --help: ExecuTorch's aarch64 libraries load)",
        f"{FIX_SETUP} --force",
        timeout=300,
        environ=env(),
    )
    if not out.startswith("usage: qkvx-run"):
        raise QkvxError(f"emulated qkvx-run printed {out[:80]!r}, not its usage: {FIX_SETUP} --force")
    return {
        "executorch": metadata.version("executorch"),
        "pte_runner": str(binary),
        "pte_setup_seconds": round(time.perf_counter() - t0, 1),
    }
