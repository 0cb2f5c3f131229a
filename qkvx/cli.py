"""`qkvx` console script: each command parses its options, calls ONE function of qkvx.api, and
prints the result (qkvx.console). User errors are one line on stderr with exit code 2."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from qkvx import api, cli_convert
from qkvx.console import (
    IGNORE_KEY_HELP,
    console,
    print_json,
    show_budget,
    show_devices,
    show_export,
    show_inspect,
    show_measured,
    show_parity,
)
from qkvx.errors import GateFailed, QkvxError


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[None]:
    """ExecuTorch's and torchao's native code log to fd 2 (one line per kernel call, sometimes):
    keep it off the user's terminal. It is shown if the command crashes; QKVX_DEBUG=1 shows it all."""
    if os.environ.get("QKVX_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        except (QkvxError, SystemExit, KeyboardInterrupt):
            ok = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not ok:  # a bug: show the native log's tail before Python prints the traceback
                log.seek(0)
                tail = log.read().decode(errors="replace").splitlines()[-40:]
                print("\n".join(tail), file=sys.stderr)


class _App(typer.Typer):
    """Typer app whose user errors are one line on stderr with exit code 2, never a traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            with _native_stderr_captured():
                return super().__call__(*args, **kwargs)
        except QkvxError as e:
            _fail(str(e), code=getattr(e, "exit_code", 2))
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


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the qkvx version and exit.")) -> None:
    if version:
        from qkvx.version import __version__

        print(__version__)
        raise typer.Exit()


def _names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _ints(text: str | None, what: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise QkvxError(f"{what}: expected comma-separated integers, got {text!r}") from None


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="Paper .pt checkpoint, Hugging Face folder, or qkvx folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ignore_config_key: list[str] | None = typer.Option(None, "--ignore-config-key", help=IGNORE_KEY_HELP),
) -> None:
    """Show a model's variant, spec, parameters and KV-cache arithmetic vs the QKV baseline."""
    info = api.inspect(path, tuple(ignore_config_key or ()))
    print_json(info) if as_json else show_inspect(path, info)


def _train_default(name: str) -> Any:
    """The trainer's own default, so `qkvx train --help` never drifts from qkvx.train.train."""
    import inspect as _inspect

    from qkvx.train import train as train_model

    return _inspect.signature(train_model).parameters[name].default


@app.command()
def train(
    variant: str = typer.Option(
        "Q-K=V", "--variant", help="Paper variant: QKV, Q=K-V, Q-K=V, Q=K=V, GQA-g, MQA, Q-GQA-g, Q-MQA."
    ),
    family: str = typer.Option(
        "gpt", help="gpt (learned positions, LayerNorm, GELU) or llama (RoPE, RMSNorm, SwiGLU)."
    ),
    layers: int = typer.Option(_train_default("n_layer"), "--layers", help="Transformer layers."),
    width: int = typer.Option(_train_default("n_embd"), "--width", help="Model width (n_embd)."),
    heads: int = typer.Option(_train_default("n_head"), "--heads", help="Query heads."),
    kv_heads: int | None = typer.Option(None, "--kv-heads", help="KV heads for a bare GQA / Q-GQA name."),
    steps: int = typer.Option(_train_default("steps"), "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(_train_default("batch_size"), "--batch-size"),
    seq_len: int = typer.Option(_train_default("seq_len"), "--seq-len", help="Training window length."),
    max_positions: int = typer.Option(
        _train_default("max_positions"), "--max-positions", help="Positions the model supports (>= seq-len)."
    ),
    lr: float = typer.Option(
        _train_default("lr"), "--lr", help="Peak learning rate (warmup, then cosine decay)."
    ),
    warmup: int = typer.Option(_train_default("warmup"), "--warmup", help="Warmup steps."),
    threads: int = typer.Option(
        _train_default("threads"), "--threads", help="CPU threads (1 is fastest on a busy 2-core machine)."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Same seed, same arguments, same threads: bitwise-identical weights."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Output folder (native format: model.safetensors + qkvx.json)."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a small byte-level model of any variant on Python's own help texts (pydoc_data)."""
    r = api.train(
        variant,
        family=family,
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        kv_heads=kv_heads,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        max_positions=max_positions,
        lr=lr,
        warmup=warmup,
        threads=threads,
        seed=seed,
        out=out,
        quiet=quiet,
    )
    console.print(
        f"[bold]{r.variant}[/] {r.params:,} params, {r.steps} steps in {r.seconds:.0f} s "
        f"({r.tokens_per_s:,.0f} tok/s): held-out perplexity [bold]{r.heldout_ppl:.2f}[/] "
        f"(unigram byte model {r.unigram_ppl:.2f}) -> {r.out}"
    )


app.command()(cli_convert.convert)
app.command()(cli_convert.distill)


@app.command()
def export(
    model: Path = typer.Argument(..., help="Paper .pt, Hugging Face folder, or qkvx folder."),
    recipe: str = typer.Option(
        ..., "--recipe", "-r", help="Recipe name (export_recipes/NAME.yaml) or YAML path."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (model + manifest.json)."),
    max_seq_len: int | None = typer.Option(
        None, "--max-seq-len", help="Cache length (default: recipe, else model)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Check parity vs the eager model."),
    tokenizer: Path | None = typer.Option(
        None,
        "--tokenizer",
        help="tokenizer.json or a Hugging Face tokenizer folder, written beside the artifact.",
    ),
    ignore_config_key: list[str] | None = typer.Option(None, "--ignore-config-key", help=IGNORE_KEY_HELP),
) -> None:
    """Export a model to an on-device artifact with ONE cache tensor per K=V layer."""
    with console.status("starting") as status:
        m = api.export(
            model,
            recipe,
            out,
            max_seq_len=max_seq_len,
            force=force,
            validate=validate,
            tokenizer=tokenizer,
            ignore_config_keys=tuple(ignore_config_key or ()),
            progress=lambda stage: status.update(f"[bold]{stage}[/]..."),
        )
    show_export(out, m)


@app.command()
def generate(
    artifact_dir: Path = typer.Argument(..., help="An export directory (with manifest.json)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_k: int | None = typer.Option(None, "--top-k"),
    seed: int = typer.Option(0, "--seed"),
    runtime: str | None = typer.Option(
        None, "--runtime", help="Runner name (default: the artifact's format)."
    ),
) -> None:
    """Generate text from an exported artifact, printing decode tokens/s."""
    text, g = api.generate(artifact_dir, prompt, max_new_tokens, temperature, top_k, seed, runtime)
    print(prompt + text)
    console.print(
        f"[dim]{len(g.prompt_ids)} prompt tokens in {1000 * g.prefill_s:.1f} ms, "
        f"{len(g.new_ids)} new tokens, decode {g.tokens_per_s:.1f} tokens/s[/]"
    )


@app.command()
def bench(
    out: Path = typer.Option(
        Path("bench_out"), "--out", help="Directory for models, exports and the report."
    ),
    sizes: str = typer.Option("20M,100M", "--sizes", help="Comma-separated model sizes (20M, 100M)."),
    variants: str = typer.Option("QKV,Q-K=V,MQA,Q-MQA", "--variants", help="Comma-separated paper variants."),
    backends: str | None = typer.Option(None, "--backends", help="Comma-separated backends (default: all)."),
    contexts: str = typer.Option("256,1024,2048", "--contexts", help="Comma-separated decode contexts."),
    repeats: int = typer.Option(3, "--repeats", help="Fresh processes per configuration."),
    steps: int = typer.Option(16, "--steps", help="Timed decode steps per context and process."),
) -> None:
    """Benchmark every variant on every backend: decode, prefill, roofline, cache bytes, export cost."""
    from qkvx.bench import to_markdown

    result = api.bench(
        out,
        _names(sizes) or [],
        _names(variants) or [],
        _names(backends),
        _ints(contexts, "--contexts") or [],
        repeats,
        steps,
        progress=console.print,
    )
    print(to_markdown(result))
    console.print(f"[dim]wrote {out}/bench.md and {out}/bench.json[/]")


@app.command()
def soak(
    out: Path = typer.Option(
        Path("bench_out/soak"), "--out", help="Directory for the exports, soak.json and soak.md."
    ),
    steps: int = typer.Option(4096, "--steps", help="Single-token decode steps per runtime and variant."),
    stream: str = typer.Option("random", "--stream", help="random (teacher-forced) | greedy (own argmax)."),
) -> None:
    """Decode soak: thousands of steps through the .pte and ONNX vs full recompute, window by window."""
    from qkvx.soak import soak_markdown

    result = api.soak(out, steps, stream, progress=console.print)
    print(soak_markdown(result))
    if not result["passed"]:
        raise GateFailed("soak: a runtime drifted beyond the fp32 parity bound (see the table)")


@app.command()
def devices(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the device profiles (devices/*.toml; host is measured now)."""
    profiles = api.devices()
    print_json([p.to_dict() for p in profiles]) if as_json else show_devices(profiles)


@app.command()
def budget(
    model: Path | None = typer.Argument(
        None, help="Checkpoint or export directory (optional with --preset)."
    ),
    preset: str | None = typer.Option(None, "--preset", help="paper-300m | paper-1.2b (with --variant)."),
    variant: str | None = typer.Option(None, "--variant", help="Paper variant name, e.g. Q-K=V."),
    device: list[str] | None = typer.Option(
        None, "--device", "-d", help="Device profile (repeatable; default all)."
    ),
    context: str | None = typer.Option(
        None, "--context", "-c", help="Comma-separated contexts (default: max positions)."
    ),
    weights: str | None = typer.Option(None, "--weights", help="fp32 | fp16 | int8 | int4 (default fp32)."),
    cache_dtype: str | None = typer.Option(None, "--cache-dtype", help="fp32 | fp16 | bf16 | int8."),
    compare: bool = typer.Option(
        False, "--compare", help="Side by side: QKV, Q-K=V, GQA-4, MQA, Q-GQA-4, Q-MQA."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print rows as JSON."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table."),
    plot: Path | None = typer.Option(None, "--plot", help="Write memory vs context PNG here."),
    measure: bool = typer.Option(
        False,
        "--measure",
        help="Run the export on this host to each --context: estimate vs measured peak RSS.",
    ),
    ignore_config_key: list[str] | None = typer.Option(None, "--ignore-config-key", help=IGNORE_KEY_HELP),
) -> None:
    """Memory budget per device: weights + KV cache + activations + runtime vs the app budget."""
    from qkvx.budget_measure import markdown_table as measured_markdown
    from qkvx.budget_report import markdown_table

    with console.status("measuring (a fresh process per context)" if measure else "estimating"):
        r = api.budget(
            model,
            preset,
            variant,
            device,
            _ints(context, "--context"),
            weights,
            cache_dtype,
            compare,
            plot=plot,
            measure=measure,
            ignore_config_keys=tuple(ignore_config_key or ()),
        )
    rows = r.measured if measure else r.rows
    if as_json:
        print_json([row.to_dict() for row in rows])
    elif markdown:
        print((measured_markdown if measure else markdown_table)(rows))
    else:
        (show_measured if measure else show_budget)(rows)
    if r.plot:
        console.print(f"[dim]wrote {r.plot}[/]")


@app.command()
def validate(
    artifact_dir: Path = typer.Argument(..., help="An export directory (with manifest.json)."),
    runtimes: str | None = typer.Option(
        None,
        "--runtimes",
        help="Comma-separated: pte | pte-native | ort | arm64 (default: the artifact's own).",
    ),
    model: Path | None = typer.Option(
        None, "--model", help="The source model (default: the manifest's path; sha256-checked)."
    ),
    text: Path | None = typer.Option(
        None, "--text", help="Text file to feed, tokenized by the export's tokenizer.json."
    ),
    tokens: int | None = typer.Option(None, "--tokens", help="Number of tokens to feed."),
    steps: int = typer.Option(64, "--steps", help="Decode steps per window after a 16-token prefill."),
    device: str | None = typer.Option(
        None, "--device", help="Device profile whose qemu CPU model arm64 emulates."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results as JSON here."),
    junit: Path | None = typer.Option(
        None, "--junit", help="Write JUnit XML here (one testcase per runtime and check)."
    ),
    ignore_config_key: list[str] | None = typer.Option(None, "--ignore-config-key", help=IGNORE_KEY_HELP),
) -> None:
    """Check an exported artifact against its source model on each runtime; exit 1 when a gate fails."""
    from qkvx.validate import junit_xml

    with console.status("validating"):
        v = api.validate(
            artifact_dir, _names(runtimes), model, text, tokens, steps, device, tuple(ignore_config_key or ())
        )
    show_parity(
        f"{artifact_dir}: {v.stream['source']}, {v.stream['windows']} window(s) of "
        f"{v.stream['tokens'] // v.stream['windows']} tokens",
        v.runtimes,
    )
    for pair, a in v.agreement.items():  # e.g. emulated arm64 vs the host, same positions
        console.print(
            f"{pair}: max |dlogit| {a['max_abs_dlogit']:.2e}, same top-1 at "
            f"{100 * a['same_top1']:.2f} % of {a['positions']} positions"
        )
    if json_out:
        out = {"passed": v.passed, "runtimes": v.runtimes, "stream": v.stream, "agreement": v.agreement}
        json_out.write_text(json.dumps(out, indent=2) + "\n")
    if junit:
        junit.write_text(junit_xml(v) + "\n")
    if not v.passed:
        raise GateFailed(
            "validation failed: "
            + "; ".join(f"{n}: {', '.join(p['failed'])}" for n, p in v.runtimes.items() if not p["passed"])
        )


@app.command(name="eval")
def eval_(
    artifact_dir: Path = typer.Argument(..., help="An export directory (with manifest.json)."),
    text: Path | None = typer.Option(
        None, "--text", help="Text file (default: the held-out pydoc_data text)."
    ),
    windows: int = typer.Option(
        8, "--windows", help="Windows of 128 tokens: 16 prefilled, the rest decoded."
    ),
    model: Path | None = typer.Option(
        None, "--model", help="The fp32 source model (default: the manifest's path)."
    ),
    ignore_config_key: list[str] | None = typer.Option(None, "--ignore-config-key", help=IGNORE_KEY_HELP),
) -> None:
    """Held-out perplexity and top-1 agreement vs the fp32 eager model, through the artifact's runtime."""
    with console.status("evaluating"):
        v = api.evaluate(artifact_dir, text, windows, model, tuple(ignore_config_key or ()))
    show_parity(f"{artifact_dir}: {v.stream['source']}", v.runtimes)


emulator_app = typer.Typer(
    help="The arm64 emulator (qemu-user + a Debian arm64 user land) for `validate --runtimes arm64`.",
    no_args_is_help=True,
)
app.add_typer(emulator_app, name="emulator")


@emulator_app.command("setup")
def emulator_setup(
    force: bool = typer.Option(False, "--force", help="Rebuild from scratch."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Default ~/.cache/qkvx/arm64."),
) -> None:
    """Build (once; idempotent) the arm64 user land with Python, numpy and onnxruntime, and the
    .pte runtime (qkvx-run cross-built against ExecuTorch's aarch64 wheel)."""
    with console.status("setting up the arm64 emulator (debootstrap, wheels, qkvx-run cross build)"):
        info = api.emulator_setup(cache_dir, force)
    print(info.summary())


@emulator_app.command("status")
def emulator_status(cache_dir: Path | None = typer.Option(None, "--cache-dir")) -> None:
    """Say whether the emulator is ready, and what is missing with how to fix it (exit 1 if not)."""
    info = api.emulator_status(cache_dir)
    print(info.summary())
    if not info.ready:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
