"""A runner whose runtime is a long-lived child process speaking arm64_driver's frame protocol:
the emulated onnxruntime driver (arm64_driver.py under qemu) and qkvx-run --serve (ExecuTorch's
C++ runtime, on the host or under qemu). One process per runner, not per call or per window: the
Runner interface hands out logits token by token, and a start costs what dozens of decode steps do
(qkvx-run: ~5 ms on the host, ~0.3-1 s under qemu; the emulated onnxruntime import: seconds).

Subclasses give the command, the environment and the names used in messages; this class starts
the child, waits for its hello, sends steps and resets with timeouts, and turns every failure
(an error frame, the child dying, no answer) into one QkvxError line.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import tempfile
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor

from qkvx.errors import QkvxError
from qkvx.harness.arm64_driver import from_npy, read_frame, to_npy, write_frame
from qkvx.harness.runners import Runner


class ChildRunner(Runner):
    """Subclasses set `runtime` (what computes: "arm64 onnxruntime (cortex-a76)") and `host`
    (what runs it: "arm64 emulator (cortex-a76)"), and implement _command / _env."""

    start_timeout = 300.0  # seconds: an emulated start takes a few, a loaded CI box more
    step_timeout = 600.0
    runtime = "child"
    host = "child process"

    proc: subprocess.Popen | None = None
    _stderr: Any = None

    def _command(self) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        return None

    def _start(self) -> None:
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: nobody has to drain it
        self.proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=self._env(),
        )
        kind, payload = self._recv(self.start_timeout, "starting")
        if kind != b"H":
            self.close()
            raise QkvxError(f"{self.path}: {self.runtime} cannot load this model: {self._message(payload)}")
        self.info: dict = json.loads(payload)

    def _message(self, payload: bytes) -> str:
        """The child's one-line message, without the path it may start with (ours says it)."""
        text = payload.decode(errors="replace").strip()
        return text.removeprefix(f"{self.path}: ")

    def _recv(self, timeout: float, doing: str) -> tuple[bytes, bytes]:
        assert self.proc is not None and self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:  # strict request/response: nothing sits buffered
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout)
        try:
            frame = read_frame(self.proc.stdout) if ready else None
        except EOFError:  # the child died mid-frame
            frame = None
        if frame is None:
            self._fail(f"no answer after {timeout:.0f} s" if not ready else "the process exited", doing)
        return frame

    def _fail(self, what: str, doing: str) -> NoReturn:
        proc = self.proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=5) if what == "the process exited" else proc.poll()
            except subprocess.TimeoutExpired:
                code = None
        tail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            lines = [ln for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
            tail = f": {lines[-1].strip()[:300]}" if lines else ""
        self.close()
        raise QkvxError(
            f"{self.path}: {self.host} {doing}: {what}"
            f"{f' (exit code {code})' if code is not None else ''}{tail}"
        )

    def _request(self, kind: bytes, payload: bytes, doing: str) -> tuple[bytes, bytes]:
        if self.proc is None:
            self._start()
        try:
            write_frame(self.proc.stdin, kind, payload)
        except (BrokenPipeError, OSError):
            self._fail("the process exited", doing)
        return self._recv(self.step_timeout, doing)

    # -- Runner ------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        # An empty cache in the live child (cheap) rather than a new process: parity runs call
        # reset first, and a restart would pay the start every time.
        if self.proc is not None and self.proc.poll() is None:
            kind, payload = self._request(b"R", b"", "resetting")
            if kind != b"K":
                self._fail(self._message(payload), "resetting")

    def _forward(self, tokens: Tensor) -> Tensor:
        ids = tokens.detach().cpu().numpy().astype(np.int64)
        kind, payload = self._request(
            b"S", to_npy(ids), f"running {len(ids)} token(s) at position {self.pos}"
        )
        if kind != b"L":
            raise QkvxError(f"{self.path}: {self.runtime} at position {self.pos}: {self._message(payload)}")
        return torch.from_numpy(from_npy(payload))

    def stats(self) -> dict:
        """The child's own report (qkvx-run: load_ms, prefill / decode tokens and ms, ms_per_token,
        peak_rss_kb); the onnxruntime driver has none and says so in a QkvxError."""
        kind, payload = self._request(b"T", b"", "reporting its timings")
        if kind != b"J":
            raise QkvxError(f"{self.path}: {self.runtime}: {self._message(payload)}")
        return json.loads(payload)

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.stdin.close()  # EOF: the child leaves its loop and exits
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> "ChildRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass
