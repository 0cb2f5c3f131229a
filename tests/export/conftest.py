"""What the exporter tests share: the fp32 parity check of one runtime against full recompute."""

import pytest
import torch

from qkvx.harness.parity import check_parity
from qkvx.recipes import Gates

PREFILL, STEPS = 16, 64


@pytest.fixture
def fp32_parity():
    """prefill 16 + 64 single-token decode steps vs the eager full recompute: DESIGN.md 6's fp32 bound
    and 100 % top-1. Returns the Parity result."""

    def check(model, runner, label):
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, model.spec.vocab_size, (PREFILL + STEPS,), generator=g)
        p = check_parity(model, runner, tokens, PREFILL, Gates())
        print(f"{label}: max|dlogit| {p.max_abs_dlogit:.2e} max|logit| {p.max_abs_logit:.2f}")
        assert p.max_abs_dlogit <= 1e-4 * p.max_abs_logit + 1e-5
        assert p.top1_agreement == 1.0 and p.steps == 1 + STEPS
        return p

    return check
