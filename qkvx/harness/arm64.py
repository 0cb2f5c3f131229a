"""arm64 runner: an artifact on an emulated arm64 CPU. model.onnx runs through onnxruntime's
aarch64 build, model.pte through ExecuTorch's aarch64 C++ runtime (qkvx-run with XNNPACK and
qkvx's kernels, cross-built by the emulator's setup).

Host code cannot call into an emulated process, so the runner starts ONE child inside the emulator
(qkvx.harness.emulator: qemu-aarch64-static -cpu MODEL) and talks to it over pipes in the frame
protocol of arm64_driver.py (qkvx.harness.child): for ONNX arm64_driver.py itself in Debian's
arm64 python3, keeping the past / present cache between calls exactly as the host onnxruntime
runner does (both use ort_feed.OrtStepper); for a .pte `qkvx-run --serve`, as pte-native does on
the host. Emulation costs time, not accuracy: the numbers are those of the arm64 kernels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qkvx.errors import QkvxError
from qkvx.harness import emulator
from qkvx.harness.child import ChildRunner
from qkvx.harness.runners import register

DEFAULT_CPU = "cortex-a76"
DRIVER = Path(__file__).with_name("arm64_driver.py")  # ort_feed.py next to it is importable too


def onnx_max_seq_len(path: Path) -> int:
    """qkvx.max_seq_len from the graph's metadata, else qkvx.spec max_positions (weights not read)."""
    import onnx

    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as e:  # protobuf raises DecodeError and others on a corrupt file
        raise QkvxError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    if "qkvx.spec" not in meta:
        raise QkvxError(f"{path}: not a qkvx ONNX export (no qkvx.spec in its metadata_props)")
    if "qkvx.max_seq_len" in meta:
        return int(meta["qkvx.max_seq_len"])
    return int(json.loads(meta["qkvx.spec"])["max_positions"])


@register("arm64", formats=("onnx", "pte"))
class Arm64Runner(ChildRunner):
    """model.onnx or model.pte on an emulated arm64 core: `cpu` (a qemu -cpu model), else the
    `device` profile's qemu_cpu, else Cortex-A76. threads: onnxruntime intra-op threads / the size
    of ExecuTorch's thread pool inside the emulator; 1 by default, since qemu-user runs guest
    threads on host cores and a tiny graph only pays the sync."""

    def __init__(
        self,
        path: str | Path,
        *,
        cpu: str | None = None,
        device: str | None = None,
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        **options: Any,
    ):
        super().__init__(path)
        self.path = Path(path).resolve()
        self.pte = self.path.suffix == ".pte"
        if not self.path.is_file():
            raise QkvxError(f"{self.path}: no such {'.pte' if self.pte else 'ONNX'} file")
        if not self.pte:
            from qkvx.export.ortops import uses_custom_ops

            if uses_custom_ops(self.path):
                raise QkvxError(
                    f"{self.path}: runtime 'arm64' cannot run it: its qkvx.CachedAttention op library "
                    f"is built for the host only (export with onnx-fp32 or onnx-fp32-rotary for arm64)"
                )
        if cpu is None and device is not None:
            from qkvx.devices import load_device

            profile = load_device(device)
            if not profile.qemu_cpu:
                raise QkvxError(
                    f"device {profile.name!r} is not an arm64 target (its profile has no qemu_cpu)"
                )
            cpu = profile.qemu_cpu
        self.cpu = cpu or DEFAULT_CPU
        self.threads, self.cache_dir = threads or 1, cache_dir
        self.runtime = f"arm64 {'ExecuTorch' if self.pte else 'onnxruntime'} ({self.cpu})"
        self.host = f"arm64 emulator ({self.cpu})"
        if not self.pte:
            self.max_seq_len = onnx_max_seq_len(self.path)
            self.prefill_chunk = self.max_seq_len  # one graph for any past length, as on the host
        self.info: dict = {}
        self._start()
        if self.pte:  # the program's constant methods, read by qkvx-run
            self.max_seq_len, self.prefill_chunk = self.info["max_seq_len"], self.info["prefill_chunk"]

    def _start(self) -> None:
        emulator.require(self.cache_dir, pte=self.pte)  # one line saying how to fix it
        super()._start()

    def _command(self) -> list[str]:
        if self.pte:
            argv = [str(self.path), "--serve", "--threads", str(self.threads)]
            return emulator.command(
                argv, self.cpu, self.cache_dir, program=emulator.pte_runner(self.cache_dir)
            )
        return emulator.command([str(DRIVER), str(self.path), str(self.threads)], self.cpu, self.cache_dir)

    def _env(self) -> dict[str, str]:
        return emulator.env()
