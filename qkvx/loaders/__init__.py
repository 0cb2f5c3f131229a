"""Load a checkpoint from any of the three sources into (ModelSpec, weights) and a model.

Loading never executes code from a file: torch.load(weights_only=True), safetensors preferred.
"""

from __future__ import annotations

import os
from pathlib import Path

from qkvx.errors import QkvxError
from qkvx.loaders import hf, native, paper
from qkvx.loaders.common import Checkpoint, build_model


def read_checkpoint(path: str | os.PathLike, ignore_config_keys: tuple[str, ...] = ()) -> Checkpoint:
    """Detect the format of `path` and read it (no module is built). ignore_config_keys: paper
    model_config keys the user vouches do not change the model (unknown keys are errors)."""
    p = Path(path)
    if not p.exists():
        raise QkvxError(f"{p}: no such file or directory")
    if native.is_native(p):
        return native.read(p)
    if hf.is_hf(p):
        return hf.read(p)
    if p.is_file():
        return paper.read(p, tuple(ignore_config_keys))
    raise QkvxError(
        f"{p}: not a model (expected a paper .pt file, a Hugging Face folder with "
        f"config.json, or a qkvx folder with {native.SPEC_FILE})"
    )


def load(path: str | os.PathLike, ignore_config_keys: tuple[str, ...] = ()):
    """The model (eval mode) with `.spec`, `.source` (format, path) and `.meta` set."""
    ckpt = read_checkpoint(path, ignore_config_keys)
    model = build_model(ckpt)
    model.source = {"format": ckpt.format, "path": str(ckpt.path)}
    model.meta = ckpt.meta
    return model
