"""`qkvx bench`: decode speed, prefill, memory and export cost of every variant on every backend,
measured side by side in one run (suite.py says what; worker.py how; report.py what it means).

This 2-core machine is noisy, so every configuration runs in a FRESH process (no warm allocator or
thread pool carried over), configurations are interleaved (alternating order per repeat) and each
figure is the median over repeats with its spread; ratios are between medians of the same run.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qkvx.bench.artifacts import artifact_path, prepare, run_measured
from qkvx.bench.render import to_markdown
from qkvx.bench.report import summarize
from qkvx.bench.suite import BACKENDS, CONTEXTS, PREFILL_TOKENS, SIZES, VARIANTS, Config, configs

__all__ = ["run_bench", "to_markdown", "configs", "Config"]


def run_bench(
    out: str | Path = "bench_out",
    sizes=tuple(SIZES),
    variants=VARIANTS,
    backends=tuple(BACKENDS),
    contexts: tuple[int, ...] = CONTEXTS,
    repeats: int = 3,
    steps: int = 16,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build (or reuse) every artifact, measure every configuration `repeats` times in fresh
    interleaved processes, write OUT/bench.json and OUT/bench.md; returns the result."""
    from qkvx.devices import measure_bandwidth

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = configs(sizes, variants, backends)
    max_seq = max(contexts)
    progress(f"{len(cfgs)} configurations; building models and exports under {out}/models")
    exports = prepare(out, cfgs, progress)
    paths = {cfg: artifact_path(out, cfg) for cfg in cfgs}
    bandwidth = measure_bandwidth()
    points: dict[Config, list[dict]] = {cfg: [] for cfg in cfgs}
    for r in range(repeats):
        for cfg in cfgs if r % 2 == 0 else cfgs[::-1]:
            arg = json.dumps(
                {
                    "backend": cfg.backend,
                    "path": str(paths[cfg]),
                    "contexts": list(contexts),
                    "steps": steps,
                    "prefill_tokens": PREFILL_TOKENS,
                    "max_seq_len": max_seq,
                }
            )
            points[cfg].append(
                json.loads(
                    run_measured([sys.executable, "-m", "qkvx.bench.worker", arg])["stdout"]
                    .strip()
                    .splitlines()[-1]
                )
            )
        progress(f"  repeat {r + 1}/{repeats} done ({(time.perf_counter() - t_start) / 60:.1f} min)")
    profiles = {}  # where the .pte's decode time goes at the largest context (ExecuTorch ETDump)
    for cfg in (c for c in cfgs if c.backend == "pte-fp32"):
        run = run_measured([sys.executable, "-m", "qkvx.bench.profile", str(paths[cfg]), str(max_seq)])
        profiles[cfg.key] = json.loads(run["stdout"].strip().splitlines()[-1])
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "steps": steps,
        "prefill_tokens": PREFILL_TOKENS,
        "pte_profiles": profiles,
    }
    result = summarize(
        points, exports, paths, contexts, max(bandwidth, measure_bandwidth.__wrapped__()), meta
    )
    result["wall_minutes"] = (time.perf_counter() - t_start) / 60
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(to_markdown(result))
    return result


def machine() -> str:
    """One line naming the CPU, cores, RAM and Python: timings depend on the host."""
    import os

    from qkvx.util import proc_fields

    fields = proc_fields()
    name = fields.get("model name", "unknown CPU")
    if "cpu family" in fields:  # a VM's model name can be generic; family / model tell the core
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cores = f"{os.cpu_count()} cores, {mem:.0f} GiB RAM"
    return f"{platform.machine()} {name}, {cores}, Python {platform.python_version()}"
