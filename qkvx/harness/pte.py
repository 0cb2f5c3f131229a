"""ExecuTorch runner: an exported .pte through executorch.runtime on the host CPU (XNNPACK)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkvx.errors import QkvxError
from qkvx.harness.runners import Runner, register


@register("pte", formats=("pte",))
class PteRunner(Runner):
    """An exported .pte through ExecuTorch's Python runtime (host CPU, XNNPACK). threads: the size
    of ExecuTorch's thread pool (None: the runtime's default)."""

    def __init__(self, path: str | Path, *, threads: int | None = None, **options: Any):
        super().__init__(path)
        from executorch.runtime import Runtime

        from qkvx.decode import load_kernels

        load_kernels()  # registers qkvx::* and llama::* kernels with the runtime
        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads)
        path = Path(path)
        try:
            # by path: ExecuTorch maps the file, and once XNNPACK has packed the weights the mapped
            # pages can go; passing bytes kept a second resident copy (+354 MiB on a 93M model)
            self.program = Runtime.get().load_program(path)
            self.method = self.program.load_method("forward")
            const = lambda n: self.program.load_method(n).execute([])[0]  # noqa: E731
            self.prefill_chunk = int(const("get_max_seq_len"))
            self.max_seq_len = int(const("get_max_context_len"))
        except (RuntimeError, ValueError) as e:
            raise QkvxError(
                f"{path}: ExecuTorch cannot load this program ({str(e).splitlines()[0]})"
            ) from None

    def _forward(self, tokens: Tensor) -> Tensor:
        out = self.method.execute([tokens[None], torch.tensor([self.pos], dtype=torch.long)])
        return out[0][0]
