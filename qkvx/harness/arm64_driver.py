"""The process inside the arm64 emulator: serves one model.onnx over stdin / stdout.

Run as a script by Debian's arm64 python3 under qemu-aarch64, where only numpy and onnxruntime
exist (the aarch64 torch wheel is a CUDA build): so this file and ort_feed.py import nothing else.
The host imports it too, for the frame helpers, so both ends speak from the same code.

    python3 arm64_driver.py MODEL.onnx [THREADS]

Protocol, one frame each way per request: a frame is 1 kind byte, an 8-byte little-endian payload
length, then the payload; arrays travel as .npy bytes (dtype and shape included, no pickle).
  driver -> host at start:  H {json: machine, versions, max_seq_len}   or E message
  host -> driver:           S npy int64 [T]  (append T tokens)   -> L npy float32 [T, vocab]
                            R                (reset the cache)     -> K
  any failure:                                                     -> E message (utf-8)
EOF on stdin ends the driver.
"""

from __future__ import annotations

import io
import json
import os
import platform
import struct
import sys

import numpy as np

try:  # on the host, as part of qkvx
    from qkvx.harness.ort_feed import OrtStepper
except ImportError:  # in the emulator: run as a script, ort_feed.py sits next to this file
    from ort_feed import OrtStepper  # type: ignore[no-redef]

_HEADER = struct.Struct("<cQ")


def write_frame(f, kind: bytes, payload: bytes = b"") -> None:
    f.write(_HEADER.pack(kind, len(payload)))
    f.write(payload)
    f.flush()


def read_frame(f) -> tuple[bytes, bytes] | None:
    """(kind, payload), or None at a clean EOF; a frame cut short raises EOFError."""
    head = f.read(_HEADER.size)
    if not head:
        return None
    if len(head) < _HEADER.size:
        raise EOFError("frame header cut short")
    kind, n = _HEADER.unpack(head)
    payload = f.read(n)
    if len(payload) < n:
        raise EOFError(f"frame payload cut short ({len(payload)} of {n} bytes)")
    return kind, payload


def to_npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def from_npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def _error(e: BaseException) -> bytes:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".encode()


def serve(model: str, threads: int, inp, out) -> int:
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # as on the host: ORT warns about every unused initializer
        if threads:
            opts.intra_op_num_threads = threads
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        stepper = OrtStepper(session)
    except Exception as e:  # the host turns this into one QkvxError line
        write_frame(out, b"E", _error(e))
        return 1
    hello = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "max_seq_len": stepper.max_seq_len,
    }
    write_frame(out, b"H", json.dumps(hello).encode())
    while (frame := read_frame(inp)) is not None:
        kind, payload = frame
        try:
            if kind == b"S":
                logits = stepper.step(from_npy(payload))
                write_frame(out, b"L", to_npy(logits.astype(np.float32, copy=False)))
            elif kind == b"R":
                stepper.reset()
                write_frame(out, b"K")
            else:
                raise ValueError(f"unknown request kind {kind!r}")
        except Exception as e:  # keep serving: the host decides whether to go on
            write_frame(out, b"E", _error(e))
    return 0


def main(argv: list[str]) -> int:
    # The protocol owns the real stdout; fd 1 is pointed at stderr so that anything a native
    # library prints cannot corrupt a frame.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    threads = int(argv[2]) if len(argv) > 2 else 0
    return serve(argv[1], threads, sys.stdin.buffer, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
