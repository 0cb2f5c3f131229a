"""`qkvx` console script: each command is a thin typer shell over a function in qkvx.api."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from qkvx.console import console, fmt_bytes, print_table
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
        from qkvx import __version__

        print(__version__)
        raise typer.Exit()


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


IGNORE_KEY_HELP = "A paper model_config key that does not change the model (repeatable)."


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="Paper .pt checkpoint, Hugging Face folder, or qkvx folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ignore_config_key: Optional[list[str]] = typer.Option(None, "--ignore-config-key", help=IGNORE_KEY_HELP),
) -> None:
    """Show a model's variant, spec, parameters and KV-cache arithmetic vs the QKV baseline."""
    from qkvx.api import inspect as inspect_model

    info = inspect_model(path, tuple(ignore_config_key or ()))
    if as_json:
        _print_json(info)
        return
    spec, base = info["spec"], info["qkv_baseline"]
    rows = [("variant", info["variant"]),
            ("layers/width/heads", f"{spec['n_layer']} / {spec['n_embd']} / {spec['n_head']}"),
            ("kv heads / head dim", f"{spec['n_kv_head']} / {spec['head_dim']}"),
            ("sharing/positions", f"{spec['sharing']} / {spec['positions']}"),
            ("norm / mlp", f"{spec['norm']} / {spec['mlp']}"),
            ("vocab / positions", f"{spec['vocab_size']:,} / {spec['max_positions']:,}"),
            ("tied embeddings", str(spec["tie_embeddings"])),
            ("parameters", f"{info['params']:,}"),
            ("KV tensors/layer", str(info["kv_tensors_per_layer"]))]
    for dt in ("fp32", "fp16"):
        rows.append((f"KV B/token {dt}", f"{info['kv_bytes_per_token'][dt]:,} (QKV {base[f'kv_bytes_per_token_{dt}']:,})"))
        rows.append((f"KV @{spec['max_positions']} {dt}", f"{fmt_bytes(info['kv_bytes_at_max_positions'][dt])} "
                                                          f"(QKV {fmt_bytes(base[f'kv_bytes_at_context_{dt}'])})"))
    rows.append(("KV saving vs QKV", f"{info['kv_saving_percent']:.1f} %"))
    meta = info.get("meta") or {}
    if trained := meta.get("training"):
        rows.append(("trained", f"{trained.get('steps')} steps, seed {trained.get('seed')}"))
        rows.append(("held-out ppl", f"{trained.get('heldout_ppl')} (unigram {trained.get('unigram_ppl')})"))
    if release := meta.get("release"):
        rows.append(("release step", f"{release.get('step', '-')}, epoch {release.get('epoch', '-')}, "
                                     f"{release.get('tokens_seen', 0):,} tokens"))
        if vm := release.get("val_metrics"):
            rows.append(("val perplexity", f"{vm.get('perplexity', float('nan')):.2f} (loss "
                                           f"{vm.get('loss', float('nan')):.4f}, bpc {vm.get('bpc', float('nan')):.4f})"))
        rows.append(("optimizer state", "in the file, not read" if release.get("optimizer_state") else "none"))
    if meta.get("ignored_config_keys"):
        rows.append(("ignored keys", ", ".join(meta["ignored_config_keys"])))
    print_table(f"{path} ({info['format']})", ("key", "value"), rows, header=False)


def _train_default(name: str) -> Any:
    """The trainer's own default, so `qkvx train --help` never drifts from qkvx.train.train."""
    import inspect as _inspect

    from qkvx.train import train as train_model

    return _inspect.signature(train_model).parameters[name].default


@app.command()
def train(
    variant: str = typer.Option("Q-K=V", "--variant", help="Paper variant: QKV, Q=K-V, Q-K=V, Q=K=V, GQA-g, MQA, Q-GQA-g, Q-MQA."),
    family: str = typer.Option("gpt", help="gpt (learned positions, LayerNorm, GELU) or llama (RoPE, RMSNorm, SwiGLU)."),
    layers: int = typer.Option(_train_default("n_layer"), "--layers", help="Transformer layers."),
    width: int = typer.Option(_train_default("n_embd"), "--width", help="Model width (n_embd)."),
    heads: int = typer.Option(_train_default("n_head"), "--heads", help="Query heads."),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", help="KV heads for a bare GQA / Q-GQA name."),
    steps: int = typer.Option(_train_default("steps"), "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(_train_default("batch_size"), "--batch-size"),
    seq_len: int = typer.Option(_train_default("seq_len"), "--seq-len", help="Training window length."),
    max_positions: int = typer.Option(_train_default("max_positions"), "--max-positions", help="Positions the model supports (>= seq-len)."),
    lr: float = typer.Option(_train_default("lr"), "--lr", help="Peak learning rate (warmup, then cosine decay)."),
    warmup: int = typer.Option(_train_default("warmup"), "--warmup", help="Warmup steps."),
    threads: int = typer.Option(_train_default("threads"), "--threads", help="CPU threads (1 is fastest on a busy 2-core machine)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same arguments, same threads: bitwise-identical weights."),
    out: Path = typer.Option(..., "--out", help="Output folder (native format: model.safetensors + qkvx.json)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a small byte-level model of any variant on Python's own help texts (pydoc_data)."""
    from qkvx.train import train as train_model

    r = train_model(variant, family=family, n_layer=layers, n_embd=width, n_head=heads, kv_heads=kv_heads,
                    steps=steps, batch_size=batch_size, seq_len=seq_len, max_positions=max_positions,
                    lr=lr, warmup=warmup, threads=threads, seed=seed, out=out, quiet=quiet)
    console.print(f"[bold]{r.variant}[/] {r.params:,} params, {r.steps} steps in {r.seconds:.0f} s "
                  f"({r.tokens_per_s:,.0f} tok/s): held-out perplexity [bold]{r.heldout_ppl:.2f}[/] "
                  f"(unigram byte model {r.unigram_ppl:.2f}) -> {r.out}")


def _fit_default(name: str) -> Any:
    """FitOptions' own default, so `qkvx convert --help` never drifts from qkvx.convert_fit."""
    import dataclasses

    from qkvx.convert_fit import FitOptions

    return next(f.default for f in dataclasses.fields(FitOptions) if f.name == name)


@app.command()
def convert(
    source: Path = typer.Argument(..., help="A model with separate keys and values (QKV, GQA-g, MQA): paper .pt, Hugging Face or qkvx folder."),
    to: str = typer.Option("Q-K=V", "--to", help="Target: Q-K=V, Q-GQA-g or Q-MQA (kv heads mean-pooled)."),
    init: str = typer.Option("avg", "--init", help="avg | keep-k | keep-v (the paper's) | fit (data-aware, on calibration text)."),
    out: Path = typer.Option(..., "--out", help="Output qkvx folder."),
    calib: Optional[list[Path]] = typer.Option(None, "--calib", help="--init fit: calibration text file or datasets folder (repeatable; default for `qkvx train` models: their training text)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer for the calibration text (default: the source folder's tokenizer.json; bytes for byte-level models)."),
    calib_batches: int = typer.Option(_fit_default("batches"), "--calib-batches", help="--init fit: calibration batches fitted on (2 more are held out)."),
    calib_batch_size: int = typer.Option(_fit_default("batch_size"), "--calib-batch-size", help="--init fit: windows per calibration batch."),
    calib_seq_len: int = typer.Option(_fit_default("seq_len"), "--calib-seq-len", help="--init fit: tokens per calibration window."),
    fit_steps: int = typer.Option(_fit_default("steps"), "--fit-steps", help="--init fit: Adam steps per layer after the closed-form start."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the conversion record as JSON."),
    ignore_config_key: Optional[list[str]] = typer.Option(None, "--ignore-config-key", help=IGNORE_KEY_HELP),
) -> None:
    """Turn a trained QKV / GQA / MQA model into a K=V model (one KV-cache tensor per layer) by weight surgery."""
    from qkvx import api

    fit = dict(batches=calib_batches, batch_size=calib_batch_size, seq_len=calib_seq_len, steps=fit_steps)
    with console.status("converting") as status:
        r = api.convert(source, to, init, out, force=force, calib=list(calib) if calib else None, tokenizer=tokenizer,
                        fit_options=fit, ignore_config_keys=tuple(ignore_config_key or ()),
                        progress=lambda s: status.update(f"converting: {s}"))
    if as_json:
        _print_json({"out": str(r.out), "seconds": round(r.seconds, 2), **r.conversion})
        return
    console.print(f"[bold]{r.source_variant}[/] -> [bold]{r.variant}[/] (init {r.init}) in {r.seconds:.1f} s: {r.out}")
    if cal := r.conversion.get("calibration"):
        print_table("attention-block output error J per layer (held-out calibration batches)",
                    ("layer", "avg", "start", "fit"),
                    [(str(row["layer"]), f"{row['heldout_J_avg']:.4f}", f"{row['heldout_J_start']:.4f} ({row['start']})",
                      f"{row['heldout_J_fit']:.4f}") for row in cal["layers"]])


@app.command()
def distill(
    student: Path = typer.Argument(..., help="The student (e.g. from `qkvx convert`)."),
    teacher: Path = typer.Option(..., "--teacher", help="The teacher: paper .pt, Hugging Face or qkvx folder."),
    data: list[Path] = typer.Option(..., "--data", help="Training text file or datasets folder (repeatable; read in order, looped)."),
    tokens: int = typer.Option(..., "--tokens", help="Training tokens in total (over all processes)."),
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoint, log and the final qkvx model (resumed if it holds a checkpoint)."),
    eval_data: Optional[list[Path]] = typer.Option(None, "--eval-data", help="Held-out text (default: the first --eval-tokens tokens of --data, never trained on)."),
    eval_tokens: int = typer.Option(65536, "--eval-tokens", help="Held-out tokens for perplexity."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Steps between held-out evaluations (default: 5 over the run)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json or folder (default: the student's or teacher's; bytes for byte-level models)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Window length (default: the length the model was trained at, else min(1024, positions))."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per micro-batch per process."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step per process."),
    lr: float = typer.Option(5e-5, "--lr", help="Peak learning rate (cosine to --min-lr)."),
    min_lr: float = typer.Option(5e-6, "--min-lr"),
    warmup: int = typer.Option(0, "--warmup", help="Linear warmup steps."),
    weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW decoupled weight decay (matrices)."),
    beta1: float = typer.Option(0.9, "--beta1"),
    beta2: float = typer.Option(0.95, "--beta2"),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Gradient-norm clip."),
    temperature: float = typer.Option(2.0, "--temperature", help="Softmax temperature of the KL term (scaled by T^2)."),
    kl_weight: float = typer.Option(0.5, "--kl-weight"),
    ce_weight: float = typer.Option(0.5, "--ce-weight", help="Weight of the hard-label cross-entropy."),
    kl: str = typer.Option("forward", "--kl", help="forward: sum p_teacher log(p_teacher/p_student) (the paper release's F.kl_div) | reverse."),
    save_every: int = typer.Option(50, "--save-every", help="Steps between checkpoints."),
    shuffle_buffer: int = typer.Option(1024, "--shuffle-buffer", help="Windows in the shuffle buffer (1 = stream order)."),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads per process (default: cores / processes)."),
    text_column: str = typer.Option("text", "--text-column", help="Column of a datasets folder."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a datasets folder with several."),
    force: bool = typer.Option(False, "--force", help="Start over in --out, discarding what is there."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    ignore_config_key: Optional[list[str]] = typer.Option(None, "--ignore-config-key", help=IGNORE_KEY_HELP),
) -> None:
    """Distill a teacher into a student (KL at temperature T + hard labels), resumable; scale with torchrun (DDP)."""
    from qkvx import api

    r = api.distill(student, teacher, list(data), out, tokens, eval_data=list(eval_data) if eval_data else None,
                    tokenizer=tokenizer, force=force, quiet=quiet, ignore_config_keys=tuple(ignore_config_key or ()),
                    eval_tokens=eval_tokens, eval_every=eval_every, seq_len=seq_len, batch_size=batch_size,
                    grad_accum=grad_accum, lr=lr, min_lr=min_lr, warmup=warmup, weight_decay=weight_decay,
                    beta1=beta1, beta2=beta2, grad_clip=grad_clip, temperature=temperature, kl_weight=kl_weight,
                    ce_weight=ce_weight, kl=kl, save_every=save_every, shuffle_buffer=shuffle_buffer, seed=seed,
                    threads=threads, text_column=text_column, split=split)
    if int(os.environ.get("RANK", "0")) == 0:
        first, last = r.evals[0], r.evals[-1]
        resumed = f", resumed at step {r.resumed_from}" if r.resumed_from else ""
        console.print(f"{r.steps} steps, {r.tokens:,} tokens on {r.world_size} process(es) in {r.seconds:.0f} s{resumed}: "
                      f"held-out perplexity [bold]{first['ppl']:.3f}[/] (step {first['step']}) -> "
                      f"[bold]{last['ppl']:.3f}[/] -> {r.out}")


@app.command()
def export(
    model: Path = typer.Argument(..., help="Paper .pt, Hugging Face folder, or qkvx folder."),
    recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe name (export_recipes/NAME.yaml) or YAML path."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (model + manifest.json)."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", help="Cache length (default: recipe, else model)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Check parity vs the eager model."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json or a Hugging Face tokenizer folder, written beside the artifact."),
    ignore_config_key: Optional[list[str]] = typer.Option(None, "--ignore-config-key", help=IGNORE_KEY_HELP),
) -> None:
    """Export a model to an on-device artifact with ONE cache tensor per K=V layer."""
    from qkvx.api import export as export_model

    with console.status("starting") as status:
        m = export_model(model, recipe, out, max_seq_len=max_seq_len, force=force, validate=validate,
                         tokenizer=tokenizer, ignore_config_keys=tuple(ignore_config_key or ()),
                         progress=lambda stage: status.update(f"[bold]{stage}[/]..."))
    art = m["artifacts"][0]
    cache = m["cache"]
    console.print(f"[bold green]wrote[/] {out}/{art['file']} ({fmt_bytes(art['bytes'])}), {m['variant']}: "
                  f"{cache['tensors_per_layer']} cache tensor(s) per layer, {cache['bytes_per_token']:,} B/token, "
                  f"{fmt_bytes(cache['bytes_at_context'])} at {cache['context']} tokens")
    for name, p in (m["parity"] or {}).items():
        bound = f" (bound {p['bound']:.2e})" if p["bound"] is not None else ""
        ppl = f", perplexity {p['ppl']:.3f} vs eager {p['ppl_ref']:.3f}" if p["ppl"] is not None else ""
        console.print(f"  parity {name}: max |dlogit| {p['max_abs_dlogit']:.2e}{bound}, "
                      f"top-1 {100 * p['top1_agreement']:.1f} % over {p['steps']} steps{ppl}: "
                      + ("[green]pass[/]" if p["passed"] else "[red]FAIL[/]"), highlight=False)


@app.command()
def generate(
    artifact_dir: Path = typer.Argument(..., help="An export directory (with manifest.json)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    seed: int = typer.Option(0, "--seed"),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="Runner name (default: the artifact's format)."),
) -> None:
    """Generate text from an exported artifact, printing decode tokens/s."""
    from qkvx.api import generate as run

    text, g = run(artifact_dir, prompt, max_new_tokens, temperature, top_k, seed, runtime)
    print(prompt + text)
    console.print(f"[dim]{len(g.prompt_ids)} prompt tokens in {1000 * g.prefill_s:.1f} ms, "
                  f"{len(g.new_ids)} new tokens, decode {g.tokens_per_s:.1f} tokens/s[/]", highlight=False)


@app.command()
def bench(
    out: Path = typer.Option(Path("bench_out"), "--out", help="Directory for models, exports and the report."),
    sizes: str = typer.Option("20M,100M", "--sizes", help="Comma-separated model sizes (20M, 100M)."),
    variants: str = typer.Option("QKV,Q-K=V,MQA,Q-MQA", "--variants", help="Comma-separated paper variants."),
    backends: Optional[str] = typer.Option(None, "--backends", help="Comma-separated backends (default: all)."),
    contexts: str = typer.Option("256,1024,2048", "--contexts", help="Comma-separated decode contexts."),
    repeats: int = typer.Option(3, "--repeats", help="Fresh processes per configuration."),
    steps: int = typer.Option(16, "--steps", help="Timed decode steps per context and process."),
) -> None:
    """Benchmark every variant on every backend: decode, prefill, roofline, cache bytes, export cost."""
    from qkvx.bench import run_bench, to_markdown
    from qkvx.bench.suite import BACKENDS, SIZES, spec_for

    names = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    ctx = tuple(sorted(_int_list(contexts, "--contexts") or []))
    for what, given, known in (("size", names(sizes), SIZES), ("backend", names(backends or ",".join(BACKENDS)), BACKENDS)):
        bad = [g for g in given if g not in known]
        if bad:
            raise QkvxError(f"unknown {what} {bad[0]!r}; known: {', '.join(known)}")
    for v in names(variants):
        spec_for("20M", v)  # an unknown variant fails here, in one line
    if not ctx or ctx[0] <= steps or ctx[-1] > 2048:
        raise QkvxError(f"--contexts must exceed --steps ({steps}) and be at most 2048, got {contexts}")
    result = run_bench(out, tuple(names(sizes)), tuple(names(variants)), tuple(names(backends or ",".join(BACKENDS))),
                       ctx, repeats, steps, progress=lambda s: console.print(s, highlight=False))
    print(to_markdown(result))
    console.print(f"[dim]wrote {out}/bench.md and {out}/bench.json[/]")


@app.command()
def soak(
    out: Path = typer.Option(Path("bench_out/soak"), "--out", help="Directory for the exports, soak.json and soak.md."),
    steps: int = typer.Option(4096, "--steps", help="Single-token decode steps per runtime and variant."),
    stream: str = typer.Option("random", "--stream", help="random (teacher-forced) | greedy (own argmax)."),
) -> None:
    """Decode soak: thousands of steps through the .pte and ONNX vs full recompute, window by window."""
    from qkvx.soak import run_soak, soak_markdown

    if stream not in ("random", "greedy") or steps < 1:
        raise QkvxError(f"--stream must be random or greedy and --steps >= 1, got {stream!r}, {steps}")
    result = run_soak(out, steps, stream=stream, progress=lambda s: console.print(s, highlight=False))
    print(soak_markdown(result))
    if not result["passed"]:
        raise GateFailed("soak: a runtime drifted beyond the fp32 parity bound (see the table)")


@app.command()
def devices(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the device profiles (devices/*.toml; host is measured now)."""
    from qkvx.devices import list_devices

    profiles = list_devices()
    if as_json:
        _print_json([p.to_dict() for p in profiles])
        return
    rows = [(p.name, p.device, p.kind, f"{p.cpu_cores}", fmt_bytes(p.ram_bytes), fmt_bytes(p.app_budget_bytes),
             f"{p.bandwidth_gb_s:.1f} GB/s ({p.mem_bandwidth_kind})", p.qemu_cpu or "-") for p in profiles]
    print_table("device profiles", ("name", "device", "kind", "cores", "RAM", "app budget", "bandwidth",
                                    "qemu cpu"), rows)


def _int_list(text: Optional[str], what: str) -> Optional[list[int]]:
    if not text:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise QkvxError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise QkvxError(f"{what}: must be >= 1, got {text!r}")
    return values


@app.command()
def budget(
    model: Optional[Path] = typer.Argument(None, help="Checkpoint or export directory (optional with --preset)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="paper-300m | paper-1.2b (with --variant)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Paper variant name, e.g. Q-K=V."),
    device: Optional[list[str]] = typer.Option(None, "--device", "-d", help="Device profile (repeatable; default all)."),
    context: Optional[str] = typer.Option(None, "--context", "-c", help="Comma-separated contexts (default: max positions)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="fp32 | fp16 | int8 | int4 (default fp32)."),
    cache_dtype: Optional[str] = typer.Option(None, "--cache-dtype", help="fp32 | fp16 | bf16 | int8."),
    compare: bool = typer.Option(False, "--compare", help="Side by side: QKV, Q-K=V, GQA-4, MQA, Q-GQA-4, Q-MQA."),
    as_json: bool = typer.Option(False, "--json", help="Print rows as JSON."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write memory vs context PNG here."),
    measure: bool = typer.Option(False, "--measure", help="Run the export on this host to each --context: estimate vs measured peak RSS."),
    ignore_config_key: Optional[list[str]] = typer.Option(None, "--ignore-config-key", help=IGNORE_KEY_HELP),
) -> None:
    """Memory budget per device: weights + KV cache + activations + runtime vs the app budget."""
    from qkvx import api
    from qkvx.budget_report import markdown_table, plot_png

    if measure:
        given = [name for name, v in (("--preset", preset), ("--variant", variant), ("--device", device),
                 ("--weights", weights), ("--cache-dtype", cache_dtype), ("--compare", compare), ("--plot", plot)) if v]
        if given or model is None:
            raise QkvxError(f"--measure takes an export directory and --context, not {given[0]}" if given
                            else "--measure needs an export directory")
        from qkvx.budget_measure import markdown_table as measure_markdown, print_measure_table

        with console.status("measuring (a fresh process per context)"):
            mrows = api.budget_measure(model, _int_list(context, "--context") or [])
        if as_json:
            _print_json([r.to_dict() for r in mrows])
        elif markdown:
            print(measure_markdown(mrows))
        else:
            print_measure_table(mrows)
        return
    if preset is not None and variant is None and not compare:
        raise QkvxError("--preset needs --variant (or --compare)")
    ignored = tuple(ignore_config_key or ())
    rows = api.budget(model, preset, variant or ("QKV" if preset and compare else None), device,
                      _int_list(context, "--context"), weights, cache_dtype, compare, ignore_config_keys=ignored)
    if plot:  # the curves need many contexts, not only the ones asked for
        top = max([*(_int_list(context, "--context") or []), 4096,
                   min(2 * max(r.max_context_memory for r in rows), 2**22)])
        grid = [2**k for k in range(7, 25) if 2**k <= top]
        plot_png(api.budget(model, preset, variant or ("QKV" if preset and compare else None), device, grid,
                            weights, cache_dtype, compare, ignore_config_keys=ignored), plot)
    if as_json:
        _print_json([r.to_dict() for r in rows])
    elif markdown:
        print(markdown_table(rows))
    else:
        print_table("memory budget", ("variant", "device", "context", "weights", "KV cache", "activations",
                                      "total", "budget", "fits", "max context", "decode ceiling"),
                    [(r.variant, r.device, f"{r.context:,}", fmt_bytes(r.weights_bytes), fmt_bytes(r.kv_cache_bytes),
                      fmt_bytes(r.activation_bytes), fmt_bytes(r.total_bytes), fmt_bytes(r.budget_bytes),
                      "[green]yes[/]" if r.fits else "[red]no[/]", f"{r.max_context:,}",
                      f"{r.decode_tokens_per_s_ceiling:,.1f} tok/s") for r in rows])
    if plot:
        console.print(f"[dim]wrote {plot}[/]")


def _print_parity(title: str, runtimes: dict) -> None:
    rows = []
    for name, p in runtimes.items():
        ppl = p["ppl"] is not None
        rows.append((name, f"{p['max_abs_dlogit']:.2e}", f"{p['rel_dlogit']:.2e}",
                     f"{p['bound']:.2e}" if p["bound"] is not None else "-", f"{100 * p['top1_agreement']:.2f} %",
                     f"{p['ppl']:.4f}" if ppl else "-", f"{p['ppl_ref']:.4f}" if ppl else "-",
                     f"{100 * p['ppl_change']:+.2f} %" if ppl else "-",
                     "[green]pass[/]" if p["passed"] else f"[red]FAIL ({', '.join(p['failed'])})[/]"))
    print_table(title, ("runtime", "max |dlogit|", "rel", "bound", "top-1", "ppl", "ppl eager", "ppl change",
                        "result"), rows)


@app.command()
def validate(
    artifact_dir: Path = typer.Argument(..., help="An export directory (with manifest.json)."),
    runtimes: Optional[str] = typer.Option(None, "--runtimes", help="Comma-separated: pte | ort | arm64 (default: the artifact's own)."),
    model: Optional[Path] = typer.Option(None, "--model", help="The source model (default: the manifest's path; sha256-checked)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text file to feed (byte-level models)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Number of tokens to feed."),
    steps: int = typer.Option(64, "--steps", help="Decode steps per window after a 16-token prefill."),
    device: Optional[str] = typer.Option(None, "--device", help="Device profile whose qemu CPU model arm64 emulates."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML here (one testcase per runtime and check)."),
    ignore_config_key: Optional[list[str]] = typer.Option(None, "--ignore-config-key", help=IGNORE_KEY_HELP),
) -> None:
    """Check an exported artifact against its source model on each runtime; exit 1 when a gate fails."""
    from qkvx.harness.validate import junit_xml, validate as run

    names = [r.strip() for r in runtimes.split(",")] if runtimes else None
    with console.status("validating"):
        v = run(artifact_dir, names, model, str(text) if text else None, tokens, steps, device=device,
                ignore_config_keys=tuple(ignore_config_key or ()))
    _print_parity(f"{artifact_dir}: {v.stream['source']}, {v.stream['windows']} window(s) of "
                  f"{v.stream['tokens'] // v.stream['windows']} tokens", v.runtimes)
    if json_out:
        json_out.write_text(json.dumps({"passed": v.passed, "runtimes": v.runtimes, "stream": v.stream}, indent=2) + "\n")
    if junit:
        junit.write_text(junit_xml(v) + "\n")
    if not v.passed:
        raise GateFailed("validation failed: " + "; ".join(
            f"{n}: {', '.join(p['failed'])}" for n, p in v.runtimes.items() if not p["passed"]))


@app.command(name="eval")
def eval_(
    artifact_dir: Path = typer.Argument(..., help="An export directory (with manifest.json)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text file (default: the held-out pydoc_data text)."),
    windows: int = typer.Option(8, "--windows", help="Windows of 128 tokens: 16 prefilled, the rest decoded."),
    model: Optional[Path] = typer.Option(None, "--model", help="The fp32 source model (default: the manifest's path)."),
    ignore_config_key: Optional[list[str]] = typer.Option(None, "--ignore-config-key", help=IGNORE_KEY_HELP),
) -> None:
    """Held-out perplexity and top-1 agreement vs the fp32 eager model, through the artifact's runtime."""
    from qkvx.harness.validate import validate as run

    with console.status("evaluating"):
        v = run(artifact_dir, None, model, str(text) if text else None, None, steps=112, windows=windows,
                ignore_config_keys=tuple(ignore_config_key or ()))
    _print_parity(f"{artifact_dir}: {v.stream['source']}", v.runtimes)


emulator_app = typer.Typer(help="The arm64 emulator (qemu-user + a Debian arm64 user land) for `validate --runtimes arm64`.",
                            no_args_is_help=True)
app.add_typer(emulator_app, name="emulator")


@emulator_app.command("setup")
def emulator_setup(
    force: bool = typer.Option(False, "--force", help="Rebuild from scratch."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Default ~/.cache/qkvx/arm64."),
) -> None:
    """Build (once; idempotent) the arm64 user land with Python, numpy and onnxruntime."""
    from qkvx.harness.emulator import setup

    with console.status("setting up the arm64 emulator (debootstrap, wheels)"):
        info = setup(cache_dir, force)
    print(info.summary())


@emulator_app.command("status")
def emulator_status(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir")) -> None:
    """Say whether the emulator is ready, and what is missing with how to fix it (exit 1 if not)."""
    from qkvx.harness.emulator import status

    info = status(cache_dir)
    print(info.summary())
    if not info.ready:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
