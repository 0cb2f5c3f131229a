"""The bench's models and exports: built once under OUT/models, each export in its own process so
its wall time and peak RSS are the export's alone.

Layout: OUT/models/{size}/{variant}/model      native qkvx checkpoint (random weights, seed 0)
                                   /{backend}    `qkvx export --recipe {backend} --no-validate`
        OUT/models/{size}/hf, optimum           HF GPT2LMHeadModel + optimum-onnx's export of it
A finished export is reused by the next run, with the record of how long it took (export.json).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qkvx.bench.suite import BACKENDS, COMMON, SIZES, Config, spec_for
from qkvx.util import variant_slug

QKVX = [sys.executable, "-m", "qkvx"]


def run_measured(cmd: list, env: dict | None = None, check: bool = True) -> dict:
    """Run a Python program `[sys.executable, "-m" | "-c", ...]` to completion in a fresh process:
    its wall seconds, its own peak RSS in bytes (VmHWM, through qkvx.bench.peak), its stdout and
    exit code. check: a failed run raises (with its stderr's tail)."""
    if cmd[0] != sys.executable or cmd[1] not in ("-m", "-c"):
        raise ValueError(f"run_measured runs Python programs only, got {cmd[:2]}")
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak"
        full = [sys.executable, "-m", "qkvx.bench.peak", str(peak), *map(str, cmd[1:])]
        t0 = time.perf_counter()
        r = subprocess.run(full, capture_output=True, text=True, env={**os.environ, **(env or {})})
        wall = time.perf_counter() - t0
        if r.returncode != 0 and check:
            raise RuntimeError(f"failed (exit {r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr[-3000:]}")
        return {
            "seconds": round(wall, 2),
            "peak_rss_bytes": int(peak.read_text()) if peak.exists() else 0,
            "stdout": r.stdout,
            "stderr": r.stderr,
            "returncode": r.returncode,
        }


def model_dir(out: Path, size: str, variant: str) -> Path:
    return out / "models" / size / variant_slug(variant)


def artifact_path(out: Path, cfg: Config) -> Path:
    """The file a backend runs: the native checkpoint for eager, else the export's artifact."""
    if cfg.backend == "optimum-onnx":
        return out / "models" / cfg.size / "optimum" / "model.onnx"
    base = model_dir(out, cfg.size, cfg.variant)
    backend = BACKENDS[cfg.backend]
    if backend.format == "eager":
        return base / "model"
    folder = backend.artifact_of or cfg.backend
    return base / folder / ("model.pte" if backend.format == "pte" else "model.onnx")


def _ensure_model(out: Path, size: str, variant: str) -> Path:
    folder = model_dir(out, size, variant) / "model"
    if not (folder / "model.safetensors").is_file() and not folder.is_dir():
        from qkvx.loaders.native import save
        from qkvx.models.transformer import Transformer

        save(Transformer(spec_for(size, variant)).init_weights(0), folder)
    return folder


def _ensure_optimum(out: Path, size: str) -> dict:
    """optimum-onnx's text-generation-with-past export of the HF GPT-2 with the bench's dims."""
    base = out / "models" / size
    record = base / "optimum" / "export.json"
    if record.is_file():
        return json.loads(record.read_text())
    if not (base / "hf" / "config.json").is_file():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        d = SIZES[size]
        config = GPT2Config(
            n_layer=d["n_layer"],
            n_embd=d["n_embd"],
            n_head=d["n_head"],
            vocab_size=COMMON["vocab_size"],
            n_positions=COMMON["max_positions"],
        )
        GPT2LMHeadModel(config).eval().save_pretrained(base / "hf")
    code = (
        "from optimum.exporters.onnx import main_export; import sys; "
        "main_export(sys.argv[1], output=sys.argv[2], task='text-generation-with-past', "
        "local_files_only=True, do_validation=False)"
    )
    rec = run_measured(
        [sys.executable, "-c", code, base / "hf", base / "optimum"], env={"HF_HUB_OFFLINE": "1"}
    )
    rec.pop("stdout")
    record.write_text(json.dumps(rec))
    return rec


def ensure_artifact(out: Path, cfg: Config) -> dict | None:
    """Build what `cfg` runs (reusing a finished one); the export's wall time and peak RSS."""
    if cfg.backend == "optimum-onnx":
        return _ensure_optimum(out, cfg.size)
    model = _ensure_model(out, cfg.size, cfg.variant)
    backend = BACKENDS[cfg.backend]
    if backend.artifact_of:  # the same file under other session options: its export, built once
        ensure_artifact(out, Config(cfg.size, cfg.variant, backend.artifact_of))
        return None
    recipe = backend.recipe
    if recipe is None:
        return None
    dest = model_dir(out, cfg.size, cfg.variant) / cfg.backend
    record = dest / "export.json"
    if record.is_file():
        return json.loads(record.read_text())
    rec = run_measured(
        [
            *QKVX,
            "export",
            model,
            "--recipe",
            recipe,
            "--out",
            dest,
            "--no-validate",
            "--force",
            "--max-seq-len",
            COMMON["max_positions"],
        ]
    )
    rec.pop("stdout")
    record.write_text(json.dumps(rec))
    return rec


def prepare(out: Path, cfgs: list[Config], progress: Callable[[str], None] = print) -> dict[str, dict]:
    """Every artifact the configurations need; {config key: export record} for the exported ones."""
    records = {}
    for cfg in cfgs:
        rec = ensure_artifact(out, cfg)
        if rec is not None:
            records[cfg.key] = rec
            progress(
                f"  {cfg.key}: export {rec['seconds']:.0f} s, "
                f"peak RSS {rec['peak_rss_bytes'] / 2**20:,.0f} MiB"
            )
    return records
