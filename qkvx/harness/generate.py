"""Token generation through any runner: greedy or temperature / top-k sampling, with timings."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from qkvx.harness.runners import Runner


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]
    prefill_s: float
    decode_s: float  # all single-token steps

    @property
    def tokens_per_s(self) -> float:
        steps = max(len(self.new_ids) - 1, 0)  # the first new token comes from prefill
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


def generate(
    runner: Runner,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    eos_ids: tuple[int, ...] = (),
) -> Generation:
    """Prefill the prompt, then decode one token at a time until max_new_tokens, an EOS id, or the
    runner's max_seq_len (never past it)."""
    gen = torch.Generator().manual_seed(seed)
    runner.reset()
    t0 = time.perf_counter()
    logits = runner.prefill(prompt_ids)[-1]
    prefill_s = time.perf_counter() - t0
    new: list[int] = []
    t1 = time.perf_counter()
    while len(new) < max_new_tokens:
        token = sample(logits, temperature, top_k, gen)
        new.append(token)
        if token in eos_ids or len(new) == max_new_tokens or runner.pos >= runner.max_seq_len:
            break
        logits = runner.decode(token)
    return Generation(list(prompt_ids), new, prefill_s, time.perf_counter() - t1)
