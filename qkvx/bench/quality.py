"""Quantization quality: every recipe on trained models, and on random-weight ones, through the
same validation the gates use; the measurements the quantized recipes' gates are set from.

    python -m qkvx.bench.quality --out DIR [--windows 32]

Trained models: the demo's Q-K=V and QKV byte-level models (`qkvx train` defaults, seed 0; reused
when DIR already holds them). Random-weight models (near-flat logits, where most positions are near
ties): a LlamaForCausalLM built with transformers (2 layers, 2 kv heads, k_proj = v_proj, so it
loads as Q-GQA-2) and a paper-style GPT Q-K=V at the init's std. Each recipe is exported without
its gates, then validated: `windows` held-out windows of 128 tokens (16 prefilled, 112 decoded)
for the byte models, the same number of random-token windows otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RECIPES = (
    "onnx-fp32",
    "onnx-int8",
    "onnx-int4",
    "onnx-int4-kv8",
    "onnx-fp32-kv8",
    "pte-fp32",
    "pte-fp32-kv8",
    "pte-8da8w",
    "pte-8da4w",
    "pte-8da4w-kv8",
)
TRAINED = ("Q-K=V", "QKV")


def random_llama(out: Path) -> Path:
    """A transformers LlamaForCausalLM with random weights and k_proj = v_proj in every layer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.copy_(layer.self_attn.k_proj.weight)
    model.save_pretrained(out)
    return out


def random_gpt(out: Path) -> Path:
    from qkvx.loaders.native import save
    from qkvx.models.transformer import Transformer
    from qkvx.spec import ModelSpec

    if (out / "qkvx.json").exists():
        return out
    spec = ModelSpec.from_paper_name(
        "Q-K=V", n_layer=4, n_embd=128, n_head=4, vocab_size=256, max_positions=512
    )
    return save(Transformer(spec).init_weights(0), out)


def measure(model: Path, recipe: str, out: Path, windows: int) -> dict:
    from qkvx.pipeline import export_model as export
    from qkvx.recipes import load_recipe
    from qkvx.validate import validate

    if not (out / "manifest.json").exists():
        export(model, recipe, out, validate=False, force=True)
    v = validate(
        out, steps=112, windows=windows, gates=load_recipe(recipe).gates
    )  # the recipe's gates as they are now
    ((name, p),) = v.runtimes.items()
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "recipe": recipe,
        "artifact_bytes": sum(a["bytes"] for a in manifest["artifacts"]),
        "cache_bytes_per_token": manifest["cache"]["bytes_per_token"],
        "stream": v.stream["source"],
        **p,
    }


def run(out: Path, windows: int = 32, recipes=RECIPES, progress=print) -> list[dict]:
    from qkvx.train import trained_model

    models = {f"{v} (trained)": trained_model(out / "models", v, 0, report=progress) for v in TRAINED}
    models["Llama Q-GQA-2 (random)"] = random_llama(out / "models" / "llama_random")
    models["GPT Q-K=V (random)"] = random_gpt(out / "models" / "gpt_random")
    rows = []
    for label, folder in models.items():
        for recipe in recipes:
            row = {"model": label, **measure(folder, recipe, out / "exports" / folder.name / recipe, windows)}
            progress(
                f"{label:24} {recipe:14} top-1 {row['top1_agreement']:.3f} ({row['near_ties']} ties) "
                f"KL {row['kl_mean']:.2e} p99 {row['kl_p99']:.2e} gap noise p50 "
                f"{row['gap_noise_p50']:.3f} {'pass' if row['passed'] else row['failed']}"
            )
            rows.append(row)
    (out / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| model | recipe | artifact bytes | cache B/token | ppl (fp32 eager) | ppl change | top-1 "
        "| near ties "
        "| KL mean | KL p99 | top-2 gap noise (median) | gates |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = f"{r['ppl']:.3f} ({r['ppl_ref']:.3f})" if r["ppl"] is not None else "-"
        change = f"{100 * r['ppl_change']:+.2f} %" if r["ppl_change"] is not None else "-"
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['artifact_bytes']:,} | {r['cache_bytes_per_token']:,} | "
            f"{ppl} | {change} | {100 * r['top1_agreement']:.1f} % | {r['near_ties']} / {r['positions']} | "
            f"{r['kl_mean']:.2e} | {r['kl_p99']:.2e} | {r['gap_noise_p50']:.3f} | "
            f"{'pass' if r['passed'] else 'FAIL ' + ', '.join(r['failed'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    a = ap.parse_args()
    print(to_markdown(run(a.out, a.windows, tuple(a.recipes.split(",")))))
