"""Long-context ONNX decode: ms/token at 1k / 4k / 16k for QKV, Q-K=V and Q-MQA in the GPT
(learned positions) and Llama (RoPE) families, for each ONNX attention graph.

    python -m qkvx.bench.longctx --out DIR [--attention plain,mha,...] [--rounds 3]

A paper-300m-wide model (d 1024, 16 heads, head_dim 64), 4 layers, vocab 256, max_positions
16384, random weights, fp32, one onnxruntime thread. Every (family, variant, attention) is exported
once, then measured `rounds` times, each time in a fresh process, the configurations interleaved
(round 1 runs every one before round 2 starts): the machine is shared and noisy, so the median over
rounds is reported. A decode step's cost depends only on how many cache positions it reads (no
kernel branches on the data), so each context's steps start from a zero past of c - steps
positions, as qkvx.bench.worker does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

WIDTH = dict(n_layer=4, n_embd=1024, n_head=16, vocab_size=256, max_positions=16384)
FAMILIES = ("gpt", "llama")
VARIANTS = ("QKV", "Q-K=V", "Q-MQA")
CONTEXTS = (1024, 4096, 16384)


def spec_for(family: str, variant: str, **overrides):
    from qkvx.spec import ModelSpec

    return ModelSpec.for_family(family, variant, **{**WIDTH, "n_inner": 4 * WIDTH["n_embd"], **overrides})


def export_one(family: str, variant: str, attention: str, out: Path, **overrides) -> Path:
    from qkvx.export.onnx import export_onnx
    from qkvx.models.transformer import Transformer

    model = Transformer(spec_for(family, variant, **overrides)).init_weights(0).eval()
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, out, attention=attention)
    return out / "model.onnx"


def measure_one(path: Path, contexts, steps: int) -> dict:
    """In this process: per context, `steps` single-token decode steps; median ms of all but the
    first two (they warm caches)."""
    import numpy as np

    from qkvx.bench.worker import _Ort

    rt = _Ort(path)
    rt.prefill(np.arange(16) % 256)  # first-call allocations, weight prepacking
    out = {}
    for c in contexts:
        rt.seek(c - steps)
        token, times = 1, []
        for _ in range(steps):
            t0 = time.perf_counter()
            token = rt.decode(token)
            times.append((time.perf_counter() - t0) * 1e3)
        out[str(c)] = statistics.median(times[2:])
    return out


def run(
    out: Path,
    attentions,
    families=FAMILIES,
    variants=VARIANTS,
    contexts=CONTEXTS,
    rounds: int = 3,
    steps: int = 10,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    configs = []
    for attention in attentions:
        for family in families:
            for variant in variants:
                d = out / "models" / f"{family}-{variant.replace('=', '')}-{attention}"
                if not (d / "model.onnx").exists():
                    t0 = time.perf_counter()
                    export_one(family, variant, attention, d)
                    print(f"exported {d.name} in {time.perf_counter() - t0:.0f} s", flush=True)
                configs.append((family, variant, attention, d / "model.onnx"))
    runs: dict = {}
    for r in range(rounds):
        for family, variant, attention, path in configs:
            cmd = [
                sys.executable,
                "-m",
                "qkvx.bench.longctx",
                "--one",
                str(path),
                "--contexts",
                ",".join(map(str, contexts)),
                "--steps",
                str(steps),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            ms = json.loads(res.stdout.strip().splitlines()[-1])
            runs.setdefault(f"{family}/{variant}/{attention}", []).append(ms)
            print(
                f"round {r + 1} {family} {variant} {attention}: "
                + " ".join(f"{c}={v:.1f}" for c, v in ms.items()),
                flush=True,
            )
    result = {key: {c: statistics.median(m[c] for m in ms) for c in ms[0]} for key, ms in runs.items()}
    (out / "longctx.json").write_text(json.dumps({"median_ms": result, "runs": runs}, indent=2) + "\n")
    return runs


def _ratio(runs: dict, base: str, key: str, c: str) -> float | None:
    """Median over rounds of base ms / key ms, each round's pair measured minutes apart at most."""
    if base not in runs:
        return None
    return statistics.median(b[c] / k[c] for b, k in zip(runs[base], runs[key], strict=False))


def to_markdown(runs: dict) -> str:
    contexts = list(next(iter(runs.values()))[0])
    lines = [
        "| family | variant | attention | " + " | ".join(f"{int(c):,}" for c in contexts) + " |",
        "|---|---|---|" + "---|" * len(contexts),
    ]
    for key, ms in runs.items():
        family, variant, attention = key.split("/")
        cells = []
        for c in contexts:
            cell = f"{statistics.median(m[c] for m in ms):.1f}"
            same, plain = (_ratio(runs, f"{family}/QKV/{a}", key, c) for a in (attention, "plain"))
            if variant != "QKV" and same is not None:
                cell += f" ({same:.2f}x"
                cell += f", {plain:.2f}x)" if attention != "plain" and plain is not None else ")"
            elif variant == "QKV" and attention != "plain" and plain is not None:
                cell += f" ({plain:.2f}x)"
            cells.append(cell)
        lines.append(f"| {family} | {variant} | {attention} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "ms/token, median over rounds. (a, b): a = QKV ms / this ms with the same attention graph, "
        "b = QKV ms on the plain graph / this ms; each the median over rounds of that round's ratio.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--attention", default="plain")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # worker: measure one model.onnx
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    if a.one:
        print(json.dumps(measure_one(a.one, contexts, a.steps)))
    else:
        res = run(
            a.out,
            a.attention.split(","),
            a.families.split(","),
            a.variants.split(","),
            contexts,
            a.rounds,
            a.steps,
        )
        print(to_markdown(res))
