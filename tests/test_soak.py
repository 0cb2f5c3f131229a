"""The decode soak (qkvx.soak), short: 300 steps of the RoPE K=V model through the .pte must stay
within the fp32 parity bound, and the same comparison must fail a runtime that drifts or whose cache
loses a position."""

import pytest
import torch

from qkvx.recipes import load_recipe
from qkvx.soak import compare, decode_stream, one_thread_runner, run_soak, soak_model
from qkvx.util import variant_slug

STEPS, PROMPT, WINDOW = 300, 16, 100
VARIANT = "llama-Q-K=V"  # RoPE with k = v: keys are rotated on every cache read


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    out = tmp_path_factory.mktemp("soak")
    return out, run_soak(
        out,
        STEPS,
        variants=(VARIANT,),
        runtimes=("pte",),
        progress=lambda _: None,
        prompt=PROMPT,
        window=WINDOW,
    )


def test_short_soak_within_fp32_bound(soak):
    out, result = soak
    (run,) = result["runs"]
    assert [(w["start"], w["end"]) for w in run["windows"]] == [(0, 16), (16, 116), (116, 216), (216, 316)]
    gates = load_recipe("pte-fp32").gates
    for w in run["windows"]:
        assert w["max_abs_dlogit"] <= gates.bound(w["max_abs_logit"]), w
        assert w["top1_decisive"] == 1.0 and w["flips"] <= w["near_ties"], w
    assert run["passed"] and result["passed"]
    assert run["max_abs_dlogit"] > 0  # a real runtime, not the reference compared with itself
    assert "| pte | llama-Q-K=V |" in (out / "soak.md").read_text()


@torch.no_grad()
def test_comparison_fails_injected_drift():
    """Logits that drift slowly with position: inside the bound at first, beyond it by the end."""
    model = soak_model(VARIANT, PROMPT + STEPS)
    ref = model(torch.randint(0, 256, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(1)))[0]
    gates = load_recipe("pte-fp32").gates
    clean = compare(ref.clone(), ref, gates, PROMPT, WINDOW)
    assert clean["passed"]
    bound = min(w["bound"] for w in clean["windows"])
    ramp = torch.linspace(0, 2.5 * bound, PROMPT + STEPS)[:, None]  # [N, 1]: grows with position
    result = compare(ref + ramp, ref, gates, PROMPT, WINDOW)
    assert [w["passed"] for w in result["windows"]] == [True, True, False, False]
    assert not result["passed"] and result["last_worse"] and result["last_over_first"] > 2


@torch.no_grad()
def test_top1_flip_fails_unless_at_a_near_tie():
    """Swapping the reference's top two logits at one position: tolerated at a near tie (an error
    within the bound can do that), a failure where the margin is wide. The near tie is made: the
    closest margin a model happens to have may still be wide."""
    ref = soak_model(VARIANT, PROMPT + STEPS)(torch.arange(PROMPT + STEPS)[None] % 256)[0]
    gates = load_recipe("pte-fp32").gates
    top2 = ref.topk(2, -1)
    tie = int((top2.values[:, 0] - top2.values[:, 1]).argmin())
    ref[tie, top2.indices[tie, 1]] = top2.values[tie, 0] - gates.bound(float(ref[tie].abs().max())) / 2
    top2 = ref.topk(2, -1)
    margin = top2.values[:, 0] - top2.values[:, 1]
    for pos, tolerated in ((tie, True), (int(margin.argmax()), False)):
        got = ref.clone()
        got[pos, top2.indices[pos]] = got[pos, top2.indices[pos].flip(0)]
        result = compare(got, ref, gates, PROMPT, WINDOW)
        assert result["flips"] == 1 and result["passed"] == tolerated, (pos, margin[pos], result)


class _HoleInCache:
    """A broken runtime: at position `at` it skips one cache slot, so every later token sits one
    position late and attends to an empty slot (what an off-by-one cache write would do)."""

    def __init__(self, runner, at: int):
        self.runner, self.at = runner, at

    def reset(self):
        self.runner.reset()

    def prefill(self, tokens):
        return self.runner.prefill(tokens)

    def decode(self, token):
        if self.runner.pos == self.at:
            self.runner.pos += 1
        return self.runner.decode(token)


@torch.no_grad()
def test_comparison_fails_a_cache_that_loses_a_position(soak):
    out, _ = soak
    runner = one_thread_runner("pte", out / "models" / variant_slug(VARIANT) / "pte" / "model.pte")
    tokens = torch.randint(
        0, 256, (PROMPT + STEPS - 1,), generator=torch.Generator().manual_seed(2)
    )  # room for the hole
    run = decode_stream(_HoleInCache(runner, at=200), tokens, PROMPT)
    ref = soak_model(VARIANT, PROMPT + STEPS)(tokens[None])[0]
    result = compare(run["logits"], ref, load_recipe("pte-fp32").gates, PROMPT, WINDOW)
    assert [w["passed"] for w in result["windows"]] == [True, True, False, False]  # broken from 200 on
    assert not result["passed"]
