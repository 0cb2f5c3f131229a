"""The Python API: one typed function per CLI command. Each validates its own arguments (an error a
user can act on is a QkvxError) and returns data; none prints. qkvx.cli parses and prints only."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkvx.errors import QkvxError
from qkvx.spec import ModelSpec, cache_layout

Progress = Callable[[str], None]


def cache_summary(spec: ModelSpec, context: int | None = None) -> dict[str, Any]:
    """Cache tensors per layer and bytes per token / at `context` (default max_positions), fp32 and
    fp16, for `spec` and for the unshared QKV model of the same size, with the saving."""
    context = spec.max_positions if context is None else context
    baseline = spec.replace(sharing="qkv", n_kv_head=spec.n_head)
    out: dict[str, Any] = {"context": context}
    for name, s in (("model", spec), ("qkv_baseline", baseline)):
        out[name] = {
            "variant": s.paper_name,
            "kv_tensors_per_layer": cache_layout(s).tensors_per_layer,
            **{f"kv_bytes_per_token_{dt}": cache_layout(s, dt).bytes_per_token for dt in ("fp32", "fp16")},
            **{f"kv_bytes_at_context_{dt}": cache_layout(s, dt).bytes_at(context) for dt in ("fp32", "fp16")},
        }
    base = out["qkv_baseline"]["kv_bytes_per_token_fp16"]
    out["saving_percent"] = 100.0 * (1 - out["model"]["kv_bytes_per_token_fp16"] / base)
    return out


def inspect(path: str | os.PathLike, ignore_config_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """`qkvx inspect`: format, variant, spec, parameters and the KV-cache arithmetic."""
    from qkvx.loaders import load

    model = load(path, ignore_config_keys)
    spec: ModelSpec = model.spec
    cache = cache_summary(spec)
    return {
        "path": str(Path(path)),
        "format": model.source["format"],
        "variant": spec.paper_name,
        "spec": spec.to_dict(),
        "params": sum(p.numel() for p in model.parameters()),  # tied: once
        "kv_tensors_per_layer": cache["model"]["kv_tensors_per_layer"],
        "kv_bytes_per_token": {dt: cache["model"][f"kv_bytes_per_token_{dt}"] for dt in ("fp32", "fp16")},
        "kv_bytes_at_max_positions": {
            dt: cache["model"][f"kv_bytes_at_context_{dt}"] for dt in ("fp32", "fp16")
        },
        "qkv_baseline": cache["qkv_baseline"],
        "kv_saving_percent": cache["saving_percent"],
        "meta": model.meta,
    }


def train(variant: str = "Q-K=V", **options: Any):
    """`qkvx train`: a byte-level model of any variant on Python's help texts (qkvx.train.train)."""
    from qkvx.train import train as train_model

    return train_model(variant, **options)


def export(
    model: str | os.PathLike,
    recipe: str,
    out: str | os.PathLike,
    max_seq_len: int | None = None,
    force: bool = False,
    validate: bool = True,
    progress: Progress = lambda stage: None,
    tokenizer: str | os.PathLike | None = None,
    ignore_config_keys: tuple[str, ...] = (),
):
    """`qkvx export`: a model with a recipe (name or YAML path) into directory `out`; returns the
    Manifest. Raises QkvxError on bad input and GateFailed (a QkvxError) when validation fails."""
    from qkvx.pipeline import export_model

    if max_seq_len is not None and max_seq_len < 1:
        raise QkvxError(f"--max-seq-len must be >= 1, got {max_seq_len}")
    return export_model(
        model,
        recipe,
        out,
        max_seq_len=max_seq_len,
        force=force,
        validate=validate,
        progress=progress,
        tokenizer=tokenizer,
        ignore_config_keys=ignore_config_keys,
    )


def generate(
    artifact_dir: str | os.PathLike,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    runtime: str | None = None,
):
    """`qkvx generate`: text from an export directory, tokenized through its tokenizer.json.
    Returns (text, Generation)."""
    from qkvx.artifact import Manifest
    from qkvx.harness.generate import generate as run_generate
    from qkvx.harness.runners import open_runner, runtimes_for
    from qkvx.tokenizer import TOKENIZER_FILE, load_tokenizer

    if max_new_tokens < 1 or temperature < 0 or (top_k is not None and top_k < 1):
        raise QkvxError("--max-new-tokens and --top-k must be >= 1 and --temperature >= 0")
    directory = Path(artifact_dir)
    manifest = Manifest.read(directory)
    if not (directory / TOKENIZER_FILE).is_file():
        raise QkvxError(
            f"{directory}: no {TOKENIZER_FILE} to encode the prompt with (re-export with --tokenizer PATH)"
        )
    tok = load_tokenizer(directory / TOKENIZER_FILE)
    eos = manifest.tokenizer.eos_ids if manifest.tokenizer is not None else tuple(tok.eos_ids)
    runner = open_runner(runtime or runtimes_for(manifest.format)[0], directory)
    ids = tok.encode(prompt)
    if not ids:
        raise QkvxError("empty prompt")
    if len(ids) >= runner.max_seq_len:
        raise QkvxError(
            f"prompt of {len(ids)} tokens does not fit the artifact's max_seq_len {runner.max_seq_len}"
        )
    try:
        g = run_generate(runner, ids, max_new_tokens, temperature, top_k, seed, eos_ids=tuple(eos))
    finally:
        runner.close()
    return tok.decode(g.new_ids), g


def validate(
    artifact_dir: str | os.PathLike,
    runtimes: list[str] | None = None,
    model: str | os.PathLike | None = None,
    text: str | os.PathLike | None = None,
    tokens: int | None = None,
    steps: int = 64,
    device: str | None = None,
    ignore_config_keys: tuple[str, ...] = (),
):
    """`qkvx validate`: the artifact on each runtime vs its source model (qkvx.validate.Validation)."""
    from qkvx.validate import validate as run

    if tokens is not None and tokens < 2:
        raise QkvxError(f"--tokens must be >= 2, got {tokens}")
    return run(
        artifact_dir,
        runtimes,
        model,
        str(text) if text else None,
        tokens,
        steps,
        device=device,
        ignore_config_keys=ignore_config_keys,
    )


EVAL_STEPS = 112  # windows of 128 tokens: 16 prefilled, 112 decoded


def evaluate(
    artifact_dir: str | os.PathLike,
    text: str | os.PathLike | None = None,
    windows: int = 8,
    model: str | os.PathLike | None = None,
    ignore_config_keys: tuple[str, ...] = (),
):
    """`qkvx eval`: held-out perplexity and top-1 agreement vs the fp32 eager model, through the
    artifact's runtime, over `windows` windows of 128 tokens."""
    from qkvx.validate import validate as run

    if windows < 1:
        raise QkvxError(f"--windows must be >= 1, got {windows}")
    return run(
        artifact_dir,
        None,
        model,
        str(text) if text else None,
        None,
        steps=EVAL_STEPS,
        windows=windows,
        ignore_config_keys=ignore_config_keys,
    )


def bench(
    out: str | os.PathLike,
    sizes: list[str],
    variants: list[str],
    backends: list[str] | None,
    contexts: list[int],
    repeats: int = 3,
    steps: int = 16,
    progress: Progress = print,
):
    """`qkvx bench`: every variant on every backend; writes OUT/bench.json and bench.md."""
    from qkvx.bench import run_bench
    from qkvx.bench.suite import BACKENDS, SIZES, spec_for

    backends = backends or list(BACKENDS)
    for what, given, known in (("size", sizes, SIZES), ("backend", backends, BACKENDS)):
        if bad := [g for g in given if g not in known]:
            raise QkvxError(f"unknown {what} {bad[0]!r}; known: {', '.join(known)}")
    for v in variants:
        spec_for("20M", v)  # an unknown variant fails here, in one line
    ctx = tuple(sorted(contexts))
    if not ctx or ctx[0] <= steps or ctx[-1] > 2048 or repeats < 1:
        raise QkvxError(
            f"--contexts must exceed --steps ({steps}) and be at most 2048, and --repeats >= 1; "
            f"got {list(contexts)}, {repeats}"
        )
    return run_bench(
        out, tuple(sizes), tuple(variants), tuple(backends), ctx, repeats, steps, progress=progress
    )


def soak(out: str | os.PathLike, steps: int = 4096, stream: str = "random", progress: Progress = print):
    """`qkvx soak`: decode steps through the .pte and ONNX vs full recompute, window by window."""
    from qkvx.soak import run_soak

    if stream not in ("random", "greedy") or steps < 1:
        raise QkvxError(f"--stream must be random or greedy and --steps >= 1, got {stream!r}, {steps}")
    return run_soak(out, steps, stream=stream, progress=progress)


def devices():
    """`qkvx devices`: every device profile (devices/*.toml; host is measured now)."""
    from qkvx.devices import list_devices

    return list_devices()


@dataclass
class BudgetResult:
    rows: list = field(default_factory=list)  # qkvx.budget.BudgetRow
    measured: list = field(default_factory=list)  # qkvx.budget_measure.MeasureRow (--measure)
    plot: Path | None = None


PLOT_CONTEXTS = [2**k for k in range(7, 25)]  # a plot's curves need many contexts


def budget(
    model: str | os.PathLike | None = None,
    preset: str | None = None,
    variant: str | None = None,
    devices: list[str] | None = None,
    contexts: list[int] | None = None,
    weights: str | None = None,
    cache_dtype: str | None = None,
    compare: bool = False,
    backend: str | None = None,
    plot: str | os.PathLike | None = None,
    measure: bool = False,
    ignore_config_keys: tuple[str, ...] = (),
) -> BudgetResult:
    """`qkvx budget`: memory rows (qkvx.budget.BudgetRow) for a model (checkpoint or export
    directory) or a preset + variant, on the named devices (default: all) at the given contexts;
    `plot` writes memory vs context; `measure` runs an export on this host to each context instead."""
    if contexts is not None and min(contexts, default=1) < 1:
        raise QkvxError(f"--context must be >= 1, got {contexts}")
    if measure:
        given = [
            name
            for name, v in (
                ("--preset", preset),
                ("--variant", variant),
                ("--device", devices),
                ("--weights", weights),
                ("--cache-dtype", cache_dtype),
                ("--compare", compare),
                ("--plot", plot),
            )
            if v
        ]
        if given or model is None:
            raise QkvxError(
                f"--measure takes an export directory and --context, not {given[0]}"
                if given
                else "--measure needs an export directory"
            )
        from qkvx.budget_measure import measure_artifact

        return BudgetResult(measured=measure_artifact(model, contexts or []))
    if preset is not None and variant is None and not compare:
        raise QkvxError("--preset needs --variant (or --compare)")
    variant = variant or ("QKV" if preset and compare else None)
    rows = _budget_rows(
        model, preset, variant, devices, contexts, weights, cache_dtype, compare, backend, ignore_config_keys
    )
    result = BudgetResult(rows=rows)
    if plot is not None:
        from qkvx.budget_report import plot_png

        top = max([*(contexts or []), 4096, min(2 * max(r.max_context_memory for r in rows), 2**22)])
        grid = [c for c in PLOT_CONTEXTS if c <= top]
        result.plot = plot_png(
            _budget_rows(
                model,
                preset,
                variant,
                devices,
                grid,
                weights,
                cache_dtype,
                compare,
                backend,
                ignore_config_keys,
            ),
            plot,
        )
    return result


def _budget_rows(model, preset, variant, devices, contexts, weights, cache_dtype, compare, backend, ignore):
    from qkvx import budget as b
    from qkvx.devices import list_devices, load_device

    artifact_bytes = plan = None
    chunk = 64
    if model is not None:
        facts = b.read_export(model)
        if facts is not None:  # an export: real artifact size and memory plan
            spec, artifact_bytes, chunk, plan = facts.spec, facts.artifact_bytes, facts.chunk, facts.plan
            backend = backend or facts.backend
            cache_dtype = cache_dtype or facts.cache_dtype
        else:
            from qkvx.loaders import read_checkpoint

            spec = read_checkpoint(Path(model), ignore).spec
    elif variant is not None:
        spec = ModelSpec.from_paper_name(variant, preset=preset or "paper-300m")
    else:
        raise QkvxError("budget needs a model path, or --preset with --variant")
    specs = b.compare_specs(spec) if compare else [spec]
    if compare:
        artifact_bytes = plan = None  # an artifact describes one variant only
    devs = [load_device(d) for d in devices] if devices else [d for d in list_devices() if d.kind != "host"]
    return b.report(
        specs,
        devs,
        contexts or [spec.max_positions],
        weights or "fp32",
        cache_dtype or "fp32",
        backend or "pte",
        chunk,
        artifact_bytes,
        plan,
    )


def emulator_setup(cache_dir: str | os.PathLike | None = None, force: bool = False):
    """`qkvx emulator setup`: build (once; idempotent) the arm64 user land (qkvx.harness.emulator)."""
    from qkvx.harness.emulator import setup

    return setup(cache_dir, force)


def emulator_status(cache_dir: str | os.PathLike | None = None):
    from qkvx.harness.emulator import status

    return status(cache_dir)


def convert(
    source: str | os.PathLike,
    to: str,
    init: str,
    out: str | os.PathLike,
    *,
    force: bool = False,
    calib: list[str | os.PathLike] | None = None,
    tokenizer: str | os.PathLike | None = None,
    fit_options: dict | None = None,
    ignore_config_keys: tuple[str, ...] = (),
    progress=lambda stage: None,
):
    """Build a K=V model (Q-K=V, Q-GQA-g, Q-MQA) from one with separate keys and values, by weight
    surgery with an init (avg | keep-k | keep-v | fit); writes a qkvx folder at `out`. Returns
    qkvx.convert.ConvertResult."""
    from qkvx.convert import convert as run

    return run(
        source,
        to,
        init,
        out,
        force=force,
        calib=calib,
        tokenizer=tokenizer,
        fit_options=fit_options,
        ignore_config_keys=ignore_config_keys,
        progress=progress,
    )


def distill(
    student: str | os.PathLike,
    teacher: str | os.PathLike,
    data: list[str | os.PathLike],
    out: str | os.PathLike,
    tokens: int,
    *,
    eval_data: list[str | os.PathLike] | None = None,
    tokenizer: str | os.PathLike | None = None,
    force: bool = False,
    quiet: bool = True,
    ignore_config_keys: tuple[str, ...] = (),
    **options: Any,
):
    """Distill `teacher` into `student` on text files / datasets folders (resumes a run in `out`);
    options: qkvx.distill.DistillOptions fields. Under torchrun, every process calls this.
    Returns qkvx.distill.DistillResult."""
    import dataclasses

    from qkvx.distill import DistillOptions
    from qkvx.distill import distill as run

    known = {f.name for f in dataclasses.fields(DistillOptions)} - {"tokens"}
    if unknown := sorted(set(options) - known):
        raise QkvxError(f"unknown distill option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return run(
        student,
        teacher,
        data,
        out,
        DistillOptions(tokens=tokens, **options),
        eval_data=eval_data,
        tokenizer=tokenizer,
        force=force,
        quiet=quiet,
        ignore_config_keys=ignore_config_keys,
    )
