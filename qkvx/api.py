"""The Python API behind every CLI command: typed functions that return data, never print."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qkvx.errors import QkvxError
from qkvx.spec import ModelSpec, cache_layout


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
    """What `qkvx inspect` reports: format, variant, spec, parameters and the KV-cache arithmetic."""
    from qkvx.loaders import load

    model = load(path, ignore_config_keys)
    spec: ModelSpec = model.spec
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    cache = cache_summary(spec)
    return {
        "path": str(Path(path)),
        "format": model.source["format"],
        "variant": spec.paper_name,
        "spec": spec.to_dict(),
        "params": params,
        "kv_tensors_per_layer": cache["model"]["kv_tensors_per_layer"],
        "kv_bytes_per_token": {dt: cache["model"][f"kv_bytes_per_token_{dt}"] for dt in ("fp32", "fp16")},
        "kv_bytes_at_max_positions": {dt: cache["model"][f"kv_bytes_at_context_{dt}"] for dt in ("fp32", "fp16")},
        "qkv_baseline": cache["qkv_baseline"],
        "kv_saving_percent": cache["saving_percent"],
        "meta": model.meta,
    }


def export(model: str | os.PathLike, recipe: str, out: str | os.PathLike, max_seq_len: int | None = None,
           force: bool = False, validate: bool = True, progress=lambda stage: None,
           tokenizer: str | os.PathLike | None = None, ignore_config_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Export a model with a recipe (name or YAML path) into directory `out`; returns the manifest.
    Raises QkvxError on bad input and GateFailed (a QkvxError) when validation fails."""
    from qkvx.export.pipeline import export_model

    return export_model(model, recipe, out, max_seq_len=max_seq_len, force=force, validate=validate,
                        progress=progress, tokenizer=tokenizer, ignore_config_keys=ignore_config_keys)


def generate(artifact_dir: str | os.PathLike, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, runtime: str | None = None):
    """Generate text from an export directory, tokenized through its tokenizer.json.
    Returns (text, Generation)."""
    from qkvx.export.manifest import read_manifest
    from qkvx.harness.generate import generate as run_generate
    from qkvx.harness.runners import open_runner
    from qkvx.tokenizer import TOKENIZER_FILE, load_tokenizer

    directory = Path(artifact_dir)
    manifest = read_manifest(directory)
    if not (directory / TOKENIZER_FILE).is_file():
        raise QkvxError(f"{directory}: no {TOKENIZER_FILE} to encode the prompt with (re-export with "
                        f"--tokenizer PATH)")
    tok = load_tokenizer(directory / TOKENIZER_FILE)
    eos = (manifest.get("tokenizer") or {}).get("eos_ids", tok.eos_ids)
    runtime = runtime or manifest["artifacts"][0]["format"]
    runner = open_runner(runtime, directory)
    ids = tok.encode(prompt)
    if not ids:
        raise QkvxError("empty prompt")
    if len(ids) >= runner.max_seq_len:
        raise QkvxError(f"prompt of {len(ids)} tokens does not fit the artifact's max_seq_len {runner.max_seq_len}")
    g = run_generate(runner, ids, max_new_tokens, temperature, top_k, seed, eos_ids=tuple(eos))
    return tok.decode(g.new_ids), g


def budget(model: str | os.PathLike | None = None, preset: str | None = None, variant: str | None = None,
           devices: list[str] | None = None, contexts: list[int] | None = None, weights: str | None = None,
           cache_dtype: str | None = None, compare: bool = False, backend: str | None = None,
           ignore_config_keys: tuple[str, ...] = ()):
    """Memory-budget rows (qkvx.budget.BudgetRow) for a model (checkpoint or export directory) or a
    preset + variant, on the named devices (default: all) at the given contexts."""
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

            spec = read_checkpoint(Path(model), ignore_config_keys).spec
    elif variant is not None:
        spec = ModelSpec.from_paper_name(variant, preset=preset or "paper-300m")
    else:
        raise QkvxError("budget needs a model path, or --preset with --variant")
    specs = b.compare_specs(spec) if compare else [spec]
    if compare:
        artifact_bytes = plan = None  # an artifact describes one variant only
    devs = [load_device(d) for d in devices] if devices else [d for d in list_devices() if d.kind != "host"]
    ctx = contexts or [spec.max_positions]
    return b.report(specs, devs, ctx, weights or "fp32", cache_dtype or "fp32", backend or "pte", chunk,
                    artifact_bytes, plan)


def budget_measure(export_dir: str | os.PathLike, contexts: list[int]):
    """The estimator checked on this host: for each context, the export run in a fresh process, its
    measured peak RSS beside the estimate (qkvx.budget_measure.MeasureRow)."""
    from qkvx.budget_measure import measure_artifact

    return measure_artifact(export_dir, contexts)


def convert(source: str | os.PathLike, to: str, init: str, out: str | os.PathLike, *, force: bool = False,
            calib: list[str | os.PathLike] | None = None, tokenizer: str | os.PathLike | None = None,
            fit_options: dict | None = None, ignore_config_keys: tuple[str, ...] = (),
            progress=lambda stage: None):
    """Build a K=V model (Q-K=V, Q-GQA-g, Q-MQA) from one with separate keys and values, by weight
    surgery with an init (avg | keep-k | keep-v | fit); writes a qkvx folder at `out`. Returns
    qkvx.convert.ConvertResult."""
    from qkvx.convert import convert as run

    return run(source, to, init, out, force=force, calib=calib, tokenizer=tokenizer, fit_options=fit_options,
               ignore_config_keys=ignore_config_keys, progress=progress)


def distill(student: str | os.PathLike, teacher: str | os.PathLike, data: list[str | os.PathLike],
            out: str | os.PathLike, tokens: int, *, eval_data: list[str | os.PathLike] | None = None,
            tokenizer: str | os.PathLike | None = None, force: bool = False, quiet: bool = True,
            ignore_config_keys: tuple[str, ...] = (), **options: Any):
    """Distill `teacher` into `student` on text files / datasets folders (resumes a run in `out`);
    options: qkvx.distill.DistillOptions fields. Under torchrun, every process calls this.
    Returns qkvx.distill.DistillResult."""
    import dataclasses

    from qkvx.distill import DistillOptions, distill as run

    known = {f.name for f in dataclasses.fields(DistillOptions)} - {"tokens"}
    if unknown := sorted(set(options) - known):
        raise QkvxError(f"unknown distill option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return run(student, teacher, data, out, DistillOptions(tokens=tokens, **options), eval_data=eval_data,
               tokenizer=tokenizer, force=force, quiet=quiet, ignore_config_keys=ignore_config_keys)
