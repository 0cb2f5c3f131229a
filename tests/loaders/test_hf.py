"""Hugging Face folders: tiny GPT2LMHeadModel / LlamaForCausalLM with random weights, saved with
save_pretrained and loaded by qkvx; logits must match transformers' own (eager) forward, and K=V
copies must be detected as Q-K=V / Q-GQA-g / Q-MQA. No network: nothing is fetched from the hub."""

import json

import pytest
import torch

import qkvx

transformers = pytest.importorskip("transformers")

V, C, LAYERS, HEADS = 100, 32, 2, 4


def randomize(model, seed=0):
    """Every parameter random (biases and norm weights too, so a mis-mapped one shows)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "bias" not in name else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.5 if ("wte" in name or "wpe" in name or "embed" in name) else 0.2)
    return model.eval()


def gpt2(kv_equal=False, **cfg):
    config = transformers.GPT2Config(
        n_embd=C,
        n_layer=LAYERS,
        n_head=HEADS,
        vocab_size=V,
        n_positions=64,
        attn_implementation="eager",
        **cfg,
    )
    model = randomize(transformers.GPT2LMHeadModel(config))
    if kv_equal:
        with torch.no_grad():
            for block in model.transformer.h:  # Conv1D c_attn: weight [C, 3C] = [in, out], q | k | v
                block.attn.c_attn.weight[:, 2 * C :] = block.attn.c_attn.weight[:, C : 2 * C]
                block.attn.c_attn.bias[2 * C :] = block.attn.c_attn.bias[C : 2 * C]
    return model


def llama(kv_heads=HEADS, kv_equal=False, kv_equal_layers=None, **cfg):
    config = transformers.LlamaConfig(
        hidden_size=C,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        intermediate_size=64,
        vocab_size=V,
        max_position_embeddings=64,
        attn_implementation="eager",
        **cfg,
    )
    model = randomize(transformers.LlamaForCausalLM(config))
    layers = range(LAYERS) if kv_equal else (kv_equal_layers or [])
    with torch.no_grad():
        for i in layers:
            attn = model.model.layers[i].self_attn
            attn.v_proj.weight.copy_(attn.k_proj.weight)
            if attn.v_proj.bias is not None:
                attn.v_proj.bias.copy_(attn.k_proj.bias)
    return model


def assert_same_logits(hf_model, path):
    model = qkvx.load(path)
    torch.manual_seed(1)
    tokens = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        want = hf_model(tokens).logits
        got = model(tokens)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, diff
    return model


@pytest.mark.parametrize("kv_equal,variant", [(False, "QKV"), (True, "Q-K=V")])
@pytest.mark.parametrize(
    "save_kwargs",
    [{}, {"max_shard_size": "20KB"}, {"safe_serialization": False}],
    ids=["safetensors", "sharded", "bin"],
)
def test_gpt2(tmp_path, kv_equal, variant, save_kwargs):
    hf = gpt2(kv_equal)
    hf.save_pretrained(tmp_path, **save_kwargs)
    model = assert_same_logits(hf, tmp_path)
    assert model.spec.paper_name == variant and model.source["format"] == "hf"
    assert (model.spec.mlp, model.spec.tie_embeddings) == ("gelu_tanh", True)
    assert (model.blocks[0].attn.v_proj is None) == kv_equal


def test_gpt2_exact_gelu_untied(tmp_path):
    hf = gpt2(activation_function="gelu", tie_word_embeddings=False)
    with torch.no_grad():  # untie for real: a head of its own
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(V, C) * 0.2)
    hf.save_pretrained(tmp_path)
    model = assert_same_logits(hf, tmp_path)
    assert (model.spec.mlp, model.spec.tie_embeddings) == ("gelu", False)


@pytest.mark.parametrize(
    "kv_heads,kv_equal,tie,variant",
    [
        (4, False, False, "QKV"),
        (2, False, True, "GQA-2"),
        (1, False, False, "MQA"),
        (4, True, True, "Q-K=V"),
        (2, True, False, "Q-GQA-2"),
        (1, True, True, "Q-MQA"),
    ],
)
def test_llama(tmp_path, kv_heads, kv_equal, tie, variant):
    hf = llama(kv_heads, kv_equal, tie_word_embeddings=tie)
    hf.save_pretrained(tmp_path)
    model = assert_same_logits(hf, tmp_path)
    spec = model.spec
    assert spec.paper_name == variant
    assert (spec.positions, spec.norm, spec.mlp, spec.tie_embeddings) == ("rope", "rmsnorm", "swiglu", tie)
    assert qkvx.cache_layout(spec).tensors_per_layer == (1 if kv_equal else 2)


def test_llama_with_biases_and_sharding(tmp_path):
    hf = llama(2, kv_equal=True, attention_bias=True, mlp_bias=True, rope_theta=500.0)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    model = assert_same_logits(hf, tmp_path)
    assert model.spec.paper_name == "Q-GQA-2" and model.spec.bias and model.spec.rope_theta == 500.0


def test_llama_kv_equal_in_some_layers_only_is_standard(tmp_path):
    hf = llama(2, kv_equal_layers=[0])
    hf.save_pretrained(tmp_path)
    model = assert_same_logits(hf, tmp_path)
    assert model.spec.paper_name == "GQA-2" and model.blocks[0].attn.v_proj is not None


# ---- rejections: one line naming the file and the setting -------------------------------------


def write_config(path, **cfg):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


LLAMA_CFG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=C,
    num_hidden_layers=2,
    num_attention_heads=HEADS,
    intermediate_size=64,
    vocab_size=V,
)


@pytest.mark.parametrize(
    "cfg,needle",
    [
        (dict(architectures=["BertForMaskedLM"], model_type="bert"), "BertForMaskedLM"),
        (dict(model_type="t5"), "t5"),
        ({**LLAMA_CFG, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({**LLAMA_CFG, "hidden_act": "gelu"}, "hidden_act"),
        ({**LLAMA_CFG, "attention_bias": True}, "mlp_bias"),
        (
            dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", scale_attn_by_inverse_layer_idx=True),
            "scale_attn_by_inverse_layer_idx",
        ),
        (
            dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", scale_attn_weights=False),
            "scale_attn_weights",
        ),
        (
            dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", activation_function="relu"),
            "activation_function",
        ),
    ],
)
def test_unsupported_config(tmp_path, load_error, cfg, needle):
    path = write_config(tmp_path / "m", **cfg)
    load_error(path, path, needle)


def test_no_weights(tmp_path, load_error):
    path = write_config(tmp_path / "m", **LLAMA_CFG)
    load_error(path, path, "no weights")


def test_shape_mismatch_names_hf_tensor(tmp_path, load_error):
    llama(2).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    load_error(tmp_path, tmp_path, "model.layers.0.mlp.", "has shape", "expected")
