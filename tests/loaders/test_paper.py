"""Paper code-release checkpoints (DESIGN.md 3.1): all 8 variants in the documented layout, checked
against an independent re-implementation of the paper model written here in plain torch ops."""
import math

import pytest
import torch

import qkvx
from qkvx.spec import cache_layout

C, H, L, V, P = 32, 4, 2, 100, 64  # n_embd, heads, layers, vocab, positions
D = C // H

# variant -> (n_kv_groups in model_config, attention tensors {name: rows}), nn.Linear [rows, C].
VARIANTS = {
    "QKV": (None, {"c_attn": 3 * C}),
    "Q=K-V": (None, {"c_kv": 2 * C}),
    "Q-K=V": (None, {"c_q": C, "c_k": C}),
    "Q=K=V": (None, {"c_k": C}),
    "GQA-2": (2, {"c_q": C, "c_kv": 2 * 2 * D}),
    "MQA": (1, {"c_q": C, "c_kv": 2 * D}),
    "Q-GQA-2": (2, {"c_q": C, "c_k": 2 * D}),
    "Q-MQA": (1, {"c_q": C, "c_kv": D}),
}


def paper_state(variant, use_bias=True, tie=True, seed=0):
    """Random weights under the paper's names, incl. the causal-mask `bias` buffers [1,1,P,P]."""
    torch.manual_seed(seed)
    sd = {"wte.weight": torch.randn(V, C) * 0.5, "wpe.weight": torch.randn(P, C) * 0.5}

    def linear(name, out, inp):
        sd[f"{name}.weight"] = torch.randn(out, inp) / math.sqrt(inp)
        if use_bias:
            sd[f"{name}.bias"] = torch.randn(out) * 0.1

    def layernorm(name):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(C)
        if use_bias:
            sd[f"{name}.bias"] = 0.1 * torch.randn(C)

    for i in range(L):
        layernorm(f"h.{i}.ln_1")
        for name, rows in VARIANTS[variant][1].items():
            linear(f"h.{i}.attn.{name}", rows, C)
        linear(f"h.{i}.attn.c_proj", C, C)
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
        layernorm(f"h.{i}.ln_2")
        linear(f"h.{i}.mlp.c_fc", 4 * C, C)
        linear(f"h.{i}.mlp.c_proj", C, 4 * C)
    layernorm("ln_f")
    if not tie:
        sd["lm_head.weight"] = torch.randn(V, C) / math.sqrt(C)
    return sd


def paper_config(variant, use_bias=True, tie=True, groups_in_config=True, **extra):
    cfg = dict(vocab_size=V, n_positions=P, n_layer=L, n_embd=C, n_head=H, n_inner=4 * C,
               layer_norm_epsilon=1e-5, use_bias=use_bias, tie_word_embeddings=tie, dropout=0.1)
    g = VARIANTS[variant][0]
    if g is not None and groups_in_config:
        cfg["n_kv_groups"] = g
    return {**cfg, **extra}


def save(path, sd, cfg, prefix=""):
    torch.save({"model_state_dict": {prefix + k: v for k, v in sd.items()}, "model_config": cfg,
                "iter_num": 1000}, path)
    return path


def reference_logits(sd, cfg, variant, tokens):
    """The paper model from its raw state dict, per the DESIGN.md table, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    eps, T = cfg["layer_norm_epsilon"], tokens.shape[1]

    def lin(x, name):
        b = sd.get(f"{name}.bias")
        return x @ sd[f"{name}.weight"].T + (b if b is not None else 0)

    def layernorm(x, name):
        mu = x.mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps) * sd[f"{name}.weight"]
        b = sd.get(f"{name}.bias")
        return y + b if b is not None else y

    def heads(t):  # [B, T, n*D] -> [B, H, T, D], kv heads repeated (query head h reads h // (H/n))
        n = t.shape[-1] // D
        return t.view(*t.shape[:2], n, D).transpose(1, 2).repeat_interleave(H // n, dim=1)

    x = sd["wte.weight"][tokens] + sd["wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        h = layernorm(x, f"h.{i}.ln_1")
        a = lambda name: lin(h, f"h.{i}.attn.{name}")  # noqa: E731
        g = cfg.get("n_kv_groups") or VARIANTS[variant][0]
        if variant == "QKV":
            q, k, v = a("c_attn").split(C, dim=-1)
        elif variant == "Q=K-V":
            k, v = a("c_kv").split(C, dim=-1)
            q = k
        elif variant in ("Q-K=V", "Q-GQA-2"):
            q, k = a("c_q"), a("c_k")
            v = k
        elif variant == "Q=K=V":
            q = k = v = a("c_k")
        elif variant in ("GQA-2", "MQA"):
            q = a("c_q")
            k, v = a("c_kv").split(g * D, dim=-1)
        else:  # Q-MQA
            q, k = a("c_q"), a("c_kv")
            v = k
        att = heads(q) @ heads(k).transpose(-2, -1) / math.sqrt(D)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ heads(v)).transpose(1, 2).reshape(*x.shape)
        x = x + lin(y, f"h.{i}.attn.c_proj")
        f = lin(layernorm(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")
        x = x + lin(0.5 * f * (1 + torch.erf(f / math.sqrt(2))), f"h.{i}.mlp.c_proj")  # exact GELU
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["wte.weight"]
    return layernorm(x, "ln_f") @ head.T


CASES = [(v, {}) for v in VARIANTS] + [
    ("QKV", dict(prefix="module.")),
    ("Q-K=V", dict(prefix="_orig_mod.")),
    ("Q-MQA", dict(prefix="module._orig_mod.")),
    ("GQA-2", dict(prefix="_orig_mod.module.", tie=False)),
    ("Q-GQA-2", dict(tie=False)),
    ("MQA", dict(tie=False, use_bias=False)),
    ("Q=K-V", dict(use_bias=False)),
    ("Q=K=V", dict(use_bias=False, tie=False)),
    ("GQA-2", dict(groups_in_config=False)),  # kv heads read from the shapes alone
    ("Q-GQA-2", dict(groups_in_config=False, use_bias=False)),
    ("Q-MQA", dict(groups_in_config=False)),
]


@pytest.mark.parametrize("variant,opts", CASES, ids=[f"{v}-{'-'.join(f'{k}={x}' for k, x in o.items())}"
                                                     for v, o in CASES])
def test_variant_matches_reference(tmp_path, variant, opts):
    opts = dict(opts)
    prefix, groups = opts.pop("prefix", ""), opts.pop("groups_in_config", True)
    sd, cfg = paper_state(variant, **opts), paper_config(variant, groups_in_config=groups, **opts)
    model = qkvx.load(save(tmp_path / "ckpt.pt", sd, cfg, prefix))

    assert model.spec.paper_name == variant
    assert model.source["format"] == "paper"
    assert (model.spec.bias, model.spec.tie_embeddings) == (opts.get("use_bias", True), opts.get("tie", True))
    assert cache_layout(model.spec).tensors_per_layer == (1 if variant in ("Q-K=V", "Q=K=V", "Q-GQA-2", "Q-MQA") else 2)
    torch.manual_seed(1)
    tokens = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        got = model(tokens).double()
    diff = (got - reference_logits(sd, cfg, variant, tokens)).abs().max().item()
    assert diff <= 1e-5, diff


def test_tied_checkpoint_may_repeat_lm_head(tmp_path):
    # nanoGPT-style state dicts list the tied tensor twice (wte and lm_head): that is fine.
    sd = paper_state("Q-K=V")
    sd["lm_head.weight"] = sd["wte.weight"]
    assert qkvx.load(save(tmp_path / "c.pt", sd, paper_config("Q-K=V"))).spec.tie_embeddings


def test_paper_to_native_is_exact(tmp_path):
    """An import written in the native format reads back unchanged (later steps start there)."""
    first = qkvx.load(save(tmp_path / "c.pt", paper_state("Q-GQA-2"), paper_config("Q-GQA-2")))
    again = qkvx.load(qkvx.save(first, tmp_path / "native"))
    assert again.spec == first.spec and again.source["format"] == "native"
    tokens = torch.arange(20).view(1, 20)
    with torch.no_grad():
        assert torch.equal(again(tokens), first(tokens))


# ---- bad inputs: one QkvxError line naming the file and the key or shape at fault ---------------

def test_missing_keys(tmp_path, load_error):
    sd = paper_state("QKV")
    del sd["h.1.mlp.c_fc.weight"], sd["ln_f.weight"]
    path = save(tmp_path / "c.pt", sd, paper_config("QKV"))
    load_error(path, path, "missing keys", "blocks.1.mlp.fc.weight", "norm_f.weight")


def test_unexpected_keys(tmp_path, load_error):
    sd = paper_state("Q-K=V")
    sd["h.0.mlp.gate.weight"] = torch.zeros(C, C)
    path = save(tmp_path / "c.pt", sd, paper_config("Q-K=V"))
    load_error(path, path, "unexpected keys", "h.0.mlp.gate.weight")


@pytest.mark.parametrize("name,shape", [("h.1.mlp.c_fc.weight", (4 * C, C + 1)),
                                        ("h.1.attn.c_k.weight", (C, C - 1)),
                                        ("wpe.weight", (P - 1, C))])
def test_shape_mismatch_names_tensor(tmp_path, load_error, name, shape):
    sd = paper_state("Q-K=V")
    sd[name] = torch.randn(shape)
    path = save(tmp_path / "c.pt", sd, paper_config("Q-K=V"))
    load_error(path, path, name, str(list(shape)))


class _Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_in_pickle_is_never_run(tmp_path, load_error):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"wte.weight": _Payload(marker)}, "model_config": paper_config("QKV")}, path)
    load_error(path, path, "never runs code")
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_file(tmp_path, load_error):
    good = save(tmp_path / "good.pt", paper_state("QKV"), paper_config("QKV")).read_bytes()
    path = tmp_path / "trunc.pt"
    path.write_bytes(good[: len(good) // 2])
    load_error(path, path)


def test_zero_byte_file(tmp_path, load_error):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    load_error(path, path)


def test_not_a_dict(tmp_path, load_error):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    load_error(path, path, "model_state_dict")


def test_kv_groups_not_dividing_heads(tmp_path, load_error):
    path = save(tmp_path / "c.pt", paper_state("GQA-2"), paper_config("GQA-2", n_kv_groups=3))
    load_error(path, path, "n_kv_groups=3")


@pytest.mark.parametrize("variant,groups,tensor", [("MQA", 4, "h.0.attn.c_kv.weight"),  # [2D, C]
                                                   ("Q-GQA-2", 1, "h.0.attn.c_k.weight"),  # [2D, C]
                                                   ("QKV", 2, "h.0.attn.c_attn.weight")])
def test_config_contradicts_weights(tmp_path, load_error, variant, groups, tensor):
    path = save(tmp_path / "c.pt", paper_state(variant), paper_config(variant, n_kv_groups=groups))
    load_error(path, path, tensor, f"n_kv_groups={groups}")


def test_nan_weights(tmp_path, load_error):
    sd = paper_state("Q-MQA")
    sd["h.1.attn.c_q.weight"][0, 0] = float("nan")
    path = save(tmp_path / "c.pt", sd, paper_config("Q-MQA"))
    load_error(path, path, "NaN")


def test_unknown_attention_layout(tmp_path, load_error):
    sd = paper_state("QKV")
    sd["h.0.attn.c_q.weight"] = torch.randn(C, C)
    path = save(tmp_path / "c.pt", sd, paper_config("QKV"))
    load_error(path, path, "c_attn, c_q")


def test_semantic_config_keys_rejected(tmp_path, load_error):
    path = save(tmp_path / "c.pt", paper_state("QKV"), paper_config("QKV", rotary=True))
    load_error(path, path, "rotary")
    path = save(tmp_path / "d.pt", paper_state("QKV"), paper_config("QKV", activation_function="relu"))
    load_error(path, path, "activation_function")


def test_tied_config_but_different_lm_head(tmp_path, load_error):
    sd = paper_state("QKV")
    sd["lm_head.weight"] = torch.randn(V, C)
    path = save(tmp_path / "c.pt", sd, paper_config("QKV"))
    load_error(path, path, "lm_head.weight", "wte.weight")
