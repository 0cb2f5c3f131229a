"""Export-at-scale benchmark: a paper-1.2b-shaped model (random weights, fp32, ~4.8 GB) through
`qkvx export --recipe onnx-fp32`, the way a user runs it; wall time and peak RSS of each step.

    python -m qkvx.bench.scale --out /tmp/scale [--preset paper-1.2b] [--variant Q-K=V]

Step 1 writes the checkpoint (built on the meta device, then filled one tensor at a time, so the
writer holds one copy); step 2 is the export in its own process (loaders build the model on the
meta device and take the loaded tensors as they are: one copy of the weights, see
Transformer.from_state). A benchmark, not a test: it needs ~5 GB of disk per copy and minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from qkvx.bench.artifacts import QKVX, run_measured


def write_random_checkpoint(preset: str, variant: str, out: Path, seed: int = 0) -> Path:
    """A native checkpoint of `preset` in `variant` form with GPT-2-style random weights."""
    import torch
    from safetensors.torch import save_file

    from qkvx.models.transformer import Transformer
    from qkvx.spec import ModelSpec

    spec = ModelSpec.from_paper_name(variant, preset=preset)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in Transformer(spec).state_dict().items()}
    if spec.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (shape, dtype) in shapes.items():
        if len(shape) >= 2:
            std = 0.02 / (math.sqrt(2 * spec.n_layer) if name.endswith(("o_proj.weight", "mlp.proj.weight")) else 1)
            state[name] = torch.randn(shape, generator=gen, dtype=dtype) * std
        else:
            state[name] = torch.ones(shape, dtype=dtype) if "norm" in name and name.endswith("weight") else torch.zeros(shape, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "qkvx.json").write_text(json.dumps({"spec": spec.to_dict(), "variant": spec.paper_name}, indent=2) + "\n")
    return out


# Step 3: the artifact runs: onnxruntime (1 thread) loads it, prefills 16 tokens, decodes 8.
_RUN_ONNX = """
import json, sys, time, numpy as np
from qkvx.harness.ort import ort_session
from qkvx.harness.ort_feed import OrtStepper
t0 = time.perf_counter(); s = OrtStepper(ort_session(sys.argv[1], threads=1)); load = time.perf_counter() - t0
logits = s.step(np.arange(16) + 100); times = []
for _ in range(8):
    t0 = time.perf_counter(); logits = s.step(np.array([int(logits[-1].argmax())])); times.append(time.perf_counter() - t0)
print(json.dumps({"load_s": load, "decode_ms": 1e3 * sorted(times)[4], "finite": bool(np.isfinite(logits).all())}))
"""


def run_scale(out: Path, preset: str = "paper-1.2b", variant: str = "Q-K=V", recipe: str = "onnx-fp32") -> dict:
    out = Path(out)
    ckpt, export_dir = out / "checkpoint", out / f"export-{recipe}"
    shutil.rmtree(export_dir, ignore_errors=True)
    code = "import sys; from pathlib import Path; from qkvx.bench.scale import write_random_checkpoint as w; " \
           "w(sys.argv[1], sys.argv[2], Path(sys.argv[3]))"
    write = run_measured([sys.executable, "-c", code, preset, variant, ckpt])
    export = run_measured([*QKVX, "export", ckpt, "--recipe", recipe, "--out", export_dir, "--no-validate"])
    files = {p.name: p.stat().st_size for p in export_dir.iterdir()}
    run = run_measured([sys.executable, "-c", _RUN_ONNX, export_dir / "model.onnx"])
    weights = (ckpt / "model.safetensors").stat().st_size
    result = {"preset": preset, "variant": variant, "recipe": recipe, "checkpoint_bytes": weights,
              "write_checkpoint": {k: write[k] for k in ("seconds", "peak_rss_bytes")},
              "export": {k: export[k] for k in ("seconds", "peak_rss_bytes")},
              "export_peak_rss_over_weights": export["peak_rss_bytes"] / weights, "artifact_files": files,
              "onnxruntime": {**json.loads(run["stdout"].strip().splitlines()[-1]),
                              **{k: run[k] for k in ("seconds", "peak_rss_bytes")}}}
    (out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def to_markdown(r: dict) -> str:
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    return "\n".join([
        f"{r['preset']} {r['variant']} (random weights, fp32 checkpoint {gb(r['checkpoint_bytes'])}), recipe {r['recipe']}:", "",
        "| step | wall time | peak RSS |", "|---|---|---|",
        f"| write checkpoint | {r['write_checkpoint']['seconds']:.0f} s | {gb(r['write_checkpoint']['peak_rss_bytes'])} |",
        f"| `qkvx export` | {r['export']['seconds']:.0f} s | {gb(r['export']['peak_rss_bytes'])} "
        f"({r['export_peak_rss_over_weights']:.2f}x the weights) |",
        f"| onnxruntime: load, prefill 16, decode 8 (1 thread) | {r['onnxruntime']['seconds']:.0f} s (load "
        f"{r['onnxruntime']['load_s']:.0f} s, decode {r['onnxruntime']['decode_ms']:.0f} ms/token) | "
        f"{gb(r['onnxruntime']['peak_rss_bytes'])} |", "",
        "Artifact files: " + ", ".join(f"{n} {gb(b)}" for n, b in sorted(r["artifact_files"].items())), ""])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="paper-1.2b")
    ap.add_argument("--variant", default="Q-K=V")
    ap.add_argument("--recipe", default="onnx-fp32")
    a = ap.parse_args()
    print(to_markdown(run_scale(a.out, a.preset, a.variant, a.recipe)))
