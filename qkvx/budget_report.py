"""Budget report renderings: a Markdown table and a memory-vs-context PNG."""

from __future__ import annotations

from pathlib import Path

from qkvx.budget import BudgetRow
from qkvx.util import fmt_bytes


def markdown_table(rows: list[BudgetRow]) -> str:
    out = [
        "| variant | device | context | weights | KV cache | activations | runtime | total | "
        "budget | fits | max context | decode ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.variant} | {r.device} | {r.context:,} | {fmt_bytes(r.weights_bytes)} | "
            f"{fmt_bytes(r.kv_cache_bytes)} | "
            f"{fmt_bytes(r.activation_bytes)} | {fmt_bytes(r.runtime_bytes)} | "
            f"{fmt_bytes(r.total_bytes)} | {fmt_bytes(r.budget_bytes)} | "
            f"{'yes' if r.fits else 'no'} | {r.max_context:,} | {r.decode_tokens_per_s_ceiling:,.1f} tok/s |"
        )
    return "\n".join(out)


def plot_png(rows: list[BudgetRow], path: str | Path) -> Path:
    """Total memory vs context, one line per variant and one panel per device; the device's app
    budget as a horizontal line; each variant's largest fitting context marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    devices = list(dict.fromkeys(r.device for r in rows))
    fig, axes = plt.subplots(1, len(devices), figsize=(6.5 * len(devices), 4.5), squeeze=False)
    for ax, dev in zip(axes[0], devices, strict=False):
        drows = [r for r in rows if r.device == dev]
        for variant in dict.fromkeys(r.variant for r in drows):
            vr = sorted((r for r in drows if r.variant == variant), key=lambda r: r.context)
            (line,) = ax.plot(
                [r.context for r in vr], [r.total_bytes / 2**30 for r in vr], marker="o", ms=3, label=variant
            )
            fit = vr[0].max_context_memory
            if vr[0].context <= fit <= vr[-1].context:
                ax.axvline(fit, color=line.get_color(), ls=":", lw=1)
                ax.annotate(
                    f"{fit:,}",
                    (fit, drows[0].budget_bytes / 2**30),
                    color=line.get_color(),
                    fontsize=7,
                    rotation=90,
                    va="top",
                    ha="right",
                )
        ax.axhline(drows[0].budget_bytes / 2**30, color="black", lw=1.5, ls="--", label="app budget")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("total memory (GiB)")
        ax.set_title(dev)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
