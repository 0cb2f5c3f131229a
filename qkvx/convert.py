"""`qkvx convert`: build a K=V student (Q-K=V, Q-GQA-g, Q-MQA) from a trained model with separate key
and value projections (QKV, GQA-g, MQA, Q=K-V), by weight surgery.

Everything but the key and value projections is copied. The one shared projection (weights and
bias) comes from an init:

  avg      (W_K + W_V) / 2            the paper's release ("average the two")
  keep-k   W_K                        attention patterns exact, values wrong
  keep-v   W_V                        values exact, attention patterns wrong
  fit      data-aware (qkvx.convert_fit): per layer, the student's attention block (query, shared
           and output projections) fitted to reproduce the teacher's attention-block outputs on
           the teacher's own layer inputs, from a few calibration batches

Fewer kv heads than the source (Q-GQA-g, Q-MQA) mean-pool the source's kv heads in groups, as GQA
uptraining does (Ainslie et al. 2023): target head j is the mean of source heads j*r .. j*r + r - 1,
r = source kv heads / target kv heads, so query head h still reads the pooled group it read before.
With RoPE nothing changes in the weights: the model stores the un-rotated shared tensor and rotates
it only where it serves as a key (qkvx.models.attention).

The result is a native qkvx folder (model.safetensors + qkvx.json) whose qkvx.json records the
conversion under "conversion": source path / format / sha256 / variant, target, init, and for `fit`
the calibration data and the per-layer objective before and after fitting on held-out batches.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from qkvx.errors import QkvxError
from qkvx.spec import ModelSpec, canonical_variant

PAPER_INITS = ("avg", "keep-k", "keep-v")
DATA_INITS = ("fit",)
INITS = PAPER_INITS + DATA_INITS
TARGETS_HELP = "Q-K=V, Q-GQA-g or Q-MQA"


@dataclass
class ConvertResult:
    out: Path
    source_variant: str
    variant: str
    init: str
    seconds: float
    conversion: dict = field(default_factory=dict)  # what qkvx.json records under "conversion"
    model: Any = field(default=None, repr=False)  # the student (eval mode), as written to `out`


def target_spec(source: ModelSpec, to: str) -> ModelSpec:
    """The student's spec: the source's, with k = v and the target's kv head count."""
    if source.kv_shared:
        raise QkvxError(f"the source is already {source.paper_name}: its keys and values share one "
                        f"projection, so there is nothing to convert")
    try:
        wanted = ModelSpec.from_paper_name(to, n_layer=1, n_embd=source.n_head, n_head=source.n_head,
                                           vocab_size=1, max_positions=1)
    except QkvxError as e:
        raise QkvxError(f"--to {to!r}: {e}") from None
    if wanted.sharing != "q-kv":
        raise QkvxError(f"--to {canonical_variant(to)}: not a K=V target; use {TARGETS_HELP}")
    g_src, g_tgt = source.n_kv_head, wanted.n_kv_head
    if g_tgt > g_src or g_src % g_tgt:
        raise QkvxError(f"--to {canonical_variant(to)} needs {g_tgt} kv heads, but the source "
                        f"({source.paper_name}) has {g_src}: a target's kv heads must divide the source's "
                        f"(mean-pooled in groups); use Q-GQA-g with g dividing {g_src}, or Q-MQA")
    return source.replace(sharing="q-kv", n_kv_head=g_tgt)


def pool_heads(t: torch.Tensor, g_src: int, g_tgt: int) -> torch.Tensor:
    """Rows of a kv projection (weight [g_src*D, C] or bias [g_src*D]) mean-pooled to g_tgt heads:
    target head j = mean of source heads j*r .. j*r + r - 1 (r = g_src / g_tgt)."""
    if g_src == g_tgt:
        return t.clone()
    r = g_src // g_tgt
    D = t.shape[0] // g_src
    return t.reshape(g_tgt, r, D, *t.shape[1:]).mean(dim=1).reshape(g_tgt * D, *t.shape[1:])


def surgery(state: dict[str, torch.Tensor], source: ModelSpec, target: ModelSpec, init: str
            ) -> dict[str, torch.Tensor]:
    """The student's state dict (qkvx names) for a paper init (avg | keep-k | keep-v): every tensor
    copied, the shared projection from the pooled K and V. `fit` starts from one of these."""
    if init not in PAPER_INITS:
        raise QkvxError(f"unknown init {init!r}; known: {', '.join(INITS)}")
    out = {k: v.clone() for k, v in state.items() if ".attn." not in k}
    for i in range(source.n_layer):
        a = f"blocks.{i}.attn."
        suffixes = ("weight", "bias") if source.bias else ("weight",)
        for s in suffixes:
            k = pool_heads(state[f"{a}k_proj.{s}"].float(), source.n_kv_head, target.n_kv_head)
            v = pool_heads(state[f"{a}v_proj.{s}"].float(), source.n_kv_head, target.n_kv_head)
            out[f"{a}k_proj.{s}"] = {"avg": (k + v) / 2, "keep-k": k, "keep-v": v}[init]
            # Q=K-V sources have no query projection: their queries are the keys.
            out[f"{a}q_proj.{s}"] = state[f"{a}{'q' if source.has_q_proj else 'k'}_proj.{s}"].clone()
            out[f"{a}o_proj.{s}"] = state[f"{a}o_proj.{s}"].clone()
    return out


def convert(source: str | os.PathLike, to: str = "Q-K=V", init: str = "avg", out: str | os.PathLike = "qkvx_kv",
            *, force: bool = False, calib: Sequence[str | os.PathLike] | None = None,
            tokenizer: str | os.PathLike | None = None, fit_options: dict | None = None,
            ignore_config_keys: tuple[str, ...] = (), progress: Callable[[str], None] = lambda s: None
            ) -> ConvertResult:
    """Convert `source` (anything qkvx.load reads with separate k and v) to a K=V model at `out`.

    calib / tokenizer: calibration text for `fit` (default: the source's own training corpus when
    it was trained by `qkvx train`). fit_options: see qkvx.convert_fit.FitOptions."""
    from qkvx.export.manifest import sha256_source
    from qkvx.loaders import read_checkpoint
    from qkvx.loaders.common import Checkpoint, build_model
    from qkvx.loaders.native import save

    t0 = time.perf_counter()
    if init not in INITS:
        raise QkvxError(f"unknown init {init!r}; known: {', '.join(INITS)}")
    src, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or not force):
        raise QkvxError(f"{out}: already exists (use --force to replace it)" if out.is_dir()
                        else f"{out}: exists and is not a directory")
    if src.exists() and out.resolve() == src.resolve():
        raise QkvxError(f"{out}: is the source; write the converted model elsewhere")
    progress("load")
    ckpt = read_checkpoint(src, ignore_config_keys)
    tspec = target_spec(ckpt.spec, to)
    if init not in PAPER_INITS and calib is None and not _trained_on_pydoc(ckpt.meta):
        raise QkvxError(f"init {init!r} fits on calibration text: pass --calib PATH (text the model "
                        f"knows); only models from `qkvx train` default to their own training corpus")
    tok = _tokenizer(src, ckpt.spec, tokenizer)
    conversion: dict[str, Any] = {
        "source": {"path": str(src.resolve()), "format": ckpt.format, "sha256": sha256_source(src),
                   "variant": ckpt.spec.paper_name, "meta": ckpt.meta},
        "target": tspec.paper_name, "init": init,
        "kv_pooling": (f"mean of {ckpt.spec.n_kv_head // tspec.n_kv_head} source kv heads per target head"
                       if tspec.n_kv_head != ckpt.spec.n_kv_head else "none"),
    }
    if init in PAPER_INITS:
        state = surgery(ckpt.state, ckpt.spec, tspec, init)
        student = build_model(Checkpoint(spec=tspec, state=state, format="native", path=out))
    else:
        from qkvx.convert_fit import FitOptions, fit_student

        teacher = build_model(ckpt)
        opts = FitOptions(**(fit_options or {}))
        progress("calibrate")
        student, report = fit_student(teacher, tspec, ckpt.state, _calibration_tokens(calib, tok, ckpt, opts),
                                      opts, progress)
        conversion["calibration"] = {"data": [str(p) for p in calib] if calib else "pydoc_data train split "
                                     "(the source's training corpus)", **report}
    from qkvx import __version__

    conversion["qkvx_version"] = __version__
    progress("save")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-", dir=out.parent))
    try:
        save(student, staging / "model", extra={"conversion": conversion})
        if src.is_dir():
            from qkvx.tokenizer import TOKENIZER_FILE

            for name in (TOKENIZER_FILE, "tokenizer_config.json"):
                if (src / name).is_file():
                    shutil.copyfile(src / name, staging / "model" / name)
        if out.exists():
            shutil.rmtree(out)
        (staging / "model").rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ConvertResult(out=out, source_variant=ckpt.spec.paper_name, variant=tspec.paper_name, init=init,
                         seconds=time.perf_counter() - t0, conversion=conversion, model=student.eval())


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
    """One flat token tensor long enough for the calibration and held-out windows (convert_fit
    cuts it into windows of seq_len)."""
    from qkvx.textdata import Encoder, TokenStream

    need = opts.windows_needed() * opts.seq_len + 1
    if calib is None:  # a `qkvx train` model: its own training split
        from qkvx.train import split_corpus

        return split_corpus()[0][:need].clone()
    if tok is None and ckpt.spec.vocab_size != 256:
        raise QkvxError(f"{ckpt.path}: no tokenizer.json beside the model; pass --tokenizer for the "
                        f"calibration text")
    tokens = TokenStream(calib, Encoder(tok)).take(need)
    if len(tokens) < need:
        raise QkvxError(f"calibration data {', '.join(map(str, calib))}: {len(tokens):,} tokens, the fit "
                        f"needs {need:,} ({opts.windows_needed()} windows of {opts.seq_len})")
    return tokens
