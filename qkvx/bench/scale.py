"""The paper's real checkpoints at their real sizes, end to end, the way a user runs qkvx on them:
release-format training checkpoints (random weights, AdamW state included) through inspect,
export (with a tokenizer), generate and validate; wall time and peak RSS of every step.

    python -m qkvx.bench.scale --out DIR [--parts memory,e2e,1.2b]

memory  paper-300m Q-K=V: the file, and `qkvx inspect` / `qkvx export --no-validate` (pte-fp32,
        onnx-fp32) peak RSS minus the interpreter's baseline (the same imports, no model), against
        the weights' bytes: the optimizer state (2x the weights) must never be read.
e2e     paper-300m Q-K=V and Q-MQA: export pte-8da4w-kv8 and onnx-int4-kv8 with a BPE tokenizer,
        generate 32 tokens from a text prompt, validate.
1.2b    paper-1.2b Q-GQA-8: export to .pte and ONNX.

Every step is its own process (qkvx.bench.artifacts.run_measured: the child's own VmHWM). A
benchmark, not a test: it writes ~20 GB of checkpoints and takes about an hour.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qkvx.bench.artifacts import QKVX, run_measured

PROMPT = "The default value of the"
RECIPES_E2E = ("pte-8da4w-kv8", "onnx-int4-kv8")
RECIPES_BIG = ("pte-8da4w-kv8", "onnx-int4-kv8")
# What each command imports before it touches a model: its baseline RSS.
BASELINE = {
    "inspect": "import torch, qkvx.loaders, qkvx.api",
    "pte": "import torch, qkvx.loaders, qkvx.api, qkvx.export.executorch, qkvx.quant.weights, "
    "executorch.exir, executorch.backends.xnnpack.partition.xnnpack_partitioner, torchao.quantization; "
    "import executorch.extension.llm.custom_ops.custom_ops",
    "onnx": "import torch, qkvx.loaders, qkvx.api, qkvx.export.onnx, onnx, onnx_ir, onnxscript, "
    "torch.onnx, onnxruntime",
}


def train_tokenizer(path: Path, vocab_size: int = 50257) -> Path:
    """A byte-level BPE (GPT-2's recipe) trained on Python's help texts, with <|endoftext|>: the
    paper's models use GPT-2's tokenizer, which this machine cannot download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from qkvx.corpus import corpus_bytes

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = corpus_bytes().decode("utf-8")
    tok.train_from_iterator(
        [text[i : i + 4096] for i in range(0, len(text), 4096)],
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def write(path: Path, variant: str, scale: str) -> dict:
    """A release training checkpoint of `variant` at `scale` (300m | 1.2b) in its own process."""
    preset = {"300m": {}, "1.2b": dict(n_layer=22, n_embd=2048, n_head=32, n_inner=8192)}[scale]
    code = (
        "import sys, json; from qkvx.bench.release import write_checkpoint as w; "
        "w(sys.argv[1], sys.argv[2], scale=sys.argv[3], **json.loads(sys.argv[4]))"
    )
    r = run_measured([sys.executable, "-c", code, path, variant, scale, json.dumps(preset)])
    return {"step": f"write {scale} {variant} checkpoint", **_cost(r), "file_bytes": path.stat().st_size}


def _cost(r: dict) -> dict:
    return {"seconds": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"]}


def _weights_bytes(ckpt: Path) -> int:
    out = run_measured([*QKVX, "inspect", ckpt, "--json"])
    return 4 * json.loads(out["stdout"])["params"]


def memory(out: Path) -> dict:
    ckpt = out / "300m-q_kv" / "checkpoint_step_7000.pt"
    rows = [] if ckpt.exists() else [write(ckpt, "Q-K=V", "300m")]
    weights = _weights_bytes(ckpt)
    base = {k: run_measured([sys.executable, "-c", code])["peak_rss_bytes"] for k, code in BASELINE.items()}
    for name, cmd, kind in (
        ("qkvx inspect", ["inspect", ckpt], "inspect"),
        (
            "qkvx export pte-8da4w --no-validate",
            [
                "export",
                ckpt,
                "-r",
                "pte-8da4w",
                "-o",
                out / "300m-q_kv" / "pte-8da4w",
                "--force",
                "--no-validate",
            ],
            "pte",
        ),
        (
            "qkvx export pte-fp32 --no-validate",
            [
                "export",
                ckpt,
                "-r",
                "pte-fp32",
                "-o",
                out / "300m-q_kv" / "pte-fp32",
                "--force",
                "--no-validate",
            ],
            "pte",
        ),
        (
            "qkvx export onnx-fp32 --no-validate",
            [
                "export",
                ckpt,
                "-r",
                "onnx-fp32",
                "-o",
                out / "300m-q_kv" / "onnx-fp32",
                "--force",
                "--no-validate",
            ],
            "onnx",
        ),
    ):
        r = run_measured([*QKVX, *cmd])
        rows.append(
            {
                "step": name,
                **_cost(r),
                "baseline_rss_bytes": base[kind],
                "over_weights": (r["peak_rss_bytes"] - base[kind]) / weights,
            }
        )
    return {"checkpoint_bytes": ckpt.stat().st_size, "weights_bytes": weights, "rows": rows}


def end_to_end(
    out: Path, tokenizer: Path, variants=("Q-K=V", "Q-MQA"), scale: str = "300m", recipes=RECIPES_E2E
) -> list[dict]:
    rows = []
    for variant in variants:
        folder = out / f"{scale}-{variant.lower().replace('=', '_').replace('-', '_')}"
        ckpt = folder / "checkpoint_step_7000.pt"
        if not ckpt.exists():
            rows.append(write(ckpt, variant, scale))
        for recipe in recipes:
            export_dir = folder / recipe
            r = run_measured(
                [
                    *QKVX,
                    "export",
                    ckpt,
                    "-r",
                    recipe,
                    "-o",
                    export_dir,
                    "--force",
                    "--no-validate",
                    "--tokenizer",
                    tokenizer,
                ]
            )
            rows.append(
                {
                    "step": f"{scale} {variant} export {recipe}",
                    **_cost(r),
                    "artifact_bytes": sum(p.stat().st_size for p in export_dir.iterdir()),
                }
            )
            r = run_measured([*QKVX, "generate", export_dir, "-p", PROMPT, "-n", "32"])
            rows.append(
                {
                    "step": f"{scale} {variant} generate 32 ({recipe})",
                    **_cost(r),
                    "output": r["stdout"].strip()[:120],
                }
            )
            r = run_measured(
                [*QKVX, "validate", export_dir, "--json", folder / f"validate-{recipe}.json"], check=False
            )
            v = (
                json.loads((folder / f"validate-{recipe}.json").read_text())
                if r["returncode"] in (0, 1)
                else {}
            )
            rows.append(
                {
                    "step": f"{scale} {variant} validate {recipe}",
                    **_cost(r),
                    "exit": r["returncode"],
                    "runtimes": v.get("runtimes", {}),
                }
            )
    return rows


def to_markdown(result: dict) -> str:
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    lines = []
    if "memory" in result:
        m = result["memory"]
        lines += [
            f"paper-300m Q-K=V training checkpoint: {gb(m['checkpoint_bytes'])} on disk, weights "
            f"{gb(m['weights_bytes'])} (fp32)",
            "",
            "| step | wall time | peak RSS | baseline | (peak - baseline) / weights |",
            "|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            extra = (
                f"{gb(r['baseline_rss_bytes'])} | {r['over_weights']:.2f}x"
                if "over_weights" in r
                else "- | -"
            )
            lines.append(f"| {r['step']} | {r['seconds']:.0f} s | {gb(r['peak_rss_bytes'])} | {extra} |")
        lines.append("")
    for part in ("e2e", "1.2b"):
        if part not in result:
            continue
        lines += ["| step | wall time | peak RSS | result |", "|---|---|---|---|"]
        for r in result[part]:
            lines.append(f"| {r['step']} | {r['seconds']:.0f} s | {gb(r['peak_rss_bytes'])} | {_what(r)} |")
        lines.append("")
    return "\n".join(lines)


def _what(r: dict) -> str:
    if "file_bytes" in r:
        return f"{gb_(r['file_bytes'])} file"
    if "artifact_bytes" in r:
        return f"{gb_(r['artifact_bytes'])} written"
    if "runtimes" in r:
        parts = [
            f"{n}: top-1 {p['top1_agreement']:.3f}, "
            f"{'pass' if p['passed'] else 'FAIL ' + ','.join(p['failed'])}"
            for n, p in r["runtimes"].items()
        ]
        return "; ".join(parts) or f"exit {r['exit']}"
    return r.get("output", "").replace("|", "\\|").replace("\n", " ")[:80]


def gb_(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="memory,e2e,1.2b")
    a = ap.parse_args(argv)
    parts = a.parts.split(",")
    result: dict = {}
    tokenizer = a.out / "tokenizer" / "tokenizer.json"
    if not tokenizer.exists() and {"e2e", "1.2b"} & set(parts):
        train_tokenizer(tokenizer)
    if "memory" in parts:
        result["memory"] = memory(a.out)
    if "e2e" in parts:
        result["e2e"] = end_to_end(a.out, tokenizer)
    if "1.2b" in parts:
        result["1.2b"] = end_to_end(a.out, tokenizer, ("Q-GQA-8",), "1.2b", RECIPES_BIG)
    (a.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(to_markdown(result))


if __name__ == "__main__":
    main()
