"""`make demo`: the main job on a bundled default, end to end.

1. trains (or reuses) a Q-K=V and a QKV byte-level model of the same dims on Python's help texts;
2. inspects both, so the one-tensor cache and its saving are visible side by side;
3. exports the Q-K=V model to an ExecuTorch .pte and to ONNX (each validated against the eager model
   on export: one cache tensor per layer, parity, perplexity);
4. generates text from each artifact.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from qkvx.errors import QkvxError

VARIANTS = ("Q-K=V", "QKV")
RECIPES = ("pte-fp32", "onnx-fp32")
PROMPT = "The default value of the"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from qkvx.cli import app
    from qkvx.train import trained_model

    try:
        folders = [trained_model(args.out, v, args.seed, report=print, quiet=False) for v in VARIANTS]
    except QkvxError as e:
        raise SystemExit(f"error: {e}")
    for folder in folders:
        app(["inspect", str(folder)], standalone_mode=False)
    for recipe in RECIPES:
        out = args.out / f"export-{recipe}"
        print(f"\n$ qkvx export {folders[0]} --recipe {recipe} --out {out} --force")
        app(["export", str(folders[0]), "--recipe", recipe, "--out", str(out), "--force"], standalone_mode=False)
        print(f"\n$ qkvx generate {out} --prompt {PROMPT!r} --max-new-tokens 120")
        app(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "120"], standalone_mode=False)


if __name__ == "__main__":
    main()
