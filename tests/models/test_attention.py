"""The one attention: shared projections alias exactly the tensors the paper says they do."""

import pytest
import torch

from qkvx import ModelSpec
from qkvx.models.transformer import Transformer

DIMS = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=97, max_positions=64)


def _as_qkv(model: Transformer) -> Transformer:
    """The same function written as an unshared QKV/GQA model: copy the shared projection into the
    projections a standard model has. Independent of how the shared model aliases tensors."""
    spec = model.spec
    twin = Transformer(spec.replace(sharing="qkv")).eval()
    state = dict(model.state_dict())
    for i, block in enumerate(model.blocks):
        a = f"blocks.{i}.attn."
        k = {n: p for n, p in block.attn.k_proj.named_parameters()}
        if block.attn.q_proj is None:  # q = k
            state.update({a + "q_proj." + n: p for n, p in k.items()})
        if block.attn.v_proj is None:  # v = k
            state.update({a + "v_proj." + n: p for n, p in k.items()})
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("name", ["Q=K-V", "Q-K=V", "Q=K=V", "Q-GQA-2", "Q-MQA"])
def test_shared_variant_equals_unshared_twin(name, family):
    torch.manual_seed(0)
    model = (
        Transformer(ModelSpec.for_family(family, name, **DIMS, n_inner=4 * DIMS["n_embd"]))
        .init_weights(1)
        .eval()
    )
    tokens = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        diff = (model(tokens) - _as_qkv(model)(tokens)).abs().max().item()
    assert diff <= 1e-5


def test_kv_shared_layer_has_one_kv_projection():
    m = Transformer(ModelSpec.from_paper_name("Q-MQA", **DIMS))
    attn = m.blocks[0].attn
    assert attn.v_proj is None and attn.q_proj is not None
    assert tuple(attn.k_proj.weight.shape) == (16, 64)  # [D, C]: one kv head


def test_causal_prefix_invariance():
    """Logits at position t depend only on tokens <= t (causal mask)."""
    m = Transformer(ModelSpec.from_paper_name("Q-K=V", **DIMS)).init_weights(2).eval()
    t = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        full, prefix = m(t), m(t[:, :12])
    assert (full[:, :12] - prefix).abs().max().item() <= 1e-5
