"""The distillation loss: KL at temperature T (forward or reverse) scaled by T^2, plus hard-label
cross-entropy, weighted."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qkvx.distill.options import DistillOptions


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, opts: DistillOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
