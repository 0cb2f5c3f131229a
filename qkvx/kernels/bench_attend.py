"""Microbenchmark: ONE layer's decode attention (one query token) at the paper's width, d = 1024,
16 heads of 64, reading a cache of 1k..32k tokens. Not a test.

    python -m qkvx.kernels.bench_attend [--contexts 1024,4096,16384,32768] [--threads 1,2]
                                        [--rounds 7] [--markdown FILE]

Rows: qkvx::attend on a [1, G, S, D] cache (K=V fp32 / fp16 / int8, K=V + RoPE rotated while
read, separate K and V, MQA), and ExecuTorch's llama::custom_sdpa on the equivalent [1, S, H, D]
caches (K=V: the same tensor as keys and values; K=V + RoPE as a .pte does it today: the prefix
rotated into a transient, then custom_sdpa). Every cache is filled with random values before
timing, in numpy-allocated memory (transparent huge pages where the OS has them). qkvx is called
through its C ABI (ctypes, views built once); custom_sdpa through torch.ops. Thread counts set
ExecuTorch's threadpool, which both kernels use (and torch's intra-op threads for the RoPE
transient).

GB/s = bytes of cache the call must read (rows 0..S-1 of every cache tensor, plus int8 scales;
RoPE tables not counted) / median time. "% stream" compares it with a single-thread streaming
read measured in the same run (numpy sum over a 1 GiB float32 array, once per round). "CPU ms" is
the CPU time of all the process's threads per call: on a shared host, wall time well above it
(1 thread) or above half of it (2 threads) means the threads waited for a core. Cases and thread
counts are interleaved round by round and medians reported.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

H, D = 16, 64  # d = 1024


@dataclass
class Case:
    name: str
    run: Callable[[], object]
    nbytes: int
    times: dict[int, list[float]] = field(default_factory=dict)  # threads -> seconds per call
    cpu: dict[int, list[float]] = field(default_factory=dict)  # threads -> process CPU s per call


def _qkvx_case(name, q, k, v=None, ks=None, vs=None, cos=None, sin=None) -> Case:
    import qkvx.kernels as K
    from qkvx.kernels import _abi

    out = torch.empty_like(q)
    S = k.shape[2]
    views = [
        _abi.view("bench", n, t)
        for n, t in zip("q k v ks vs cos sin".split(), (q, k, v, ks, vs, cos, sin), strict=False)
    ]
    ov = _abi.view("bench", "out", out)
    args = [_abi.ref(x) for x in views] + [S - 1, _abi.ref(ov)]
    f, clib = K._clib.qkvx_attend, K._clib

    def run():
        if f(*args) != 0:
            raise RuntimeError(clib.qkvx_last_error().decode())

    keep = (q, k, v, ks, vs, cos, sin, out)  # the views point into these
    run.keep = keep  # type: ignore[attr-defined]
    n = sum(t.numel() * t.element_size() for t in (k, v, ks, vs) if t is not None)
    return Case(name, run, n)


def _llama_case(name, q, k, v) -> Case:
    S = k.shape[1]

    def run():
        return torch.ops.llama.custom_sdpa(q, k, v, S - 1, None, 0.0, True)

    n = k.numel() * k.element_size() * (1 if v is k else 2)
    return Case(name, run, n)


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t in memory numpy allocated: numpy advises transparent huge pages for
    large arrays, as the kernels do for a .pte's caches on their first write and as the streaming
    read below has them, so the GB/s compare like with like."""
    return torch.from_numpy(np.empty(tuple(t.shape), dtype=t.numpy().dtype)).copy_(t)


def make_cases(S: int, gen: torch.Generator, with_llama: bool) -> list[Case]:
    from qkvx.models.attention import Rope
    from qkvx.quant.kv import quantize_int8

    q = torch.randn(1, 1, H, D, generator=gen)
    kv = on_huge_pages(torch.randn(1, H, S, D, generator=gen))  # G = H: a kv head per query head
    kv16 = on_huge_pages(kv.half())
    kv8, s8 = (on_huge_pages(t) for t in quantize_int8(kv))
    other = on_huge_pages(torch.randn(1, H, S, D, generator=gen))
    mqa = on_huge_pages(torch.randn(1, 1, S, D, generator=gen))
    rope = Rope(D, S, 10000.0)
    cos, sin = rope.cos.contiguous(), rope.sin.contiguous()
    cases = [
        _qkvx_case("qkvx K=V fp32", q, kv),
        _qkvx_case("qkvx K=V fp16", q, kv16),
        _qkvx_case("qkvx K=V int8", q, kv8, ks=s8),
        _qkvx_case("qkvx K=V fp32 + RoPE", q, kv, cos=cos, sin=sin),
        _qkvx_case("qkvx K=V int8 + RoPE", q, kv8, ks=s8, cos=cos, sin=sin),
        _qkvx_case("qkvx K,V fp32", q, kv, v=other),
        _qkvx_case("qkvx MQA K=V fp32", q, mqa),
    ]
    if with_llama:
        lk = on_huge_pages(kv.transpose(1, 2))  # [1, S, H, D]
        lv = on_huge_pages(other.transpose(1, 2))
        cases += [
            _llama_case("llama custom_sdpa K=V fp32", q, lk, lk),
            _llama_case("llama custom_sdpa K,V fp32", q, lk, lv),
        ]
    return cases


def stream_bandwidth(a: np.ndarray, passes: int = 3) -> float:
    """Bytes/s of the best of `passes` single-threaded passes summing `a` (numpy's sum runs on one
    thread; the best pass, as STREAM reports, since one pass can lose its core for a while)."""
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def time_call(run: Callable[[], object], min_time: float) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all this process's threads) per call."""
    run()  # warm: pool threads awake, pages mapped
    t = time.perf_counter()
    run()
    one = time.perf_counter() - t
    n = max(1, math.ceil(min_time / max(one, 1e-7)))
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        run()
    return (time.perf_counter() - t) / n, (time.process_time() - c) / n


def set_threads(n: int) -> None:
    import qkvx.kernels as K

    if K.set_num_threads(n) != n:
        raise RuntimeError(f"could not set the threadpool to {n} threads")


class QuietNativeStderr:
    """ExecuTorch's C++ logging writes to fd 2 (custom_sdpa run eagerly logs a line per call);
    silence it while timing. `write` still reaches the real stderr."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        return self

    def write(self, msg: str) -> None:
        os.write(self.saved, (msg + "\n").encode())

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def bench(
    contexts: list[int], threads: list[int], rounds: int, min_time: float, with_llama: bool, log=print
) -> tuple[list[dict], list[float]]:
    import qkvx.kernels  # noqa: F401  (builds / loads the kernels)

    if with_llama:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama::custom_sdpa)
    big = np.ones(256 * 1024 * 1024, dtype=np.float32)  # 1 GiB, every page written
    streams: list[float] = []
    rows: list[dict] = []
    rng = random.Random(0)
    for S in contexts:
        cases = make_cases(S, torch.Generator().manual_seed(S), with_llama)
        for r in range(rounds):
            streams.append(stream_bandwidth(big))
            order = [(c, t) for c in cases for t in threads]
            rng.shuffle(order)
            for case, t in order:
                set_threads(t)
                wall, cpu = time_call(case.run, min_time)
                case.times.setdefault(t, []).append(wall)
                case.cpu.setdefault(t, []).append(cpu)
            log(f"  context {S}: round {r + 1}/{rounds} done")
        for case in cases:
            for t in threads:
                med = statistics.median(case.times[t])
                rows.append(
                    dict(
                        context=S,
                        variant=case.name,
                        threads=t,
                        ms=med * 1e3,
                        cpu_ms=statistics.median(case.cpu[t]) * 1e3,
                        gbs=case.nbytes / med / 1e9,
                        nbytes=case.nbytes,
                        spread=(min(case.times[t]) * 1e3, max(case.times[t]) * 1e3),
                    )
                )
        del cases
    return rows, streams


def render(rows: list[dict], streams: list[float], threads: list[int]) -> str:
    stream = statistics.median(streams) / 1e9
    lines = [
        f"Single-thread streaming read (numpy sum, 1 GiB): median {stream:.1f} GB/s "
        f"(min {min(streams) / 1e9:.1f}, max {max(streams) / 1e9:.1f}, {len(streams)} samples)",
        "",
        "| context | variant | threads | ms (median) | ms min..max | CPU ms | GB/s of cache | % "
        "stream | x vs 1 thread |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    one = {(r["context"], r["variant"]): r["ms"] for r in rows if r["threads"] == 1}
    for r in rows:
        base = one.get((r["context"], r["variant"]))
        speedup = f"{base / r['ms']:.2f}" if base and r["threads"] != 1 else ""
        lines.append(
            f"| {r['context']} | {r['variant']} | {r['threads']} | {r['ms']:.3f} | "
            f"{r['spread'][0]:.3f}..{r['spread'][1]:.3f} | {r['cpu_ms']:.3f} | {r['gbs']:.1f} | "
            f"{100 * r['gbs'] / stream:.0f} % | {speedup} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m qkvx.kernels.bench_attend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.03, help="seconds of calls per measurement")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama::custom_sdpa rows")
    ap.add_argument("--markdown", help="also write the table to this file")
    a = ap.parse_args(argv)
    contexts = [int(x) for x in a.contexts.split(",")]
    threads = [int(x) for x in a.threads.split(",")]
    import qkvx.kernels as K

    with QuietNativeStderr() as quiet:
        quiet.write(f"qkvx attention path: {K.simd_path()}; load average before: {os.getloadavg()}")
        rows, streams = bench(contexts, threads, a.rounds, a.min_time, not a.no_llama, log=quiet.write)
        quiet.write(f"load average after: {os.getloadavg()}")
    text = render(rows, streams, threads)
    print(text)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
