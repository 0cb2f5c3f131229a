"""qkvx's native format: save -> load is exact, and the folder holds model.safetensors + qkvx.json."""

import json

import pytest
import torch

import qkvx
from qkvx.models.transformer import Transformer

GPT = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=100, max_positions=64)
LLAMA = dict(GPT, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_inner=64)


@pytest.mark.parametrize(
    "variant,fields",
    [
        ("QKV", GPT),
        ("Q-K=V", GPT),
        ("Q=K-V", dict(GPT, tie_embeddings=False)),
        ("Q-MQA", LLAMA),
        ("GQA-2", dict(LLAMA, tie_embeddings=False)),
    ],
)
def test_round_trip(tmp_path, variant, fields):
    spec = qkvx.ModelSpec.from_paper_name(variant, **fields)
    model = Transformer(spec).init_weights(seed=0).eval()
    out = qkvx.save(model, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "qkvx.json"]
    assert json.loads((out / "qkvx.json").read_text())["spec"] == spec.to_dict()

    loaded = qkvx.load(out)
    assert loaded.spec == spec and loaded.source["format"] == "native"
    torch.manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
