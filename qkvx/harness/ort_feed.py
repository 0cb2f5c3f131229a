"""Feeds for a qkvx model.onnx (the ONNX contract, docs/architecture.md), batch 1, in numpy only.

Shared by the host onnxruntime runner and the arm64 driver that runs inside the emulator, where
there is no torch and no qkvx package: this module imports nothing but json and numpy, so both
sides build byte-identical feeds and advance the cache the same way.

Graph contract: inputs input_ids [1, T], attention_mask ones [1, past + T], position_ids
[1, T] = past .. past + T - 1, and past_key_values.{i}.kv (K=V: one tensor) or .key / .value
[1, kv_heads, past, head_dim]; outputs logits [1, T, vocab] then present.* in the order of the
past inputs. Past length 0 is the prefill, so one graph serves prefill and decode.
An int8 cache adds a float `_scale` input [1, kv_heads, past, 1] after each int8 cache input: the
empty past of every input is derived from the graph's own names, element types and dims, so any
number of cache tensors of any dtype is carried from call to call without knowing what they mean.
"""

from __future__ import annotations

import json

import numpy as np

PAST_PREFIX = "past_key_values."
# onnxruntime reports element types as strings: float caches, int8 caches and their float scales.
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}
SCALE_SUFFIX = "_scale"  # an int8 cache tensor's per-token scales: last dim 1


def past_shapes(session) -> dict[str, tuple[tuple[int, int], type]]:
    """Per past input: ((kv_heads, last dim), dtype): the last dim is head_dim, or 1 for a `_scale`
    input. The graph declares both dims as constants; when a graph leaves one symbolic, the
    qkvx.spec metadata fills it in."""
    meta = session.get_modelmeta().custom_metadata_map
    spec = json.loads(meta["qkvx.spec"]) if "qkvx.spec" in meta else {}
    if spec and not spec.get("head_dim"):
        spec["head_dim"] = spec["n_embd"] // spec["n_head"]
    if spec and not spec.get("n_kv_head"):
        spec["n_kv_head"] = spec["n_head"]
    out = {}
    for i in session.get_inputs():
        if not i.name.startswith(PAST_PREFIX):
            continue
        _, heads, _, dim = i.shape
        heads = heads if isinstance(heads, int) else spec.get("n_kv_head")
        if not isinstance(dim, int):
            dim = 1 if i.name.endswith(SCALE_SUFFIX) else spec.get("head_dim")
        if heads is None or dim is None:
            raise ValueError(f"{i.name}: symbolic kv heads / head dim and no qkvx.spec metadata to fill them")
        if i.type not in _ORT_DTYPES:
            raise ValueError(f"{i.name}: cache element type {i.type} is not supported")
        out[i.name] = ((int(heads), int(dim)), _ORT_DTYPES[i.type])
    return out


def max_seq_len(session) -> int | None:
    """The context the artifact was exported for: qkvx.max_seq_len, else the spec's max_positions."""
    meta = session.get_modelmeta().custom_metadata_map
    if "qkvx.max_seq_len" in meta:
        return int(meta["qkvx.max_seq_len"])
    if "qkvx.spec" in meta:
        return int(json.loads(meta["qkvx.spec"])["max_positions"])
    return None


def build_feed(tokens: np.ndarray, pos: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs of one call appending `tokens` [T] after `pos` cached positions."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    T = len(tokens)
    return {
        "input_ids": tokens[None],
        "attention_mask": np.ones((1, pos + T), np.int64),
        "position_ids": np.arange(pos, pos + T, dtype=np.int64)[None],
        **past,
    }


class OrtStepper:
    """Batch-1 incremental decoding over an onnxruntime session: each step's present tensors are
    the next step's past. `step(tokens [T]) -> logits [T, vocab]` (a view of ORT's output)."""

    def __init__(self, session):
        self.session = session
        self.shapes = past_shapes(session)
        self.past_names = list(self.shapes)  # graph order = the order of the present outputs
        self.output_names = [o.name for o in session.get_outputs()]
        if len(self.output_names) != 1 + len(self.past_names):
            raise ValueError(
                f"{len(self.output_names)} outputs for {len(self.past_names)} past inputs: "
                "expected logits plus one present per past"
            )
        self.max_seq_len = max_seq_len(session)
        self.reset()

    def reset(self) -> None:
        self.load_past({n: np.zeros((1, h, 0, d), dt) for n, ((h, d), dt) in self.shapes.items()}, 0)

    def load_past(self, past: dict[str, np.ndarray], pos: int) -> None:
        """Continue from `past` (one array per past input, `pos` positions long)."""
        self.past, self.pos = past, pos

    def _check(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) == 0:
            raise ValueError("nothing to run: empty token sequence")
        if self.max_seq_len is not None and self.pos + len(tokens) > self.max_seq_len:
            raise ValueError(
                f"context overflow: {self.pos} cached + {len(tokens)} new tokens exceed "
                f"max_seq_len {self.max_seq_len}"
            )
        return tokens

    def step(self, tokens: np.ndarray) -> np.ndarray:
        tokens = self._check(tokens)
        logits, *present = self.session.run(self.output_names, build_feed(tokens, self.pos, self.past))
        self.past = dict(zip(self.past_names, present, strict=True))
        self.pos += len(tokens)
        return logits[0]


class IoBoundStepper(OrtStepper):
    """OrtStepper over IO binding: each step's presents stay onnxruntime OrtValues, bound as the
    next step's past without a round trip through numpy; only the logits are read out."""

    def load_past(self, past: dict[str, np.ndarray], pos: int) -> None:
        from onnxruntime import OrtValue

        self.past = {n: OrtValue.ortvalue_from_numpy(a) for n, a in past.items()}
        self.pos = pos

    def step(self, tokens: np.ndarray) -> np.ndarray:
        tokens = self._check(tokens)
        io = self.session.io_binding()
        for name, array in build_feed(tokens, self.pos, {}).items():
            io.bind_cpu_input(name, array)
        for name, value in self.past.items():
            io.bind_ortvalue_input(name, value)
        for name in self.output_names:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        logits, *present = io.get_outputs()
        self.past = dict(zip(self.past_names, present, strict=True))
        self.pos += len(tokens)
        return logits.numpy()[0]
