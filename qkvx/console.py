"""What the CLI prints: one rich console, tables that stay readable in an 80-column CI log with no
terminal (a table too wide for the console is printed as one block of `column: value` lines per
row instead of being cut to "runti…"), and one view per command's result."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from qkvx.util import fmt_bytes

console = Console(highlight=False)

# The help of --ignore-config-key, an option of every command that reads a model.
IGNORE_KEY_HELP = "A paper model_config key that does not change the model (repeatable)."


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    header: bool = True,
    out: Console | None = None,
) -> None:
    """A table when it fits the console's width; otherwise each row as a block of `column: value`
    lines. Cells may hold rich markup. header=False: a two-column key/value table."""
    out = out or console
    table = Table(
        title=title, box=box.SIMPLE_HEAD if header else box.SIMPLE, show_header=header, title_justify="left"
    )
    for i, name in enumerate(columns):
        table.add_column(name, no_wrap=True, style="bold" if not header and i == 0 else None)
    for row in rows:
        table.add_row(*row)
    if out.measure(table, options=out.options.update_width(10**6)).maximum <= out.width:
        out.print(table)
        return
    out.print(f"[bold]{title}[/]")
    if not header:  # key/value: the keys are the first cells
        width = max(len(str(r[0])) for r in rows)
        for key, *values in rows:
            out.print(f"  {key:<{width}}  {' '.join(values)}")
        return
    width = max(len(c) for c in columns)
    for row in rows:
        for name, value in zip(columns, row, strict=False):
            out.print(f"  {name:<{width}}  {value}")
        out.print()


def show_inspect(path, info: dict[str, Any]) -> None:
    spec, base = info["spec"], info["qkv_baseline"]
    rows = [
        ("variant", info["variant"]),
        ("layers/width/heads", f"{spec['n_layer']} / {spec['n_embd']} / {spec['n_head']}"),
        ("kv heads / head dim", f"{spec['n_kv_head']} / {spec['head_dim']}"),
        ("sharing/positions", f"{spec['sharing']} / {spec['positions']}"),
        ("norm / mlp", f"{spec['norm']} / {spec['mlp']}"),
        ("vocab / positions", f"{spec['vocab_size']:,} / {spec['max_positions']:,}"),
        ("tied embeddings", str(spec["tie_embeddings"])),
        ("parameters", f"{info['params']:,}"),
        ("KV tensors/layer", str(info["kv_tensors_per_layer"])),
    ]
    for dt in ("fp32", "fp16"):
        rows.append(
            (
                f"KV B/token {dt}",
                f"{info['kv_bytes_per_token'][dt]:,} (QKV {base[f'kv_bytes_per_token_{dt}']:,})",
            )
        )
        rows.append(
            (
                f"KV @{spec['max_positions']} {dt}",
                f"{fmt_bytes(info['kv_bytes_at_max_positions'][dt])} "
                f"(QKV {fmt_bytes(base[f'kv_bytes_at_context_{dt}'])})",
            )
        )
    rows.append(("KV saving vs QKV", f"{info['kv_saving_percent']:.1f} %"))
    meta = info.get("meta") or {}
    if trained := meta.get("training"):
        rows.append(("trained", f"{trained.get('steps')} steps, seed {trained.get('seed')}"))
        rows.append(("held-out ppl", f"{trained.get('heldout_ppl')} (unigram {trained.get('unigram_ppl')})"))
    if release := meta.get("release"):
        rows.append(
            (
                "release step",
                f"{release.get('step', '-')}, epoch {release.get('epoch', '-')}, "
                f"{release.get('tokens_seen', 0):,} tokens",
            )
        )
        if vm := release.get("val_metrics"):
            rows.append(
                (
                    "val perplexity",
                    f"{vm.get('perplexity', float('nan')):.2f} (loss "
                    f"{vm.get('loss', float('nan')):.4f}, bpc {vm.get('bpc', float('nan')):.4f})",
                )
            )
        rows.append(
            ("optimizer state", "in the file, not read" if release.get("optimizer_state") else "none")
        )
    if meta.get("ignored_config_keys"):
        rows.append(("ignored keys", ", ".join(meta["ignored_config_keys"])))
    print_table(f"{path} ({info['format']})", ("key", "value"), rows, header=False)


def show_parity(title: str, runtimes: dict) -> None:
    rows = []
    for name, p in runtimes.items():
        ppl = p["ppl"] is not None
        rows.append(
            (
                name,
                f"{p['max_abs_dlogit']:.2e}",
                f"{p['bound']:.2e}" if p["bound"] is not None else "-",
                f"{100 * p['top1_agreement']:.2f} %",
                f"{p['near_ties']}/{p['positions']}",
                f"{p['kl_mean']:.2e}",
                f"{p['kl_p99']:.2e}",
                f"{p['ppl']:.4f}" if ppl else "-",
                f"{p['ppl_ref']:.4f}" if ppl else "-",
                f"{100 * p['ppl_change']:+.2f} %" if ppl else "-",
                "[green]pass[/]" if p["passed"] else f"[red]FAIL ({', '.join(p['failed'])})[/]",
            )
        )
    print_table(
        title,
        (
            "runtime",
            "max |dlogit|",
            "bound",
            "top-1",
            "near ties",
            "KL mean",
            "KL p99",
            "ppl",
            "ppl eager",
            "ppl change",
            "result",
        ),
        rows,
    )


def show_devices(profiles) -> None:
    print_table(
        "device profiles",
        ("name", "device", "kind", "cores", "RAM", "app budget", "bandwidth", "qemu cpu"),
        [
            (
                p.name,
                p.device,
                p.kind,
                f"{p.cpu_cores}",
                fmt_bytes(p.ram_bytes),
                fmt_bytes(p.app_budget_bytes),
                f"{p.bandwidth_gb_s:.1f} GB/s ({p.mem_bandwidth_kind})",
                p.qemu_cpu or "-",
            )
            for p in profiles
        ],
    )


def show_budget(rows) -> None:
    print_table(
        "memory budget",
        (
            "variant",
            "device",
            "context",
            "weights",
            "KV cache",
            "activations",
            "total",
            "budget",
            "fits",
            "max context",
            "decode ceiling",
        ),
        [
            (
                r.variant,
                r.device,
                f"{r.context:,}",
                fmt_bytes(r.weights_bytes),
                fmt_bytes(r.kv_cache_bytes),
                fmt_bytes(r.activation_bytes),
                fmt_bytes(r.total_bytes),
                fmt_bytes(r.budget_bytes),
                "[green]yes[/]" if r.fits else "[red]no[/]",
                f"{r.max_context:,}",
                f"{r.decode_tokens_per_s_ceiling:,.1f} tok/s",
            )
            for r in rows
        ],
    )


def show_export(out, m) -> None:
    from qkvx.harness.parity import Parity

    cache = m.cache
    console.print(
        f"[green]wrote[/] {out}/{m.artifact.file} ({fmt_bytes(m.artifact.total_bytes)}), {m.variant}: "
        f"{cache.tensors_per_layer} cache tensor(s) per layer, {cache.bytes_per_token:,} B/token, "
        f"{fmt_bytes(cache.bytes_at_context)} at {cache.context} tokens"
    )
    for p in (m.parity or {}).values():
        console.print(f"  parity {Parity.from_dict(dict(p)).describe()}")


def show_measured(rows) -> None:
    """qkvx budget --measure: estimate vs measured peak RSS in MiB, with the measured vs counted baseline."""
    mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
    print_table(
        f"{rows[0].artifact} ({rows[0].format}): estimate vs measured peak RSS (MiB), this host, 1 thread",
        (
            "context",
            "estimate",
            "measured",
            "error",
            "model: est.",
            "measured",
            "error",
            "weights+copies",
            "KV",
            "act.",
            "session",
        ),
        [
            (
                f"{r.context:,}",
                mib(r.estimate_bytes),
                mib(r.peak_rss_bytes),
                f"{100 * r.error:+.1f}%",
                mib(r.estimate_model_bytes),
                mib(r.model_peak_bytes),
                f"{100 * r.model_error:+.1f}%",
                f"{mib(r.weights_bytes)}+{mib(r.weight_copies_bytes)}",
                mib(r.kv_cache_bytes),
                mib(r.activation_bytes),
                mib(r.session_bytes),
            )
            for r in rows
        ],
    )
    console.print(
        f"[dim]model = peak - baseline RSS (interpreter, torch, runtime: measured "
        f"{mib(rows[0].baseline_rss_bytes)} MiB, counted {mib(rows[0].runtime_baseline_bytes)} MiB)[/]"
    )


def show_convert(r, as_json: bool = False) -> None:
    """qkvx convert: the conversion record as JSON, or one line and, for --init fit, the per-layer
    attention-block error on the held-out calibration batches."""
    if as_json:
        print_json({"out": str(r.out), "seconds": round(r.seconds, 2), **r.conversion})
        return
    console.print(
        f"[bold]{r.source_variant}[/] -> [bold]{r.variant}[/] (init {r.init}) in {r.seconds:.1f} s: {r.out}"
    )
    if cal := r.conversion.get("calibration"):
        print_table(
            "attention-block output error J per layer (held-out calibration batches)",
            ("layer", "avg", "start", "fit"),
            [
                (
                    str(row["layer"]),
                    f"{row['heldout_J_avg']:.4f}",
                    f"{row['heldout_J_start']:.4f} ({row['start']})",
                    f"{row['heldout_J_fit']:.4f}",
                )
                for row in cal["layers"]
            ],
        )


def show_distill(r) -> None:
    """qkvx distill: steps, tokens, processes, time and held-out perplexity first -> last. Under
    torchrun only rank 0 prints."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    first, last = r.evals[0], r.evals[-1]
    resumed = f", resumed at step {r.resumed_from}" if r.resumed_from else ""
    console.print(
        f"{r.steps} steps, {r.tokens:,} tokens on {r.world_size} process(es) in {r.seconds:.0f} s{resumed}: "
        f"held-out perplexity [bold]{first['ppl']:.3f}[/] (step {first['step']}) -> "
        f"[bold]{last['ppl']:.3f}[/] -> {r.out}"
    )
