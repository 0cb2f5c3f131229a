"""What every loader shares: a (ModelSpec, state dict in qkvx names) pair becomes a checked model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

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


def build_model(ckpt: Checkpoint) -> Transformer:
    """Instantiate the spec and load `state` strictly: every key, every shape, finite values."""
    model = Transformer(ckpt.spec)
    expected = {k: v.shape for k, v in model.state_dict().items()}
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
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model.eval()


def _short(keys: list[str], n: int = 4) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
