"""python -m qkvx.kernels [--aarch64] [--tests] [--runner] [--executorch-prefix DIR] [--out DIR]:
build the kernel library (and qkvx_kernels_test, and the qkvx-run .pte runner) and print the
library's path (and the runner's)."""

from __future__ import annotations

import argparse
import sys

from qkvx.native_build import RUNNER, KernelsBuildError, build


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qkvx.kernels", description=__doc__)
    ap.add_argument(
        "--aarch64",
        action="store_true",
        help="cross-compile with aarch64-linux-gnu-g++ (default prefix: the aarch64 wheel, fetched once)",
    )
    ap.add_argument(
        "--executorch-prefix", help="ExecuTorch include/ + lib/ directory (default: the installed wheel)"
    )
    ap.add_argument("--tests", action="store_true", help="also build qkvx_kernels_test")
    ap.add_argument(
        "--runner", action="store_true", help="also build qkvx-run (a .pte on ExecuTorch's C++ runtime)"
    )
    ap.add_argument("--out", help="build directory (default: the cache directory the loader uses)")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    try:
        prefix = a.executorch_prefix
        if a.aarch64 and prefix is None:
            from qkvx.kernels.aarch64 import executorch_prefix

            prefix = executorch_prefix()
        lib = build(a.aarch64, prefix, a.tests, a.jobs, a.out, a.verbose, runner=a.runner)
    except KernelsBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(lib)
    if a.runner:
        print(lib.parent / RUNNER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
