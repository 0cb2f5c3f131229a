"""`qkvx export`, the orchestrator: load -> (quantize) -> export -> validate -> manifest.

It calls the generic steps below it (loaders, qkvx.export's exporters, the harness's parity) and
writes everything into a temp directory beside the destination, renamed into place only when every
step, validation included, succeeded: a failure never leaves a half artifact or touches what the
user had.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qkvx.artifact import ArtifactFile, CacheFacts, ExportInfo, Manifest, Source, TokenizerInfo
from qkvx.errors import GateFailed, QkvxError
from qkvx.harness.parity import Parity, check_parity
from qkvx.harness.runners import open_runner, runtimes_for
from qkvx.loaders import load
from qkvx.recipes import Recipe, load_recipe
from qkvx.spec import cache_layout
from qkvx.tokenizer import TOKENIZER_FILE, Tokenizer, byte_tokenizer, check_vocab, load_tokenizer
from qkvx.util import atomic_dir, check_max_seq_len, check_new_output, sha256_source
from qkvx.validate import BYTE_WINDOWS, PREFILL, token_stream
from qkvx.version import __version__

Progress = Callable[[str], None]
PARITY_STEPS = 64  # decode steps per validation window after the prefill


def export_model(
    model_path: str | os.PathLike,
    recipe: str | Recipe,
    out: str | os.PathLike,
    max_seq_len: int | None = None,
    force: bool = False,
    validate: bool = True,
    progress: Progress = lambda s: None,
    tokenizer: str | os.PathLike | None = None,
    ignore_config_keys: tuple[str, ...] = (),
) -> Manifest:
    """Export `model_path` with `recipe` into directory `out`; returns the manifest. tokenizer: a
    tokenizer.json or tokenizer folder written beside the artifact (default: the source folder's
    own, else the byte-level one for a byte-level model)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    out, source = Path(out), Path(model_path)
    check_new_output(out, force)  # before the slow part
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    progress("load")
    model = load(source, ignore_config_keys)
    spec, fmt = model.spec, model.source["format"]
    tok = tok or _source_tokenizer(source, spec)
    if tok is not None:
        check_vocab(tok, spec.vocab_size, str(source))
    seq = check_max_seq_len(max_seq_len or recipe.max_seq_len or spec.max_positions, spec.max_positions)
    t0 = time.perf_counter()
    with atomic_dir(out, force) as tmp:
        progress(f"export {recipe.format} ({recipe.backend}, max_seq_len {seq})")
        artifact, cache, export = _lower(model, recipe, seq, tmp, tok.eos_ids if tok else [])
        if tok is not None:
            (tmp / TOKENIZER_FILE).write_text(tok.to_json(), encoding="utf-8")
        export_s = time.perf_counter() - t0
        parity = None
        if validate:
            progress("validate")
            if recipe.format == "pte" and recipe.weights != "none":  # quantized in place: reload the
                model = load(source, ignore_config_keys)  # fp32 reference (mapped, so cheap)
            parity = _validate(model, recipe, tmp / artifact.file)
        manifest = Manifest(
            qkvx_version=__version__,
            source=Source(
                path=str(source.resolve()),
                format=fmt,
                sha256=sha256_source(source),
                ignored_config_keys=tuple(ignore_config_keys),
            ),
            tokenizer=TokenizerInfo(
                file=TOKENIZER_FILE, source=tok.source, vocab_size=tok.vocab_size, eos_ids=tuple(tok.eos_ids)
            )
            if tok is not None
            else None,
            variant=spec.paper_name,
            spec=spec,
            recipe=recipe,
            max_seq_len=seq,
            artifacts=(artifact,),
            cache=CacheFacts(**cache_layout(spec, recipe.kv_cache).to_dict(context=seq), **cache),
            parity={p.runtime: p.to_dict() for p in parity} if parity is not None else None,
            export=ExportInfo(
                seconds=round(export_s, 2), torch=torch.__version__, host=platform.machine(), **export
            ),
        )
        manifest.write(tmp)
        if parity is not None and (bad := next((p for p in parity if not p.passed), None)):
            raise GateFailed(f"validation failed, {bad.describe()}; {out} was not written")
    return manifest


def _lower(model, recipe: Recipe, seq: int, tmp: Path, eos: list[int]) -> tuple[ArtifactFile, dict, dict]:
    """Write the artifact; returns its files and the CacheFacts / ExportInfo fields read back from it."""
    if recipe.format == "pte":
        from qkvx.export.executorch import export_pte

        # in place: the fp32 weights are not needed again, validation reloads its reference
        plan = export_pte(
            model,
            tmp / "model.pte",
            seq,
            recipe.prefill_chunk,
            eos_ids=eos,
            weights=recipe.weights,
            group_size=recipe.group_size,
            quantize_lm_head=recipe.quantize_lm_head,
            kv_cache=recipe.kv_cache,
            kernels=recipe.attention_kind,
            inplace=True,
        )
        return (
            ArtifactFile.of(tmp, "model.pte", "pte"),
            dict(
                program_cache_buffers=plan.cache_buffers,
                program_cache_bytes=plan.cache_bytes,
                program_zero_point_bytes=plan.zero_point_bytes,
            ),
            dict(planned_bytes=plan.planned_bytes, prefill_chunk=min(recipe.prefill_chunk, seq)),
        )
    if recipe.format == "onnx":
        from qkvx.export.onnx import export_onnx

        files, graph = export_onnx(model, tmp, seq, kv_cache=recipe.kv_cache, attention=recipe.attention_kind)
        export = dict(weight_matmuls=graph.weight_matmuls)
        if recipe.weights != "none":  # quantize the saved graph in place: the artifact is the quantized model
            from qkvx.export.onnx_quant import quantize_onnx_weights

            files, graph, export["weights"] = quantize_onnx_weights(tmp, recipe, model.spec)
        return (
            ArtifactFile.of(tmp, files[0], "onnx", tuple(files[1:])),
            dict(
                graph_cache_inputs=graph.to_dict()["cache_inputs"],
                graph_cache_bytes_per_token=graph.cache_bytes_per_token(),
            ),
            export,
        )
    raise QkvxError(f"recipe {recipe.name!r}: format {recipe.format!r} has no exporter yet")


def _source_tokenizer(source: Path, spec) -> Tokenizer | None:
    """The source folder's own tokenizer (a Hugging Face or qkvx folder), else the byte-level one
    for a byte-level model, else none."""
    if source.is_dir() and (source / TOKENIZER_FILE).is_file():
        return load_tokenizer(source)
    return byte_tokenizer() if spec.byte_level else None


def _validate(model, recipe: Recipe, artifact: Path) -> list[Parity]:
    """The artifact on its format's default runtime vs the eager model: PARITY_STEPS decode steps
    after a PREFILL-token prefill, BYTE_WINDOWS windows of held-out text for byte-level models."""
    runner = open_runner(runtimes_for(recipe.format)[0], artifact)
    n = min(PREFILL + PARITY_STEPS, runner.max_seq_len)
    windows = BYTE_WINDOWS if model.spec.byte_level else 1
    tokens, text, _ = token_stream(model.spec, None, n * windows)
    return [check_parity(model, runner, tokens, min(PREFILL, n - 1), recipe.gates, windows, text)]
