"""Parity: the same token stream through the eager reference (full recompute, no cache) and a
runtime (prefill, then single-token decode steps). DESIGN.md 6.

One function serves export-time validation, `qkvx validate` and `qkvx eval`: windows of a token
stream, each fed to the runtime as a prefill followed by teacher-forced decode steps, compared with
ONE full forward of the eager model over the same window (causal, so position t's logits are the
full recompute at step t). With text, perplexity of both and its relative change.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from qkvx.harness.runners import Runner
from qkvx.recipes import Gates


@dataclass
class Parity:
    runtime: str
    steps: int  # runtime calls: one prefill per window plus one per decoded token
    max_abs_dlogit: float
    max_abs_logit: float
    rel_dlogit: float  # max_abs_dlogit / max_abs_logit
    top1_agreement: float  # runtime argmax == reference argmax, over every position
    bound: float | None  # the gate on max_abs_dlogit (None: no logit gate, e.g. quantized)
    ppl: float | None  # runtime perplexity of the stream (None unless it is text)
    ppl_ref: float | None  # eager perplexity of the same positions
    ppl_change: float | None  # ppl / ppl_ref - 1
    passed: bool
    failed: list[str]  # names of the gates that failed: "dlogit", "top1", "ppl"

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def check_parity(model: torch.nn.Module, runner: Runner, tokens: torch.Tensor, prefill: int, gates: Gates,
                 windows: int = 1, text: bool = False) -> Parity:
    """Split `tokens` into `windows` equal windows; in each, prefill `prefill` tokens then decode the
    rest one at a time. Perplexity (with text=True) scores every next-token prediction."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    n = len(tokens) // windows
    if n <= prefill:
        raise ValueError(f"window of {n} tokens leaves nothing to decode after prefill {prefill}")
    dl = ml = 0.0
    agree = total = steps = 0
    nll = nll_ref = 0.0
    for w in range(windows):
        window = tokens[w * n:(w + 1) * n]
        ref = model.eval()(window[None])[0].float()  # [n, vocab]
        runner.reset()
        got = [runner.prefill(window[:prefill])]
        got += [runner.decode(int(t))[None] for t in window[prefill:]]
        got = torch.cat(got, 0).float()
        steps += 1 + n - prefill
        dl, ml = max(dl, (got - ref).abs().max().item()), max(ml, ref.abs().max().item())
        agree += (got.argmax(-1) == ref.argmax(-1)).sum().item()
        total += n
        nll += F.cross_entropy(got[:-1], window[1:], reduction="sum").item()
        nll_ref += F.cross_entropy(ref[:-1], window[1:], reduction="sum").item()
    top1 = agree / total
    ppl = math.exp(nll / (windows * (n - 1))) if text else None
    ppl_ref = math.exp(nll_ref / (windows * (n - 1))) if text else None
    change = ppl / ppl_ref - 1 if text else None
    bound = gates.bound(ml) if gates.max_rel_dlogit is not None else None
    failed = []
    if bound is not None and dl > bound:
        failed.append("dlogit")
    if top1 < gates.min_top1:
        failed.append("top1")
    if gates.max_ppl_change is not None and change is not None and change > gates.max_ppl_change:
        failed.append("ppl")
    return Parity(runtime=runner.name, steps=steps, max_abs_dlogit=dl, max_abs_logit=ml,
                  rel_dlogit=dl / ml if ml else 0.0, top1_agreement=top1, bound=bound, ppl=ppl,
                  ppl_ref=ppl_ref, ppl_change=change, passed=not failed, failed=failed)
