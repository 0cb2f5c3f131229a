"""`make demo`: the main job on a bundled default, end to end, through the Python API.

1. trains (or reuses) a Q-K=V and a QKV byte-level model of the same dims on Python's help texts;
2. inspects both, so the one-tensor cache and its saving are visible side by side;
3. exports the Q-K=V model to an ExecuTorch .pte and to ONNX (each validated against the eager model
   on export: one cache tensor per layer, parity, perplexity);
4. generates text from each artifact.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qkvx import api
from qkvx.console import console, show_export, show_inspect
from qkvx.errors import QkvxError

VARIANTS = ("Q-K=V", "QKV")
RECIPES = ("pte-fp32", "onnx-fp32")
PROMPT = "The default value of the"


def run(out: Path, seed: int = 0) -> None:
    from qkvx.train import trained_model

    folders = [trained_model(out, v, seed, report=print, quiet=False) for v in VARIANTS]
    for folder in folders:
        show_inspect(folder, api.inspect(folder))
    for recipe in RECIPES:
        export_dir = out / f"export-{recipe}"
        console.print(f"\n$ qkvx export {folders[0]} --recipe {recipe} --out {export_dir} --force")
        show_export(export_dir, api.export(folders[0], recipe, export_dir, force=True))
        console.print(f"\n$ qkvx generate {export_dir} --prompt {PROMPT!r} --max-new-tokens 120")
        text, g = api.generate(export_dir, PROMPT, 120)
        print(PROMPT + text)
        console.print(f"[dim]{len(g.new_ids)} new tokens, decode {g.tokens_per_s:.1f} tokens/s[/]")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        run(args.out, args.seed)
    except QkvxError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
