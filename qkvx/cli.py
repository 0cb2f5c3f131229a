"""`qkvx` console script: each command is a thin typer shell over a function in qkvx.api."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from qkvx.errors import QkvxError


class _App(typer.Typer):
    """Typer app whose user errors are one line on stderr with exit code 2, never a traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except QkvxError as e:
            _fail(str(e))
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            _fail(f"{e.filename}: {e.strerror}" if e.filename else str(e))
        except KeyboardInterrupt:
            _fail("interrupted", code=130)


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message.splitlines()[0] if message else 'failed'}", file=sys.stderr)
    sys.exit(code)


app = _App(
    help="Deploy shared-projection (K=V) transformers to devices: one KV tensor per layer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the qkvx version and exit.")) -> None:
    if version:
        from qkvx import __version__

        print(__version__)
        raise typer.Exit()


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="Paper .pt checkpoint, Hugging Face folder, or qkvx folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show a model's variant, spec, parameters and KV-cache arithmetic vs the QKV baseline."""
    from qkvx.api import inspect as inspect_model

    info = inspect_model(path)
    if as_json:
        _print_json(info)
        return
    spec = info["spec"]
    t = Table(title=f"{path}  ({info['format']})", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("variant", info["variant"])
    t.add_row("layers / width / heads / kv heads / head dim",
              f"{spec['n_layer']} / {spec['n_embd']} / {spec['n_head']} / {spec['n_kv_head']} / {spec['head_dim']}")
    t.add_row("sharing / positions / norm / mlp",
              f"{spec['sharing']} / {spec['positions']} / {spec['norm']} / {spec['mlp']}")
    t.add_row("vocab / max positions / tied", f"{spec['vocab_size']} / {spec['max_positions']} / {spec['tie_embeddings']}")
    t.add_row("parameters", f"{info['params']:,}")
    t.add_row("KV tensors per layer", str(info["kv_tensors_per_layer"]))
    base = info["qkv_baseline"]
    for dt in ("fp32", "fp16"):
        t.add_row(f"KV bytes / token ({dt})",
                  f"{info['kv_bytes_per_token'][dt]:,}  (QKV: {base[f'kv_bytes_per_token_{dt}']:,})")
        t.add_row(f"KV bytes at {spec['max_positions']} tokens ({dt})",
                  f"{_bytes(info['kv_bytes_at_max_positions'][dt])}  (QKV: {_bytes(base[f'kv_bytes_at_context_{dt}'])})")
    t.add_row("KV cache saving vs QKV", f"{info['kv_saving_percent']:.1f} %")
    for key, value in (info.get("meta") or {}).get("training", {}).items():
        t.add_row(f"training {key}", str(value))
    console.print(t)


@app.command()
def train(
    variant: str = typer.Option("Q-K=V", "--variant", help="Paper variant: QKV, Q=K-V, Q-K=V, Q=K=V, GQA-g, MQA, Q-GQA-g, Q-MQA."),
    family: str = typer.Option("gpt", help="gpt (learned positions, LayerNorm, GELU) or llama (RoPE, RMSNorm, SwiGLU)."),
    layers: int = typer.Option(4, "--layers", help="Transformer layers."),
    width: int = typer.Option(256, "--width", help="Model width (n_embd)."),
    heads: int = typer.Option(8, "--heads", help="Query heads."),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", help="KV heads for a bare GQA / Q-GQA name."),
    steps: int = typer.Option(600, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(16, "--batch-size"),
    seq_len: int = typer.Option(128, "--seq-len", help="Training window length."),
    max_positions: int = typer.Option(2048, "--max-positions", help="Positions the model supports (>= seq-len)."),
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (warmup, then cosine decay)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same arguments: bitwise-identical weights."),
    out: Path = typer.Option(..., "--out", help="Output folder (native format: model.safetensors + qkvx.json)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a small byte-level model of any variant on Python's own help texts (pydoc_data)."""
    from qkvx.train import train as train_model

    r = train_model(variant, family=family, n_layer=layers, n_embd=width, n_head=heads, kv_heads=kv_heads,
                    steps=steps, batch_size=batch_size, seq_len=seq_len, max_positions=max_positions,
                    lr=lr, seed=seed, out=out, quiet=quiet)
    console.print(f"[bold]{r.variant}[/] {r.params:,} params, {r.steps} steps in {r.seconds:.0f} s "
                  f"({r.tokens_per_s:,.0f} tok/s): held-out perplexity [bold]{r.heldout_ppl:.2f}[/] "
                  f"(unigram byte model {r.unigram_ppl:.2f}) -> {r.out}")


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
