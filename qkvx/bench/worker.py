"""One bench configuration, measured in THIS (fresh) process: `python -m qkvx.bench.worker CONFIG_JSON`.

1. prefill: a 512-token prompt from an empty cache, timed once after a short warm-up -> tokens/s;
2. decode: at each context c, `steps` single-token steps at positions c-steps .. c-1, timed one by
   one -> median ms/token (the first 2 steps warm caches and are dropped).
The decode steps start at position c-steps without prefilling c tokens first: a step's cost depends
only on how many cache positions it reads, not on what they hold (no kernel here branches on the
data), so cache positions are set, not computed. That keeps each process short enough to measure
every configuration several times in fresh processes within the 30-minute budget.
One thread for every backend: on this shared 2-core machine two XNNPACK threads swung 3x run to run.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from qkvx.bench.peak import vm_hwm


class _Ort:
    """onnxruntime via ort_feed.OrtStepper: qkvx's graphs and optimum's share the naming contract."""

    def __init__(self, path: Path, optimize: bool = True, io_binding: bool = False):
        from qkvx.harness.ort import ort_session
        from qkvx.harness.ort_feed import IoBoundStepper, OrtStepper

        session = ort_session(path, threads=1, optimize=optimize)
        self.stepper = IoBoundStepper(session) if io_binding else OrtStepper(session)

    def prefill(self, tokens: np.ndarray) -> None:
        self.stepper.reset()
        self.stepper.step(tokens)

    def seek(self, pos: int) -> None:
        s = self.stepper
        s.load_past({n: np.zeros((1, h, pos, d), dt) for n, ((h, d), dt) in s.shapes.items()}, pos)

    def decode(self, token: int) -> int:
        return int(self.stepper.step(np.array([token]))[-1].argmax())


class _Torch:
    """A qkvx Runner (eager-kv over the checkpoint, or the .pte through ExecuTorch)."""

    def __init__(self, backend: str, path: Path, max_seq_len: int):
        from qkvx.harness.runners import one_thread_runner

        if backend.startswith("pte"):  # pte-fp32, pte-8da4w
            self.runner = one_thread_runner("pte", path)
        else:
            self.runner = one_thread_runner("eager-kv", path, max_seq_len=max_seq_len)

    def prefill(self, tokens: np.ndarray) -> None:
        self.runner.reset()
        self.runner.prefill(tokens)

    def seek(self, pos: int) -> None:
        self.runner.pos = pos

    def decode(self, token: int) -> int:
        return int(self.runner.decode(token).argmax())


class _EagerCat:
    """Eager PyTorch with a past/present cache in plain ops: qkvx's ONNX decode form run eagerly,
    concatenating each step's new rows onto the cache (the way Hugging Face's eager generate does)."""

    def __init__(self, path: Path):
        import torch

        from qkvx.decode import OnnxDecodeModel
        from qkvx.harness.runners import one_thread
        from qkvx.loaders import load

        one_thread("eager")

        self.torch = torch
        self.model = OnnxDecodeModel(load(path)).eval()
        spec, layout = self.model.spec, self.model.layout
        self.shape, self.n = (1, spec.n_kv_head, 0, spec.head_dim), spec.n_layer * layout.tensors_per_layer

    def seek(self, pos: int) -> None:
        b, g, _, d = self.shape
        self.past, self.pos = [self.torch.zeros(b, g, pos, d) for _ in range(self.n)], pos

    def _run(self, tokens) -> "np.ndarray":
        t = self.torch
        ids = t.as_tensor(np.asarray(tokens), dtype=t.long)[None]
        T = ids.shape[1]
        with t.no_grad():
            logits, *self.past = self.model(
                ids, t.ones(1, self.pos + T, dtype=t.long), t.arange(self.pos, self.pos + T)[None], *self.past
            )
        self.pos += T
        return logits[0]

    def prefill(self, tokens: np.ndarray) -> None:
        self.seek(0)
        self._run(tokens)

    def decode(self, token: int) -> int:
        return int(self._run([token])[-1].argmax())


def measure(
    backend: str, path: Path, contexts: list[int], steps: int, prefill_tokens: int, max_seq_len: int
) -> dict:
    from qkvx.bench.suite import BACKENDS

    b = BACKENDS[backend]
    if b.format == "onnx":
        rt = _Ort(path, b.ort_optimize, b.io_binding)
    else:
        rt = _EagerCat(path) if backend == "eager-cat" else _Torch(backend, path, max_seq_len)
    prompt = np.random.default_rng(0).integers(0, 256, prefill_tokens)
    rt.prefill(prompt[:16])  # warm-up: first-call allocations and weight packing
    t0 = time.perf_counter()
    rt.prefill(prompt)
    prefill_s = time.perf_counter() - t0
    decode = {}
    for c in contexts:
        rt.seek(c - steps)
        token, times = 1, []
        for _ in range(steps):
            t0 = time.perf_counter()
            token = rt.decode(token)
            times.append((time.perf_counter() - t0) * 1e3)
        decode[str(c)] = statistics.median(times[2:])
    return {
        "prefill_tokens_per_s": prefill_tokens / prefill_s,
        "decode_ms": decode,
        "peak_rss_bytes": vm_hwm(),
    }


if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    print(
        json.dumps(
            measure(
                a["backend"],
                Path(a["path"]),
                a["contexts"],
                a["steps"],
                a["prefill_tokens"],
                a["max_seq_len"],
            )
        )
    )
