"""`qkvx convert`: the converted weights against expectations computed here from the source files
themselves (the release's fused c_attn rows, Hugging Face's own parameters), head pooling by
explicit loops, the RoPE semantics of a K=V student against transformers' rotary code, the
data-aware init against avg on held-out text, and exports with one cache tensor per layer."""

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import qkvx
from qkvx.api import export, inspect
from qkvx.bench.release import write_checkpoint
from qkvx.convert import convert
from qkvx.corpus import split_corpus
from qkvx.tokenizer import byte_tokenizer_json
from qkvx.train import perplexity

transformers = pytest.importorskip("transformers")

DIMS = dict(n_layer=2, n_embd=32, n_head=4, n_inner=64, vocab_size=96, n_positions=64)
C, D = 32, 8
INITS = ["avg", "keep-k", "keep-v"]


def shared(k, v, init):
    return {"avg": (k + v) / 2, "keep-k": k, "keep-v": v}[init]


def pooled(t, heads, groups):
    """Mean of consecutive kv heads, by an explicit loop: rows of head h are t[h*D:(h+1)*D]."""
    per = heads // groups
    return torch.cat(
        [sum(t[h * D : (h + 1) * D] for h in range(g * per, (g + 1) * per)) / per for g in range(groups)]
    )


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    d = tmp_path_factory.mktemp("paper")
    return {
        v: write_checkpoint(d / f"{v}.pt", v, kind="final", drift=0.05, **DIMS)
        for v in ("QKV", "GQA-2", "MQA", "Q=K-V", "Q-K=V")
    }


def release_state(path):
    sd = torch.load(path, weights_only=True)["model_state_dict"]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def converted(out):
    return load_file(out / "model.safetensors"), json.loads((out / "qkvx.json").read_text())


@pytest.mark.parametrize("init", INITS)
def test_paper_qkv_each_init(paper, tmp_path, init):
    r = convert(paper["QKV"], "Q-K=V", init, tmp_path / "kv")
    st, meta = converted(tmp_path / "kv")
    sd = release_state(paper["QKV"])
    for i in range(DIMS["n_layer"]):
        w, b = sd[f"h.{i}.attn.c_attn.weight"], sd[f"h.{i}.attn.c_attn.bias"]  # [3C, C]: q | k | v rows
        a = f"blocks.{i}.attn."
        assert torch.allclose(
            st[a + "k_proj.weight"], shared(w[C : 2 * C], w[2 * C :], init), atol=1e-7, rtol=0
        )
        assert torch.allclose(
            st[a + "k_proj.bias"], shared(b[C : 2 * C], b[2 * C :], init), atol=1e-7, rtol=0
        )
        assert torch.equal(st[a + "q_proj.weight"], w[:C]) and torch.equal(st[a + "q_proj.bias"], b[:C])
        assert torch.equal(st[a + "o_proj.weight"], sd[f"h.{i}.attn.c_proj.weight"])
        assert torch.equal(st[f"blocks.{i}.mlp.fc.weight"], sd[f"h.{i}.mlp.c_fc.weight"])
        assert torch.equal(st[f"blocks.{i}.norm2.bias"], sd[f"h.{i}.ln_2.bias"])
        assert a + "v_proj.weight" not in st
    assert torch.equal(st["tok_emb.weight"], sd["wte.weight"]) and torch.equal(
        st["pos_emb.weight"], sd["wpe.weight"]
    )
    conv = meta["conversion"]
    assert conv["init"] == init and conv["target"] == "Q-K=V" and conv["source"]["variant"] == "QKV"
    assert conv["source"]["sha256"] == hashlib.sha256(paper["QKV"].read_bytes()).hexdigest()
    assert conv["source"]["format"] == "paper" and "release" in conv["source"]["meta"]
    info = inspect(tmp_path / "kv")
    assert (info["variant"], info["kv_tensors_per_layer"], info["format"]) == ("Q-K=V", 1, "native")
    assert "training" not in info["meta"]  # the source's training record stays under conversion.source
    assert r.variant == "Q-K=V" and r.model.blocks[0].attn.v_proj is None


@pytest.mark.parametrize(
    "source,to,groups",
    [
        ("GQA-2", "Q-MQA", 1),
        ("GQA-2", "Q-GQA-2", 2),
        ("MQA", "Q-MQA", 1),
        ("QKV", "Q-GQA-2", 2),
        ("QKV", "Q-MQA", 1),
    ],
)
def test_paper_grouped_targets_mean_pool_kv_heads(paper, tmp_path, source, to, groups):
    convert(paper[source], to, "avg", tmp_path / "out")
    st, meta = converted(tmp_path / "out")
    sd = release_state(paper[source])
    g_src = {"GQA-2": 2, "MQA": 1, "QKV": 4}[source]
    for i in range(DIMS["n_layer"]):
        for kind in ("weight", "bias"):
            if source == "QKV":
                t = sd[f"h.{i}.attn.c_attn.{kind}"]
                k, v = t[C : 2 * C], t[2 * C :]
            else:  # c_kv [2 g D, C]: k rows then v rows
                t = sd[f"h.{i}.attn.c_kv.{kind}"]
                k, v = t[: g_src * D], t[g_src * D :]
            want = (pooled(k, g_src, groups) + pooled(v, g_src, groups)) / 2
            got = st[f"blocks.{i}.attn.k_proj.{kind}"]
            assert got.shape[0] == groups * D and torch.allclose(got, want, atol=1e-7, rtol=0)
    assert meta["variant"] == to and qkvx.load(tmp_path / "out").spec.n_kv_head == groups


def test_paper_q_eq_k_minus_v_source_keeps_its_queries(paper, tmp_path):
    """Q=K-V (queries are the keys) -> Q-K=V: the query projection is the source's shared q = k."""
    convert(paper["Q=K-V"], "Q-K=V", "keep-v", tmp_path / "out")
    st, _ = converted(tmp_path / "out")
    w = release_state(paper["Q=K-V"])["h.0.attn.c_kv.weight"]  # [2C, C]: (q = k) | v
    assert torch.equal(st["blocks.0.attn.q_proj.weight"], w[:C]) and torch.equal(
        st["blocks.0.attn.k_proj.weight"], w[C:]
    )


def randomize(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                (1.0 if "norm" in name or "ln" in name else 0.0) + 0.1 * torch.randn_like(p)
                if p.dim() == 1
                else 0.2 * torch.randn_like(p)
            )
    return model.eval()


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(n_embd=C, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    model = randomize(transformers.GPT2LMHeadModel(cfg))
    model.save_pretrained(d)
    (d / "tokenizer.json").write_text(byte_tokenizer_json(), encoding="utf-8")
    return d, model


@pytest.mark.parametrize("init", INITS)
def test_hf_gpt2_each_init_and_tokenizer_copied(hf_gpt2, tmp_path, init):
    src, hf = hf_gpt2
    convert(src, "Q-K=V", init, tmp_path / "out")
    st, meta = converted(tmp_path / "out")
    for i, block in enumerate(hf.transformer.h):
        w, b = block.attn.c_attn.weight.detach(), block.attn.c_attn.bias.detach()  # Conv1D: [in, out]
        assert torch.allclose(
            st[f"blocks.{i}.attn.k_proj.weight"], shared(w[:, C : 2 * C].T, w[:, 2 * C :].T, init), atol=1e-7
        )
        assert torch.allclose(
            st[f"blocks.{i}.attn.k_proj.bias"], shared(b[C : 2 * C], b[2 * C :], init), atol=1e-7
        )
        assert torch.equal(st[f"blocks.{i}.attn.q_proj.weight"], w[:, :C].T.contiguous())
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert meta["conversion"]["source"]["format"] == "hf"


def _llama(kv_heads, tmp_path, seed=0):
    cfg = transformers.LlamaConfig(
        hidden_size=C,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=48,
        vocab_size=128,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = randomize(transformers.LlamaForCausalLM(cfg), seed)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("kv_heads,to,groups", [(4, "Q-K=V", 4), (2, "Q-MQA", 1), (2, "Q-GQA-2", 2)])
def test_hf_llama_each_init(tmp_path, init, kv_heads, to, groups):
    hf = _llama(kv_heads, tmp_path / "src")
    convert(tmp_path / "src", to, init, tmp_path / "out")
    st, _ = converted(tmp_path / "out")
    for i, layer in enumerate(hf.model.layers):
        k, v = layer.self_attn.k_proj.weight.detach(), layer.self_attn.v_proj.weight.detach()
        want = shared(pooled(k, kv_heads, groups), pooled(v, kv_heads, groups), init)
        assert torch.allclose(st[f"blocks.{i}.attn.k_proj.weight"], want, atol=1e-7)
        assert torch.equal(st[f"blocks.{i}.attn.q_proj.weight"], layer.self_attn.q_proj.weight.detach())
        assert f"blocks.{i}.attn.k_proj.bias" not in st  # Llama has no attention biases
    assert qkvx.load(tmp_path / "out").spec.positions == "rope"


def test_llama_k_eq_v_student_rotates_keys_not_values(tmp_path):
    """keep-k student of a Llama: its attention must be softmax(rope(q) rope(s)^T / sqrt(D)) s O^T with
    s the UN-rotated shared tensor, computed here with transformers' own rotary code."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf = _llama(4, tmp_path / "src", seed=3)
    convert(tmp_path / "src", "Q-K=V", "keep-k", tmp_path / "out")
    student = qkvx.load(tmp_path / "out")
    torch.manual_seed(0)
    T = 12
    x = torch.randn(1, T, C)
    attn = hf.model.layers[0].self_attn
    pos = torch.arange(T)[None]
    cos, sin = LlamaRotaryEmbedding(hf.config)(x, pos)
    with torch.no_grad():
        q = attn.q_proj(x).view(1, T, 4, D).transpose(1, 2)
        s = attn.k_proj(x).view(1, T, 4, D).transpose(1, 2)  # keep-k: the shared tensor is x W_K
        q_rot, s_rot = apply_rotary_pos_emb(q, s, cos, sin)
        scores = q_rot @ s_rot.transpose(-1, -2) / math.sqrt(D)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        want = attn.o_proj((scores.softmax(-1) @ s).transpose(1, 2).reshape(1, T, C))  # values un-rotated
        got = student.blocks[0].attn(x, torch.arange(T), student.rope)
        rotated_values = attn.o_proj((scores.softmax(-1) @ s_rot).transpose(1, 2).reshape(1, T, C))
    assert (got - want).abs().max().item() < 1e-5
    assert (got - rotated_values).abs().max().item() > 1e-3  # the check can tell the two apart


# ---- the data-aware init ------------------------------------------------------------------------
def attention_io(model, tokens):
    """Per layer: (input to the attention block, its output), by forward hooks."""
    seen = []
    hooks = [
        b.attn.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
        for b in model.blocks
    ]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return seen


def block_error(student, teacher, tokens):
    """J per layer: ||student attention(teacher's layer input) - teacher's attention output||^2 / ||.||^2."""
    out = []
    positions = torch.arange(tokens.shape[1])
    for (h, y), block in zip(attention_io(teacher, tokens), student.blocks, strict=True):
        with torch.no_grad():
            out.append(((block.attn(h, positions, student.rope) - y).pow(2).sum() / y.pow(2).sum()).item())
    return out


@pytest.fixture(scope="module")
def fitted(teachers, fit_options, tmp_path_factory):
    """{family: {init: folder}}: avg and fit students of each trained teacher."""
    root = tmp_path_factory.mktemp("students")
    out = {}
    for family, teacher in teachers.items():
        out[family] = {
            init: convert(teacher, "Q-K=V", init, root / f"{family}-{init}", fit_options=fit_options).out
            for init in ("avg", "fit")
        }
    return out


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_fit_init_beats_avg_on_heldout_text(fitted, teachers, fit_options, family):
    teacher = qkvx.load(teachers[family])
    avg, fit = (qkvx.load(fitted[family][i]) for i in ("avg", "fit"))
    heldout = split_corpus()[1][: 8 * 64]  # text the calibration never saw
    windows = heldout.view(8, 64)
    j_avg, j_fit = block_error(avg, teacher, windows), block_error(fit, teacher, windows)
    print(family, "J avg", [f"{j:.3f}" for j in j_avg], "J fit", [f"{j:.3f}" for j in j_fit])
    assert all(f < 0.1 * a for f, a in zip(j_fit, j_avg, strict=True)), (j_avg, j_fit)
    text = split_corpus()[1][:4096]
    ppl = {name: perplexity(m, text, 64) for name, m in (("teacher", teacher), ("avg", avg), ("fit", fit))}
    print(family, ppl)
    assert ppl["fit"] < ppl["avg"] and ppl["fit"] < 1.1 * ppl["teacher"] < ppl["avg"]
    cal = json.loads((fitted[family]["fit"] / "qkvx.json").read_text())["conversion"]["calibration"]
    assert cal["options"]["batches"] == fit_options["batches"] and len(cal["layers"]) == 2
    assert all(row["heldout_J_fit"] < row["heldout_J_avg"] for row in cal["layers"])
    assert fit.blocks[0].attn.v_proj is None and fit.spec.paper_name == "Q-K=V"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["pte-fp32", "onnx-fp32"])
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_converted_models_export_with_one_cache_tensor_per_layer(fitted, family, recipe, tmp_path):
    manifest = export(fitted[family]["fit"], recipe, tmp_path / "export", max_seq_len=64)  # validates parity
    assert manifest.variant == "Q-K=V" and all(p["passed"] for p in manifest.parity.values())
    cache = manifest.cache
    assert cache.tensors_per_layer == 1 and list(cache.names) == ["kv"]
    stored = cache.program_cache_buffers if recipe.startswith("pte") else cache.graph_cache_inputs
    assert len(stored) == 2, stored  # one per layer, in the artifact itself
    assert (tmp_path / "export" / "tokenizer.json").is_file()
