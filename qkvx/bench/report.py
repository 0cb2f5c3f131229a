"""Bench results -> derived figures (ratios, roofline, cache bytes, goals) and the Markdown report.

Roofline: a decode step reads every weight and the cache up to its context once, so at memory
bandwidth B the fastest possible step takes (weight bytes + cache bytes at c) / B. B is this
machine's numpy-copy bandwidth (read + write counted, STREAM copy convention), measured in the run.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from qkvx.bench.suite import BACKENDS, Config, spec_for


def _med(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bytes_read_per_token(size: str, variant: str, backend: str, context: int) -> int:
    """Weights at the backend's storage scheme + the fp32 cache at `context` (the budget's
    decode-ceiling formula)."""
    from qkvx.budget import weight_bytes
    from qkvx.spec import cache_layout

    spec = spec_for(size, variant)
    return weight_bytes(spec, BACKENDS[backend].scheme) + cache_layout(spec, "fp32").bytes_at(context)


def artifact_cache_bytes(path: Path, backend: str, context: int) -> int | None:
    """Cache bytes at `context` as the artifact itself declares them: the .pte plan's cache buffers
    (allocated for max_seq_len) scaled to `context`, or the ONNX graph's past inputs x context."""
    fmt = BACKENDS[backend].format
    if fmt == "pte":
        from qkvx.export.executorch import read_plan

        plan = read_plan(path)
        return plan.cache_bytes * context // plan.cache_seq_len
    if fmt == "onnx":
        from qkvx.export.onnx import read_graph

        return read_graph(path).cache_bytes_per_token() * context
    return None


def summarize(
    points: dict[Config, list[dict]],
    exports: dict[str, dict],
    paths: dict[Config, Path],
    contexts: tuple[int, ...],
    bandwidth: float,
    meta: dict,
) -> dict[str, Any]:
    from qkvx.spec import cache_layout

    rows = []
    for cfg, runs in points.items():
        row = {
            "size": cfg.size,
            "variant": cfg.variant,
            "backend": cfg.backend,
            "repeats": len(runs),
            "prefill_tokens_per_s": _med([r["prefill_tokens_per_s"] for r in runs]),
            "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in runs),
            "export": exports.get(cfg.key),
            "decode": {},
        }
        qkv_fp16 = cache_layout(spec_for(cfg.size, "QKV"), "fp16")
        for c in contexts:
            ms = _med([r["decode_ms"][str(c)] for r in runs])
            read = bytes_read_per_token(cfg.size, cfg.variant, cfg.backend, c)
            cache = artifact_cache_bytes(paths[cfg], cfg.backend, c)
            row["decode"][str(c)] = {
                "ms": ms,
                "bytes_read_per_token": read,
                "roofline_ms": 1e3 * read / bandwidth,
                "roofline_fraction": (1e3 * read / bandwidth) / ms["median"],
                "artifact_cache_bytes": cache,
                "cache_vs_qkv_fp16": None if cache is None else cache / qkv_fp16.bytes_at(c),
            }
        rows.append(row)
    return {
        **meta,
        "bandwidth_bytes_per_s": bandwidth,
        "contexts": list(contexts),
        "rows": rows,
        "goals": goals(rows, contexts),
    }


def _ms(rows, size, variant, backend, c) -> float | None:
    for r in rows:
        if (r["size"], r["variant"], r["backend"]) == (size, variant, backend):
            return r["decode"][str(c)]["ms"]["median"]
    return None


def ratio_table(rows: list[dict], contexts) -> list[dict]:
    """Per size and context: K=V vs QKV per backend, .pte vs eager, qkvx ONNX vs optimum."""
    out = []
    sizes = sorted({r["size"] for r in rows}, key=lambda s: float(s.rstrip("M")))
    for size in sizes:
        for c in contexts:
            m = lambda v, b: _ms(rows, size, v, b, c)  # noqa: B023 (used in this iteration only)
            entry = {"size": size, "context": c}
            for b in BACKENDS:
                if m("QKV", b) and m("Q-K=V", b):
                    entry[f"qkv_over_kv/{b}"] = m("QKV", b) / m("Q-K=V", b)
            for v in ("QKV", "Q-K=V"):
                if m(v, "onnx-fp32") and m(v, "pte-fp32"):
                    entry[f"onnx_over_pte/{v}"] = m(v, "onnx-fp32") / m(v, "pte-fp32")
                for e in ("eager-kv", "eager-cat"):
                    if m(v, e) and m(v, "pte-fp32"):
                        entry[f"{e}_over_pte/{v}"] = m(v, e) / m(v, "pte-fp32")
            if m("QKV", "optimum-onnx"):
                for v in ("QKV", "Q-K=V"):
                    if m(v, "onnx-fp32"):
                        entry[f"optimum_over_qkvx_onnx/{v}"] = m("QKV", "optimum-onnx") / m(v, "onnx-fp32")
            out.append(entry)
    return out


def goals(rows: list[dict], contexts) -> list[dict]:
    """The bench's goals, each met or missed with the numbers behind it."""
    out = []
    sizes = sorted({r["size"] for r in rows}, key=lambda s: float(s.rstrip("M")))
    top = max(contexts)
    for size in sizes:
        m = lambda v, b, c: _ms(rows, size, v, b, c)  # noqa: B023 (used in this iteration only)
        if m("QKV", "pte-fp32", top) and m("Q-K=V", "pte-fp32", top):
            speedup = m("QKV", "pte-fp32", top) / m("Q-K=V", "pte-fp32", top)
            ideal = bytes_read_per_token(size, "QKV", "pte-fp32", top) / bytes_read_per_token(
                size, "Q-K=V", "pte-fp32", top
            )
            out.append(
                {
                    "size": size,
                    "goal": f"K=V .pte speedup over QKV .pte at {top} >= 0.9x the bytes-read ratio",
                    "value": f"{speedup:.2f}x vs 0.9 x {ideal:.2f} = {0.9 * ideal:.2f}x",
                    "met": speedup >= 0.9 * ideal,
                }
            )
        for v in ("QKV", "Q-K=V"):
            for e in ("eager-kv", "eager-cat"):
                ratios = [
                    m(v, e, c) / m(v, "pte-fp32", c) for c in contexts if m(v, e, c) and m(v, "pte-fp32", c)
                ]
                if ratios:
                    out.append(
                        {
                            "size": size,
                            "goal": f".pte >= 3x eager ({v}, {e})",
                            "value": " / ".join(f"{r:.2f}x" for r in ratios)
                            + f" at {'/'.join(map(str, contexts))}",
                            "met": min(ratios) >= 3.0,
                        }
                    )
        if 1024 in contexts and m("QKV", "optimum-onnx", 1024) and m("Q-K=V", "onnx-fp32", 1024):
            r = m("QKV", "optimum-onnx", 1024) / m("Q-K=V", "onnx-fp32", 1024)
            out.append(
                {
                    "size": size,
                    "goal": "qkvx Q-K=V ONNX >= optimum QKV ONNX at 1024 (speed)",
                    "value": f"{r:.2f}x ({m('Q-K=V', 'onnx-fp32', 1024):.2f} vs "
                    f"{m('QKV', 'optimum-onnx', 1024):.2f} ms)",
                    "met": r >= 1.0,
                }
            )
        onnx = [
            (m("Q-K=V", b, c), b, c)
            for c in contexts
            for b in ("onnx-fp32", "onnx-fp32-mha", "onnx-fp32-mha-iobind")
            if m("Q-K=V", b, c) and m("Q-K=V", "pte-fp32", c)
        ]
        if onnx:
            per_ctx = {
                c: min((ms, b) for ms, b, cc in onnx if cc == c)
                for c in contexts
                if any(cc == c for *_, cc in onnx)
            }
            ratios = {c: ms / m("Q-K=V", "pte-fp32", c) for c, (ms, _) in per_ctx.items()}
            out.append(
                {
                    "size": size,
                    "goal": "qkvx Q-K=V ONNX decode within 1.5x of the .pte (fp32, fastest ORT setup)",
                    "value": " / ".join(f"{r:.2f}x ({per_ctx[c][1]})" for c, r in ratios.items())
                    + f" at {'/'.join(map(str, ratios))}",
                    "met": max(ratios.values()) <= 1.5,
                }
            )
        for v in ("QKV", "Q-K=V"):
            row = next(
                (r for r in rows if (r["size"], r["variant"], r["backend"]) == (size, v, "pte-fp32")), None
            )
            if row:
                f = row["decode"][str(top)]["roofline_fraction"]
                out.append(
                    {
                        "size": size,
                        "goal": f".pte >= 50 % of roofline at {top} ({v}, fp32)",
                        "value": f"{100 * f:.0f} %",
                        "met": f >= 0.5,
                    }
                )
    return out
