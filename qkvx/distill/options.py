"""What a distill run is told (DistillOptions: loss, schedule, batching, cadence; validated, with
the learning-rate schedule) and what it returns (DistillResult)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from qkvx.errors import QkvxError


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
        if not (
            0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.weight_decay >= 0 and self.grad_clip > 0
        ):
            raise QkvxError("betas must be in [0, 1), --weight-decay >= 0 and --grad-clip > 0")
        if (
            not self.temperature > 0
            or self.kl_weight < 0
            or self.ce_weight < 0
            or self.kl_weight + self.ce_weight == 0
        ):
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
