"""`qkvx convert`, the run: read the source, build the student (a paper init, or the data-aware
fit on calibration text), and write it as a qkvx folder whose qkvx.json records the conversion."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qkvx.convert.surgery import INITS, PAPER_INITS, surgery, target_spec
from qkvx.errors import QkvxError
from qkvx.spec import ModelSpec
from qkvx.util import atomic_dir, check_new_output, sha256_source
from qkvx.version import __version__


@dataclass
class ConvertResult:
    out: Path
    source_variant: str
    variant: str
    init: str
    seconds: float
    conversion: dict = field(default_factory=dict)  # what qkvx.json records under "conversion"
    model: Any = field(default=None, repr=False)  # the student (eval mode), as written to `out`


def convert(
    source: str | os.PathLike,
    to: str = "Q-K=V",
    init: str = "avg",
    out: str | os.PathLike = "qkvx_kv",
    *,
    force: bool = False,
    calib: Sequence[str | os.PathLike] | None = None,
    tokenizer: str | os.PathLike | None = None,
    fit_options: dict | None = None,
    ignore_config_keys: tuple[str, ...] = (),
    progress: Callable[[str], None] = lambda s: None,
) -> ConvertResult:
    """Convert `source` (anything qkvx.load reads with separate k and v) to a K=V model at `out`.

    calib / tokenizer: calibration text for `fit` (default: the source's own training corpus when
    it was trained by `qkvx train`). fit_options: see qkvx.convert.fit.FitOptions."""
    from qkvx.loaders import read_checkpoint
    from qkvx.loaders.common import Checkpoint, build_model
    from qkvx.loaders.native import save

    t0 = time.perf_counter()
    if init not in INITS:
        raise QkvxError(f"unknown init {init!r}; known: {', '.join(INITS)}")
    src, out = Path(source), Path(out)
    check_new_output(out, force)
    if src.exists() and out.resolve() == src.resolve():
        raise QkvxError(f"{out}: is the source; write the converted model elsewhere")
    progress("load")
    ckpt = read_checkpoint(src, ignore_config_keys)
    tspec = target_spec(ckpt.spec, to)
    if init not in PAPER_INITS and calib is None and not _trained_on_pydoc(ckpt.meta):
        raise QkvxError(
            f"init {init!r} fits on calibration text: pass --calib PATH (text the model "
            f"knows); only models from `qkvx train` default to their own training corpus"
        )
    tok = _tokenizer(src, ckpt.spec, tokenizer)
    conversion: dict[str, Any] = {
        "source": {
            "path": str(src.resolve()),
            "format": ckpt.format,
            "sha256": sha256_source(src),
            "variant": ckpt.spec.paper_name,
            "meta": ckpt.meta,
        },
        "target": tspec.paper_name,
        "init": init,
        "kv_pooling": (
            f"mean of {ckpt.spec.n_kv_head // tspec.n_kv_head} source kv heads per target head"
            if tspec.n_kv_head != ckpt.spec.n_kv_head
            else "none"
        ),
    }
    if init in PAPER_INITS:
        state = surgery(ckpt.state, ckpt.spec, tspec, init)
        student = build_model(Checkpoint(spec=tspec, state=state, format="native", path=out))
    else:
        from qkvx.convert.fit import FitOptions, fit_student

        teacher = build_model(ckpt)
        opts = FitOptions(**(fit_options or {}))
        progress("calibrate")
        student, report = fit_student(
            teacher, tspec, ckpt.state, _calibration_tokens(calib, tok, ckpt, opts), opts, progress
        )
        conversion["calibration"] = {
            "data": [str(p) for p in calib]
            if calib
            else "pydoc_data train split (the source's training corpus)",
            **report,
        }
    conversion["qkvx_version"] = __version__
    progress("save")
    with atomic_dir(out, force) as tmp:
        save(student, tmp, extra={"conversion": conversion})
        if src.is_dir():
            from qkvx.tokenizer import TOKENIZER_FILE

            for name in (TOKENIZER_FILE, "tokenizer_config.json"):
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
    return ConvertResult(
        out=out,
        source_variant=ckpt.spec.paper_name,
        variant=tspec.paper_name,
        init=init,
        seconds=time.perf_counter() - t0,
        conversion=conversion,
        model=student.eval(),
    )


def _trained_on_pydoc(meta: dict) -> bool:
    return "pydoc_data.topics" in str((meta or {}).get("training", {}).get("corpus", ""))


def _tokenizer(src: Path, spec: ModelSpec, given: str | os.PathLike | None):
    """The tokenizer calibration text goes through: the one given, else the source folder's
    tokenizer.json, else None (bytes) for a byte-level model. Checked against the vocabulary."""
    from qkvx.tokenizer import TOKENIZER_FILE, check_vocab, load_tokenizer

    tok = None
    if given is not None:
        tok = load_tokenizer(given)
    elif src.is_dir() and (src / TOKENIZER_FILE).is_file():
        tok = load_tokenizer(src)
    if tok is not None:
        check_vocab(tok, spec.vocab_size, str(src))
        if spec.vocab_size == 256 and tok.vocab_size == 256:
            return None  # a byte-level tokenizer: bytes directly
    return tok


def _calibration_tokens(calib, tok, ckpt, opts) -> torch.Tensor:
    """One flat token tensor long enough for the calibration and held-out windows (convert.fit
    cuts it into windows of seq_len)."""
    from qkvx.textdata import Encoder, TokenStream

    need = opts.windows_needed() * opts.seq_len + 1
    if calib is None:  # a `qkvx train` model: its own training split
        from qkvx.corpus import split_corpus

        return split_corpus()[0][:need].clone()
    if tok is None and ckpt.spec.vocab_size != 256:
        raise QkvxError(
            f"{ckpt.path}: no tokenizer.json beside the model; pass --tokenizer for the calibration text"
        )
    tokens = TokenStream(calib, Encoder(tok)).take(need)
    if len(tokens) < need:
        raise QkvxError(
            f"calibration data {', '.join(map(str, calib))}: {len(tokens):,} tokens, the fit "
            f"needs {need:,} ({opts.windows_needed()} windows of {opts.seq_len})"
        )
    return tokens
