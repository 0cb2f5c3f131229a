"""`qkvx distill`: train a student (typically a K=V model from `qkvx convert`) on a teacher's soft
targets plus the hard labels, on one process or many under `torchrun` (DDP), resumable after a kill.

Loss per token (both terms averaged over the predicted tokens):

    kl_weight * T^2 * KL_T + ce_weight * CE(student, next token)

with KL_T at temperature T between the teacher's and the student's next-token distributions. The
paper's release computes F.kl_div(log_softmax(student / T), softmax(teacher / T)), i.e.
sum p_teacher (log p_teacher - log p_student) (its docstring calls it "KL(student || teacher)"); that
is `kl="forward"`, the default. `kl="reverse"` is sum p_student (log p_student - log p_teacher).

Optimizer: AdamW (beta1, beta2), decoupled weight decay on matrices only (GPT-2 practice, as
`qkvx train`), learning rate linear warmup then cosine from lr to min_lr at the last step, gradient
norm clipped. One optimizer step consumes world_size * grad_accum * batch_size windows of
seq_len + 1 tokens from ONE global stream (qkvx.textdata.WindowLoader, identical on every rank);
rank r takes its share. So a step sees the same windows whatever the process count, and 2 processes
with accumulation A compute the step that 1 process with accumulation 2A does.

Run directory `out`:
  distill/checkpoint.pt   everything a resume needs: student weights, optimizer moments, schedule
                          position, every rank's RNG state, the data stream position, shuffle
                          buffer and history; written to a temp file then renamed (atomic)
  distill/log.jsonl       one line per step (loss, kl, ce, lr, grad norm, tokens/s) and per eval
  model.safetensors + qkvx.json (+ tokenizer.json)   the final student, when the run completes;
                          qkvx.json records the distillation under "distillation"
Rerunning the same command resumes from the checkpoint (a kill loses at most the steps since the
last save; they are recomputed to the same values). On SIGTERM / SIGINT the run saves at the next
step boundary and exits.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from qkvx.errors import QkvxError

CHECKPOINT = "checkpoint.pt"
RUN_DIR = "distill"
LOG = "log.jsonl"
FORMAT_VERSION = 1


class Interrupted(QkvxError):
    """SIGTERM / SIGINT: the checkpoint is saved; rerun the same command to resume."""

    exit_code = 130


@dataclass
class DistillOptions:
    tokens: int  # training tokens (predicted tokens) to consume in total
    seq_len: int | None = None  # default: the length the model was trained at, else min(1024, positions)
    batch_size: int = 8  # windows per micro-batch per process
    grad_accum: int = 1
    lr: float = 5e-5
    min_lr: float = 5e-6
    warmup: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    temperature: float = 2.0
    kl_weight: float = 0.5
    ce_weight: float = 0.5
    kl: str = "forward"  # forward (the release's) | reverse
    eval_every: int | None = None  # steps; default: 5 evaluations over the run (plus step 0)
    eval_tokens: int = 65536
    save_every: int = 50  # steps
    shuffle_buffer: int = 1024  # windows
    seed: int = 0
    threads: int | None = None  # CPU threads per process (default: cores / local processes)
    text_column: str = "text"
    split: str | None = None

    def __post_init__(self) -> None:
        ints = ("tokens", "batch_size", "grad_accum", "eval_tokens", "save_every", "shuffle_buffer")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise QkvxError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("seq_len", "eval_every", "threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise QkvxError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.warmup < 0:
            raise QkvxError(f"--warmup must be >= 0, got {self.warmup}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise QkvxError(f"--lr must be > 0 and --min-lr in [0, lr], got {self.lr}, {self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.weight_decay >= 0 and self.grad_clip > 0):
            raise QkvxError("betas must be in [0, 1), --weight-decay >= 0 and --grad-clip > 0")
        if not self.temperature > 0 or self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise QkvxError("--temperature must be > 0 and the loss weights >= 0, not both 0")
        if self.kl not in ("forward", "reverse"):
            raise QkvxError(f"--kl must be forward or reverse, got {self.kl!r}")

    def lr_at(self, step: int, steps: int) -> float:
        """Linear warmup over `warmup` steps, then cosine from lr at the first step after it to
        min_lr at the last step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, steps - 1 - self.warmup)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class DistillResult:
    out: Path
    steps: int
    tokens: int  # training tokens consumed (predicted tokens)
    world_size: int
    seconds: float  # wall time of this call
    evals: list[dict]  # [{"step", "tokens", "ppl"}]
    history: list[dict] = field(repr=False)  # per step
    resumed_from: int | None = None
    meta: dict = field(default_factory=dict, repr=False)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            opts: DistillOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce), each a mean over the predicted tokens; kl already scaled by T^2."""
    V = student_logits.shape[-1]
    s = student_logits.reshape(-1, V).float()
    t = teacher_logits.reshape(-1, V).float()
    ce = F.cross_entropy(s, targets.reshape(-1))
    T = opts.temperature
    log_ps, log_pt = F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)
    if opts.kl == "forward":
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    else:
        kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean()
    kl = kl * T * T
    return opts.kl_weight * kl + opts.ce_weight * ce, kl, ce


# ---- distributed --------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_mean(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return (t / self.world).tolist()

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def setup_distributed() -> Dist:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...) -> a process group: nccl on CUDA,
    gloo on CPU. One process without torchrun: world 1, no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
                device=torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu"), owns_group=owns)


# ---- setup ----------------------------------------------------------------------------------------
def _resolve_tokenizer(student: Path, teacher: Path, spec, given):
    """The tokenizer the data is encoded with: --tokenizer, else the student folder's tokenizer.json,
    else the teacher folder's; None means bytes (byte-level models). Checked against both models."""
    from qkvx.tokenizer import TOKENIZER_FILE, check_vocab, load_tokenizer

    def folder_tok(p: Path):
        return load_tokenizer(p) if p.is_dir() and (p / TOKENIZER_FILE).is_file() else None

    tok = load_tokenizer(given) if given is not None else None
    if tok is None:
        s_tok, t_tok = folder_tok(student), folder_tok(teacher)
        if s_tok is not None and t_tok is not None and s_tok.to_json() != t_tok.to_json():
            raise QkvxError(f"{student} and {teacher} carry different tokenizer.json files: the student "
                            f"must read the teacher's tokens (pass --tokenizer to choose)")
        tok = s_tok or t_tok
    if tok is None:
        if spec.vocab_size == 256:
            return None
        raise QkvxError(f"{student}: no tokenizer.json beside the student or the teacher; pass --tokenizer")
    check_vocab(tok, spec.vocab_size, str(student))
    if tok.vocab_size < spec.vocab_size // 2:
        raise QkvxError(f"{tok.source}: the tokenizer has {tok.vocab_size} ids, but the model's vocabulary "
                        f"has {spec.vocab_size} rows: not this model's tokenizer")
    if spec.vocab_size == 256 and tok.vocab_size == 256:
        return None  # byte-level: bytes directly
    return tok


def _trained_seq_len(meta: dict) -> int | None:
    """The window length the model (or the model it was converted from) was trained at."""
    for m in (meta, (meta.get("conversion") or {}).get("source", {}).get("meta") or {},
              meta.get("distillation") or {}):
        seq = (m.get("training") or {}).get("seq_len") if "training" in m else m.get("seq_len")
        if isinstance(seq, int) and seq > 0:
            return seq
    return None


def _fingerprint(student_sha: str, teacher_sha: str, data, eval_data, opts: DistillOptions, global_batch: int,
                 seq_len: int, steps: int) -> dict:
    """What must not change between a run and its resume (threads, save and eval cadence may)."""
    keep = {k: v for k, v in asdict(opts).items() if k not in ("threads", "save_every", "eval_every",
                                                                "batch_size", "grad_accum")}
    return {"student_sha256": student_sha, "teacher_sha256": teacher_sha,
            "data": [str(Path(p).resolve()) for p in data],
            "eval_data": [str(Path(p).resolve()) for p in eval_data] if eval_data else None,
            "options": keep, "global_batch": global_batch, "seq_len": seq_len, "steps": steps}


def _atomic_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise QkvxError(f"{path}: not a readable distill checkpoint ({type(e).__name__}); delete it to "
                        f"start over") from None


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


# ---- the run ------------------------------------------------------------------------------------
def distill(student: str | os.PathLike, teacher: str | os.PathLike, data: Sequence[str | os.PathLike],
            out: str | os.PathLike, opts: DistillOptions, *, eval_data: Sequence[str | os.PathLike] | None = None,
            tokenizer: str | os.PathLike | None = None, force: bool = False, quiet: bool = False,
            ignore_config_keys: tuple[str, ...] = ()) -> DistillResult:
    """Distill `teacher` into `student` on `data`, writing the run and the final model to `out`
    (resuming the run there if it has a checkpoint). Under torchrun every process calls this."""
    d = setup_distributed()
    try:
        return _distill(d, Path(student), Path(teacher), list(data), Path(out), opts,
                        list(eval_data) if eval_data else None, tokenizer, force, quiet, ignore_config_keys)
    finally:
        if d.owns_group:
            torch.distributed.destroy_process_group()


def _distill(d: Dist, student_path: Path, teacher_path: Path, data: list, out: Path, opts: DistillOptions,
             eval_data: list | None, tokenizer, force: bool, quiet: bool, ignore: tuple[str, ...]) -> DistillResult:
    import qkvx
    from qkvx.export.manifest import sha256_source
    from qkvx.textdata import Encoder, TokenStream, WindowLoader
    from qkvx.train import perplexity

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
    student = qkvx.load(student_path, ignore)
    teacher = qkvx.load(teacher_path, ignore)
    spec, tspec = student.spec, teacher.spec
    if spec.vocab_size != tspec.vocab_size:
        raise QkvxError(f"the student's vocabulary ({spec.vocab_size}) differs from the teacher's "
                        f"({tspec.vocab_size}): distillation compares their next-token distributions")
    tok = _resolve_tokenizer(student_path, teacher_path, spec, tokenizer)
    encoder = Encoder(tok)
    seq_len = opts.seq_len or _trained_seq_len(student.meta or {}) or min(1024, spec.max_positions)
    limit = min(spec.max_positions, tspec.max_positions)
    if seq_len > limit:
        raise QkvxError(f"--seq-len {seq_len} exceeds the models' max positions ({limit})")
    global_batch = d.world * opts.grad_accum * opts.batch_size
    steps = max(1, opts.tokens // (global_batch * seq_len))
    eval_every = opts.eval_every or max(1, steps // 5)
    # ---- data: the held-out set, then the training stream (which skips it when it comes from --data)
    if eval_data:
        eval_tokens = TokenStream(eval_data, encoder, text_column=opts.text_column, split=opts.split).take(opts.eval_tokens)
        skip = 0
    else:
        eval_tokens = TokenStream(data, encoder, text_column=opts.text_column, split=opts.split).take(opts.eval_tokens)
        skip = len(eval_tokens)
    if len(eval_tokens) < 2:
        raise QkvxError(f"no tokens in {', '.join(map(str, eval_data or data))}: the data is empty")
    stream = TokenStream(data, encoder, text_column=opts.text_column, split=opts.split, skip_tokens=skip)
    loader = WindowLoader(stream, seq_len, opts.shuffle_buffer, opts.seed)
    # ---- the run directory: new, resumed or refused (rank 0 decides, everyone follows)
    student_sha = sha256_source(student_path)
    teacher_sha = sha256_source(teacher_path)
    fp = _fingerprint(student_sha, teacher_sha, data, eval_data, opts, global_batch, seq_len, steps)
    state = None
    decision = None
    if d.main:
        decision = _prepare_out(out, ckpt_path, fp, force)
    decision = d.broadcast(decision)
    if decision == "resume":
        state = _load_checkpoint(ckpt_path)
    # ---- model, optimizer
    student = student.to(d.device).train()
    teacher = teacher.to(d.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": opts.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
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
        _rewrite_log(run_dir / LOG, history, evals)

    def evaluate() -> None:
        """Rank 0 measures; every rank records the same entry (the broadcast is the barrier)."""
        entry = None
        if d.main:
            ppl = perplexity(student, eval_tokens.to(d.device), seq_len, batch_size=opts.batch_size)
            entry = {"step": step, "tokens": step * global_batch * seq_len, "ppl": ppl}
            _append_log(run_dir / LOG, {"eval": True, **entry})
        evals.append(d.broadcast(entry))

    def save() -> None:
        rngs = d.gather(torch.get_rng_state())
        if d.main:
            _atomic_save({"format": FORMAT_VERSION, "fingerprint": fp, "step": step,
                          "student": student.state_dict(), "optimizer": opt.state_dict(),
                          "schedule": {"step": step, "steps": steps, "lr": opts.lr_at(min(step, steps - 1), steps)},
                          "rng": rngs, "data": loader.state_dict(), "history": history, "evals": evals,
                          "elapsed": elapsed_before + time.perf_counter() - t_loop}, ckpt_path)
        d.barrier()

    t_loop = time.perf_counter()
    if step == 0:
        evaluate()  # the student as given (zero-shot); a resumed run has it already
    share = slice(d.rank * opts.grad_accum * opts.batch_size, (d.rank + 1) * opts.grad_accum * opts.batch_size)
    with _stop_signals() as flag, _progress(quiet or not d.main, steps, step) as bar:
        tokens_done_here, t_here = 0, time.perf_counter()
        while step < steps:
            if d.any(flag["stop"]):
                save()
                raise Interrupted(f"interrupted: checkpoint saved at step {step}/{steps} in {ckpt_path}; "
                                  f"rerun the same command to resume")
            lr = opts.lr_at(step, steps)
            for g in opt.param_groups:
                g["lr"] = lr
            windows = loader.next(global_batch)[share].to(d.device)
            opt.zero_grad(set_to_none=True)
            sums = [0.0, 0.0, 0.0]
            for i in range(opts.grad_accum):
                x = windows[i * opts.batch_size:(i + 1) * opts.batch_size]
                sync = contextlib.nullcontext() if d.world == 1 or i == opts.grad_accum - 1 else model.no_sync()
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
            history.append({"step": step, "loss": loss_v, "kl": kl_v, "ce": ce_v, "lr": lr, "grad_norm": grad_norm})
            if d.main:
                _append_log(run_dir / LOG, {**history[-1], "tokens_per_s": round(tps, 1)})
            bar(step, loss_v, tps, evals[-1]["ppl"] if evals else float("nan"))
            if step % eval_every == 0 or step == steps:
                evaluate()
            if step % opts.save_every == 0 and step < steps:
                save()
    elapsed = elapsed_before + time.perf_counter() - t_loop
    meta = {}
    if d.main:
        meta = _finish(out, student, student_path, teacher_path, student_sha, teacher_sha, teacher.spec, data,
                       eval_data, opts, d.world, global_batch, seq_len, steps, evals, elapsed, tok)
        with contextlib.suppress(FileNotFoundError):
            ckpt_path.unlink()
    d.barrier()
    return DistillResult(out=out, steps=steps, tokens=steps * global_batch * seq_len, world_size=d.world,
                         seconds=time.perf_counter() - t_start, evals=evals, history=history,
                         resumed_from=resumed_from, meta=meta)


def _prepare_out(out: Path, ckpt_path: Path, fp: dict, force: bool) -> str:
    """'resume' (a matching checkpoint), or 'new' (out made ready for a fresh run)."""
    from qkvx.loaders.native import SPEC_FILE

    if ckpt_path.is_file() and not force:
        state_fp = _load_checkpoint(ckpt_path).get("fingerprint")
        if state_fp != fp:
            diff = sorted(k for k in fp if (state_fp or {}).get(k) != fp[k])
            raise QkvxError(f"{out}: holds a distill run with other settings ({', '.join(diff)}); use "
                            f"--force to start over")
        return "resume"
    if out.exists():
        if not force:
            done = (out / SPEC_FILE).is_file()
            raise QkvxError(f"{out}: already exists{' (a finished run)' if done else ''} (use --force to "
                            f"replace it)")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    (out / RUN_DIR).mkdir(parents=True)
    return "new"


def _rewrite_log(path: Path, history: list[dict], evals: list[dict]) -> None:
    """The log as the checkpoint knows it (steps after the last save are recomputed)."""
    lines = [json.dumps(h) for h in history] + [json.dumps({"eval": True, **e}) for e in evals]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def _append_log(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


@contextlib.contextmanager
def _progress(disabled: bool, steps: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
               TextColumn("held-out ppl {task.fields[ppl]:.3f}"), TimeRemainingColumn()]
    with Progress(*columns, disable=disabled) as progress:
        task = progress.add_task("distill", total=steps, completed=start, loss=float("nan"), tps=0.0, ppl=float("nan"))

        def update(step: int, loss: float, tps: float, ppl: float) -> None:
            progress.update(task, completed=step, loss=loss, tps=tps, ppl=ppl)

        yield update


def _finish(out: Path, student, student_path: Path, teacher_path: Path, student_sha: str, teacher_sha: str,
            teacher_spec, data, eval_data, opts: DistillOptions, world: int, global_batch: int, seq_len: int,
            steps: int, evals: list[dict], elapsed: float, tok) -> dict:
    """Write the final student into `out` (model.safetensors, qkvx.json, tokenizer.json), each file
    renamed into place."""
    from qkvx.loaders.native import SPEC_FILE, save
    from qkvx.tokenizer import TOKENIZER_FILE

    carried = {k: v for k, v in (student.meta or {}).items() if k in ("conversion", "training")}
    if "distillation" in (student.meta or {}):
        carried["previous_distillation"] = student.meta["distillation"]
    meta = {
        "teacher": {"path": str(teacher_path.resolve()), "sha256": teacher_sha, "variant": teacher_spec.paper_name},
        "student_init": {"path": str(student_path.resolve()), "sha256": student_sha},
        "data": [str(p) for p in data], "eval_data": [str(p) for p in eval_data] if eval_data else
        f"the first {opts.eval_tokens:,} tokens of the data (not trained on)",
        "tokenizer": tok.source if tok is not None else "bytes",
        "options": asdict(opts), "seq_len": seq_len, "world_size": world, "global_batch": global_batch,
        "steps": steps, "tokens": steps * global_batch * seq_len, "evals": evals,
        "heldout_ppl": evals[-1]["ppl"] if evals else None, "seconds": round(elapsed, 1),
        "torch": torch.__version__,
    }
    staging = Path(tempfile.mkdtemp(prefix=".final-", dir=out / RUN_DIR))
    try:
        was_training = student.training
        student.eval()
        save(student.cpu(), staging / "m", extra={**carried, "distillation": meta})
        student.train(was_training)
        src_tok = next((p / TOKENIZER_FILE for p in (student_path, teacher_path)
                        if p.is_dir() and (p / TOKENIZER_FILE).is_file()), None)
        if tok is not None and (src_tok is None or tok.source != str(src_tok.parent)):
            (staging / "m" / TOKENIZER_FILE).write_text(tok.to_json(), encoding="utf-8")
        elif src_tok is not None:
            shutil.copyfile(src_tok, staging / "m" / TOKENIZER_FILE)
        for f in sorted((staging / "m").iterdir(), key=lambda f: f.name == SPEC_FILE):  # qkvx.json last
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta
