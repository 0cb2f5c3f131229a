"""`qkvx distill`, the run: models, tokenizer and data; the run directory new or resumed; the
training loop (micro-batches, DDP gradient sync, clipping, the schedule), held-out evaluation at set
points, checkpoints, a stop on SIGTERM / SIGINT at a step boundary; the final student."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from qkvx.distill.distributed import Dist, setup_distributed
from qkvx.distill.inputs import resolve_tokenizer, trained_seq_len
from qkvx.distill.loss import kd_loss
from qkvx.distill.options import DistillOptions, DistillResult, Interrupted
from qkvx.distill.rundir import (
    CHECKPOINT,
    FORMAT_VERSION,
    LOG,
    RUN_DIR,
    append_log,
    fingerprint,
    load_checkpoint,
    prepare_out,
    rewrite_log,
    save_checkpoint,
    write_final,
)
from qkvx.errors import QkvxError


@contextlib.contextmanager
def _stop_signals():
    """SIGTERM / SIGINT set a flag (checked at step boundaries) instead of killing mid-write."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    old = {}
    try:
        for s in (signal.SIGTERM, signal.SIGINT):
            old[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread: no handlers
        pass
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def distill(
    student: str | os.PathLike,
    teacher: str | os.PathLike,
    data: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    opts: DistillOptions,
    *,
    eval_data: Sequence[str | os.PathLike] | None = None,
    tokenizer: str | os.PathLike | None = None,
    force: bool = False,
    quiet: bool = False,
    ignore_config_keys: tuple[str, ...] = (),
) -> DistillResult:
    """Distill `teacher` into `student` on `data`, writing the run and the final model to `out`
    (resuming the run there if it has a checkpoint). Under torchrun every process calls this."""
    d = setup_distributed()
    try:
        return _distill(
            d,
            Path(student),
            Path(teacher),
            list(data),
            Path(out),
            opts,
            list(eval_data) if eval_data else None,
            tokenizer,
            force,
            quiet,
            ignore_config_keys,
        )
    finally:
        if d.owns_group:
            torch.distributed.destroy_process_group()


def _distill(
    d: Dist,
    student_path: Path,
    teacher_path: Path,
    data: list,
    out: Path,
    opts: DistillOptions,
    eval_data: list | None,
    tokenizer,
    force: bool,
    quiet: bool,
    ignore: tuple[str, ...],
) -> DistillResult:
    from qkvx.loaders import load
    from qkvx.textdata import Encoder, TokenStream, WindowLoader
    from qkvx.train import perplexity
    from qkvx.util import sha256_source

    t_start = time.perf_counter()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    elif d.device.type == "cpu" and d.local_world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.local_world))
    for p in (student_path, teacher_path):
        if not p.exists():
            raise QkvxError(f"{p}: no such file or directory")
    if out.resolve() in (student_path.resolve(), teacher_path.resolve()):
        raise QkvxError(f"{out}: is the student or the teacher; write the distilled model elsewhere")
    run_dir, ckpt_path = out / RUN_DIR, out / RUN_DIR / CHECKPOINT
    # ---- the models and the tokenizer
    student = load(student_path, ignore)
    teacher = load(teacher_path, ignore)
    spec, tspec = student.spec, teacher.spec
    if spec.vocab_size != tspec.vocab_size:
        raise QkvxError(
            f"the student's vocabulary ({spec.vocab_size}) differs from the teacher's "
            f"({tspec.vocab_size}): distillation compares their next-token distributions"
        )
    tok = resolve_tokenizer(student_path, teacher_path, spec, tokenizer)
    encoder = Encoder(tok)
    seq_len = opts.seq_len or trained_seq_len(student.meta or {}) or min(1024, spec.max_positions)
    limit = min(spec.max_positions, tspec.max_positions)
    if seq_len > limit:
        raise QkvxError(f"--seq-len {seq_len} exceeds the models' max positions ({limit})")
    global_batch = d.world * opts.grad_accum * opts.batch_size
    steps = max(1, opts.tokens // (global_batch * seq_len))
    eval_every = opts.eval_every or max(1, steps // 5)
    # ---- data: the held-out set, then the training stream (which skips it when it comes from --data)
    columns = dict(text_column=opts.text_column, split=opts.split)
    eval_tokens = TokenStream(eval_data or data, encoder, **columns).take(opts.eval_tokens)
    skip = 0 if eval_data else len(eval_tokens)
    if len(eval_tokens) < 2:
        raise QkvxError(f"no tokens in {', '.join(map(str, eval_data or data))}: the data is empty")
    stream = TokenStream(data, encoder, skip_tokens=skip, **columns)
    loader = WindowLoader(stream, seq_len, opts.shuffle_buffer, opts.seed)
    # ---- the run directory: new, resumed or refused (rank 0 decides, everyone follows)
    student_sha = sha256_source(student_path)
    teacher_sha = sha256_source(teacher_path)
    fp = fingerprint(student_sha, teacher_sha, data, eval_data, opts, global_batch, seq_len, steps)
    state = None
    decision = None
    if d.main:
        decision = prepare_out(out, ckpt_path, fp, force)
    decision = d.broadcast(decision)
    if decision == "resume":
        state = load_checkpoint(ckpt_path)
    # ---- model, optimizer
    student = student.to(d.device).train()
    teacher = teacher.to(d.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": opts.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=opts.lr, betas=(opts.beta1, opts.beta2))
    history: list[dict] = []
    evals: list[dict] = []
    step = 0
    elapsed_before = 0.0
    if state is not None:
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["data"])
        step, history, evals = state["step"], list(state["history"]), list(state["evals"])
        elapsed_before = float(state["elapsed"])
        rng = state["rng"]
        torch.set_rng_state(rng[d.rank] if d.rank < len(rng) else rng[0])
    else:
        torch.manual_seed(opts.seed + d.rank)
    resumed_from = step if state is not None else None
    model = student
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(student, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        rewrite_log(run_dir / LOG, history, evals)

    def evaluate() -> None:
        """Rank 0 measures; every rank records the same entry (the broadcast is the barrier)."""
        entry = None
        if d.main:
            ppl = perplexity(student, eval_tokens.to(d.device), seq_len, batch_size=opts.batch_size)
            entry = {"step": step, "tokens": step * global_batch * seq_len, "ppl": ppl}
            append_log(run_dir / LOG, {"eval": True, **entry})
        evals.append(d.broadcast(entry))

    def save() -> None:
        rngs = d.gather(torch.get_rng_state())
        if d.main:
            save_checkpoint(
                {
                    "format": FORMAT_VERSION,
                    "fingerprint": fp,
                    "step": step,
                    "student": student.state_dict(),
                    "optimizer": opt.state_dict(),
                    "schedule": {"step": step, "steps": steps, "lr": opts.lr_at(min(step, steps - 1), steps)},
                    "rng": rngs,
                    "data": loader.state_dict(),
                    "history": history,
                    "evals": evals,
                    "elapsed": elapsed_before + time.perf_counter() - t_loop,
                },
                ckpt_path,
            )
        d.barrier()

    t_loop = time.perf_counter()
    if step == 0:
        evaluate()  # the student as given (zero-shot); a resumed run has it already
    share = slice(
        d.rank * opts.grad_accum * opts.batch_size, (d.rank + 1) * opts.grad_accum * opts.batch_size
    )
    with _stop_signals() as flag, _progress(quiet or not d.main, steps, step) as bar:
        tokens_done_here, t_here = 0, time.perf_counter()
        while step < steps:
            if d.any(flag["stop"]):
                save()
                raise Interrupted(
                    f"interrupted: checkpoint saved at step {step}/{steps} in {ckpt_path}; "
                    f"rerun the same command to resume"
                )
            lr = opts.lr_at(step, steps)
            for g in opt.param_groups:
                g["lr"] = lr
            windows = loader.next(global_batch)[share].to(d.device)
            opt.zero_grad(set_to_none=True)
            sums = [0.0, 0.0, 0.0]
            for i in range(opts.grad_accum):
                x = windows[i * opts.batch_size : (i + 1) * opts.batch_size]
                sync = (
                    contextlib.nullcontext() if d.world == 1 or i == opts.grad_accum - 1 else model.no_sync()
                )
                with sync:
                    s_logits = model(x[:, :-1])
                    with torch.no_grad():
                        t_logits = teacher(x[:, :-1])
                    loss, kl, ce = kd_loss(s_logits, t_logits, x[:, 1:], opts)
                    (loss / opts.grad_accum).backward()
                for j, v in enumerate((loss, kl, ce)):
                    sums[j] += v.item() / opts.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip).item()
            opt.step()
            loss_v, kl_v, ce_v = d.all_mean(sums)
            step += 1
            tokens_done_here += global_batch * seq_len
            tps = tokens_done_here / (time.perf_counter() - t_here)
            history.append(
                {"step": step, "loss": loss_v, "kl": kl_v, "ce": ce_v, "lr": lr, "grad_norm": grad_norm}
            )
            if d.main:
                append_log(run_dir / LOG, {**history[-1], "tokens_per_s": round(tps, 1)})
            bar(step, loss_v, tps, evals[-1]["ppl"] if evals else float("nan"))
            if step % eval_every == 0 or step == steps:
                evaluate()
            if step % opts.save_every == 0 and step < steps:
                save()
    elapsed = elapsed_before + time.perf_counter() - t_loop
    meta = {}
    if d.main:
        meta = write_final(
            out,
            student,
            student_path,
            teacher_path,
            student_sha,
            teacher_sha,
            teacher.spec,
            data,
            eval_data,
            opts,
            d.world,
            global_batch,
            seq_len,
            steps,
            evals,
            elapsed,
            tok,
        )
        with contextlib.suppress(FileNotFoundError):
            ckpt_path.unlink()
    d.barrier()
    return DistillResult(
        out=out,
        steps=steps,
        tokens=steps * global_batch * seq_len,
        world_size=d.world,
        seconds=time.perf_counter() - t_start,
        evals=evals,
        history=history,
        resumed_from=resumed_from,
        meta=meta,
    )


@contextlib.contextmanager
def _progress(disabled: bool, steps: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [
        TextColumn("[bold]distill"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TextColumn("held-out ppl {task.fields[ppl]:.3f}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, disable=disabled) as progress:
        task = progress.add_task(
            "distill", total=steps, completed=start, loss=float("nan"), tps=0.0, ppl=float("nan")
        )

        def update(step: int, loss: float, tps: float, ppl: float) -> None:
            progress.update(task, completed=step, loss=loss, tps=tps, ppl=ppl)

        yield update
