"""The small trainer behind the demo and the quantization measurements: a byte-level LM on
Python's own help texts (qkvx.corpus), so training needs no download and every machine sees the
same corpus. A token is a byte (vocab 256)."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from qkvx.corpus import corpus_info, split_corpus
from qkvx.errors import QkvxError
from qkvx.loaders.native import save
from qkvx.models.transformer import Transformer
from qkvx.spec import BYTE_VOCAB, ModelSpec, canonical_variant
from qkvx.util import variant_slug


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int = 16) -> float:
    """exp(mean NLL) over NON-OVERLAPPING windows of seq_len + 1 tokens (stride seq_len): every token
    but the first is predicted exactly once, from the tokens before it in its window (context 0 to
    seq_len - 1, reset at each window). Deterministic; cheaper and slightly pessimistic vs a sliding
    window. Keep seq_len within the length the model was trained on."""
    if len(tokens) < 2:
        raise QkvxError(f"perplexity needs at least 2 tokens, got {len(tokens)}")
    starts = list(range(0, len(tokens) - 1, seq_len))
    full = [s for s in starts if s + seq_len + 1 <= len(tokens)]
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        # Full windows in batches, then the one shorter tail window on its own.
        groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
        groups += [[s] for s in starts[len(full) :]]
        for group in groups:
            x = torch.stack([tokens[s : s + seq_len + 1] for s in group])
            logits = model(x[:, :-1])
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum"
            )
            nll += loss.item()
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)


def unigram_perplexity(train: torch.Tensor, heldout: torch.Tensor) -> float:
    """Perplexity on every held-out byte of a unigram byte model fit on `train` with add-one
    (Laplace) smoothing: p(b) = (count(b) + 1) / (len(train) + 256). The baseline to beat."""
    counts = torch.bincount(train, minlength=BYTE_VOCAB).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[heldout].mean().item())


def make_spec(
    variant: str,
    family: str = "gpt",
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    kv_heads: int | None = None,
    max_positions: int = 2048,
) -> ModelSpec:
    """A byte-level spec of a model family (qkvx.spec.FAMILIES) from a paper variant name (QKV,
    Q-K=V, Q-MQA, GQA-2, ...). kv_heads only sets what the name leaves open ("GQA" / "Q-GQA")."""
    fields = dict(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=BYTE_VOCAB, max_positions=max_positions
    )
    spec = ModelSpec.for_family(family, variant, **fields)
    if kv_heads is not None and kv_heads != spec.n_kv_head:
        # from_paper_name derives the kv head count from the name; only a bare GQA name is open.
        if canonical_variant(variant) not in ("GQA", "Q-GQA"):
            raise QkvxError(
                f"kv_heads={kv_heads} contradicts variant {variant!r} "
                f"({spec.n_kv_head} kv heads); use GQA-{kv_heads} / Q-GQA-{kv_heads}"
            )
        spec = ModelSpec.for_family(family, f"{variant}-{kv_heads}", **fields)
    return spec


@dataclass
class TrainResult:
    out: Path
    variant: str
    params: int
    steps: int
    initial_loss: float  # loss of the first batch, before any update (ln 256 = 5.55 is uniform)
    final_loss: float  # mean training loss over the last 10 % of steps
    heldout_ppl: float  # perplexity(model, heldout, seq_len)
    unigram_ppl: float  # unigram_perplexity(train, heldout): the baseline to beat
    seconds: float  # wall time of the whole call (training, evaluation, saving)
    tokens_per_s: float  # training tokens / training-loop seconds
    model: Transformer = field(repr=False)  # the trained model (eval mode), as written to `out`


def train(
    variant: str | ModelSpec = "Q-K=V",
    *,
    family: str = "gpt",
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    kv_heads: int | None = None,
    max_positions: int = 2048,
    steps: int = 500,
    batch_size: int = 32,
    seq_len: int = 128,
    lr: float = 5e-3,
    warmup: int = 50,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    seed: int = 0,
    threads: int = 1,
    out: str | os.PathLike = "qkvx_model",
    quiet: bool = False,
) -> TrainResult:
    """Train a byte-level model on the pydoc corpus and write it as a native qkvx folder at `out`.

    The defaults (4 x 128, 4 heads of 32, 500 steps of 32 x 128 bytes) take a few minutes (README).
    threads=1 by default: on a shared 2-core machine two OpenMP threads stall whenever one is
    preempted; on an idle machine 2 are faster. The same arguments (and torch build) give
    bitwise-identical weights; another thread count changes the low bits. max_positions (2048)
    exceeds the training length so exports can be checked at long contexts; learned positions >=
    seq_len stay untrained, so measure quality within seq_len."""
    spec = (
        variant
        if isinstance(variant, ModelSpec)
        else make_spec(variant, family, n_layer, n_embd, n_head, kv_heads, max_positions)
    )
    if not spec.byte_level or spec.max_positions < seq_len:
        raise QkvxError(
            f"training needs vocab_size {BYTE_VOCAB} and max_positions >= seq_len ({seq_len}); "
            f"got {spec.vocab_size} and {spec.max_positions}"
        )
    if min(steps, batch_size, seq_len, threads) < 1:
        raise QkvxError("steps, batch_size, seq_len and threads must be >= 1")
    t0 = time.perf_counter()
    train_tokens, heldout = split_corpus()
    with _pinned(threads, seed):
        model = Transformer(spec).init_weights(seed).train()
        losses, train_s = _fit(
            model, train_tokens, steps, batch_size, seq_len, lr, warmup, weight_decay, grad_clip, seed, quiet
        )
        model.eval()
        heldout_ppl = perplexity(model, heldout, seq_len)
    unigram_ppl = unigram_perplexity(train_tokens, heldout)
    tail = losses[-max(1, steps // 10) :]
    result = TrainResult(
        out=Path(out),
        variant=spec.paper_name,
        params=spec.param_count(),
        steps=steps,
        initial_loss=losses[0],
        final_loss=sum(tail) / len(tail),
        heldout_ppl=heldout_ppl,
        unigram_ppl=unigram_ppl,
        seconds=0.0,
        tokens_per_s=steps * batch_size * seq_len / train_s,
        model=model,
    )
    training = {
        "family": family if not isinstance(variant, ModelSpec) else "spec",
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "grad_clip": grad_clip,
        "threads": threads,
        "torch": torch.__version__,
        "final_loss": round(result.final_loss, 4),
        "heldout_ppl": round(heldout_ppl, 3),
        "unigram_ppl": round(unigram_ppl, 3),
        "heldout_eval": f"non-overlapping windows of {seq_len}",
        **corpus_info(),
    }
    save(model, out, extra={"training": training})
    result.seconds = time.perf_counter() - t0
    return result


@contextlib.contextmanager
def _pinned(threads: int, seed: int):
    """Determinism: weights come from init_weights(seed), batches from a Generator seeded by `seed`,
    and the CPU kernels used here are deterministic for a given thread count (verified bitwise; a
    different thread count changes the low bits). torch.use_deterministic_algorithms changes nothing
    on CPU and costs a 1.4 s import, so it is not used. Nothing draws from the global RNG; seeding it
    guards future edits. Thread count and RNG are restored: a library call leaves no global change."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(prev)


def _fit(
    model,
    data: torch.Tensor,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    grad_clip: float,
    seed: int,
    quiet: bool,
) -> tuple[list[float], float]:
    """AdamW, linear warmup then cosine decay to lr / 10, gradient clipping, random windows.
    Returns the per-step losses and the seconds spent."""
    # Decay matrices only (GPT-2 practice); biases and norm gains keep their scale.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)  # the only source of randomness in the batches
    offsets = torch.arange(seq_len + 1)
    losses: list[float] = []
    columns = [
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
    ]
    t0 = time.perf_counter()
    with Progress(*columns, disable=quiet) as progress:
        task = progress.add_task("train", total=steps, loss=float("nan"), tps=0.0)
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * _lr_factor(step, steps, warmup)
            starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
            batch = data[starts[:, None] + offsets]  # [B, seq_len + 1]
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            losses.append(loss.item())
            tps = (step + 1) * batch_size * seq_len / (time.perf_counter() - t0)
            progress.update(task, advance=1, loss=losses[-1], tps=tps)
    return losses, time.perf_counter() - t0


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 down to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def trained_model(
    out: Path, variant: str, seed: int = 0, report=lambda line: None, quiet: bool = True
) -> Path:
    """out/<slug>: reuse a finished model of the same variant and seed, else train one with the
    defaults (about 3 minutes on 2 idle cores). The demo and the quality benchmark share them."""
    import json

    folder = Path(out) / variant_slug(variant)
    meta_file = folder / "qkvx.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("variant") == variant and meta.get("training", {}).get("seed") == seed:
            report(f"reusing {folder} (delete it to retrain)")
            return folder
    r = train(variant, seed=seed, out=folder, quiet=quiet)
    report(
        f"{variant}: held-out perplexity {r.heldout_ppl:.2f} vs unigram {r.unigram_ppl:.2f} "
        f"({r.seconds:.0f} s)"
    )
    return folder
