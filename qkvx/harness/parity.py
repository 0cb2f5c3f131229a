"""Parity: the same token stream through the eager reference (full recompute, no cache) and a
runtime (prefill, then single-token decode steps).

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
class LogitStats:
    """Runtime logits vs reference logits at the same positions."""

    positions: int
    max_abs_dlogit: float
    max_abs_logit: float  # of the reference
    tie_margin: float  # top-2 margins at or below this are near ties
    near_ties: int  # positions excluded from top-1
    top1: float  # agreement over the decisive (non-tie) positions; 1.0 when there are none
    top1_all: float  # agreement over every position
    flips: int  # positions whose argmax differs, ties included
    kl_mean: float  # KL(reference || runtime) per position, nats
    kl_p99: float
    gap_noise_p50: float  # median |change of the reference's top-2 gap|: what sets a near-tie margin


def runtime_agreement(logits: dict[str, torch.Tensor]) -> dict[str, dict[str, float | int]]:
    """Every later runtime against every earlier one, on the same positions: "b vs a" -> max
    |dlogit| and the share of positions with the same argmax (e.g. emulated arm64 vs the host)."""
    names, out = list(logits), {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            x, y = logits[a].double(), logits[b].double()
            out[f"{b} vs {a}"] = {
                "max_abs_dlogit": (x - y).abs().max().item(),
                "same_top1": (x.argmax(-1) == y.argmax(-1)).double().mean().item(),
                "positions": len(x),
            }
    return out


def logit_stats(got: torch.Tensor, ref: torch.Tensor, gates: Gates) -> LogitStats:
    """got / ref [N, vocab]. The one comparison behind validate, eval, export and the soak."""
    got, ref = got.double(), ref.double()
    ml = ref.abs().max().item()
    margin = gates.tie_margin(ml)
    top2 = ref.topk(2, dim=-1)
    gap = top2.values[:, 0] - top2.values[:, 1]
    decisive = gap > margin
    got_gap = got.gather(1, top2.indices[:, :1]) - got.gather(1, top2.indices[:, 1:])
    gap_noise = (got_gap[:, 0] - gap).abs()
    agree = got.argmax(-1) == ref.argmax(-1)
    logp_ref, logp_got = F.log_softmax(ref, -1), F.log_softmax(got, -1)
    kl = (logp_ref.exp() * (logp_ref - logp_got)).sum(-1).clamp(min=0.0)  # [N]
    return LogitStats(
        positions=len(ref),
        max_abs_dlogit=(got - ref).abs().max().item(),
        max_abs_logit=ml,
        tie_margin=margin,
        near_ties=int((~decisive).sum()),
        top1=agree[decisive].double().mean().item() if decisive.any() else 1.0,
        top1_all=agree.double().mean().item(),
        flips=int((~agree).sum()),
        kl_mean=kl.mean().item(),
        kl_p99=torch.quantile(kl, 0.99).item(),
        gap_noise_p50=torch.quantile(gap_noise, 0.5).item(),
    )


@dataclass
class Parity:
    runtime: str
    steps: int  # runtime calls: one prefill per window plus one per decoded token
    positions: int
    max_abs_dlogit: float
    max_abs_logit: float
    rel_dlogit: float  # max_abs_dlogit / max_abs_logit
    top1_agreement: float  # runtime argmax == reference argmax, over the decisive positions
    top1_all: float  # the same over every position, near ties included
    near_ties: int  # positions whose reference top-2 margin is within tie_margin: not gated
    tie_margin: float
    kl_mean: float  # KL(reference || runtime) per position, nats
    kl_p99: float
    gap_noise_p50: float  # median |change of the reference's top-2 gap|, nats
    bound: float | None  # the gate on max_abs_dlogit (None: no logit gate, e.g. quantized)
    ppl: float | None  # runtime perplexity of the stream (None unless it is text)
    ppl_ref: float | None  # eager perplexity of the same positions
    ppl_change: float | None  # ppl / ppl_ref - 1
    passed: bool
    failed: list[str]  # names of the gates that failed: dlogit, top1, ppl, kl, kl_p99

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Parity":
        return cls(**d)

    def checks(self) -> dict[str, str]:
        """Each check (the gate names of `failed`; kl covers kl_p99) with its measured values."""
        out = {
            "dlogit": f"max |dlogit| {self.max_abs_dlogit:.3g}"
            + (f" (bound {self.bound:.3g})" if self.bound is not None else " (no gate)"),
            "top1": f"top-1 {self.top1_agreement:.4f} ({self.near_ties} of {self.positions} near "
            "ties excluded)",
            "kl": f"KL(reference || runtime) mean {self.kl_mean:.3g}, p99 {self.kl_p99:.3g}",
        }
        if self.ppl is not None:
            out["ppl"] = (
                f"perplexity {self.ppl:.4f} vs {self.ppl_ref:.4f} eager ({100 * self.ppl_change:+.2f} %)"
            )
        return out

    def describe(self) -> str:
        """One line with every measured value and, if any, the failed gates."""
        verdict = "passed" if self.passed else f"gate(s) {', '.join(self.failed)} failed"
        return f"{self.runtime}: {verdict}: {'; '.join(self.checks().values())}"


@torch.no_grad()
def check_parity(
    model: torch.nn.Module,
    runner: Runner,
    tokens: torch.Tensor,
    prefill: int,
    gates: Gates,
    windows: int = 1,
    text: bool = False,
    record: dict | None = None,
) -> Parity:
    """Split `tokens` into `windows` equal windows; in each, prefill `prefill` tokens then decode the
    rest one at a time. Perplexity (with text=True) scores every next-token prediction. record: a
    dict that receives the runtime's logits [positions, vocab] under "logits" (to compare runtimes
    with each other)."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    n = len(tokens) // windows
    if n <= prefill:
        raise ValueError(f"window of {n} tokens leaves nothing to decode after prefill {prefill}")
    gots, refs = [], []
    nll = nll_ref = 0.0
    for w in range(windows):
        window = tokens[w * n : (w + 1) * n]
        ref = model.eval()(window[None])[0].float()  # [n, vocab]
        runner.reset()
        got = [runner.prefill(window[:prefill])]
        got += [runner.decode(int(t))[None] for t in window[prefill:]]
        got = torch.cat(got, 0).float()
        gots.append(got)
        refs.append(ref)
        nll += F.cross_entropy(got[:-1], window[1:], reduction="sum").item()
        nll_ref += F.cross_entropy(ref[:-1], window[1:], reduction="sum").item()
    s = logit_stats(torch.cat(gots), torch.cat(refs), gates)
    if record is not None:
        record["logits"] = torch.cat(gots)
    ppl = math.exp(nll / (windows * (n - 1))) if text else None
    ppl_ref = math.exp(nll_ref / (windows * (n - 1))) if text else None
    change = ppl / ppl_ref - 1 if text else None
    bound = gates.bound(s.max_abs_logit) if gates.max_rel_dlogit is not None else None
    checks = {
        "dlogit": bound is not None and s.max_abs_dlogit > bound,
        "top1": s.top1 < gates.min_top1,
        "ppl": gates.max_ppl_change is not None and change is not None and change > gates.max_ppl_change,
        "kl": gates.max_kl is not None and s.kl_mean > gates.max_kl,
        "kl_p99": gates.max_kl_p99 is not None and s.kl_p99 > gates.max_kl_p99,
    }
    failed = [name for name, bad in checks.items() if bad]
    return Parity(
        runtime=runner.name,
        steps=windows * (1 + n - prefill),
        positions=s.positions,
        max_abs_dlogit=s.max_abs_dlogit,
        max_abs_logit=s.max_abs_logit,
        rel_dlogit=s.max_abs_dlogit / s.max_abs_logit if s.max_abs_logit else 0.0,
        top1_agreement=s.top1,
        top1_all=s.top1_all,
        near_ties=s.near_ties,
        tie_margin=s.tie_margin,
        kl_mean=s.kl_mean,
        kl_p99=s.kl_p99,
        gap_noise_p50=s.gap_noise_p50,
        bound=bound,
        ppl=ppl,
        ppl_ref=ppl_ref,
        ppl_change=change,
        passed=not failed,
        failed=failed,
    )
