"""Export recipes (export_recipes/*.yaml): small validated dataclasses; unknown keys are errors."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qkvx.config import typed as _typed
from qkvx.errors import QkvxError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "export_recipes"
FORMATS = {"pte": ("xnnpack",), "onnx": ("cpu",)}
WEIGHTS = ("none",)
KV_CACHE = ("fp32",)


@dataclass(frozen=True)
class Gates:
    """Parity gates (DESIGN.md 6): fp32 artifacts pass when every step's max |dlogit| <=
    max_rel_dlogit * max|logit| + abs_dlogit_floor and top-1 agreement >= min_top1."""

    max_rel_dlogit: float = 1e-4
    abs_dlogit_floor: float = 1e-5
    min_top1: float = 1.0
    max_ppl_change: float | None = None  # relative, e.g. 0.03 = 3 %

    def bound(self, max_abs_logit: float) -> float:
        return self.max_rel_dlogit * max_abs_logit + self.abs_dlogit_floor


@dataclass(frozen=True)
class Recipe:
    name: str
    format: str  # pte | onnx
    backend: str
    weights: str = "none"
    kv_cache: str = "fp32"
    max_seq_len: int | None = None  # None: the model's max_positions
    prefill_chunk: int = 64
    gates: Gates = field(default_factory=Gates)
    description: str = ""

    def __post_init__(self) -> None:
        src = f"recipe {self.name!r}"
        if self.format not in FORMATS:
            raise QkvxError(f"{src}: format {self.format!r} unknown; known: {', '.join(FORMATS)}")
        if self.backend not in FORMATS[self.format]:
            raise QkvxError(f"{src}: backend {self.backend!r} not available for {self.format}; "
                            f"known: {', '.join(FORMATS[self.format])}")
        if self.weights not in WEIGHTS:
            raise QkvxError(f"{src}: weights {self.weights!r} unknown; known: {', '.join(WEIGHTS)}")
        if self.kv_cache not in KV_CACHE:
            raise QkvxError(f"{src}: kv_cache {self.kv_cache!r} unknown; known: {', '.join(KV_CACHE)}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise QkvxError(f"{src}: max_seq_len must be >= 1, got {self.max_seq_len}")
        if self.prefill_chunk < 2:
            raise QkvxError(f"{src}: prefill_chunk must be >= 2, got {self.prefill_chunk}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (export_recipes/NAME.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise QkvxError(f"unknown recipe {name_or_path!r}; known: {', '.join(list_recipes())}")
    elif not path.is_file():
        raise QkvxError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise QkvxError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return _typed(Recipe, data, str(path))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
