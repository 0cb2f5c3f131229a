"""Markdown for a qkvx.bench.longctx result: ms/token tables, where a .pte step goes, and the
long-context goals measured against the single-thread streaming read of the same run."""

from __future__ import annotations

import statistics

from qkvx.bench.longctx import ONNX_BUILTIN_PAIR, ONNX_CUSTOM_PAIR, PAIR_KIND, READ_MIB, median_ms, spec_for

GOAL_RATIO, GOAL_STEP_STREAM, GOAL_ATTN_STREAM, GOAL_THREADS = 1.35, 0.60, 0.70, 1.6
# Llama ONNX, QKV ms / Q-K=V ms of the same attention graph: onnxruntime's built-in ops, qkvx's op
GOAL_ONNX_BUILTIN, GOAL_ONNX_CUSTOM = 0.9, 1.35


def _key(fmt, family, variant, kind) -> str:
    return f"{fmt}/{family}/{variant}/{kind}"


def ratio(result: dict, base: str, key: str, context: int, threads: int = 1) -> float | None:
    """Median over rounds of base ms / key ms, each round's pair measured minutes apart at most."""
    a, b = result["runs"].get(base), result["runs"].get(key)
    if not a or not b:
        return None
    t, c = str(threads), str(context)
    return statistics.median(x["ms"][t][c] / y["ms"][t][c] for x, y in zip(a, b, strict=False))


def speedup(result: dict, key: str, threads: int, context: int) -> float:
    """Median over rounds of 1-thread ms / `threads`-thread ms (both measured in one process)."""
    c = str(context)
    return statistics.median(r["ms"]["1"][c] / r["ms"][str(threads)][c] for r in result["runs"][key])


def thread_bound(result: dict, key: str, context: int) -> float | None:
    """Median over rounds of the 2-thread speedup memory allows this step: the bytes it reads
    (bytes_read) over the round's 2-thread read bandwidth, against its own 1-thread time; at most
    2. None without the 2-thread read (results written before it was measured)."""
    reads = result.get("read_gbs")
    if not reads or "2" not in result["runs"][key][0]["ms"]:
        return None
    _, family, variant, kind = key.split("/")
    total = sum(bytes_read(family, variant, kind, context))
    c = str(context)
    return statistics.median(
        min(2.0, rd["2"] * 1e6 / (total / r["ms"]["1"][c]))
        for rd, r in zip(reads, result["runs"][key], strict=False)
    )


def paired(result: dict, label: str, context: int, what: str = "ratio") -> tuple[float, str] | None:
    """The median over rounds of a pair's side 0 ms / side 1 ms ("control": its control pair's), its
    sides' steps alternated (longctx.pairs labels), and the rounds' ratios as text; None if not
    measured."""
    ratios = [p[what][str(context)] for p in result.get("pairs", {}).get(label, []) if what in p]
    if not ratios:
        return None
    return statistics.median(ratios), ", ".join(f"{x:.2f}" for x in ratios)


def _rows(result: dict, fmt: str) -> list[tuple[str, str, str]]:
    return [tuple(k.split("/")[1:]) for k in result["runs"] if k.startswith(fmt + "/")]


def ms_table(result: dict, fmt: str) -> list[str]:
    """ms/token on 1 thread per context; (x) = QKV ms / this ms, same family and kind."""
    ctx = result["contexts"]
    rows = _rows(result, fmt)
    if not rows:
        return []
    head = "kernels-cache" if fmt == "pte" else "attention graph"
    out = [
        f"| family | variant | {head} | " + " | ".join(f"{c:,}" for c in ctx) + " |",
        "|---|---|---|" + "---:|" * len(ctx),
    ]
    for family, variant, kind in rows:
        key = _key(fmt, family, variant, kind)
        cells = []
        for c in ctx:
            cell = f"{median_ms(result, key, 1, c):.1f}"
            x = ratio(result, _key(fmt, family, "QKV", kind), key, c) if variant != "QKV" else None
            cells.append(cell + (f" ({x:.2f}x)" if x is not None else ""))
        out.append(f"| {family} | {variant} | {kind} | " + " | ".join(cells) + " |")
    return out


def attention_read(result: dict, key: str, context: int) -> dict | None:
    """Over the rounds that profiled `key` (ETDump, 1 thread): attention ms and its share of the
    step, the GB/s at which it reads the cache, and that over the streaming read measured in the
    same process just before (results written before that: the round's own), each the median over
    rounds, with the rounds' fractions as text. None if never profiled."""
    _, family, variant, kind = key.split("/")
    cache_b = bytes_read(family, variant, kind, context)[0]
    rounds = [
        (r["profile"][str(context)], r.get("stream_gbs", s))
        for r, s in zip(result["runs"][key], result["stream_gbs"], strict=False)
        if "profile" in r
    ]
    if not rounds:
        return None
    attn = [p["parts_ms"]["attention"] for p, _ in rounds]
    frac = [cache_b / a / 1e6 / s for a, (_, s) in zip(attn, rounds, strict=True)]
    med = statistics.median
    return {
        "ms": med(attn),
        "share": med(a / p["total_ms"] for a, (p, _) in zip(attn, rounds, strict=True)),
        "gbs": med(cache_b / a / 1e6 for a in attn),
        "frac": med(frac),
        "rounds": ", ".join(f"{f:.0%}" for f in frac),
    }


def bytes_read(family: str, variant: str, kind: str, context: int) -> tuple[int, int]:
    """(cache bytes, weight bytes) one decode step reads at `context`: every cache row (int8: and
    its scale) and every weight except tables only gathered from (qkvx.budget)."""
    from qkvx.budget import lookup_table_bytes, weight_bytes
    from qkvx.spec import cache_layout

    spec = spec_for(family, variant)
    kv = kind.split("-")[-1]
    return cache_layout(spec, kv).bytes_at(context), weight_bytes(spec) - lookup_table_bytes(spec)


def step_table(result: dict, context: int) -> list[str]:
    """At `context`: threads, the ETDump attention share, and read bandwidth vs streaming."""
    stream = statistics.median(result["stream_gbs"])
    threads = result["threads"]
    rows = _rows(result, "pte")
    if not rows or context not in result["contexts"]:
        return []
    out = [
        "| family | variant | kernels-cache | "
        + " | ".join(f"ms, {t} thr" for t in threads)
        + " | attention ms (share) | attention reads cache | step reads weights + cache |",
        "|---|---|---|" + "---:|" * (len(threads) + 3),
    ]
    for family, variant, kind in rows:
        key = _key("pte", family, variant, kind)
        ms = {t: median_ms(result, key, t, context) for t in threads}
        bound = thread_bound(result, key, context)
        cells = [f"{ms[threads[0]]:.1f}"] + [
            f"{ms[t]:.1f} ({speedup(result, key, t, context):.2f}x"
            + (f"; memory ~{bound:.2f}x" if t == 2 and bound else "")
            + ")"
            for t in threads[1:]
        ]
        cache_b, weight_b = bytes_read(family, variant, kind, context)
        att = attention_read(result, key, context)
        if att:
            cells += [f"{att['ms']:.1f} ({att['share']:.0%})", f"{att['gbs']:.1f} GB/s ({att['frac']:.0%})"]
        else:
            cells += ["", ""]
        step = (cache_b + weight_b) / ms[threads[0]] / 1e6
        cells.append(f"{step:.1f} GB/s ({step / stream:.0%})")
        out.append(f"| {family} | {variant} | {kind} | " + " | ".join(cells) + " |")
    return out


def best_onnx(result: dict, family: str, variant: str, context: int) -> tuple[str, float] | None:
    cands = [
        (kind, median_ms(result, _key("onnx", f, v, kind), 1, context))
        for f, v, kind in _rows(result, "onnx")
        if (f, v) == (family, variant)
    ]
    return min(cands, key=lambda x: x[1]) if cands else None


def goals(result: dict) -> list[str]:
    """Each goal of the long-context work, measured (1 thread unless said; qkvx-fp32 .pte)."""
    stream = statistics.median(result["stream_gbs"])
    ctx, runs = result["contexts"], result["runs"]
    out = ["| goal | measured | |", "|---|---|---|"]

    def row(goal: str, measured: str, ok: bool) -> None:
        out.append(f"| {goal} | {measured} | {'met' if ok else '**missed**'} |")

    def judged(goal: str, label: str, ok, separate: str, separate_ok: bool, name: str = "") -> None:
        """The goal on the pair `label` at `at` if it was measured (ok(ratio)), else on the
        separate-process figures."""
        if pair := paired(result, label, at):
            got = f"{name}{pair[0]:.2f}x paired (rounds {pair[1]}); separate processes {separate}"
            if control := paired(result, label, at, "control"):
                got += f"; a {READ_MIB} MiB read right after: {control[0]:.2f}x (rounds {control[1]})"
            row(goal, got, ok(pair[0]))
        else:
            row(goal, separate, separate_ok)

    families = sorted({k.split("/")[1] for k in runs if k.startswith("pte/")})
    at = 16384 if 16384 in ctx else ctx[-1]
    for fam in families:
        kv, qkv = _key("pte", fam, "Q-K=V", "qkvx-fp32"), _key("pte", fam, "QKV", "qkvx-fp32")
        if kv not in runs:
            continue
        if qkv in runs:
            x = ratio(result, qkv, kv, at)
            goal = f"{fam}: QKV ms / Q-K=V ms at {at} >= {GOAL_RATIO}x"
            label = f"qkv/pte/{fam}/{PAIR_KIND}"
            judged(goal, label, lambda r: r >= GOAL_RATIO, f"{x:.2f}x", x >= GOAL_RATIO)
        cache_b, weight_b = bytes_read(fam, "Q-K=V", "qkvx-fp32", at)
        step = (cache_b + weight_b) / median_ms(result, kv, 1, at) / 1e6
        row(
            f"{fam} Q-K=V: step reads weights + cache at >= {GOAL_STEP_STREAM:.0%} of streaming, {at}",
            f"{step:.1f} of {stream:.1f} GB/s = {step / stream:.0%}",
            step >= GOAL_STEP_STREAM * stream,
        )
        for c in (c for c in ctx if c >= 8192):
            att = attention_read(result, kv, c)
            if att:
                row(
                    f"{fam} Q-K=V: attention reads the cache at >= {GOAL_ATTN_STREAM:.0%} of streaming, {c}",
                    f"{att['gbs']:.1f} GB/s = {att['frac']:.0%} (rounds {att['rounds']})",
                    att["frac"] >= GOAL_ATTN_STREAM,
                )
        i8 = _key("pte", fam, "Q-K=V", "qkvx-int8")
        if i8 in runs:
            a, b = median_ms(result, i8, 1, at), median_ms(result, kv, 1, at)
            goal = f"{fam} Q-K=V: int8 cache faster than fp32 at {at}"
            judged(goal, f"int8/{fam}", lambda r: r > 1.0, f"{a:.1f} vs {b:.1f} ms", a < b, "fp32 / int8 = ")
        if 2 in result["threads"]:
            x = speedup(result, kv, 2, at)
            bound = thread_bound(result, kv, at)
            bound = f" (memory ~{bound:.2f}x: its bytes at the round's 2-thread read rate)" if bound else ""
            goal = f"{fam} Q-K=V: 2 threads >= {GOAL_THREADS}x 1 thread at {at}"
            judged(goal, f"threads/{fam}", lambda r: r >= GOAL_THREADS, f"{x:.2f}x{bound}", x >= GOAL_THREADS)
        goal = f"{fam} Q-K=V: .pte not slower than the fastest ONNX graph at any context"
        graphs = sorted({k.split("/")[3] for k in runs if k.startswith(f"onnx/{fam}/Q-K=V/")})
        duels = [(paired(result, f"onnx/{fam}/{g}", c), c, g) for c in ctx for g in graphs]
        duels = [(p[0], c, g) for p, c, g in duels if p]
        if duels:  # paired: ONNX ms / .pte ms, both at the same moments
            w = min(duels)
            row(goal, f"worst ONNX ms / .pte ms = {w[0]:.2f} paired, at {w[1]} ({w[2]})", w[0] >= 1.0)
        else:
            worst = [
                (median_ms(result, kv, 1, c) / best[1], c, best[0])
                for c in ctx
                if (best := best_onnx(result, fam, "Q-K=V", c))
            ]
            if worst:
                w = max(worst)
                row(goal, f"worst .pte / ONNX = {w[0]:.2f} at {w[1]} ({w[2]})", w[0] <= 1.0)
    for graph, what, bar in (
        (ONNX_BUILTIN_PAIR, "onnxruntime's built-in ops", GOAL_ONNX_BUILTIN),
        (ONNX_CUSTOM_PAIR, "qkvx's custom op", GOAL_ONNX_CUSTOM),
    ):
        if pair := paired(result, f"qkv/onnx/llama/{graph}", at):
            goal = f"llama ONNX, {what} ({graph}): QKV ms / Q-K=V ms at {at} >= {bar}x"
            row(goal, f"{pair[0]:.2f}x paired (rounds {pair[1]})", pair[0] >= bar)
    return out


PAIR_SIDES = {  # what a label's a / b are (longctx.pairs)
    "qkv": "QKV ms / Q-K=V ms ({}, 1 thread)",
    "threads": "1-thread ms / 2-thread ms (Q-K=V .pte, {}; control: a read)",
    "int8": "fp32-cache ms / int8-cache ms (Q-K=V .pte, {}, 1 thread)",
    "onnx": "ONNX ms / .pte ms (Q-K=V, 1 thread; {})",
}


def pair_table(result: dict) -> list[str]:
    """Every pair's median ratio per context: its two sides' steps alternated."""
    ctx, labels = result["contexts"], list(result.get("pairs", {}))
    if not labels:
        return []
    out = ["| pair | ratio | " + " | ".join(f"{c:,}" for c in ctx) + " |", "|---|---|" + "---:|" * len(ctx)]
    for label in labels:
        kind, rest = label.split("/", 1)
        cells = []
        for c in ctx:
            p, control = paired(result, label, c), paired(result, label, c, "control")
            cells.append((f"{p[0]:.2f}x" if p else "") + (f" (read {control[0]:.2f}x)" if control else ""))
        out.append(f"| {label} | {PAIR_SIDES[kind].format(rest)} | " + " | ".join(cells) + " |")
    return out


def to_markdown(result: dict) -> str:
    stream = result["stream_gbs"]
    n = len(next(iter(result["runs"].values())))
    lines = [f"Machine: {result['machine']}.", ""] if result.get("machine") else []
    lines += [
        "Streaming read, one thread (numpy sum over 1 GiB, best of 3 passes): median "
        f"{statistics.median(stream):.1f} GB/s (min {min(stream):.1f}, max {max(stream):.1f}); "
        f"{n} rounds, medians.",
    ]
    if result.get("read_gbs"):
        one, two = ([r[n] for r in result["read_gbs"]] for n in ("1", "2"))
        per = ", ".join(f"{b / a:.2f}x" for a, b in zip(one, two, strict=True))
        lines[-1] += (
            f" Vectorized read (torch.sum over 1 GiB): median {statistics.median(one):.1f} GB/s on 1 thread,"
            f" {statistics.median(two):.1f} on 2 (2 / 1 per round: {per})."
        )
    if result.get("load"):  # other work on the machine: the times and ratios are only as quiet as it
        loads = ", ".join(f"{x:.1f}" for x in result["load"])
        lines[-1] += f" 1-minute load average per round: {loads}."
    for fmt, title in (("pte", ".pte"), ("onnx", "ONNX")):
        table = ms_table(result, fmt)
        if table:
            lines += [
                "",
                f"#### {title} decode, ms/token on 1 thread ((x) = QKV ms / this ms, same kind)",
                "",
            ]
            lines += table
    for c in (c for c in (16384, 32768) if c in result["contexts"]):
        table = step_table(result, c)
        if table:
            lines += ["", f"#### .pte at {c:,}: threads, attention share (ETDump, 1 thread), read GB/s", ""]
            lines += table
    table = pair_table(result)
    if table:
        head = "#### Paired: two processes, their single-token steps alternated (medians over rounds)"
        lines += ["", head, ""]
        lines += table
    lines += ["", "#### Goals", ""] + goals(result)
    return "\n".join(lines)
