"""Where a .pte's decode step spends its time, from ExecuTorch's own ETDump (devtools Inspector):
`python -m qkvx.bench.profile MODEL.pte CONTEXT [STEPS]` prints JSON, ms per decode step by part.

Parts: attention over the cache (qkvx::attend, or llama::custom_sdpa / custom_quantized_sdpa),
cache writes (qkvx::update_cache(_int8) or llama::update_cache), the XNNPACK delegate (every
Linear, norms and GELU it took), and the portable ops left outside it. Each is the sum over the
graph's instances of their median per step.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

PARTS = {
    "attention": ("attend", "custom_sdpa", "custom_quantized_sdpa"),
    "cache write": ("update_cache",),
    "XNNPACK delegate (Linear, ...)": ("DELEGATE_CALL",),
}


def profile_pte(path: str | Path, context: int, steps: int = 12) -> dict[str, float]:
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib as pl

    from qkvx.decode import load_kernels
    from qkvx.harness.runners import one_thread

    load_kernels()
    one_thread("pte")
    module = pl._load_for_executorch(str(path), enable_etdump=True, debug_buffer_size=0)
    for i in range(steps):  # decode steps ending at position context - 1 (content does not change cost)
        module.forward([torch.tensor([[1]]), torch.tensor([context - steps + i])])
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "etdump.etdp"
        module.write_etdump_result_to_file(str(dump))
        blocks = [b for b in Inspector(etdump_path=str(dump)).event_blocks if b.name == "Execute"]
    per_event: dict[str, float] = {}
    for ev in blocks[0].events:
        if ev.perf_data is not None:
            raw = ev.perf_data.raw[2:] or ev.perf_data.raw  # drop warm-up steps
            per_event.setdefault(ev.name, 0.0)
            per_event[ev.name] += statistics.median(raw)
    total = per_event.get("Method::execute", 0.0)
    parts = {
        part: sum(ms for name, ms in per_event.items() if any(k in name for k in keys))
        for part, keys in PARTS.items()
    }
    portable = sum(
        ms
        for name, ms in per_event.items()
        if name.startswith("native_call_") and not any(k in name for keys in PARTS.values() for k in keys)
    )
    parts["portable ops (outside XNNPACK)"] = portable
    parts["runtime overhead"] = max(0.0, total - sum(parts.values()))
    return {"total_ms": total, "parts_ms": parts}


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(profile_pte(a[0], int(a[1]), int(a[2]) if len(a) > 2 else 12)))
