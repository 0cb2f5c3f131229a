"""`qkvx export`: load -> decode form -> lower -> write artifact(s) -> validate -> manifest.

Everything is written into a temp directory beside the destination and renamed into place only when
every step, validation included, succeeded: a failure never leaves a half artifact or touches what
the user had.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

import qkvx
from qkvx.errors import GateFailed, QkvxError
from qkvx.harness.parity import Parity
from qkvx.export import manifest as mf
from qkvx.recipes import Recipe, load_recipe
from qkvx.spec import cache_layout
from qkvx.tokenizer import TOKENIZER_FILE, Tokenizer, byte_tokenizer, check_vocab, load_tokenizer

Progress = Callable[[str], None]
PARITY_PREFILL, PARITY_STEPS = 16, 64
PARITY_TEXT_WINDOWS = 4  # byte-level models: 4 windows of held-out text (perplexity over 316 predictions)


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
                 progress: Progress = lambda s: None, tokenizer: str | os.PathLike | None = None,
                 ignore_config_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Export `model_path` with `recipe` into directory `out`; returns the manifest. tokenizer: a
    tokenizer.json or tokenizer folder written beside the artifact (default: the source folder's
    own, else the byte-level one for a vocab-256 model)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    out = Path(out)
    if out.exists() and (not out.is_dir() or not force):  # fail before the slow part
        raise QkvxError(f"{out}: already exists (use --force to replace it)" if out.is_dir()
                        else f"{out}: exists and is not a directory")
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    progress("load")
    model = qkvx.load(model_path, ignore_config_keys)
    spec = model.spec
    tok = tok or _source_tokenizer(Path(model_path), spec)
    if tok is not None:
        check_vocab(tok, spec.vocab_size, str(model_path))
    seq = max_seq_len or recipe.max_seq_len or spec.max_positions
    if not 1 <= seq <= spec.max_positions:
        raise QkvxError(f"max_seq_len {seq} must be between 1 and the model's max_positions ({spec.max_positions})")
    t0 = time.perf_counter()
    with mf.atomic_output_dir(out, force) as tmp:
        progress(f"export {recipe.format} ({recipe.backend}, max_seq_len {seq})")
        artifact, extra = _lower(model, recipe, seq, tmp, tok.eos_ids if tok else [])
        data_files = extra.pop("data_files", [])  # ONNX external data beside the graph
        if tok is not None:
            (tmp / TOKENIZER_FILE).write_text(tok.to_json(), encoding="utf-8")
        export_s = time.perf_counter() - t0
        parity = None
        if validate:
            progress("validate")
            if recipe.format == "pte" and recipe.weights != "none":  # quantized in place: reload the fp32
                model = qkvx.load(model_path, ignore_config_keys)  # reference (mapped, so cheap)
            parity = _validate(model, recipe, tmp / artifact)
        layout = cache_layout(spec, recipe.kv_cache)
        manifest = {
            "qkvx_version": qkvx.__version__,
            "source": {"path": str(Path(model_path).resolve()), "format": model.source["format"],
                       "sha256": mf.sha256_source(Path(model_path)),
                       "ignored_config_keys": list(ignore_config_keys)},
            "tokenizer": {"file": TOKENIZER_FILE, **tok.describe()} if tok is not None else None,
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
            bad = next(Parity.from_dict(p) for p in parity.values() if not p["passed"])
            raise GateFailed(f"validation failed, {bad.describe()}; {out} was not written")
    return manifest


def _lower(model, recipe: Recipe, seq: int, tmp: Path, eos: list[int]) -> tuple[str, dict]:
    if recipe.format == "pte":
        from qkvx.export.executorch import export_pte

        # in place: the fp32 weights are not needed again, validation reloads its reference
        plan = export_pte(model, tmp / "model.pte", seq, recipe.prefill_chunk, eos_ids=eos, weights=recipe.weights,
                          group_size=recipe.group_size, quantize_lm_head=recipe.quantize_lm_head,
                          kv_cache=recipe.kv_cache, inplace=True)
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


def _source_tokenizer(source: Path, spec) -> Tokenizer | None:
    """The source folder's own tokenizer (a Hugging Face or qkvx folder), else the byte-level one
    for a vocab-256 model, else none."""
    if source.is_dir() and (source / TOKENIZER_FILE).is_file():
        return load_tokenizer(source)
    return byte_tokenizer() if spec.vocab_size == 256 else None


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
