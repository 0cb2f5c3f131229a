"""The trainer: it learns, it is reproducible bit for bit, what it writes loads back as the same
model, and its evaluation functions compute what they say."""

import json
import math

import pytest
import torch
from torch import nn

import qkvx
from qkvx import QkvxError
from qkvx.corpus import split_corpus
from qkvx.models.transformer import Transformer
from qkvx.train import make_spec, perplexity, train, unigram_perplexity

# Tiny on purpose (about a second per run): the tests check behaviour, not quality.
TINY = dict(
    n_layer=1,
    n_embd=32,
    n_head=4,
    max_positions=64,
    steps=40,
    batch_size=8,
    seq_len=32,
    lr=3e-3,
    warmup=5,
    threads=1,
    quiet=True,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "model"
    return train("Q-K=V", seed=0, out=out, **TINY)


def state(path):
    return qkvx.load(path).state_dict()


def head(n=4096):
    return split_corpus()[1][:n]  # enough held-out text for a comparison, at a fraction of the cost


def test_training_lowers_loss_and_heldout_perplexity(trained):
    untrained = Transformer(trained.model.spec).init_weights(0)
    init_ppl = perplexity(untrained, head(), TINY["seq_len"])
    assert init_ppl > 200  # about uniform (256) at init
    assert trained.initial_loss == pytest.approx(math.log(256), abs=0.1)
    assert trained.final_loss < trained.initial_loss - 1.0
    assert perplexity(trained.model, head(), TINY["seq_len"]) < init_ppl / 3
    assert trained.heldout_ppl < 256 / 3
    assert trained.unigram_ppl == pytest.approx(unigram_perplexity(*split_corpus()))
    assert trained.variant == "Q-K=V" and trained.steps == TINY["steps"] and trained.tokens_per_s > 0


def test_same_seed_same_weights_other_seed_other_weights(trained, tmp_path):
    again = train("Q-K=V", seed=0, out=tmp_path / "again", **TINY)
    other = train("Q-K=V", seed=1, out=tmp_path / "other", **TINY)
    a, b, c = state(trained.out), state(again.out), state(other.out)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert again.heldout_ppl == trained.heldout_ppl
    assert not torch.equal(a["blocks.0.attn.k_proj.weight"], c["blocks.0.attn.k_proj.weight"])


def test_written_folder_loads_as_the_trained_model(trained):
    loaded = qkvx.load(trained.out)
    assert loaded.spec == trained.model.spec and loaded.spec.sharing == "q-kv"
    x = head(2 * TINY["seq_len"]).view(2, -1)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained.model(x))
    assert perplexity(loaded, head(), 32) == perplexity(trained.model, head(), 32)
    meta = json.loads((trained.out / "qkvx.json").read_text())["training"]
    assert meta["steps"] == TINY["steps"] and meta["seed"] == 0 and meta["threads"] == 1
    assert meta["heldout_ppl"] == round(trained.heldout_ppl, 3) and "pydoc_data.topics" in meta["corpus"]
    assert meta["split"].endswith("(last 10 %)")


def test_unigram_perplexity_closed_form():
    train_bytes, heldout = torch.tensor(list(b"aab")), torch.tensor(list(b"abc"))
    # add-one: p(a) = 3/259, p(b) = 2/259, p(c) = 1/259 -> ppl = 259 / (3 * 2 * 1) ** (1/3)
    assert unigram_perplexity(train_bytes, heldout) == pytest.approx(259 / 6 ** (1 / 3), rel=1e-12)


class Bigram(nn.Module):
    """Logits depend on the current token only, so windowing cannot change the perplexity."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(256, 256)

    def forward(self, tokens):
        return self.table(tokens)


@pytest.mark.parametrize("seq_len,batch_size", [(7, 3), (32, 16), (99, 1)])
def test_perplexity_predicts_every_token_but_the_first_once(seq_len, batch_size):
    torch.manual_seed(0)
    model, tokens = Bigram(), torch.randint(0, 256, (100,))
    with torch.no_grad():
        logp = model.table.weight.log_softmax(-1)
    expected = math.exp(-logp[tokens[:-1], tokens[1:]].double().mean().item())
    assert perplexity(model, tokens, seq_len, batch_size) == pytest.approx(expected, rel=1e-6)


def test_make_spec_families_and_kv_heads():
    gpt, llama = make_spec("Q-K=V"), make_spec("Q-K=V", family="llama")
    assert (gpt.positions, gpt.norm, gpt.mlp, gpt.bias) == ("learned", "layernorm", "gelu", True)
    assert (llama.positions, llama.norm, llama.mlp, llama.bias) == ("rope", "rmsnorm", "swiglu", False)
    assert gpt.vocab_size == 256 and gpt.max_positions == 2048
    assert make_spec("GQA", kv_heads=2).paper_name == "GQA-2"
    assert make_spec("Q-MQA", kv_heads=1).n_kv_head == 1
    with pytest.raises(QkvxError, match="contradicts"):
        make_spec("Q-K=V", kv_heads=2)
    with pytest.raises(QkvxError, match="family"):
        make_spec("QKV", family="bert")


def test_llama_family_with_kv_heads_round_trips(tmp_path):
    r = train("Q-GQA", family="llama", kv_heads=2, out=tmp_path / "llama", **{**TINY, "steps": 5})
    assert (r.variant, r.model.spec.positions, r.model.spec.bias) == ("Q-GQA-2", "rope", False)
    x = head(TINY["seq_len"]).view(1, -1)
    with torch.no_grad():
        assert torch.equal(qkvx.load(r.out)(x), r.model(x))
