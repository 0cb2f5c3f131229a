"""The arm64 emulator: Debian bookworm's arm64 python3.11 plus onnxruntime and numpy
aarch64 wheels from PyPI, run under qemu-aarch64-static, and a .pte runtime: qkvx-run and qkvx's
kernels cross-built with g++-aarch64-linux-gnu against ExecuTorch's aarch64 wheel (its lib/ and
include/ only, qkvx.kernels.aarch64). `python -m qkvx.harness.emulator setup|status`.

The user land is built without binfmt_misc (often not mounted in containers and CI sandboxes):
`debootstrap --foreign` downloads and resolves the packages, then the .debs are unpacked on the host
with dpkg-deb. No maintainer script has to run for python3 to work, so no second stage is needed,
and programs are started as `qemu-aarch64-static -L ROOTFS ROOTFS/usr/bin/python3` (qemu looks a
path up under ROOTFS first, then on the host: host files such as model.onnx stay reachable).

onnxruntime crashes at import under qemu-user unless /proc/cpuinfo describes an ARM CPU (qemu 7.2
passes the host's x86 text through), so every run is wrapped in a private mount namespace with an
ARM cpuinfo for the emulated core bind-mounted over /proc/cpuinfo: that needs root.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from qkvx.errors import QkvxError

DEFAULT_CACHE = Path("~/.cache/qkvx/arm64")
SUITE, PYTHON = "bookworm", "3.11"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
QEMU = "qemu-aarch64-static"
FIX_TOOLS = "apt-get install -y qemu-user-static debootstrap"
FIX_CROSS = "apt-get install -y g++-aarch64-linux-gnu cmake"  # the .pte runtime's cross build
FIX_SETUP = "qkvx emulator setup"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# Same versions as the host by default, so an arm64-vs-x86 difference is the ISA, not a release.
PINS = {"onnxruntime": "1.32.0", "numpy": "2.4.6"}
SITE = f"usr/local/lib/python{PYTHON}/dist-packages"  # on Debian python's sys.path, empty otherwise

# /proc/cpuinfo per qemu -cpu model as Linux prints it on that core: (implementer, variant, part,
# revision, features). cpuinfo (inside onnxruntime) reads the part to name the microarchitecture;
# the ISA features it really uses come from the auxv HWCAPs, which qemu sets from -cpu.
_V80 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
_V82 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
_V9 = (
    _V82.replace("asimdrdm lrcpc", "asimdrdm jscvt fcma lrcpc") + " sha3 sm3 sm4 sha512 sve asimdfhm dit"
    " uscat ilrcpc flagm ssbs sb paca pacg dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2"
    " frint svei8mm svebf16 i8mm bf16 dgh rng bti"
)
CORES = {
    "cortex-a35": (0x41, 0x0, 0xD04, 2, _V80),
    "cortex-a53": (0x41, 0x0, 0xD03, 4, _V80),
    "cortex-a57": (0x41, 0x1, 0xD07, 3, _V80),
    "cortex-a72": (0x41, 0x0, 0xD08, 3, _V80),
    "cortex-a76": (0x41, 0x4, 0xD0B, 1, _V82),
    "neoverse-n1": (0x41, 0x3, 0xD0C, 1, _V82 + " ssbs"),
    "a64fx": (0x46, 0x1, 0x001, 0, _V82.replace("aes pmull ", "").replace("dcpop asimddp", "fcma dcpop sve")),
    "max": (0x41, 0x0, 0xD4F, 0, _V9),  # shown as a Neoverse-V2 (Armv9.0), the ISA qemu's max reaches
}


@dataclass
class EmulatorInfo:
    ready: bool
    cache_dir: str
    missing: list[str] = field(default_factory=list)  # what is not there, each with how to fix it
    pte_missing: list[str] = field(default_factory=list)  # those of `missing` that only a .pte needs
    versions: dict = field(default_factory=dict)  # the stamp: suite, mirror, python, wheels, qemu
    action: str = "status"  # status | ready (setup was a no-op) | installed
    setup_seconds: float | None = None

    def summary(self) -> str:
        if not self.ready:
            return "arm64 emulator: not ready\n" + "\n".join(f"  - {m}" for m in self.missing)
        v = self.versions
        how = {
            "installed": f" (set up in {self.setup_seconds or 0:.0f} s)",
            "ready": " (already set up: nothing to do)",
        }.get(self.action, "")
        return (
            f"arm64 emulator: ready{how}: Debian {v.get('suite')} python {v.get('python')}, "
            f"onnxruntime {v.get('onnxruntime')}, numpy {v.get('numpy')}, "
            f"ExecuTorch {v.get('executorch')} (qkvx-run), {v.get('qemu')}; {self.cache_dir}"
        )


def _cache(cache_dir) -> Path:
    return Path(cache_dir if cache_dir is not None else DEFAULT_CACHE).expanduser().resolve()


def rootfs(cache_dir=None) -> Path:
    return _cache(cache_dir) / "rootfs"


def wanted() -> dict[str, str]:
    out = {"suite": SUITE, "python": PYTHON}
    for dist, pin in PINS.items():
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = pin
    return out


def tool_problems(need_debootstrap: bool) -> list[str]:
    """What this machine lacks to run the emulator, or with need_debootstrap to set it up."""
    out = []
    tools = [QEMU, "unshare"] + (["debootstrap", "dpkg-deb", "tar"] if need_debootstrap else [])
    if absent := [t for t in tools if not shutil.which(t)]:
        out.append(f"{', '.join(absent)} not found: {FIX_TOOLS}")
    if need_debootstrap and (
        absent := [t for t in ("aarch64-linux-gnu-g++", "cmake") if not shutil.which(t)]
    ):
        out.append(f"{', '.join(absent)} not found: {FIX_CROSS}")
    if need_debootstrap and not KEYRING.exists():
        out.append(f"{KEYRING} not found: apt-get install -y debian-archive-keyring")
    if os.geteuid() != 0:
        out.append(
            "not root: the emulator bind-mounts an ARM /proc/cpuinfo in a mount namespace "
            "(and debootstrap needs root); run as root"
        )
    return out


def status(cache_dir=None) -> EmulatorInfo:
    """What is there, without running anything: ready only when every piece is in place."""
    cache = _cache(cache_dir)
    missing = tool_problems(need_debootstrap=False)
    stamp_file = cache / "stamp.json"
    stamp = json.loads(stamp_file.read_text()) if stamp_file.exists() else {}
    if not (rootfs(cache) / "usr/bin/python3").exists() or not stamp:
        missing.append(f"no arm64 user land in {cache}: {FIX_SETUP}")
    else:
        if stale := [f"{k} {stamp.get(k)} (want {v})" for k, v in wanted().items() if stamp.get(k) != v]:
            missing.append(f"stale arm64 user land ({', '.join(stale)}): {FIX_SETUP}")
    pte_missing = []
    try:
        binary = pte_runner(cache)
    except QkvxError as e:  # no csrc/ (not a source checkout) or no executorch: say which
        pte_missing.append(f"no arm64 .pte runtime: {e}")
    else:
        if stamp.get("pte_runner") != str(binary) or not binary.exists():
            pte_missing.append(
                f"no arm64 .pte runtime for this source tree and executorch "
                f"{metadata.version('executorch')} (qkvx-run, built once by setup): {FIX_SETUP}"
            )
    return EmulatorInfo(
        ready=not missing and not pte_missing,
        cache_dir=str(cache),
        missing=missing + pte_missing,
        pte_missing=pte_missing,
        versions=stamp,
    )


def require(cache_dir=None, pte: bool = False) -> EmulatorInfo:
    """status(), raising one QkvxError line saying how to fix it when what an ONNX model (or, with
    pte, a .pte) needs is not ready."""
    info = status(cache_dir)
    problems = [m for m in info.missing if pte or m not in info.pte_missing]
    if problems:
        raise QkvxError(f"arm64 emulator not ready: {'; '.join(problems)}")
    return info


def pte_runner(cache_dir=None) -> Path:
    """qkvx-run cross-built for aarch64 from this source tree (what setup builds; may not exist)."""
    from qkvx.kernels import aarch64

    return aarch64.runner_binary(_cache(cache_dir))


def debian_mirror() -> str:
    """$QKVX_DEBIAN_MIRROR, else the first Debian (non-security) URI apt is configured with."""
    if os.environ.get("QKVX_DEBIAN_MIRROR"):
        return os.environ["QKVX_DEBIAN_MIRROR"]
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        if f.suffix not in (".list", ".sources", "") or not f.is_file():
            continue
        text = re.sub(r"#.*", "", f.read_text(errors="replace"))
        # one-line format: `deb [opts] URI suite ...`; deb822 format: `URIs: URI ...`
        uris = re.findall(r"^\s*deb\s+(?:\[[^]]*]\s+)?(\S+)", text, re.M) + [
            u for line in re.findall(r"^URIs:(.*)$", text, re.M) for u in line.split()
        ]
        for uri in uris:
            if "debian" in uri and "security" not in uri and "ubuntu" not in uri:
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def cpuinfo_text(cpu: str) -> str:
    """A /proc/cpuinfo for `cpu` (a qemu -cpu string: model[,feature=off...]), one entry per host
    processor (cpuinfo checks the count against /sys/devices/system/cpu, which qemu passes through)."""
    model, *opts = cpu.split(",")
    if model not in CORES:
        raise QkvxError(f"no /proc/cpuinfo text for qemu cpu {model!r}; known: {', '.join(CORES)}")
    impl, variant, part, rev, features = CORES[model]
    for off in (o.split("=")[0] for o in opts if o.endswith("=off")):  # e.g. max,sve=off
        features = " ".join(f for f in features.split() if not f.startswith(off))
    try:
        n = int(Path("/sys/devices/system/cpu/present").read_text().strip().split("-")[-1].split(",")[-1]) + 1
    except (OSError, ValueError):
        n = os.cpu_count() or 1
    return "".join(
        f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: {impl:#x}\n"
        f"CPU architecture: 8\nCPU variant\t: {variant:#x}\nCPU part\t: {part:#05x}\n"
        f"CPU revision\t: {rev}\n\n"
        for i in range(n)
    )


def command(
    argv: list[str], cpu: str = "cortex-a76", cache_dir=None, program: str | Path | None = None
) -> list[str]:
    """The host command running `program` (an aarch64 executable; default ROOTFS's python3) with
    `argv` on an emulated `cpu`."""
    cache = _cache(cache_dir)
    info = cache / "cpuinfo" / (re.sub(r"[^\w.-]", "_", cpu) + ".txt")
    text = cpuinfo_text(cpu)
    if not info.exists() or info.read_text() != text:
        info.parent.mkdir(parents=True, exist_ok=True)
        tmp = info.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, info)  # atomic: runners starting concurrently never see half a file
    root = rootfs(cache)
    # The mount lives in the new namespace only, and dies with the process.
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        'mount --bind "$1" /proc/cpuinfo && shift && exec "$@"',
        "sh",
        str(info),
        shutil.which(QEMU) or QEMU,
        "-cpu",
        cpu,
        "-L",
        str(root),
        str(program or root / "usr/bin/python3"),
        *argv,
    ]


def env() -> dict[str, str]:
    """A clean environment: the host's PYTHONPATH / venv would point python3 at x86 packages."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def setup(cache_dir=None, force: bool = False) -> EmulatorInfo:
    """Build (or confirm) the emulator; idempotent: when ready, a no-op reporting "ready". The
    user land (for ONNX) and the .pte runtime are set up each only when missing or stale."""
    from qkvx.harness import emulator_build  # imports this module: loaded only to build

    cache = _cache(cache_dir)
    if not force and (info := status(cache)).ready:
        info.action = "ready"
        return info
    if problems := tool_problems(need_debootstrap=True):
        raise QkvxError(f"cannot set up the arm64 emulator: {'; '.join(problems)}")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers: one builds, the others wait
        info = status(cache)
        if not force and info.ready:
            info.action = "ready"
            return info
        t0 = time.perf_counter()
        stamp_file = cache / "stamp.json"
        if force or [m for m in info.missing if m not in info.pte_missing]:
            stamp_file.unlink(missing_ok=True)  # not ready until everything below passed
            stamp = emulator_build.user_land(cache, force)
            stamp_file.write_text(json.dumps(stamp, indent=1) + "\n")
        stamp = json.loads(stamp_file.read_text())
        if force or info.pte_missing:
            stamp.update(emulator_build.pte_runtime(cache, force))
            stamp_file.write_text(json.dumps(stamp, indent=1) + "\n")
        seconds = round(time.perf_counter() - t0, 1)
    info = status(cache)
    info.action, info.setup_seconds = "installed", seconds
    return info


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m qkvx.harness.emulator", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["setup", "status"])
    ap.add_argument("--cache-dir", help=f"default {DEFAULT_CACHE}")
    ap.add_argument("--force", action="store_true", help="setup: rebuild from scratch")
    args = ap.parse_args(argv)
    try:
        info = setup(args.cache_dir, args.force) if args.command == "setup" else status(args.cache_dir)
    except QkvxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(info.summary())
    return 0 if info.ready else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
