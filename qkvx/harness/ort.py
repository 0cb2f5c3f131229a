"""onnxruntime runner: an exported model.onnx (the ONNX contract) on the host CPU, batch 1.

The feeds and the past -> present hand-over are ort_feed.OrtStepper's, the same code the arm64
emulator driver runs: one tensor per K=V layer is carried from call to call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkvx.errors import QkvxError
from qkvx.export.ortops import DOMAIN, library_path
from qkvx.harness.ort_feed import OrtStepper
from qkvx.harness.runners import Runner, register


def ort_session(path: str | Path, threads: int | None = None, optimize: bool = True):
    """An onnxruntime CPU session over `path`; a file it cannot load is one QkvxError line.
    optimize=False turns onnxruntime's graph optimizations off (the bench measures what they buy)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind exception types
        if f"{DOMAIN}:" not in str(e):
            raise _cannot_load(path, e) from None
    # the graph uses qkvx's op domain (qkvx.CachedAttention): register its library and load again.
    # Asked only then: reading the graph up front to look would hold a copy of its weights.
    opts.register_custom_ops_library(str(library_path()))
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise _cannot_load(path, e) from None


def _cannot_load(path, e: Exception) -> QkvxError:
    return QkvxError(f"{path}: onnxruntime cannot load this model ({str(e).splitlines()[0]})")


@register("onnx", formats=("onnx",))
class OrtRunner(Runner):
    """model.onnx through onnxruntime: prefill and decode are the same graph (past length 0 or not).

    Plain session.run: IO binding (presents kept as OrtValues, bound as the next past) was no
    faster (README), since run() hands the outputs to numpy without copying the cache."""

    def __init__(
        self, path: str | Path, *, threads: int | None = None, optimize: bool = True, **options: Any
    ):
        super().__init__(path)
        self.session = ort_session(path, threads, optimize)
        if "qkvx.spec" not in self.session.get_modelmeta().custom_metadata_map:
            raise QkvxError(f"{path}: not a qkvx ONNX export (no qkvx.spec in its metadata_props)")
        try:
            self.stepper = OrtStepper(self.session)
        except ValueError as e:
            raise QkvxError(f"{path}: {e}") from None
        self.max_seq_len = self.stepper.max_seq_len
        self.prefill_chunk = self.max_seq_len  # any past length: one call takes the whole prompt

    def reset(self) -> None:
        super().reset()
        self.stepper.reset()

    def _forward(self, tokens: Tensor) -> Tensor:
        return torch.from_numpy(self.stepper.step(tokens.numpy()))
