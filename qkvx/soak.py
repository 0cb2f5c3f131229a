"""Decode soak: 4096 single-token steps through each runtime, compared window by window with the
eager model's full recompute, to show the cache does not drift beyond the fp32 parity bound.

Models: small random-weight decoders (SOAK_DIMS, init std INIT_STD so the logits and attention are
far from uniform) in Q-K=V form for both families: GPT (learned positions) and Llama (RoPE, where a
K=V cache holds the un-rotated tensor and keys are rotated on every read, so a position error would
grow with context) and QKV GPT as the control. Each is exported to .pte (export_pte, a static cache
of prompt + steps) and ONNX (export_onnx) and run on one thread: a PROMPT-token prefill, then one
decode call per token, keeping every step's logits.

Token stream: a fixed seeded random stream (teacher-forced), not the runtime's own greedy choice.
Greedy text from these random weights collapses: over the last 512 of 4096 greedy steps the GPT
Q-K=V model emitted ONE distinct token and the QKV control 10 (Llama 125), so attention read a loop
and the late windows, where drift would show, tested little. A random stream gives every position
fresh content, and every runtime and variant sees the same tokens. stream="greedy" is kept for
comparison (each runtime feeds back its own argmax; the reference reads that sequence; soak.json
records distinct_last_window).

Reference: ONE teacher-forced forward of the eager model over the whole final sequence (causal, so
position t's logits are the full recompute at step t): no cache code is involved.

Gate (the fp32 recipes' gates): in EVERY window (the prefill, then each WINDOW decode
steps) max |dlogit| <= max_rel_dlogit * max|logit| + abs_dlogit_floor, and top-1 agreement >=
min_top1. Per-window rather than over the whole stream, so large early logits cannot hide a late
drift. Top-1 is gated over the decisive positions: those whose reference top-2 margin exceeds twice
the bound. At a near tie an error within the bound may flip the argmax (seen here: margin 1.2e-6 at
3.0, runtime error 4.5e-6, bound 5e-4), and over 4096 random-weight steps a few such ties occur;
flips there are counted and reported, not failed. Where the margin is wider a flip needs an error
beyond the bound, so the dlogit gate already rules it out; the top-1 gate stays as a cross-check.
The last / first decode window ratio of max|dlogit| / max|logit| is reported, not gated: a longer
softmax sum rounds a little more, which is not a cache bug; the bound is what must hold.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qkvx.harness.parity import logit_stats
from qkvx.harness.runners import one_thread_runner
from qkvx.recipes import Gates, load_recipe
from qkvx.util import variant_slug

# 1.0-1.35M params: fast on one core. Head size 64, the paper's: the kernels' one-query-row decode
# path (state in registers, kv heads read in twos) is compiled for 64 and 128 only.
SOAK_DIMS = dict(n_layer=4, n_embd=128, n_head=2, vocab_size=256)
INIT_STD = 0.1  # 0.02 gives max|logit| ~1 and near-uniform attention; 0.1 gives ~5
VARIANTS: dict[str, tuple[str, str, dict]] = {  # name -> (paper variant, family, other fields)
    "gpt-QKV": ("QKV", "gpt", {}),
    "gpt-Q-K=V": ("Q-K=V", "gpt", {}),
    "llama-Q-K=V": ("Q-K=V", "llama", dict(tie_embeddings=False, n_inner=4 * SOAK_DIMS["n_embd"])),
}
RUNTIMES = ("pte", "onnx")
RECIPES = {"pte": "pte-fp32", "onnx": "onnx-fp32"}  # whose gates bound each runtime
PROMPT, WINDOW = 16, 512


def soak_model(variant: str, max_positions: int, seed: int = 0):
    from qkvx.models.transformer import Transformer
    from qkvx.spec import ModelSpec

    paper, family, extra = VARIANTS[variant]
    spec = ModelSpec.for_family(family, paper, **SOAK_DIMS, max_positions=max_positions, **extra)
    return Transformer(spec).init_weights(seed, std=INIT_STD).eval()


def export(model, runtime: str, folder: Path, max_seq_len: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if runtime == "pte":
        from qkvx.export.executorch import export_pte

        path = folder / "model.pte"
        export_pte(model, path, max_seq_len)
        return path
    from qkvx.export.onnx import export_onnx

    return folder / export_onnx(model, folder, max_seq_len)[0][0]


@torch.no_grad()
def decode_stream(runner, tokens: torch.Tensor, prompt: int, greedy: bool = False) -> dict[str, Any]:
    """Prefill tokens[:prompt], then one decode call per remaining position. Returns the tokens fed
    ([N]; with greedy, the runtime's own argmax after the prompt), logits [N, vocab] and timings."""
    tokens = tokens.clone()
    runner.reset()
    t0 = time.perf_counter()
    first = runner.prefill(tokens[:prompt]).float()
    logits = torch.empty(len(tokens), first.shape[-1])
    logits[:prompt] = first  # preallocated: ORT hands back views of buffers it reuses
    t1 = time.perf_counter()
    for t in range(prompt, len(tokens)):
        if greedy:
            tokens[t] = logits[t - 1].argmax()
        logits[t] = runner.decode(int(tokens[t]))
    t2 = time.perf_counter()
    return {"tokens": tokens, "logits": logits, "prefill_s": t1 - t0, "decode_s": t2 - t1}


def windows(prompt: int, total: int, window: int = WINDOW) -> list[tuple[int, int]]:
    """Position ranges [start, end): the prefill, then each `window` decode steps."""
    return [(0, prompt)] + [(s, min(s + window, total)) for s in range(prompt, total, window)]


def compare(
    got: torch.Tensor, ref: torch.Tensor, gates: Gates, prompt: int, window: int = WINDOW
) -> dict[str, Any]:
    """Runtime logits vs reference logits, both [N, vocab], per window (see the module docstring)."""
    rows = []
    for start, end in windows(prompt, len(ref), window):
        st = logit_stats(got[start:end], ref[start:end], gates)
        bound = gates.bound(st.max_abs_logit)
        rows.append(
            {
                "start": start,
                "end": end,
                "max_abs_dlogit": st.max_abs_dlogit,
                "max_abs_logit": st.max_abs_logit,
                "rel_dlogit": st.max_abs_dlogit / st.max_abs_logit if st.max_abs_logit else 0.0,
                "bound": bound,
                "top1": st.top1_all,
                "top1_decisive": st.top1,
                "near_ties": st.near_ties,
                "flips": st.flips,
                "passed": st.max_abs_dlogit <= bound and st.top1 >= gates.min_top1,
            }
        )
    first, last = rows[1]["rel_dlogit"], rows[-1]["rel_dlogit"]  # decode windows: drift grows with context
    return {
        "windows": rows,
        "max_abs_dlogit": max(w["max_abs_dlogit"] for w in rows),
        "max_rel_dlogit": max(w["rel_dlogit"] for w in rows),
        "top1": sum(w["top1"] * (w["end"] - w["start"]) for w in rows) / len(ref),
        "flips": sum(w["flips"] for w in rows),
        "near_ties": sum(w["near_ties"] for w in rows),
        "last_over_first": last / first if first else None,  # None: the first window was exact
        "last_worse": last > first,
        "passed": all(w["passed"] for w in rows),
    }


def run_soak(
    out_dir: str | Path,
    steps: int = 4096,
    variants: tuple[str, ...] = tuple(VARIANTS),
    runtimes: tuple[str, ...] = RUNTIMES,
    progress: Callable[[str], Any] = print,
    stream: str = "random",
    prompt: int = PROMPT,
    window: int = WINDOW,
) -> dict[str, Any]:
    """Export, run and compare every variant x runtime; writes soak.json and soak.md in out_dir."""
    if stream not in ("random", "greedy") or steps < 1:
        raise ValueError(f"need stream 'random' or 'greedy' and steps >= 1, got {stream!r}, {steps}")
    out, total = Path(out_dir), prompt + steps
    gates = {rt: load_recipe(RECIPES[rt]).gates for rt in runtimes}
    stream_tokens = torch.randint(
        0, SOAK_DIMS["vocab_size"], (total,), generator=torch.Generator().manual_seed(0)
    )
    t_all, runs = time.perf_counter(), []
    torch.set_num_threads(1)
    for variant in variants:
        model = soak_model(variant, total)
        for rt in runtimes:
            t0 = time.perf_counter()
            path = export(model, rt, out / "models" / variant_slug(variant) / rt, total)
            export_s = time.perf_counter() - t0
            run = decode_stream(one_thread_runner(rt, path), stream_tokens, prompt, greedy=stream == "greedy")
            with torch.no_grad():
                ref = model(run["tokens"][None])[0].float()  # [total, vocab], full recompute
            cmp = compare(run["logits"], ref, gates[rt], prompt, window)
            runs.append(
                {
                    "runtime": rt,
                    "variant": variant,
                    **cmp,
                    "export_s": export_s,
                    "prefill_s": run["prefill_s"],
                    "decode_s": run["decode_s"],
                    "decode_tok_s": steps / run["decode_s"],
                    "distinct_last_window": len(set(run["tokens"][-window:].tolist())),
                }
            )
            progress(
                f"  {rt:4} {variant:11} max|dlogit| {cmp['max_abs_dlogit']:.2e} top-1 {cmp['top1']:.2%} "
                f"(flips {cmp['flips']}, near ties {cmp['near_ties']}) "
                f"last/first {_ratio(cmp)} {'passed' if cmp['passed'] else 'FAILED'} "
                f"(export {export_s:.0f} s, {steps / run['decode_s']:.0f} tok/s)"
            )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, 1 thread",
        "model": {**SOAK_DIMS, "init_std": INIT_STD},
        "prompt": prompt,
        "steps": steps,
        "window": window,
        "stream": stream,
        "gates": {rt: {"recipe": RECIPES[rt], **vars(g)} for rt, g in gates.items()},
        "runs": runs,
        "wall_s": time.perf_counter() - t_all,
        "passed": all(r["passed"] for r in runs),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "soak.md").write_text(soak_markdown(result))
    return result


def soak_markdown(result: dict[str, Any]) -> str:
    m, runs = result["model"], result["runs"]
    gate_text = "; ".join(
        f"{rt} ({g['recipe']}): max|dlogit| <= {g['max_rel_dlogit']:g} * max|logit| + "
        f"{g['abs_dlogit_floor']:g}, top-1 >= {g['min_top1']:.0%} where the reference's "
        f"top-2 margin > 2 * bound"
        for rt, g in result["gates"].items()
    )
    lines = [
        f"Decode soak: {result['prompt']}-token prefill + {result['steps']} single-token decode steps, "
        f"{result['stream']} token stream, vs the eager full recompute; {m['n_layer']} layers, width "
        f"{m['n_embd']}, {m['n_head']} heads, vocab {m['vocab_size']}, random weights (std {m['init_std']}); "
        f"{result['machine']}; {result['date']}. Gate per window: {gate_text}.",
        "",
        "| runtime | variant | max abs dlogit | max rel dlogit | top-1 (flips / near ties) | last "
        "/ first window | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['runtime']} | {r['variant']} | {r['max_abs_dlogit']:.2e} | {r['max_rel_dlogit']:.2e} | "
            f"{_top1(r)} | {_ratio(r)} | {'passed' if r['passed'] else 'FAILED'} |"
        )
    lines += [
        "",
        f"Per window (positions; the first row is the prefill, then {result['window']} decode steps each):",
        "",
        "| runtime | variant | positions | max abs dlogit | / max abs logit | bound | top-1 (flips "
        "/ near ties) | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for w in r["windows"]:
            lines.append(
                f"| {r['runtime']} | {r['variant']} | {w['start']}-{w['end'] - 1} | "
                f"{w['max_abs_dlogit']:.2e} | "
                f"{w['rel_dlogit']:.2e} | {w['bound']:.2e} | {_top1(w)} | {'yes' if w['passed'] else 'NO'} |"
            )
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    lines += [
        "",
        "| runtime | export s | prefill + decode s | decode tok/s, all | "
        + " | ".join(v + " tok/s" for v in variants)
        + " |",
        "|---" * (4 + len(variants)) + "|",
    ]
    for rt in dict.fromkeys(r["runtime"] for r in runs):
        mine = [r for r in runs if r["runtime"] == rt]
        decode_s = sum(r["decode_s"] for r in mine)
        lines.append(
            f"| {rt} | {sum(r['export_s'] for r in mine):.1f} | "
            f"{sum(r['prefill_s'] for r in mine) + decode_s:.1f} | "
            f"{result['steps'] * len(mine) / decode_s:.0f} | "
            + " | ".join(f"{r['decode_tok_s']:.0f}" for r in mine)
            + " |"
        )
    lines += ["", f"Wall time {result['wall_s']:.0f} s; {'PASSED' if result['passed'] else 'FAILED'}.", ""]
    return "\n".join(lines)


def _top1(row: dict[str, Any]) -> str:
    return f"{row['top1']:.2%} ({row['flips']} / {row['near_ties']})"


def _ratio(run: dict[str, Any]) -> str:
    ratio = run["last_over_first"]
    return "-" if ratio is None else f"{ratio:.2f} ({'worse' if run['last_worse'] else 'not worse'})"
