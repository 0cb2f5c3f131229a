"""The `qkvx convert` and `qkvx distill` commands, registered on qkvx.cli's app: each parses its
options, calls ONE function of qkvx.api, and prints the result (qkvx.console). Option defaults are
read from FitOptions and DistillOptions, so `--help` never drifts from what runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

from qkvx import api
from qkvx.console import IGNORE_KEY_HELP, console, show_convert, show_distill


def _default(options: type, name: str) -> Any:
    """A dataclass field's default: the API's own, shown by --help and passed when not given."""
    return next(f.default for f in dataclasses.fields(options) if f.name == name)


def _fit(name: str) -> Any:
    from qkvx.convert.fit import FitOptions

    return _default(FitOptions, name)


def _distill(name: str) -> Any:
    from qkvx.distill import DistillOptions

    return _default(DistillOptions, name)


def convert(
    source: Path = typer.Argument(
        ...,
        help="A model with separate keys and values (QKV, GQA-g, MQA): paper .pt, Hugging Face or "
        "qkvx folder.",
    ),
    to: str = typer.Option("Q-K=V", "--to", help="Target: Q-K=V, Q-GQA-g or Q-MQA (kv heads mean-pooled)."),
    init: str = typer.Option(
        "avg", "--init", help="avg | keep-k | keep-v (the paper's) | fit (data-aware, on calibration text)."
    ),
    out: Path = typer.Option(..., "--out", help="Output qkvx folder."),
    calib: list[Path] | None = typer.Option(
        None,
        "--calib",
        help="--init fit: calibration text file or datasets folder (repeatable; default for `qkvx "
        "train` models: their training text).",
    ),
    tokenizer: Path | None = typer.Option(
        None,
        "--tokenizer",
        help="Tokenizer for the calibration text (default: the source folder's tokenizer.json; bytes "
        "for byte-level models).",
    ),
    calib_batches: int = typer.Option(
        _fit("batches"),
        "--calib-batches",
        help="--init fit: calibration batches fitted on (2 more are held out).",
    ),
    calib_batch_size: int = typer.Option(
        _fit("batch_size"), "--calib-batch-size", help="--init fit: windows per calibration batch."
    ),
    calib_seq_len: int = typer.Option(
        _fit("seq_len"), "--calib-seq-len", help="--init fit: tokens per calibration window."
    ),
    fit_steps: int = typer.Option(
        _fit("steps"), "--fit-steps", help="--init fit: Adam steps per layer after the closed-form start."
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the conversion record as JSON."),
    ignore_config_key: list[str] | None = typer.Option(None, "--ignore-config-key", help=IGNORE_KEY_HELP),
) -> None:
    """Turn a trained QKV / GQA / MQA model into a K=V model (one KV-cache tensor per layer)."""
    fit = dict(batches=calib_batches, batch_size=calib_batch_size, seq_len=calib_seq_len, steps=fit_steps)
    with console.status("converting") as status:
        r = api.convert(
            source,
            to,
            init,
            out,
            force=force,
            calib=list(calib) if calib else None,
            tokenizer=tokenizer,
            fit_options=fit,
            ignore_config_keys=tuple(ignore_config_key or ()),
            progress=lambda stage: status.update(f"converting: {stage}"),
        )
    show_convert(r, as_json)


def distill(
    student: Path = typer.Argument(..., help="The student (e.g. from `qkvx convert`)."),
    teacher: Path = typer.Option(
        ..., "--teacher", help="The teacher: paper .pt, Hugging Face or qkvx folder."
    ),
    data: list[Path] = typer.Option(
        ..., "--data", help="Training text file or datasets folder (repeatable; read in order, looped)."
    ),
    tokens: int = typer.Option(..., "--tokens", help="Training tokens in total (over all processes)."),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Run directory: checkpoint, log and the final qkvx model (resumed if it holds a checkpoint).",
    ),
    eval_data: list[Path] | None = typer.Option(
        None,
        "--eval-data",
        help="Held-out text (default: the first --eval-tokens tokens of --data, never trained on).",
    ),
    eval_tokens: int = typer.Option(
        _distill("eval_tokens"), "--eval-tokens", help="Held-out tokens for perplexity."
    ),
    eval_every: int | None = typer.Option(
        None, "--eval-every", help="Steps between held-out evaluations (default: 5 over the run)."
    ),
    tokenizer: Path | None = typer.Option(
        None,
        "--tokenizer",
        help="tokenizer.json or folder (default: the student's or teacher's; bytes for byte-level models).",
    ),
    seq_len: int | None = typer.Option(
        None,
        "--seq-len",
        help="Window length (default: the length the model was trained at, else min(1024, positions)).",
    ),
    batch_size: int = typer.Option(
        _distill("batch_size"), "--batch-size", help="Windows per micro-batch per process."
    ),
    grad_accum: int = typer.Option(
        _distill("grad_accum"), "--grad-accum", help="Micro-batches per optimizer step per process."
    ),
    lr: float = typer.Option(_distill("lr"), "--lr", help="Peak learning rate (cosine to --min-lr)."),
    min_lr: float = typer.Option(_distill("min_lr"), "--min-lr"),
    warmup: int = typer.Option(_distill("warmup"), "--warmup", help="Linear warmup steps."),
    weight_decay: float = typer.Option(
        _distill("weight_decay"), "--weight-decay", help="AdamW decoupled weight decay (matrices)."
    ),
    beta1: float = typer.Option(_distill("beta1"), "--beta1"),
    beta2: float = typer.Option(_distill("beta2"), "--beta2"),
    grad_clip: float = typer.Option(_distill("grad_clip"), "--grad-clip", help="Gradient-norm clip."),
    temperature: float = typer.Option(
        _distill("temperature"), "--temperature", help="Softmax temperature of the KL term (scaled by T^2)."
    ),
    kl_weight: float = typer.Option(_distill("kl_weight"), "--kl-weight"),
    ce_weight: float = typer.Option(
        _distill("ce_weight"), "--ce-weight", help="Weight of the hard-label cross-entropy."
    ),
    kl: str = typer.Option(
        _distill("kl"),
        "--kl",
        help="forward: sum p_teacher log(p_teacher/p_student) (the paper release's F.kl_div) | reverse.",
    ),
    save_every: int = typer.Option(_distill("save_every"), "--save-every", help="Steps between checkpoints."),
    shuffle_buffer: int = typer.Option(
        _distill("shuffle_buffer"),
        "--shuffle-buffer",
        help="Windows in the shuffle buffer (1 = stream order).",
    ),
    seed: int = typer.Option(_distill("seed"), "--seed"),
    threads: int | None = typer.Option(
        None, "--threads", help="CPU threads per process (default: cores / processes)."
    ),
    text_column: str = typer.Option(
        _distill("text_column"), "--text-column", help="Column of a datasets folder."
    ),
    split: str | None = typer.Option(None, "--split", help="Split of a datasets folder with several."),
    force: bool = typer.Option(False, "--force", help="Start over in --out, discarding what is there."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    ignore_config_key: list[str] | None = typer.Option(None, "--ignore-config-key", help=IGNORE_KEY_HELP),
) -> None:
    """Distill a teacher into a student (KL at temperature T + hard labels); resumable, DDP via torchrun."""
    r = api.distill(
        student,
        teacher,
        list(data),
        out,
        tokens,
        eval_data=list(eval_data) if eval_data else None,
        tokenizer=tokenizer,
        force=force,
        quiet=quiet,
        ignore_config_keys=tuple(ignore_config_key or ()),
        eval_tokens=eval_tokens,
        eval_every=eval_every,
        seq_len=seq_len,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        min_lr=min_lr,
        warmup=warmup,
        weight_decay=weight_decay,
        beta1=beta1,
        beta2=beta2,
        grad_clip=grad_clip,
        temperature=temperature,
        kl_weight=kl_weight,
        ce_weight=ce_weight,
        kl=kl,
        save_every=save_every,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        threads=threads,
        text_column=text_column,
        split=split,
    )
    show_distill(r)
