"""One runner interface (prefill, decode step, reset) over every runtime, chosen by name.

A runner appends tokens at its current position and returns their logits; prefill chunks a long
prompt the way the runtime needs. Adding a runtime is one class registered here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from qkvx.errors import QkvxError
from qkvx.export.manifest import read_manifest

RUNNERS: dict[str, Callable[..., "Runner"]] = {}


def register(name: str):
    def deco(cls):
        RUNNERS[name] = cls
        cls.name = name
        return cls
    return deco


class Runner:
    """Base: subclasses implement `_forward(tokens [T]) -> logits [T, vocab]` at self.pos."""

    name = "base"
    max_seq_len: int
    prefill_chunk: int

    def __init__(self) -> None:
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def prefill(self, tokens: list[int] | Tensor) -> Tensor:
        """Append a prompt; logits for every prompt token, [T, vocab]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        self._check_room(len(tokens))
        out = [self._step(tokens[i:i + self.prefill_chunk]) for i in range(0, len(tokens), self.prefill_chunk)]
        return torch.cat(out, 0)

    def decode(self, token: int) -> Tensor:
        """Append one token; its logits [vocab]."""
        self._check_room(1)
        return self._step(torch.tensor([int(token)]))[0]

    def _check_room(self, n: int) -> None:
        if n < 1:
            raise QkvxError("nothing to run: empty token sequence")
        if self.pos + n > self.max_seq_len:
            raise QkvxError(f"context overflow: {self.pos} cached + {n} new tokens exceed the "
                            f"artifact's max_seq_len {self.max_seq_len}")

    def _step(self, tokens: Tensor) -> Tensor:
        logits = self._forward(tokens)
        self.pos += len(tokens)
        return logits

    def _forward(self, tokens: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@register("eager")
class EagerRunner(Runner):
    """The reference: the trained model, full recompute over the whole history at every step."""

    def __init__(self, model: torch.nn.Module, max_seq_len: int | None = None):
        super().__init__()
        self.model = model.eval()
        self.max_seq_len = max_seq_len or model.spec.max_positions
        self.prefill_chunk = self.max_seq_len
        self.history = torch.empty(0, dtype=torch.long)

    def reset(self) -> None:
        super().reset()
        self.history = torch.empty(0, dtype=torch.long)

    @torch.no_grad()
    def _forward(self, tokens: Tensor) -> Tensor:
        self.history = torch.cat([self.history, tokens])
        return self.model(self.history[None])[0, -len(tokens):].float()


@register("eager-kv")
class EagerKVRunner(Runner):
    """The trained model in eager PyTorch with the decode-form static cache (what gets exported)."""

    def __init__(self, model: torch.nn.Module, max_seq_len: int | None = None):
        super().__init__()
        from qkvx.rewrite import DecodeModel

        self.max_seq_len = max_seq_len or model.spec.max_positions
        self.prefill_chunk = self.max_seq_len
        self.decode_model = DecodeModel(model.eval(), self.max_seq_len).eval()

    @torch.no_grad()
    def _forward(self, tokens: Tensor) -> Tensor:
        return self.decode_model(tokens[None], torch.tensor([self.pos]))[0]


# Modules that register runners for artifacts; imported on first use (each pulls in its runtime).
RUNNER_MODULES = ("qkvx.harness.pte", "qkvx.harness.ort", "qkvx.harness.arm64")


def _import_runners() -> None:
    import importlib

    for module in RUNNER_MODULES:
        importlib.import_module(module)


def get_runner(name: str) -> Callable[..., "Runner"]:
    _import_runners()
    if name not in RUNNERS:
        raise QkvxError(f"unknown runtime {name!r}; known: {', '.join(RUNNERS)}")
    return RUNNERS[name]


def use_one_thread(runtime: str) -> None:
    """One compute thread for torch and, for a .pte, ExecuTorch's thread pool (onnxruntime takes
    threads=1 per session). Benchmarks use it: on a shared 2-core machine 2 threads swung 3x."""
    torch.set_num_threads(1)
    if runtime == "pte":
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(1)


def one_thread_runner(runtime: str, path: str | Path) -> "Runner":
    """The `runtime` runner ("pte" | "onnx") over an artifact file, on one thread."""
    use_one_thread(runtime)
    cls = get_runner(runtime)
    return cls(path, threads=1) if runtime == "onnx" else cls(path)


def open_runner(name: str, artifact_dir: str | Path | None = None, model=None) -> Runner:
    """A runner by registry name over an export directory (or, for eager, a model)."""
    cls = get_runner(name)
    if name.startswith("eager"):
        return cls(model)
    manifest = read_manifest(Path(artifact_dir))
    files = {a["format"]: a["file"] for a in manifest["artifacts"]}
    if name not in files:
        raise QkvxError(f"{artifact_dir}: no {name} artifact (it holds {', '.join(files) or 'none'})")
    return cls(Path(artifact_dir) / files[name])
