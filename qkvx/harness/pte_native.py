"""pte-native runner: a .pte through qkvx-run, ExecuTorch's C++ runtime with the XNNPACK delegate,
ExecuTorch's kernels and qkvx's kernel library, and no Python or libtorch in the process: the
runtime an app embeds, on the host CPU.

One qkvx-run --serve child per runner, driven in arm64_driver's frame protocol
(qkvx.harness.child), as the arm64 runner drives the same program under qemu. The binary is built
by `make install` (python -m qkvx.kernels --runner) into the kernels' cache directory, or now on
first use; $QKVX_RUN points at another build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qkvx.errors import QkvxError
from qkvx.harness.child import ChildRunner
from qkvx.harness.runners import register


@register("pte-native", formats=("pte",))
class PteNativeRunner(ChildRunner):
    """model.pte in qkvx-run on this machine. threads: the size of ExecuTorch's thread pool (None:
    the runtime's default); binary: a qkvx-run to use instead of this source tree's build."""

    start_timeout = 120.0
    step_timeout = 300.0

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        binary: str | Path | None = None,
        **options: Any,
    ):
        super().__init__(path)
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise QkvxError(f"{self.path}: no such .pte file")
        if binary is None:
            from qkvx.native_build import runner_path

            binary = runner_path()
        self.binary = Path(binary)
        if not self.binary.is_file():
            raise QkvxError(f"{self.binary}: no qkvx-run here (make install builds it)")
        self.threads = threads or 0
        self.runtime = self.host = "qkvx-run (ExecuTorch C++)"
        self.info: dict = {}
        self._start()
        self.max_seq_len, self.prefill_chunk = self.info["max_seq_len"], self.info["prefill_chunk"]

    def _command(self) -> list[str]:
        return [str(self.binary), str(self.path), "--serve", "--threads", str(self.threads)]
