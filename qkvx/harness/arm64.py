"""arm64 runner: model.onnx through onnxruntime's aarch64 build on an emulated arm64 CPU.

Host code cannot call into an emulated process, so the runner starts arm64_driver.py ONCE inside
the emulator (qkvx.harness.emulator: qemu-aarch64-static -cpu MODEL, Debian's arm64 python3) and
talks to it over pipes in the driver's frame protocol; the driver keeps the past / present cache
between calls exactly as the host onnxruntime runner does (both use ort_feed.OrtStepper).
Emulation costs time, not accuracy: the numbers are those of onnxruntime's arm64 kernels.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor

from qkvx.errors import QkvxError
from qkvx.harness import emulator
from qkvx.harness.arm64_driver import from_npy, read_frame, to_npy, write_frame
from qkvx.harness.runners import Runner, register

DEFAULT_CPU = "cortex-a76"
DRIVER = Path(__file__).with_name("arm64_driver.py")  # ort_feed.py next to it is importable too
START_TIMEOUT = 300.0  # seconds: importing onnxruntime under qemu takes a few, a loaded CI box more
STEP_TIMEOUT = 600.0


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


@register("arm64", formats=("onnx",))
class Arm64Runner(Runner):
    """model.onnx on an emulated arm64 core: `cpu` (a qemu -cpu model), else the `device` profile's
    qemu_cpu, else Cortex-A76. threads: onnxruntime intra-op threads inside the emulator; 1 by
    default, since qemu-user runs guest threads on host cores and a tiny graph only pays the sync."""

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
        threads = threads or 1
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise QkvxError(f"{self.path}: no such ONNX file")
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
        self.threads, self.cache_dir = threads, cache_dir
        self.max_seq_len = onnx_max_seq_len(self.path)
        self.prefill_chunk = self.max_seq_len  # one graph for any past length, as on the host
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self._start()

    # -- the driver process ------------------------------------------------------------------
    def _start(self) -> None:
        emulator.require(self.cache_dir)  # one line saying how to fix it, never a silent pass
        cmd = emulator.command([str(DRIVER), str(self.path), str(self.threads)], self.cpu, self.cache_dir)
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: nobody has to drain it
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=emulator.env()
        )
        kind, payload = self._recv(START_TIMEOUT, "starting")
        if kind != b"H":
            self.close()
            raise QkvxError(
                f"{self.path}: arm64 onnxruntime ({self.cpu}) cannot load this model: "
                f"{payload.decode(errors='replace')}"
            )
        self.info = json.loads(payload)

    def _recv(self, timeout: float, doing: str) -> tuple[bytes, bytes]:
        assert self.proc is not None and self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:  # strict request/response: nothing sits buffered
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout)
        try:
            frame = read_frame(self.proc.stdout) if ready else None
        except EOFError:  # the driver died mid-frame
            frame = None
        if frame is None:
            self._fail(f"no answer after {timeout:.0f} s" if not ready else "the driver exited", doing)
        return frame

    def _fail(self, what: str, doing: str) -> NoReturn:
        code = self.proc.poll() if self.proc else None
        tail = ""
        if getattr(self, "_stderr", None) is not None:
            self._stderr.seek(0)
            lines = [ln for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
            tail = f": {lines[-1].strip()[:300]}" if lines else ""
        self.close()
        raise QkvxError(
            f"{self.path}: arm64 emulator ({self.cpu}) {doing}: {what}"
            f"{f' (exit code {code})' if code is not None else ''}{tail}"
        )

    def _request(self, kind: bytes, payload: bytes, doing: str) -> tuple[bytes, bytes]:
        if self.proc is None:
            self._start()
        try:
            write_frame(self.proc.stdin, kind, payload)
        except (BrokenPipeError, OSError):
            self._fail("the driver exited", doing)
        return self._recv(STEP_TIMEOUT, doing)

    # -- Runner ------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        # An empty cache in the live driver (cheap) rather than a new process: a restart would pay
        # the emulated onnxruntime import (seconds) on every parity run, which calls reset first.
        if self.proc is not None and self.proc.poll() is None:
            kind, payload = self._request(b"R", b"", "resetting")
            if kind != b"K":
                self._fail(payload.decode(errors="replace"), "resetting")

    def _forward(self, tokens: Tensor) -> Tensor:
        ids = tokens.detach().cpu().numpy().astype(np.int64)
        kind, payload = self._request(
            b"S", to_npy(ids), f"running {len(ids)} token(s) at position {self.pos}"
        )
        if kind != b"L":
            raise QkvxError(
                f"{self.path}: arm64 onnxruntime ({self.cpu}) at position {self.pos}: "
                f"{payload.decode(errors='replace')}"
            )
        return torch.from_numpy(from_npy(payload))

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.stdin.close()  # EOF: the driver leaves its loop and exits
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> "Arm64Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass
