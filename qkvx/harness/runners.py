"""One runner interface (prefill, decode step, reset) over every runtime, and the registry that is
the only place that knows the runtimes.

Every runner is built the same way: `Runner(path, **options)`, path being the artifact (or, for
eager, the checkpoint) and options keywords the runtime takes (threads, cpu, device, model, ...).
`open_runner(name, path, **options)` opens one by registry name, an export directory or a file.
A runner appends tokens at its current position and returns their logits; prefill chunks a long
prompt the way the runtime needs. Adding a runtime is one class registered here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkvx.errors import QkvxError

RUNNERS: dict[str, type["Runner"]] = {}
ALIASES = {"ort": "onnx"}  # names users type for a registered runtime
# Modules that register runners for artifacts; imported on first use (each pulls in its runtime).
RUNNER_MODULES = ("qkvx.harness.pte", "qkvx.harness.pte_native", "qkvx.harness.ort", "qkvx.harness.arm64")


def register(name: str, formats: tuple[str, ...] = ()):
    """Register a runner class under `name`, for artifacts of `formats` (the first runner registered
    for a format is that format's default runtime)."""

    def deco(cls):
        RUNNERS[name] = cls
        cls.name, cls.formats = name, formats
        return cls

    return deco


class Runner:
    """Base: subclasses implement `_forward(tokens [T]) -> logits [T, vocab]` at self.pos."""

    name = "base"
    formats: tuple[str, ...] = ()
    max_seq_len: int
    prefill_chunk: int

    def __init__(self, path: str | Path | None = None, **options: Any) -> None:
        self.path = Path(path) if path is not None else None
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def prefill(self, tokens: list[int] | Tensor) -> Tensor:
        """Append a prompt; logits for every prompt token, [T, vocab]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        self._check_room(len(tokens))
        out = [
            self._step(tokens[i : i + self.prefill_chunk]) for i in range(0, len(tokens), self.prefill_chunk)
        ]
        return torch.cat(out, 0)

    def decode(self, token: int) -> Tensor:
        """Append one token; its logits [vocab]."""
        self._check_room(1)
        return self._step(torch.tensor([int(token)]))[0]

    def close(self) -> None:
        """Release what the runtime holds (a child process for arm64); a no-op elsewhere."""

    def _check_room(self, n: int) -> None:
        if n < 1:
            raise QkvxError("nothing to run: empty token sequence")
        if self.pos + n > self.max_seq_len:
            raise QkvxError(
                f"context overflow: {self.pos} cached + {n} new tokens exceed the "
                f"artifact's max_seq_len {self.max_seq_len}"
            )

    def _step(self, tokens: Tensor) -> Tensor:
        logits = self._forward(tokens)
        self.pos += len(tokens)
        return logits

    def _forward(self, tokens: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _eager_model(path, model):
    if model is not None:
        return model.eval()
    if path is None:
        raise QkvxError("an eager runner needs a checkpoint path or model=")
    from qkvx.loaders import load

    return load(path)


@register("eager")
class EagerRunner(Runner):
    """The reference: the trained model, full recompute over the whole history at every step.
    path: a checkpoint (or model=, an already loaded one)."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        model: torch.nn.Module | None = None,
        max_seq_len: int | None = None,
        **options: Any,
    ):
        super().__init__(path)
        self.model = _eager_model(path, model)
        self.max_seq_len = max_seq_len or self.model.spec.max_positions
        self.prefill_chunk = self.max_seq_len
        self.history = torch.empty(0, dtype=torch.long)

    def reset(self) -> None:
        super().reset()
        self.history = torch.empty(0, dtype=torch.long)

    @torch.no_grad()
    def _forward(self, tokens: Tensor) -> Tensor:
        self.history = torch.cat([self.history, tokens])
        return self.model(self.history[None])[0, -len(tokens) :].float()


@register("eager-kv")
class EagerKVRunner(Runner):
    """The trained model in eager PyTorch with the decode-form static cache (what gets exported)."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        model: torch.nn.Module | None = None,
        max_seq_len: int | None = None,
        **options: Any,
    ):
        super().__init__(path)
        from qkvx.decode import DecodeModel

        model = _eager_model(path, model)
        self.max_seq_len = max_seq_len or model.spec.max_positions
        self.prefill_chunk = self.max_seq_len
        self.decode_model = DecodeModel(model, self.max_seq_len).eval()

    @torch.no_grad()
    def _forward(self, tokens: Tensor) -> Tensor:
        return self.decode_model(tokens[None], torch.tensor([self.pos]))[0]


def _import_runners() -> None:
    for module in RUNNER_MODULES:
        importlib.import_module(module)


def runner_class(name: str) -> type[Runner]:
    _import_runners()
    name = ALIASES.get(name, name)
    if name not in RUNNERS:
        raise QkvxError(f"unknown runtime {name!r}; known: {', '.join([*RUNNERS, *ALIASES])}")
    return RUNNERS[name]


def runtimes_for(fmt: str) -> tuple[str, ...]:
    """The runtimes that run an artifact of format `fmt`, its default first."""
    _import_runners()
    return tuple(name for name, cls in RUNNERS.items() if fmt in cls.formats)


def check_runtime(name: str, fmt: str) -> None:
    """One error naming the runtimes that can, when runtime `name` cannot run a `fmt` artifact."""
    runner_class(name)  # an unknown name says so first
    if ALIASES.get(name, name) not in runtimes_for(fmt):
        raise QkvxError(f"runtime {name!r} cannot run a {fmt} artifact; use {', '.join(runtimes_for(fmt))}")


def open_runner(name: str, path: str | Path, **options: Any) -> Runner:
    """The runner `name` (or an alias) over `path`: an artifact file, an export directory (its
    manifest names the artifact), or for eager a checkpoint. A runtime that cannot run the
    export's format is one error naming the ones that can."""
    cls = runner_class(name)
    path = Path(path)
    if cls.formats and path.is_dir():
        from qkvx.artifact import Manifest

        manifest = Manifest.read(path)
        check_runtime(name, manifest.format)
        path = path / manifest.artifact.file
    return cls(path, **options)


def one_thread(runtime: str) -> None:
    """One compute thread for torch and, for a .pte, ExecuTorch's thread pool (onnxruntime takes
    threads=1 per session). Benchmarks use it: on a shared 2-core machine 2 threads swung 3x."""
    torch.set_num_threads(1)
    if ALIASES.get(runtime, runtime) == "pte":
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(1)


def one_thread_runner(runtime: str, path: str | Path, **options: Any) -> Runner:
    """open_runner on one thread (benchmarks, the soak)."""
    one_thread(runtime)
    return open_runner(runtime, path, threads=1, **options)
