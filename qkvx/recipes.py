"""Export recipes (export_recipes/*.yaml): small validated dataclasses; unknown keys are errors."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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


def _typed(cls, data: Any, where: str):
    """Build dataclass `cls` from a mapping, naming the file and key of any unknown key or bad type."""
    if not isinstance(data, dict):
        raise QkvxError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise QkvxError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(names))}")
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _typed(hint, value, f"{where}.{key}")
            continue
        allowed = typing.get_args(hint) or (hint,)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = any(value is None if t is type(None) else isinstance(value, t) and not (t is int and isinstance(value, bool))
                 for t in allowed)
        if not ok:
            raise QkvxError(f"{where}: key {key!r} must be {' or '.join(getattr(t, '__name__', str(t)) for t in allowed)}, "
                            f"got {value!r}")
        values[key] = value
    return cls(**values)


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
