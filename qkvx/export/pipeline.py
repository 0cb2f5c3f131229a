"""`qkvx export`: load -> decode form -> lower -> write artifact(s) -> validate -> manifest.

Everything is written into a temp directory beside the destination and renamed into place only when
every step, validation included, succeeded: a failure never leaves a half artifact or touches what
the user had.
"""
from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

import qkvx
from qkvx.errors import GateFailed, QkvxError
from qkvx.export import manifest as mf
from qkvx.recipes import Recipe, load_recipe
from qkvx.spec import cache_layout

Progress = Callable[[str], None]
PARITY_PREFILL, PARITY_STEPS = 16, 64
PARITY_TEXT_WINDOWS = 4  # byte-level models: 4 windows of held-out text (perplexity over 316 predictions)
BYTE_EOS = 0  # byte-level models: NUL never occurs in text, so it is the end-of-sequence id


def validation_tokens(model, n: int, seed: int = 0) -> torch.Tensor:
    """The token stream validation feeds: held-out text for byte-level models trained by qkvx (so
    top-1 agreement is about real predictions), seeded random ids otherwise."""
    if model.spec.vocab_size == 256:
        from qkvx.train import split_corpus

        heldout = split_corpus()[1]
        return heldout[:n].clone()
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.spec.vocab_size, (n,), generator=g)


def export_model(model_path: str | os.PathLike, recipe: str | Recipe, out: str | os.PathLike,
                 max_seq_len: int | None = None, force: bool = False, validate: bool = True,
                 progress: Progress = lambda s: None) -> dict[str, Any]:
    """Export `model_path` with `recipe` into directory `out`; returns the manifest."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    out = Path(out)
    if out.exists() and (not out.is_dir() or not force):  # fail before the slow part
        raise QkvxError(f"{out}: already exists (use --force to replace it)" if out.is_dir()
                        else f"{out}: exists and is not a directory")
    progress("load")
    model = qkvx.load(model_path)
    spec = model.spec
    seq = max_seq_len or recipe.max_seq_len or spec.max_positions
    if not 1 <= seq <= spec.max_positions:
        raise QkvxError(f"max_seq_len {seq} must be between 1 and the model's max_positions ({spec.max_positions})")
    t0 = time.perf_counter()
    with mf.atomic_output_dir(out, force) as tmp:
        progress(f"export {recipe.format} ({recipe.backend}, max_seq_len {seq})")
        artifact, extra = _lower(model, recipe, seq, tmp)
        data_files = extra.pop("data_files", [])  # ONNX external data beside the graph
        _write_tokenizer(model, Path(model_path), tmp)
        export_s = time.perf_counter() - t0
        parity = None
        if validate:
            progress("validate")
            parity = _validate(model, recipe, tmp / artifact)
        layout = cache_layout(spec, recipe.kv_cache)
        manifest = {
            "qkvx_version": qkvx.__version__,
            "source": {"path": str(Path(model_path).resolve()), "format": model.source["format"],
                       "sha256": mf.sha256_source(Path(model_path))},
            "variant": spec.paper_name,
            "spec": spec.to_dict(),
            "recipe": recipe.to_dict(),
            "max_seq_len": seq,
            "artifacts": [_artifact(tmp, artifact, recipe.format, data_files)],
            "cache": {**layout.to_dict(context=seq), **extra.get("cache", {})},
            "parity": parity,
            "export": {"seconds": round(export_s, 2), "torch": torch.__version__, "host": platform.machine(),
                       **{k: v for k, v in extra.items() if k != "cache"}},
        }
        mf.write_manifest(tmp, manifest)
        if parity is not None and not all(p["passed"] for p in parity.values()):
            bad = next(n for n, p in parity.items() if not p["passed"])
            raise GateFailed(f"validation failed, {gate_message(bad, parity[bad])}; {out} was not written")
    return manifest


def _lower(model, recipe: Recipe, seq: int, tmp: Path) -> tuple[str, dict]:
    if recipe.format == "pte":
        from qkvx.export.executorch import export_pte

        eos = [BYTE_EOS] if model.spec.vocab_size == 256 else []
        pte, plan = export_pte(model, seq, recipe.prefill_chunk, eos_ids=eos, weights=recipe.weights,
                               group_size=recipe.group_size, quantize_lm_head=recipe.quantize_lm_head,
                               kv_cache=recipe.kv_cache)
        (tmp / "model.pte").write_bytes(pte)
        return "model.pte", {"cache": {"program_cache_buffers": plan.cache_buffers,
                                       "program_cache_bytes": plan.cache_bytes,
                                       "program_zero_point_bytes": plan.zero_point_bytes},
                             "planned_bytes": plan.planned_bytes, "prefill_chunk": min(recipe.prefill_chunk, seq)}
    if recipe.format == "onnx":
        from qkvx.export.onnx import export_onnx

        files, graph = export_onnx(model, tmp, seq, kv_cache=recipe.kv_cache, fused_attention=recipe.fused_attention,
                                   attention=recipe.attention)
        extra: dict[str, Any] = {"weight_matmuls": graph.weight_matmuls}
        if recipe.weights != "none":  # quantize the saved graph in place: the artifact is the quantized model
            from qkvx.quant.onnx_weights import quantize_onnx_weights

            files, graph, extra["weights"] = quantize_onnx_weights(tmp, recipe, model.spec)
        return files[0], {"cache": {"graph_cache_inputs": graph.to_dict()["cache_inputs"],
                                    "graph_cache_bytes_per_token": graph.cache_bytes_per_token()},
                          **extra, "data_files": files[1:]}
    raise QkvxError(f"recipe {recipe.name!r}: format {recipe.format!r} has no exporter yet")


def _artifact(tmp: Path, name: str, fmt: str, data_files: list[str]) -> dict[str, Any]:
    entry = mf.artifact_entry(tmp, name, fmt)
    if data_files:  # part of the one model (ONNX weights beside the graph), listed in its entry
        entry["data"] = [mf.artifact_entry(tmp, f, f"{fmt}-data") for f in data_files]
    return entry


def _write_tokenizer(model, source: Path, tmp: Path) -> None:
    """tokenizer.json for ExecuTorch's LLM runner: the source's own, else byte-level for vocab 256."""
    own = source / "tokenizer.json" if source.is_dir() else None
    if own is not None and own.is_file():
        shutil.copyfile(own, tmp / "tokenizer.json")
    elif model.spec.vocab_size == 256:
        from qkvx.export.tokenizer import byte_tokenizer_json

        (tmp / "tokenizer.json").write_text(byte_tokenizer_json(), encoding="utf-8")


def _validate(model, recipe: Recipe, artifact: Path) -> dict[str, dict]:
    from qkvx.harness.parity import check_parity
    from qkvx.harness.runners import get_runner

    runner = get_runner(recipe.format)(artifact)
    n = min(PARITY_PREFILL + PARITY_STEPS, runner.max_seq_len)
    text = model.spec.vocab_size == 256  # qkvx-trained byte models: held-out text, perplexity too
    windows = PARITY_TEXT_WINDOWS if text else 1
    tokens = validation_tokens(model, n * windows)
    result = check_parity(model, runner, tokens, min(PARITY_PREFILL, n - 1), recipe.gates, windows, text)
    return {runner.name: result.to_dict()}


def gate_message(name: str, p: dict) -> str:
    """One line naming the failed gate(s) of runtime `name` and the measured values."""
    parts = [f"max |dlogit| {p['max_abs_dlogit']:.3g}" + (f" (bound {p['bound']:.3g})" if p["bound"] is not None else ""),
             f"top-1 agreement {p['top1_agreement']:.3f}"]
    if p.get("ppl_change") is not None:
        parts.append(f"perplexity {p['ppl']:.3f} vs {p['ppl_ref']:.3f} eager ({100 * p['ppl_change']:+.2f} %)")
    return f"{name}: gate(s) {', '.join(p['failed'])} failed: {'; '.join(parts)}"
