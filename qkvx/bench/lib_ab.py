"""Two builds of the kernel library inside the same .pte, for kernel work (not a test):

    python -m qkvx.bench.lib_ab MODEL.pte LIB_A LIB_B [--contexts 16384] [--steps 32] [--repeats 3]
                                [--threads 1]

Each library is loaded by its own fresh longctx_worker process (QKVX_KERNELS_LIB); their
single-token decode steps at the end of each context are alternated (a b, b a, ...) so both see
the same moments of a noisy machine. Prints, per context and repeat, each side's median ms per
step and the median of the per-step ratios A / B (above 1: B is faster). Build a library from a
source tree with `python -m qkvx.kernels` run in it (it prints the library's path).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qkvx.bench.longctx import alternate_workers


def compare(
    pte: Path, libs: tuple[str, str], contexts: list[int], steps: int, repeats: int, threads: int = 1
) -> list[dict]:
    """One alternate_workers result per repeat (fresh processes each time)."""
    arg = {"format": "serve", "serve": "pte", "path": str(pte), "threads": threads, "read_mib": 0}
    envs = [{"QKVX_KERNELS_LIB": lib} for lib in libs]
    label = f"lib_ab {pte.name}"
    return [alternate_workers(label, [arg, arg], contexts, steps, envs) for _ in range(repeats)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qkvx.bench.lib_ab", description=__doc__.split("\n")[0])
    ap.add_argument("pte", type=Path)
    ap.add_argument("lib_a")
    ap.add_argument("lib_b")
    ap.add_argument("--contexts", default="16384")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    contexts = [int(c) for c in a.contexts.split(",")]
    for i, res in enumerate(compare(a.pte, (a.lib_a, a.lib_b), contexts, a.steps, a.repeats, a.threads)):
        for c in contexts:
            ms_a, ms_b = res["ms"][str(c)]
            print(
                f"{a.pte} context {c} repeat {i + 1}: A {ms_a:.2f} ms, B {ms_b:.2f} ms, "
                f"A / B {res['ratio'][str(c)]:.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
