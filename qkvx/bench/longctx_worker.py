"""One long-context artifact, measured in THIS (fresh) process (qkvx.bench.longctx starts it):

    python -m qkvx.bench.longctx_worker '{"format": "pte", "path": ..., "contexts": [...],
                                          "threads": [1, 2], "steps": 8, "profile": true}'
    python -m qkvx.bench.longctx_worker '{"format": "stream"}'
    python -m qkvx.bench.longctx_worker '{"format": "serve", "serve": "pte", "path": ..., "threads": 1,
                                          "read_mib": 256}'

Prints one JSON line: {"ms": {threads: {context: median ms/token}}, "profile": {context: parts}};
"serve" answers step commands instead (serve()).

Every cache position a step reads holds real values, on pages that were written: a .pte carries
its cache's initial state (random values, copied into the planned cache at load); an ONNX past is
filled with random values and each step's present is written by onnxruntime. A step's cost does
not depend on the values (no kernel branches on them), so steps at c - steps .. c - 1 measure
context c without a c-token prefill.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _time_steps(decode, steps: int) -> float:
    """Median ms of `steps` single-token steps; the first two warm caches and are dropped."""
    token, times = 1, []
    for _ in range(steps):
        t0 = time.perf_counter()
        token = decode(token)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[2:])


# The cores this process may use, as it started (before any pinning).
_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def pin_threads(n: int) -> None:
    """With n > 1, each thread of this process on one core: the main thread on the first allowed
    core, every other thread (ExecuTorch's pool workers among them) on the next ones in turn; with
    n = 1, every thread back on all allowed cores. Why: alternated with another process's steps
    (longctx.alternate_workers), the 2-thread step often ran as if on one core (its CPU time equal
    to its wall time) while the other core idled, consistent with the scheduler waking the pool
    worker onto its main thread's core and keeping it there. Steps back to back (a partner whose
    steps take no time, as in an app's decode loop) never showed it; pinning, as llama.cpp's
    --cpu-strict does, rules it out. Linux only (elsewhere a no-op)."""
    if _CORES is None:
        return
    tids = sorted(int(t) for t in os.listdir("/proc/self/task"))
    if n == 1 or len(_CORES) < 2:
        for t in tids:
            os.sched_setaffinity(t, _CORES)
        return
    main = os.getpid()
    os.sched_setaffinity(main, {_CORES[0]})
    others = [t for t in tids if t != main]
    for i, t in enumerate(others):
        os.sched_setaffinity(t, {_CORES[1 + i % (len(_CORES) - 1)]})


class _Pte:
    """The program is loaded again for each thread count: XNNPACK keeps the threadpool it was
    created with, and resizing ExecuTorch's pool under a loaded program leaves it a freed pool.
    Its threads are pinned (pin_threads)."""

    def __init__(self, path: Path):
        self.path, self.runner = path, None

    def set_threads(self, n: int) -> None:
        import qkvx.kernels as K

        self.runner = None  # the old program goes before the pool it was created with
        if K.set_num_threads(n) != n:  # ExecuTorch's pool: XNNPACK's and the kernels'
            raise RuntimeError(f"ExecuTorch's threadpool refused {n} threads")
        self.load()
        pin_threads(n)

    def load(self) -> None:
        """Load the program on the pool as it is now."""
        from qkvx.harness.runners import open_runner

        self.runner = open_runner("pte", self.path)
        self.runner.prefill(np.arange(4) % 256)  # first-call allocations, XNNPACK weight packing

    def seek(self, pos: int) -> None:
        self.runner.pos = pos

    def decode(self, token: int) -> int:
        return int(self.runner.decode(token).argmax())


class _Onnx:
    """One session per thread count (onnxruntime fixes intra-op threads at session creation)."""

    def __init__(self, path: Path, threads: list[int]):
        from qkvx.harness.ort import ort_session
        from qkvx.harness.ort_feed import OrtStepper

        self.steppers = {t: OrtStepper(ort_session(path, threads=t)) for t in threads}
        self.rng = np.random.default_rng(0)
        for s in self.steppers.values():
            s.reset()
            s.step(np.arange(4) % 256)  # first-call allocations, weight prepacking

    def set_threads(self, n: int) -> None:
        self.stepper = self.steppers[n]

    def seek(self, pos: int) -> None:
        s = self.stepper
        past = {
            n: self.rng.standard_normal((1, h, pos, d)).astype(dt) for n, ((h, d), dt) in s.shapes.items()
        }
        s.load_past(past, pos)

    def decode(self, token: int) -> int:
        return int(self.stepper.step(np.array([token]))[-1].argmax())


def measure(fmt: str, path: Path, contexts: list[int], threads: list[int], steps: int) -> dict:
    rt = _Pte(path) if fmt == "pte" else _Onnx(path, threads)
    ms: dict[str, dict[str, float]] = {str(t): {} for t in threads}
    for t in threads:
        rt.set_threads(t)
        for c in contexts:
            rt.seek(c - steps)
            ms[str(t)][str(c)] = _time_steps(rt.decode, steps)
    return ms


class _Read:
    """Not an artifact: each step reads a freshly written array of `mib` MiB (torch.sum; every page
    written), the control beside a step's 1 vs 2 threads (what a second core adds to the memory
    bandwidth at those moments) and read_gbs's reader."""

    def __init__(self, mib: int):
        import torch

        self.torch, self.a = torch, torch.ones(mib * 1024 * 1024 // 4, dtype=torch.float32)

    def set_threads(self, n: int) -> None:
        self.torch.set_num_threads(n)

    def seek(self, pos: int) -> None:
        pass

    def decode(self, token: int) -> int:
        return int(self.a.sum() > 0)


def serve(fmt: str, path: Path, threads: int, read_mib: int) -> None:
    """Hold one artifact loaded on `threads` threads and answer commands on stdin, one per line, so
    that a parent can alternate the steps of two such processes (longctx.alternate) and both see
    the same moments of a noisy machine: "seek POS" -> "ok" (the next step writes position POS),
    "step" -> the step's ms (timed here: no pipe in it), "quit"."""
    answers = os.fdopen(os.dup(1), "w")  # the protocol's own stream; what libraries print goes
    os.dup2(2, 1)  # to stderr instead of between answers
    rt = _Pte(path) if fmt == "pte" else _Onnx(path, [threads]) if fmt == "onnx" else _Read(read_mib)
    rt.set_threads(threads)

    def say(text: str) -> None:
        answers.write(text + "\n")
        answers.flush()

    say("ready")
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "seek":
            rt.seek(int(cmd[1]))
            say("ok")
        elif cmd[0] == "step":
            t = time.perf_counter()
            rt.decode(1)
            say(f"{(time.perf_counter() - t) * 1e3:.6f}")
        else:
            return


def stream_gbs() -> float:
    """Single-thread streaming read of a freshly written 1 GiB array, GB/s. In a fresh process:
    an array kept in the parent across rounds was paged out while the workers mapped their
    programs, and read at a tenth of the speed."""
    from qkvx.kernels.bench_attend import stream_bandwidth

    big = np.ones(256 * 1024 * 1024, dtype=np.float32)  # every page written
    return stream_bandwidth(big) / 1e9


def read_gbs(passes: int = 3) -> dict[str, float]:
    """Reading a freshly written 1 GiB array with torch.sum on 1 and on 2 threads (the 2-thread sum
    splits the array in halves), the best of `passes` each, alternated, GB/s: a vectorized read as
    fast as the step's own kernels on one core (numpy's pairwise sum is slower), so read 2 / read 1
    is what a second core adds to the memory bandwidth, the bound of a memory-bound step's
    2-thread speedup."""
    read, best = _Read(1024), {1: 0.0, 2: 0.0}
    for p in range(passes):
        for n in (1, 2) if p % 2 == 0 else (2, 1):
            read.set_threads(n)
            t = time.perf_counter()
            read.decode(1)
            best[n] = max(best[n], read.a.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return {str(n): gbs for n, gbs in best.items()}


def main(argv: list[str]) -> int:
    a = json.loads(argv[0])
    if a["format"] == "stream":
        print(json.dumps({"stream_gbs": stream_gbs(), "read_gbs": read_gbs()}))
        return 0
    if a["format"] == "serve":
        serve(a["serve"], Path(a["path"]), a["threads"], a["read_mib"])
        return 0
    path, contexts = Path(a["path"]), a["contexts"]
    out: dict = {"ms": measure(a["format"], path, contexts, a["threads"], a["steps"])}
    if a["format"] == "pte" and a.get("profile"):
        from qkvx.bench.profile import profile_pte

        # The bound its attention's read rate is compared with, measured in this process right
        # before (a round's own stream read is minutes away on a machine whose speed drifts).
        out["stream_gbs"] = stream_gbs()
        out["profile"] = {str(c): profile_pte(path, c, a["steps"]) for c in contexts}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
