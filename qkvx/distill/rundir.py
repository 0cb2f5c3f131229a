"""The run directory `out`: distill/checkpoint.pt (written atomically; read back on resume),
distill/log.jsonl, the decision new / resume / refuse, and the final student written beside them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from qkvx.distill.options import DistillOptions
from qkvx.errors import QkvxError
from qkvx.util import atomic_file

CHECKPOINT = "checkpoint.pt"
RUN_DIR = "distill"
LOG = "log.jsonl"
FORMAT_VERSION = 1


def fingerprint(
    student_sha: str,
    teacher_sha: str,
    data,
    eval_data,
    opts: DistillOptions,
    global_batch: int,
    seq_len: int,
    steps: int,
) -> dict:
    """What must not change between a run and its resume (threads, save and eval cadence may)."""
    keep = {
        k: v
        for k, v in asdict(opts).items()
        if k not in ("threads", "save_every", "eval_every", "batch_size", "grad_accum")
    }
    return {
        "student_sha256": student_sha,
        "teacher_sha256": teacher_sha,
        "data": [str(Path(p).resolve()) for p in data],
        "eval_data": [str(Path(p).resolve()) for p in eval_data] if eval_data else None,
        "options": keep,
        "global_batch": global_batch,
        "seq_len": seq_len,
        "steps": steps,
    }


def save_checkpoint(obj: Any, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise QkvxError(
            f"{path}: not a readable distill checkpoint ({type(e).__name__}); delete it to start over"
        ) from None


def prepare_out(out: Path, ckpt_path: Path, fp: dict, force: bool) -> str:
    """'resume' (a matching checkpoint), or 'new' (out made ready for a fresh run)."""
    from qkvx.loaders.native import SPEC_FILE

    if ckpt_path.is_file() and not force:
        state_fp = load_checkpoint(ckpt_path).get("fingerprint")
        if state_fp != fp:
            diff = sorted(k for k in fp if (state_fp or {}).get(k) != fp[k])
            raise QkvxError(
                f"{out}: holds a distill run with other settings ({', '.join(diff)}); use "
                f"--force to start over"
            )
        return "resume"
    if out.exists():
        if not force:
            done = (out / SPEC_FILE).is_file()
            raise QkvxError(
                f"{out}: already exists{' (a finished run)' if done else ''} (use --force to replace it)"
            )
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    (out / RUN_DIR).mkdir(parents=True)
    return "new"


def rewrite_log(path: Path, history: list[dict], evals: list[dict]) -> None:
    """The log as the checkpoint knows it (steps after the last save are recomputed)."""
    lines = [json.dumps(h) for h in history] + [json.dumps({"eval": True, **e}) for e in evals]
    with atomic_file(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))


def append_log(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def write_final(
    out: Path,
    student,
    student_path: Path,
    teacher_path: Path,
    student_sha: str,
    teacher_sha: str,
    teacher_spec,
    data,
    eval_data,
    opts: DistillOptions,
    world: int,
    global_batch: int,
    seq_len: int,
    steps: int,
    evals: list[dict],
    elapsed: float,
    tok,
) -> dict:
    """Write the final student into `out` (model.safetensors, qkvx.json, tokenizer.json), each file
    renamed into place."""
    from qkvx.loaders.native import SPEC_FILE, save
    from qkvx.tokenizer import TOKENIZER_FILE

    carried = {k: v for k, v in (student.meta or {}).items() if k in ("conversion", "training")}
    if "distillation" in (student.meta or {}):
        carried["previous_distillation"] = student.meta["distillation"]
    meta = {
        "teacher": {
            "path": str(teacher_path.resolve()),
            "sha256": teacher_sha,
            "variant": teacher_spec.paper_name,
        },
        "student_init": {"path": str(student_path.resolve()), "sha256": student_sha},
        "data": [str(p) for p in data],
        "eval_data": [str(p) for p in eval_data]
        if eval_data
        else f"the first {opts.eval_tokens:,} tokens of the data (not trained on)",
        "tokenizer": tok.source if tok is not None else "bytes",
        "options": asdict(opts),
        "seq_len": seq_len,
        "world_size": world,
        "global_batch": global_batch,
        "steps": steps,
        "tokens": steps * global_batch * seq_len,
        "evals": evals,
        "heldout_ppl": evals[-1]["ppl"] if evals else None,
        "seconds": round(elapsed, 1),
        "torch": torch.__version__,
    }
    staging = Path(tempfile.mkdtemp(prefix=".final-", dir=out / RUN_DIR))
    try:
        was_training = student.training
        student.eval()
        save(student.cpu(), staging / "m", extra={**carried, "distillation": meta})
        student.train(was_training)
        src_tok = next(
            (
                p / TOKENIZER_FILE
                for p in (student_path, teacher_path)
                if p.is_dir() and (p / TOKENIZER_FILE).is_file()
            ),
            None,
        )
        if tok is not None and (src_tok is None or tok.source != str(src_tok.parent)):
            (staging / "m" / TOKENIZER_FILE).write_text(tok.to_json(), encoding="utf-8")
        elif src_tok is not None:
            shutil.copyfile(src_tok, staging / "m" / TOKENIZER_FILE)
        for f in sorted((staging / "m").iterdir(), key=lambda f: f.name == SPEC_FILE):  # qkvx.json last
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta
