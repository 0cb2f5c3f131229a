"""Shared loader for small validated config files (recipes, device profiles).

`typed(cls, data, where)` builds a dataclass from a parsed mapping and raises a one-line
QkvxError naming the file (`where`) and the key for an unknown key, a missing key or a wrong type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qkvx.errors import QkvxError


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin in (tuple, list):
        (item, *_) = typing.get_args(t) or (Any,)
        return f"list of {getattr(item, '__name__', str(item))}"
    if origin in (dict, Mapping):
        return "table"
    return getattr(t, "__name__", str(t))


def _coerce(value: Any, t: Any, where: str = "") -> tuple[bool, Any]:
    """(ok, converted value) for one allowed type `t`; nested dataclasses (also as list items) are
    built with typed(), whose errors name `where`."""
    if t is type(None):
        return value is None, value
    if dataclasses.is_dataclass(t):
        return isinstance(value, dict), typed(t, value, where) if isinstance(value, dict) else value
    origin = typing.get_origin(t)
    if origin in (tuple, list):
        item = (typing.get_args(t) or (Any,))[0]
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        if not all(ok for ok, _ in items):
            return False, value
        return True, tuple(v for _, v in items)
    if origin in (dict, Mapping):
        key_t, val_t = typing.get_args(t) or (Any, Any)
        if not isinstance(value, dict) or not all(
            _coerce(k, key_t)[0] and _coerce(v, val_t)[0] for k, v in value.items()
        ):
            return False, value
        return True, types.MappingProxyType(dict(value))
    if t is Any:
        return True, value
    if isinstance(value, bool) and t in (int, float):
        return False, value
    if t is float and isinstance(value, int):
        return True, float(value)
    return isinstance(value, t), value


def typed(cls, data: Any, where: str, *, require: bool = True, hidden: tuple[str, ...] = ()):
    """Build dataclass `cls` from a mapping, naming the file and key of any unknown, missing or
    mistyped key. Nested dataclass fields are built recursively. With `require`, fields without a
    default must be present. `hidden` fields (with defaults) are set by code, never by the file."""
    if not isinstance(data, dict):
        raise QkvxError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in hidden}
    for key in data:
        if key not in fields:
            raise QkvxError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(fields))}")
    if require:
        for name, f in fields.items():
            if (
                name not in data
                and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ):
                raise QkvxError(f"{where}: missing key {name!r}")
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = typed(hint, value, f"{where}.{key}", require=require)
            continue
        allowed = (
            typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        )
        for t in allowed:
            ok, converted = _coerce(value, t, f"{where}.{key}")
            if ok:
                values[key] = converted
                break
        else:
            raise QkvxError(
                f"{where}: key {key!r} must be {' or '.join(_type_name(t) for t in allowed)}, got {value!r}"
            )
    return cls(**values)


def resolve_named_file(
    name_or_path, directory: Path, suffixes: tuple[str, ...], kind: str, noun: str
) -> Path:
    """A shipped file by name (directory/NAME + suffixes[0]) or a user's file by path: the lookup
    recipes and device profiles share. Unknown names list the known ones."""
    path = Path(name_or_path)
    if path.suffix in suffixes:
        if not path.is_file():
            raise QkvxError(f"{path}: no such {noun}")
        return path
    path = directory / f"{name_or_path}{suffixes[0]}"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob(f"*{suffixes[0]}"))
        raise QkvxError(f"unknown {kind} {str(name_or_path)!r}; known: {', '.join(known)}")
    return path
