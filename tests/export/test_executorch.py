"""ExecuTorch export: parity vs full recompute, one cache buffer per K=V layer, the runner contract."""

import pytest
import torch

from qkvx import ModelSpec, cache_layout
from qkvx.export.executorch import export_pte, read_plan
from qkvx.harness.pte import PteRunner
from qkvx.models.transformer import Transformer

from tiny import DIMS, EXPORT_CASES, case_ids
from tiny import model as _model


def _export(tmp_path, model, max_seq_len=96, chunk=32):
    path = tmp_path / "model.pte"
    return path, export_pte(model, path, max_seq_len, chunk)


@pytest.mark.parametrize("family,name", EXPORT_CASES, ids=case_ids(EXPORT_CASES))
def test_pte_parity_prefill_then_decode(tmp_path, family, name, fp32_parity):
    model = _model(name, family)
    path, plan = _export(tmp_path, model)
    fp32_parity(model, PteRunner(path), f"{family} {name}")
    # one tensor per K=V layer, two otherwise, and bytes exactly as the spec's formula says
    layout = cache_layout(model.spec, "fp32")
    assert len(plan.cache_buffers) == DIMS["n_layer"] * (1 if model.spec.kv_shared else 2)
    assert plan.cache_bytes == layout.bytes_at(96)
    assert {"qkvx::attend", "qkvx::update_cache"} <= set(plan.operators)  # qkvx's kernels by default


def test_kv_shared_halves_planned_cache_paper_300m_shape(tmp_path):
    """paper-300m dims (width 1024, 16 heads, 2048 positions; 1 layer and a small vocab keep the
    test fast: the cache ratio does not depend on them)."""
    dims = dict(preset="paper-300m", n_layer=1, vocab_size=256)
    plans = {}
    for name in ("Q-K=V", "QKV"):
        model = Transformer(ModelSpec.from_paper_name(name, **dims)).eval()
        plans[name] = export_pte(model, tmp_path / f"{name}.pte", 2048, 8)
    kv, qkv = plans["Q-K=V"], plans["QKV"]
    assert (len(kv.cache_buffers), len(qkv.cache_buffers)) == (1, 2)
    assert kv.cache_buffers["caches.0.kv"] == [1, 16, 2048, 64]  # kv heads before tokens
    assert kv.cache_bytes / qkv.cache_bytes == 0.5
    assert qkv.cache_bytes == 2 * 2048 * 1024 * 4
    assert kv.planned_bytes < qkv.planned_bytes


def test_runner_constants_and_overflow(tmp_path):
    model = _model("Q-K=V", "gpt")
    path, _ = _export(tmp_path, model, max_seq_len=40, chunk=8)
    runner = PteRunner(path)
    assert (runner.max_seq_len, runner.prefill_chunk) == (40, 8)
    runner.prefill(list(range(39)))  # 5 chunks of <= 8
    runner.decode(1)
    from qkvx import QkvxError

    with pytest.raises(QkvxError, match="context overflow"):
        runner.decode(2)


def test_read_plan_rejects_garbage():
    from qkvx import QkvxError

    with pytest.raises(QkvxError, match="not a readable .pte"):
        read_plan(b"\x00" * 64)


@pytest.mark.parametrize(
    "family,name", [("gpt", "QKV"), ("gpt", "Q-K=V"), ("llama", "Q-K=V"), ("llama", "Q-MQA")]
)
def test_llama_op_pte_still_exports_and_agrees_with_qkvx_kernels(tmp_path, family, name, fp32_parity):
    """The llama-op form (ExecuTorch's LLM custom ops) passes the same fp32 gate, and the qkvx-kernel
    .pte agrees with it token by token within that bound: two independent attention kernels."""
    from qkvx.harness.parity import check_parity
    from qkvx.recipes import Gates

    model = _model(name, family)
    (tmp_path / "llama").mkdir()
    llama = tmp_path / "llama" / "model.pte"
    plan = export_pte(model, llama, 96, 32, kernels="llama")
    assert {"llama::custom_sdpa", "llama::update_cache"} <= set(plan.operators)
    assert (
        plan.cache_buffers["caches.0." + ("kv" if model.spec.kv_shared else "key")][1] == 96
    )  # tokens first
    fp32_parity(model, PteRunner(llama), f"{family} {name} llama ops")
    qkvx_path, _ = _export(tmp_path, model)

    class LlamaAsReference(torch.nn.Module):  # the llama-op .pte's logits as the "eager" side
        spec = model.spec

        def forward(self, tokens):
            runner = PteRunner(llama)
            return torch.cat([runner.prefill(tokens[0])])[None]

    tokens = torch.randint(0, DIMS["vocab_size"], (80,), generator=torch.Generator().manual_seed(3))
    p = check_parity(LlamaAsReference(), PteRunner(qkvx_path), tokens, 16, Gates())
    assert p.passed and p.top1_agreement == 1.0, p.describe()
