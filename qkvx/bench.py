"""`qkvx bench`: decode speed of K=V vs QKV, side by side in one run, as medians with spread.

This 2-core machine is noisy, so every measurement runs in a FRESH process (no warm allocator or
thread pool carried over), configurations are interleaved (A, B, A, B, ...) and each figure is the
median over repeats; ratios are taken between medians of the same run. One thread for every backend:
two XNNPACK threads swung 3x between runs here, one was stable and no slower.
"""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

BENCH_DIMS = dict(n_layer=6, n_embd=512, n_head=8, vocab_size=256, max_positions=2048)  # ~19M params
VARIANTS = ("QKV", "Q-K=V")
BACKENDS = ("eager-kv", "pte")
CONTEXTS = (256, 1024, 2048)


@dataclass
class Point:
    backend: str
    variant: str
    context: int
    ms: list[float]  # one median per fresh process

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.ms), max(self.ms)


def prepare(out: Path, max_seq_len: int) -> dict[str, Path]:
    """Random-weight models of BENCH_DIMS per variant (native format) and their .pte exports."""
    import qkvx
    from qkvx.export.executorch import export_pte
    from qkvx.models.transformer import Transformer

    paths: dict[str, Path] = {}
    for variant in VARIANTS:
        folder = out / "models" / variant.replace("=", "").replace("-", "_").lower()
        pte = folder / f"model-{max_seq_len}.pte"
        if not pte.is_file():
            spec = qkvx.ModelSpec.from_paper_name(variant, **BENCH_DIMS)
            model = Transformer(spec).init_weights(0)
            qkvx.save(model, folder)
            t0 = time.perf_counter()
            data, _ = export_pte(model, max_seq_len, prefill_chunk=64)
            pte.write_bytes(data)
            print(f"  exported {variant} .pte in {time.perf_counter() - t0:.0f} s", flush=True)
        paths[variant] = folder
    return paths


def measure(backend: str, model_dir: Path, context: int, max_seq_len: int, steps: int) -> float:
    """In THIS process: fill the cache to `context - steps` tokens, then time `steps` single-token
    decode steps; return the median ms/token."""
    torch.set_num_threads(1)
    import qkvx
    from qkvx.harness.runners import get_runner

    if backend == "pte":
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(1)
        runner = get_runner("pte")(model_dir / f"model-{max_seq_len}.pte")
    else:
        runner = get_runner(backend)(qkvx.load(model_dir), max_seq_len)
    fill = context - steps
    g = torch.Generator().manual_seed(0)
    runner.prefill(torch.randint(0, 256, (fill,), generator=g))
    times = []
    token = 1
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = runner.decode(token)
        times.append((time.perf_counter() - t0) * 1e3)
        token = int(logits.argmax())
    return statistics.median(times[2:])  # the first steps warm caches


def _worker(args: list[str]) -> None:
    backend, model_dir, context, max_seq_len, steps = args
    ms = measure(backend, Path(model_dir), int(context), int(max_seq_len), int(steps))
    print(json.dumps({"ms": ms}))


def _fresh_process(backend: str, model_dir: Path, context: int, max_seq_len: int, steps: int) -> float:
    cmd = [sys.executable, "-m", "qkvx.bench", "--worker", backend, str(model_dir), str(context),
           str(max_seq_len), str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"bench worker failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["ms"]


def run_bench(out: str | Path = "bench_out", contexts: tuple[int, ...] = CONTEXTS, repeats: int = 5,
              steps: int = 24, progress=print) -> dict[str, Any]:
    """Measure every (backend, variant, context) `repeats` times in fresh, interleaved processes."""
    out = Path(out)
    max_seq_len = max(contexts)
    progress(f"preparing models ({BENCH_DIMS}) and .pte exports (max_seq_len {max_seq_len})")
    paths = prepare(out, max_seq_len)
    points = {(b, v, c): Point(b, v, c, []) for c in contexts for b in BACKENDS for v in VARIANTS}
    for r in range(repeats):
        order = list(points) if r % 2 == 0 else list(reversed(points))  # interleave, alternate order
        for b, v, c in order:
            points[(b, v, c)].ms.append(_fresh_process(b, paths[v], c, max_seq_len, steps))
        progress(f"  repeat {r + 1}/{repeats} done")
    result = _summarize(points, contexts)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(to_markdown(result))
    return result


def _summarize(points: dict, contexts) -> dict[str, Any]:
    from qkvx import ModelSpec, cache_layout

    rows = []
    for c in contexts:
        for b in BACKENDS:
            for v in VARIANTS:
                p = points[(b, v, c)]
                rows.append({**asdict(p), "median_ms": p.median, "min_ms": p.spread[0], "max_ms": p.spread[1]})
    med = {(r["backend"], r["variant"], r["context"]): r["median_ms"] for r in rows}
    ratios = []
    for c in contexts:
        ratios.append({
            "context": c,
            **{f"qkv_over_kv_{b}": med[(b, "QKV", c)] / med[(b, "Q-K=V", c)] for b in BACKENDS},
            **{f"eager_over_pte_{v}": med[("eager-kv", v, c)] / med[("pte", v, c)] for v in VARIANTS},
        })
    spec = ModelSpec.from_paper_name("QKV", **BENCH_DIMS)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {_cpu_name()}, {torch.get_num_threads()} cores visible, 1 thread used",
        "model": {**BENCH_DIMS, "params": spec.param_count()},
        "cache_bytes_per_token_fp32": {v: cache_layout(ModelSpec.from_paper_name(v, **BENCH_DIMS)).bytes_per_token
                                       for v in VARIANTS},
        "rows": rows,
        "ratios": ratios,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def to_markdown(result: dict[str, Any]) -> str:
    m = result["model"]
    lines = [f"Decode ms/token (median of {len(result['rows'][0]['ms'])} fresh processes, [min-max]); "
             f"{m['n_layer']} layers, width {m['n_embd']}, {m['n_head']} heads, {m['params'] / 1e6:.1f}M params, "
             f"fp32; {result['machine']}; {result['date']}.", "",
             "| context | backend | QKV | Q-K=V | QKV / Q-K=V |", "|---|---|---|---|---|"]
    rows = {(r["backend"], r["variant"], r["context"]): r for r in result["rows"]}
    for ratio in result["ratios"]:
        c = ratio["context"]
        for b in BACKENDS:
            cell = lambda v: f"{rows[(b, v, c)]['median_ms']:.2f} [{rows[(b, v, c)]['min_ms']:.2f}-{rows[(b, v, c)]['max_ms']:.2f}]"  # noqa: E731
            lines.append(f"| {c} | {b} | {cell('QKV')} | {cell('Q-K=V')} | {ratio[f'qkv_over_kv_{b}']:.2f}x |")
    lines += ["", "| context | eager / .pte (QKV) | eager / .pte (Q-K=V) |", "|---|---|---|"]
    for ratio in result["ratios"]:
        lines.append(f"| {ratio['context']} | {ratio['eager_over_pte_QKV']:.2f}x | {ratio['eager_over_pte_Q-K=V']:.2f}x |")
    kv = result["cache_bytes_per_token_fp32"]
    lines += ["", f"Cache bytes per token (fp32): QKV {kv['QKV']:,}, Q-K=V {kv['Q-K=V']:,}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
