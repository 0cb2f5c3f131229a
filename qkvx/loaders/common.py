"""What every loader shares: a (ModelSpec, state dict in qkvx names) pair becomes a checked model."""

from __future__ import annotations

import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qkvx.errors import QkvxError
from qkvx.models.transformer import Transformer
from qkvx.spec import ModelSpec


@dataclass
class Checkpoint:
    """A loaded checkpoint, before it becomes a module. `state` uses qkvx's parameter names."""

    spec: ModelSpec
    state: dict[str, torch.Tensor]
    format: str  # "paper" | "hf" | "native"
    path: Path
    meta: dict = field(default_factory=dict)  # e.g. training metadata of a native model


def build_model(ckpt: Checkpoint) -> Transformer:
    """Instantiate the spec and load `state` strictly: every key, every shape, finite values."""
    with torch.device("meta"):  # shapes only; from_state below takes the loaded tensors as they are
        expected = {k: v.shape for k, v in Transformer(ckpt.spec).state_dict().items()}
    if ckpt.spec.tie_embeddings:
        expected.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight
    state = dict(ckpt.state)
    if ckpt.spec.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        raise QkvxError(f"{ckpt.path}: {'; '.join(parts)} for a {ckpt.spec.paper_name} model")
    for key, shape in expected.items():
        got = tuple(state[key].shape)
        if got != tuple(shape):
            raise QkvxError(f"{ckpt.path}: tensor {key} has shape {list(got)}, the spec needs {list(shape)}")
        if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
            raise QkvxError(f"{ckpt.path}: tensor {key} holds NaN or Inf values")
    return Transformer.from_state(ckpt.spec, state).eval()


def _short(keys: list[str], n: int = 4) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ---- helpers shared by the paper and Hugging Face readers --------------------------------------
# Everything a corrupt or hostile pickle can raise under weights_only=True: the zip reader
# (RuntimeError), an empty file (EOFError), garbage bytes (KeyError / ValueError / ...).
_LOAD_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    ImportError,
    UnicodeDecodeError,
    struct.error,
)


def torch_load(path: Path) -> Any:
    """torch.load that never runs code from the file; any failure is one QkvxError line.

    The file is memory-mapped: a tensor's bytes are read only when it is used, so a training
    checkpoint's optimizer state (two fp32 moments per weight) never enters memory. Files in the
    pre-zip format (torch < 1.6) cannot be mapped and are read whole."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as e:
        why = str(e)
        if "WeightsUnpickler error:" in why:
            # torch's message advises weights_only=False (the opposite of what we want); the line
            # after this marker says what the unpickler refused.
            why = next(
                (ln.strip() for ln in why.split("WeightsUnpickler error:", 1)[1].splitlines() if ln.strip()),
                "",
            )
            if why.startswith("Unsupported global"):
                name = why.split()[3] if len(why.split()) > 3 else "?"
                raise QkvxError(
                    f"{path}: refused: the pickle needs code to load ({name}), and qkvx never "
                    f"runs code from a file (torch.load weights_only=True)"
                ) from None
        why = (why.splitlines() or [""])[0].split(". ")[0][:160] or "empty or truncated"
        raise QkvxError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {why})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise QkvxError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def strip_prefixes(state: dict[str, Any], prefixes: tuple[str, ...], path: Path) -> dict[str, Any]:
    """Drop wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`, HF `transformer.`) in any
    order and any number, e.g. `module._orig_mod.wte.weight` -> `wte.weight`."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        name = key
        while name.startswith(prefixes):
            name = name[len(next(p for p in prefixes if name.startswith(p))) :]
        if name in out:
            raise QkvxError(f"{path}: two tensors are named {name} once prefixes are stripped")
        out[name] = value
    return out


Rules = list[tuple[re.Pattern, str]]


def rename(state: dict[str, Any], rules: Rules) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply the first matching (pattern, replacement) to each key. Keys no rule matches keep their
    own name, so build_model reports them as unexpected under the name the user knows.
    Returns the renamed state and origin: qkvx name -> source name (for error messages)."""
    out, origin = {}, {}
    for key, value in state.items():
        new = next((p.sub(r, key, count=1) for p, r in rules if p.match(key)), key)
        out[new], origin[new] = value, key
    return out, origin


def check_state(spec: ModelSpec, state: dict[str, torch.Tensor], origin: dict[str, str], path: Path) -> None:
    """Shape check in the checkpoint's own names (build_model would name qkvx's), and tied
    embeddings that really are tied. Missing / unexpected keys are left to build_model."""
    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {k: tuple(v.shape) for k, v in Transformer(spec).state_dict().items()}
    for key, value in state.items():
        if key in expected and tuple(value.shape) != expected[key]:
            name = origin.get(key, key)
            also = f" ({key})" if name != key else ""
            raise QkvxError(
                f"{path}: {name}{also} has shape {list(value.shape)}, expected {list(expected[key])}"
            )
    head, emb = state.get("lm_head.weight"), state.get("tok_emb.weight")
    if spec.tie_embeddings and head is not None and emb is not None and not torch.equal(head, emb):
        raise QkvxError(
            f"{path}: embeddings are tied in the config, but {origin.get('lm_head.weight')} "
            f"differs from {origin.get('tok_emb.weight')}"
        )


def make_spec(source: Path, **fields: Any) -> ModelSpec:
    """ModelSpec(**fields), its errors prefixed with the file the fields came from."""
    try:
        return ModelSpec(**fields)
    except QkvxError as e:
        raise QkvxError(f"{source}: {e}") from None
