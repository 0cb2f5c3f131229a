"""qkvx's own format: model.safetensors + qkvx.json (the ModelSpec). Written by train and any import."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from qkvx.errors import QkvxError
from qkvx.loaders.common import Checkpoint, read_safetensors
from qkvx.spec import ModelSpec
from qkvx.util import atomic_dir

SPEC_FILE = "qkvx.json"
WEIGHTS_FILE = "model.safetensors"


def is_native(path: Path) -> bool:
    return path.is_dir() and (path / SPEC_FILE).is_file()


def read(path: Path) -> Checkpoint:
    spec_path, weights_path = path / SPEC_FILE, path / WEIGHTS_FILE
    try:
        meta = json.loads(spec_path.read_text())
    except json.JSONDecodeError as e:
        raise QkvxError(f"{spec_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict):
        raise QkvxError(f"{spec_path}: expected an object with a 'spec' key")
    spec = ModelSpec.from_dict(meta["spec"], source=str(spec_path))
    if not weights_path.is_file():
        raise QkvxError(f"{weights_path}: missing (a native model needs {WEIGHTS_FILE} beside {SPEC_FILE})")
    state = read_safetensors(weights_path)
    meta = {k: v for k, v in meta.items() if k not in ("spec", "variant")}
    return Checkpoint(spec=spec, state=state, format="native", path=path, meta=meta)


def save(model, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write model.safetensors + qkvx.json atomically (temp dir, then rename), replacing `directory`."""
    out = Path(directory)
    spec: ModelSpec = model.spec
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if spec.tie_embeddings:
        state.pop("lm_head.weight", None)
    with atomic_dir(out, force=True) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {"spec": spec.to_dict(), "variant": spec.paper_name, **(extra or {})}
        (tmp / SPEC_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out
