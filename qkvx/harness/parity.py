"""Parity: the same token stream through the eager reference (full recompute, no cache) and a
runtime (prefill, then single-token decode steps). DESIGN.md 6."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from qkvx.harness.runners import Runner
from qkvx.recipes import Gates


@dataclass
class Parity:
    runtime: str
    steps: int  # prefill counts as one step, then one per decoded token
    max_abs_dlogit: float
    max_abs_logit: float
    rel_dlogit: float  # max_abs_dlogit / max_abs_logit
    top1_agreement: float
    bound: float  # the gate on max_abs_dlogit
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def check_parity(model: torch.nn.Module, runner: Runner, tokens: torch.Tensor, prefill: int,
                 gates: Gates) -> Parity:
    """Feed tokens[:prefill] as one prefill, then tokens[prefill:] one at a time. Compare every
    position's logits with ONE full forward of the eager model over the whole stream (causal, so
    position t's logits are the full recompute at step t)."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    ref = model.eval()(tokens[None])[0].float()  # [N, vocab]
    runner.reset()
    got = [runner.prefill(tokens[:prefill])]
    got += [runner.decode(int(t))[None] for t in tokens[prefill:]]
    got = torch.cat(got, 0).float()
    dl = (got - ref).abs().max().item()
    ml = ref.abs().max().item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    bound = gates.bound(ml)
    return Parity(runtime=runner.name, steps=1 + len(tokens) - prefill, max_abs_dlogit=dl, max_abs_logit=ml,
                  rel_dlogit=dl / ml if ml else 0.0, top1_agreement=top1, bound=bound,
                  passed=dl <= bound and top1 >= gates.min_top1)
