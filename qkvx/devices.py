"""Device profiles (devices/*.toml), validated; `host` is measured on this machine at load time.

A profile describes one real device: its SoC, CPU cores and ISA features, RAM, the memory
an app may really use there (`app_budget_bytes`, not total RAM), memory bandwidth, backends and the
qemu-aarch64 CPU model that emulates its cores. Every number carries a public source in `[sources]`
(field name -> "URL or document, and what it says"; estimates say `estimate: <derivation>`).

A field whose value is the string "measure" (only in a profile of kind "host") is filled in by
`measure_host()`: RAM from /proc/meminfo MemTotal, the app budget from MemAvailable, cores from
os.cpu_count(), ISA features from /proc/cpuinfo, bandwidth from a numpy copy benchmark (cached per process).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import time
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkvx.config import resolve_named_file, typed
from qkvx.errors import QkvxError
from qkvx.util import proc_fields

DEVICE_DIR = Path(__file__).resolve().parent.parent / "devices"
KINDS = ("phone", "sbc", "laptop", "desktop", "host")
BANDWIDTH_KINDS = ("theoretical", "measured")
BACKENDS = ("xnnpack", "onnxruntime-cpu", "coreml", "mps", "qnn", "vulkan", "cuda", "tensorrt")
MEASURE = "measure"
# Fields `measure_host()` can fill in, and the loader-owned field a profile file may not set.
MEASURABLE = (
    "soc",
    "cpu_cores",
    "cpu_core_types",
    "isa_features",
    "ram_bytes",
    "app_budget_bytes",
    "mem_bandwidth_bytes_per_s",
)
LOADER_OWNED = ("measured",)


@dataclass(frozen=True)
class DeviceProfile:
    name: str  # profile id, e.g. "raspberry-pi-5" (defaults to the file stem)
    device: str  # the product, e.g. "Raspberry Pi 5 Model B (8 GB)"
    kind: str  # phone | sbc | laptop | desktop | host
    soc: str
    cpu_cores: int
    cpu_core_types: str  # e.g. "1x Cortex-X4 + 3x Cortex-A720 + 4x Cortex-A520"
    isa_features: tuple[str, ...]  # e.g. ("armv9.2-a", "neon", "dotprod", "i8mm", "bf16")
    ram_bytes: int  # total RAM
    app_budget_bytes: int  # what one app can really use before the OS kills it
    mem_bandwidth_bytes_per_s: float
    mem_bandwidth_kind: str  # theoretical (bus width x data rate) | measured
    backends: tuple[str, ...]
    sources: Mapping[str, str]
    qemu_cpu: str | None = None  # qemu-aarch64 -cpu model; None: not an arm64 target
    description: str = ""
    measured: tuple[str, ...] = ()  # set by the loader: fields measured on this machine

    def __post_init__(self) -> None:
        src = f"device {self.name!r}"
        if self.kind not in KINDS:
            raise QkvxError(f"{src}: kind {self.kind!r} unknown; known: {', '.join(KINDS)}")
        if self.mem_bandwidth_kind not in BANDWIDTH_KINDS:
            raise QkvxError(
                f"{src}: mem_bandwidth_kind {self.mem_bandwidth_kind!r} unknown; "
                f"known: {', '.join(BANDWIDTH_KINDS)}"
            )
        for key in numeric_fields():
            if getattr(self, key) <= 0:
                raise QkvxError(f"{src}: {key} must be > 0, got {getattr(self, key)}")
        if self.app_budget_bytes >= self.ram_bytes:
            raise QkvxError(
                f"{src}: app_budget_bytes ({self.app_budget_bytes}) must be below "
                f"ram_bytes ({self.ram_bytes}): an app never gets all of the RAM"
            )
        for b in self.backends:
            if b not in BACKENDS:
                raise QkvxError(f"{src}: backend {b!r} unknown; known: {', '.join(BACKENDS)}")
        if not self.isa_features:
            raise QkvxError(f"{src}: isa_features is empty")

    @property
    def ram_gib(self) -> float:
        return self.ram_bytes / 2**30

    @property
    def app_budget_gib(self) -> float:
        return self.app_budget_bytes / 2**30

    @property
    def bandwidth_gb_s(self) -> float:
        return self.mem_bandwidth_bytes_per_s / 1e9

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["isa_features"], d["backends"] = list(self.isa_features), list(self.backends)
        d["sources"], d["measured"] = dict(self.sources), list(self.measured)
        return d


@functools.cache
def numeric_fields() -> tuple[str, ...]:
    """The profile fields that hold numbers: each needs a line in [sources]."""
    hints = typing.get_type_hints(DeviceProfile)
    return tuple(f.name for f in dataclasses.fields(DeviceProfile) if hints[f.name] in (int, float))


# ---------------------------------------------------------------- host measurement

# /proc/cpuinfo flag -> feature name used in the profiles (x86 "flags", arm64 "Features").
_ISA_FLAGS = {
    "x86_64": {
        "sse4_2": "sse4.2",
        "avx": "avx",
        "avx2": "avx2",
        "fma": "fma",
        "f16c": "f16c",
        "avx512f": "avx512f",
        "avx512bw": "avx512bw",
        "avx512vl": "avx512vl",
        "avx512_vnni": "avx512_vnni",
        "avx_vnni": "avx_vnni",
        "avx512_bf16": "avx512_bf16",
        "avx512_fp16": "avx512_fp16",
        "amx_tile": "amx_tile",
        "amx_int8": "amx_int8",
        "amx_bf16": "amx_bf16",
    },
    "aarch64": {
        "asimd": "neon",
        "fphp": "fp16",
        "asimddp": "dotprod",
        "i8mm": "i8mm",
        "bf16": "bf16",
        "sve": "sve",
        "sve2": "sve2",
        "sme": "sme",
        "sme2": "sme2",
    },
}


@functools.cache
def measure_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s: the best of `repeats` numpy copies of an `nbytes` array, counting
    read + write (STREAM "copy" convention). Cached per process; takes well under a second."""
    import numpy as np

    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def measure_host() -> dict[str, Any]:
    """This machine's measurable profile fields (see MEASURABLE)."""
    mem = proc_fields("/proc/meminfo")
    cpu = proc_fields("/proc/cpuinfo")
    arch = platform.machine()
    kib = lambda key: int(mem[key].split()[0]) * 1024 if key in mem else 0  # noqa: E731
    ram = kib("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    avail = kib("MemAvailable") or ram // 2
    cores = os.cpu_count() or 1
    model = cpu.get("model name") or cpu.get("Hardware") or platform.processor() or arch
    flags = set((cpu.get("flags") or cpu.get("Features") or "").split())
    isa = [arch] + [name for flag, name in _ISA_FLAGS.get(arch, {}).items() if flag in flags]
    return {
        "soc": model,
        "cpu_cores": cores,
        "cpu_core_types": f"{cores}x {model}",
        "isa_features": isa,
        "ram_bytes": ram,
        "app_budget_bytes": min(avail, ram - 1),
        "mem_bandwidth_bytes_per_s": measure_bandwidth(),
    }


# ---------------------------------------------------------------- loading


def _resolve_measured(data: dict[str, Any], where: str) -> tuple[str, ...]:
    """Replace "measure" values by measurements; only a host profile may ask for them."""
    wanted = tuple(k for k, v in data.items() if isinstance(v, str) and v == MEASURE)
    if not wanted:
        return ()
    if data.get("kind") != "host":
        raise QkvxError(
            f'{where}: key {wanted[0]!r} is "measure", which only a profile of kind "host" may use'
        )
    for key in wanted:
        if key not in MEASURABLE:
            raise QkvxError(f"{where}: key {key!r} cannot be measured; measurable: {', '.join(MEASURABLE)}")
    host = measure_host()
    data.update({k: host[k] for k in wanted})
    return wanted


def _check_sources(data: dict[str, Any], where: str) -> None:
    sources = data.get("sources")
    if not isinstance(sources, dict):
        return  # typed() names the missing or mistyped key
    names = {f.name for f in dataclasses.fields(DeviceProfile)} - set(LOADER_OWNED)
    for key, line in sources.items():
        if key not in names:
            raise QkvxError(f"{where}: [sources] has unknown key {key!r}; it must name a profile field")
        if not isinstance(line, str) or not line.strip():
            raise QkvxError(f"{where}: [sources] key {key!r} must be a non-empty string")
    for key in numeric_fields():
        if key in data and key not in sources:
            raise QkvxError(
                f'{where}: key {key!r} has no source: add {key} = "<URL or document, and '
                f'what it says>" to [sources]'
            )


def load_device(name_or_path: str | os.PathLike) -> DeviceProfile:
    """A device profile by name (devices/NAME.toml) or by path to a TOML file."""
    path = resolve_named_file(name_or_path, DEVICE_DIR, (".toml",), "device", "device profile")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise QkvxError(f"{path}: not valid TOML ({e})") from None
    where = str(path)
    data.setdefault("name", path.stem)
    _check_sources(data, where)  # before measuring: a broken file fails fast
    measured = _resolve_measured(data, where)
    try:
        profile = typed(DeviceProfile, data, where, hidden=LOADER_OWNED)
    except QkvxError as e:
        raise QkvxError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    return dataclasses.replace(profile, measured=measured) if measured else profile


def device_names() -> list[str]:
    return sorted(p.stem for p in DEVICE_DIR.glob("*.toml"))


def list_devices() -> list[DeviceProfile]:
    """Every shipped profile (host included, measured once per process)."""
    return [load_device(name) for name in device_names()]
