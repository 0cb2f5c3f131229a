"""The bench report as Markdown (README pastes it as is)."""

from __future__ import annotations

from typing import Any

from qkvx.bench.report import ratio_table
from qkvx.bench.suite import SIZES, spec_for
from qkvx.util import fmt_mib


def _cell(ms: dict) -> str:
    return f"{ms['median']:.2f} [{ms['min']:.2f}-{ms['max']:.2f}]"


def to_markdown(result: dict[str, Any]) -> str:
    ctx = result["contexts"]
    rows = result["rows"]
    reps = max(r["repeats"] for r in rows)
    out = [
        f"Measured {result['date']} on {result['machine']}; {reps} fresh processes per configuration, "
        f"interleaved; medians [min-max]; 1 thread; memory bandwidth (numpy copy) "
        f"{result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; whole run {result['wall_minutes']:.1f} min.",
        "",
    ]
    for size in [s for s in SIZES if any(r["size"] == s for r in rows)]:
        spec = spec_for(size, "QKV")
        out += [
            f"### {size}: {spec.n_layer} layers, width {spec.n_embd}, {spec.n_head} heads, "
            f"vocab {spec.vocab_size}, {spec.param_count() / 1e6:.1f}M parameters (random weights)",
            "",
            "| variant | backend | "
            + " | ".join(f"decode ms @{c}" for c in ctx)
            + f" | prefill 512 tok/s | % roofline @{ctx[-1]} | cache @{ctx[-1]} (artifact) | vs QKV "
            "fp16 | peak RSS |",
            "|---|---|" + "---|" * (len(ctx) + 5),
        ]
        for r in (r for r in rows if r["size"] == size):
            d = r["decode"][str(ctx[-1])]
            cache = "-" if d["artifact_cache_bytes"] is None else fmt_mib(d["artifact_cache_bytes"], 0)
            vs = "-" if d["cache_vs_qkv_fp16"] is None else f"{d['cache_vs_qkv_fp16']:.3f}"
            out.append(
                f"| {r['variant']} | {r['backend']} | "
                + " | ".join(_cell(r["decode"][str(c)]["ms"]) for c in ctx)
                + f" | {r['prefill_tokens_per_s']['median']:,.0f} | {100 * d['roofline_fraction']:.0f} % | "
                f"{cache} | {vs} | {fmt_mib(r['peak_rss_bytes'], 0)} |"
            )
        out.append("")
    out += ["### Ratios (medians of the same run)", ""]
    ratios = ratio_table(rows, ctx)
    keys = sorted({k for e in ratios for k in e if "/" in k}, key=lambda k: (k.split("/")[0], k))
    out += ["| size | context | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for e in ratios:
        out.append(
            f"| {e['size']} | {e['context']} | "
            + " | ".join(f"{e[k]:.2f}x" if k in e else "-" for k in keys)
            + " |"
        )
    out += [
        "",
        "qkv_over_kv/B: QKV ms / Q-K=V ms on backend B (>1: K=V faster). E_over_pte: eager backend E's ms / "
        ".pte fp32 ms (eager-kv: qkvx's static cache with the llama custom ops, the same attention kernel as "
        "the .pte; eager-cat: past/present in plain ops, torch.cat per step). onnx_over_pte: ONNX "
        "fp32 ms / .pte fp32 ms. optimum_over_qkvx_onnx/V: optimum's QKV ONNX ms / qkvx's ONNX of variant V.",
        "",
    ]
    out += [
        "### Export wall time and peak RSS (one process per export)",
        "",
        "| size | variant | backend | seconds | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["export"]:
            out.append(
                f"| {r['size']} | {r['variant']} | {r['backend']} | {r['export']['seconds']:.0f} | "
                f"{fmt_mib(r['export']['peak_rss_bytes'], 0)} |"
            )
    out += ablation_table(result)
    out += profile_table(result)
    out += ["", "### Goals", "", "| size | goal | measured | |", "|---|---|---|---|"]
    for g in result["goals"]:
        out.append(f"| {g['size']} | {g['goal']} | {g['value']} | {'met' if g['met'] else '**missed**'} |")
    return "\n".join(out) + "\n"


def profile_table(result: dict[str, Any]) -> list[str]:
    """ETDump breakdown of a .pte fp32 decode step at the largest context, with the bandwidth each
    part reaches: the cache through custom_sdpa, the weights through XNNPACK."""
    from qkvx.budget import weight_bytes
    from qkvx.spec import cache_layout

    profiles = result.get("pte_profiles") or {}
    if not profiles:
        return []
    top = result["contexts"][-1]
    parts = list(next(iter(profiles.values()))["parts_ms"])
    out = [
        "",
        f"### Where a .pte fp32 decode step goes at {top} (ExecuTorch ETDump, ms per step)",
        "",
        "| model | step | " + " | ".join(parts) + " | cache read by attention | weights read by XNNPACK |",
        "|---|---|" + "---|" * (len(parts) + 2),
    ]
    for key, prof in profiles.items():
        size, variant, _ = key.split("/")
        spec = spec_for(size, variant)
        p = prof["parts_ms"]
        attn = p["attention"]
        xnn = p["XNNPACK delegate (Linear, ...)"]
        cache_gbs = cache_layout(spec).bytes_at(top) / (attn * 1e6) if attn else 0.0
        weights_gbs = weight_bytes(spec) / (xnn * 1e6) if xnn else 0.0
        out.append(
            f"| {size} {variant} | {prof['total_ms']:.2f} | "
            + " | ".join(f"{p[k]:.2f}" for k in parts)
            + f" | {cache_gbs:.1f} GB/s | {weights_gbs:.1f} GB/s |"
        )
    return out


def ablation_table(result: dict[str, Any]) -> list[str]:
    """What each onnxruntime step buys on ABLATION_MODEL, against the .pte of the same model."""
    from qkvx.bench.suite import ABLATION_MODEL

    size, variant = ABLATION_MODEL
    ctx = result["contexts"]
    steps = [
        ("onnx-fp32-noopt", "dynamo graph, onnxruntime optimizations off"),
        ("onnx-fp32", "+ onnxruntime graph optimizations (default; recipe onnx-fp32)"),
        (
            "onnx-fp32-mha",
            "+ fused MultiHeadAttention, the one cache as key and value (recipe onnx-fp32-mha)",
        ),
        ("onnx-fp32-mha-iobind", "+ IO binding (presents stay OrtValues)"),
        ("pte-fp32", "reference: the .pte (ExecuTorch, XNNPACK + custom_sdpa)"),
    ]
    rows = {r["backend"]: r for r in result["rows"] if (r["size"], r["variant"]) == (size, variant)}
    if not all(b in rows for b, _ in steps):
        return []
    pte = {c: rows["pte-fp32"]["decode"][str(c)]["ms"]["median"] for c in ctx}
    out = [
        "",
        f"### What each onnxruntime step buys ({size} {variant}, decode ms/token, x = vs the .pte)",
        "",
        "| step | " + " | ".join(f"@{c}" for c in ctx) + " |",
        "|---|" + "---|" * len(ctx),
    ]
    for b, label in steps:
        cells = [
            f"{rows[b]['decode'][str(c)]['ms']['median']:.2f} "
            f"({rows[b]['decode'][str(c)]['ms']['median'] / pte[c]:.2f}x)"
            for c in ctx
        ]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out
