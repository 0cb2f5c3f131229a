"""Paper code-release checkpoints, written exactly as the release's training scripts write them
(qkvx.bench.release: DDP `module.` keys, causal-mask buffers, asdict() configs, a real AdamW state,
the published format with val_metrics), for all 8 variants, checked against an independent
re-implementation of the paper model written here in plain torch ops."""

import math

import pytest
import torch

import qkvx
from qkvx.bench.release import adamw_state, build, model_config, train_config, write_checkpoint
from qkvx.spec import cache_layout

C, H, L, V, P = 32, 4, 2, 100, 64  # n_embd, heads, layers, vocab, positions
D = C // H
DIMS = dict(n_layer=L, n_embd=C, n_head=H, n_inner=4 * C, vocab_size=V, n_positions=P, initializer_range=0.3)
VARIANTS = ("QKV", "Q=K-V", "Q-K=V", "Q=K=V", "GQA-2", "MQA", "Q-GQA-2", "Q-MQA")
SHARED = ("Q-K=V", "Q=K=V", "Q-GQA-2", "Q-MQA")


def release(tmp_path, variant, kind="training", name="ckpt.pt", **opts):
    """(path, raw state dict without the DDP prefix and mask buffers, model_config) of a release
    checkpoint of `variant` with trained-looking (drifted) weights."""
    path = write_checkpoint(tmp_path / name, variant, kind=kind, drift=0.1, **{**DIMS, **opts})
    obj = torch.load(path, weights_only=True)
    sd = {
        k.removeprefix("module."): v
        for k, v in obj["model_state_dict"].items()
        if not k.endswith(".attn.bias")
    }
    return path, sd, obj["model_config"]


def resave(path, obj):
    torch.save(obj, path)
    return path


def reference_logits(sd, cfg, variant, tokens):
    """The paper model from its raw state dict (the release's attention per variant), in float64."""
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
        a = lambda name: lin(h, f"h.{i}.attn.{name}")  # noqa: B023 (used in this iteration only)
        g = cfg.get("n_kv_groups", H)
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


CASES = (
    [(v, "training", {}) for v in VARIANTS]
    + [(v, "final", {}) for v in VARIANTS]
    + [
        ("GQA-2", "training", dict(tie_word_embeddings=False)),
        ("Q-GQA-2", "final", dict(tie_word_embeddings=False)),
        ("MQA", "training", dict(tie_word_embeddings=False, use_bias=False)),
        ("Q=K-V", "final", dict(use_bias=False)),
        ("Q-K=V", "training", dict(use_bias=False, tie_word_embeddings=False)),
    ]
)


@pytest.mark.parametrize(
    "variant,kind,opts",
    CASES,
    ids=[f"{v}-{k}-{'-'.join(f'{a}={x}' for a, x in o.items())}" for v, k, o in CASES],
)
def test_release_checkpoint_matches_reference(tmp_path, variant, kind, opts):
    path, sd, cfg = release(tmp_path, variant, kind, **opts)
    model = qkvx.load(path)

    assert model.spec.paper_name == variant
    assert model.source["format"] == "paper"
    assert model.spec.bias == opts.get("use_bias", True)
    assert model.spec.norm_bias  # the release's LayerNorms keep their bias whatever use_bias says
    assert model.spec.tie_embeddings == opts.get("tie_word_embeddings", True)
    assert cache_layout(model.spec).tensors_per_layer == (1 if variant in SHARED else 2)
    release_meta = model.meta["release"]
    assert (release_meta["step"], release_meta["epoch"]) == (7000, 0) and release_meta["tokens_seen"] > 0
    assert release_meta["optimizer_state"] == (kind == "training")
    assert release_meta["train_config"]["learning_rate"] == 2e-4
    if kind == "final":
        vm = release_meta["val_metrics"]
        assert vm["perplexity"] == pytest.approx(math.exp(vm["loss"])) and vm["bpc"] == pytest.approx(
            vm["loss"] / math.log(2)
        )
    torch.manual_seed(1)
    tokens = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        got = model(tokens).double()
    ref = reference_logits(sd, cfg, variant, tokens)
    assert ref.abs().max() > 1.0  # weights large enough that a misplaced tensor shows
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-5 * ref.abs().max().item(), diff  # fp32 rounding vs float64


def test_release_fixture_has_every_key(tmp_path):
    """The fixtures are the release's format: its keys, its ModelConfig fields in order, DDP keys,
    mask buffers, AdamW's state for every parameter."""
    path, _, _ = release(tmp_path, "Q-MQA")
    obj = torch.load(path, weights_only=True)
    assert list(obj) == [
        "step",
        "epoch",
        "tokens_seen",
        "model_state_dict",
        "optimizer_state_dict",
        "model_config",
        "train_config",
    ]
    assert list(obj["model_config"]) == [
        "vocab_size",
        "n_positions",
        "n_layer",
        "n_embd",
        "n_head",
        "n_kv_groups",
        "n_inner",
        "embd_pdrop",
        "resid_pdrop",
        "attn_pdrop",
        "layer_norm_epsilon",
        "initializer_range",
        "use_bias",
        "tie_word_embeddings",
        "use_flash_attention",
    ]
    assert "n_kv_groups" not in model_config("Q-K=V") and model_config("GQA-8", n_head=32)["n_kv_groups"] == 8
    sd = obj["model_state_dict"]
    assert all(k.startswith("module.") for k in sd) and sd["module.h.1.attn.bias"].shape == (1, 1, P, P)
    assert "module.lm_head.weight" not in sd  # tied: the release's head is a lambda over wte
    opt = obj["optimizer_state_dict"]
    params = [k for k in sd if not k.endswith(".attn.bias")]
    assert len(opt["state"]) == len(params) and opt["param_groups"][0]["params"] == list(range(len(params)))
    assert all(
        st["exp_avg"].dtype == torch.float32
        and st["exp_avg_sq"].shape == sd["module." + params[i].removeprefix("module.")].shape
        for i, st in opt["state"].items()
    )
    final = torch.load(
        write_checkpoint(tmp_path / "final.pt", "Q-K=V", kind="final", **DIMS), weights_only=True
    )
    assert list(final) == [
        "step",
        "epoch",
        "tokens_seen",
        "model_state_dict",
        "val_metrics",
        "model_config",
        "train_config",
    ]
    assert set(final["val_metrics"]) == {"loss", "perplexity", "bpc"}


def test_assembled_adamw_state_equals_one_optimizer():
    """adamw_state steps one parameter at a time (memory); the result must be what ONE
    torch.optim.AdamW over model.parameters() writes after the same step."""
    cfg = model_config("GQA-2", **DIMS)
    tcfg = train_config("GQA-2")
    a, b = build(cfg, "GQA-2", seed=3), build(cfg, "GQA-2", seed=3)
    assembled = adamw_state(a, tcfg, seed=5)
    gen = torch.Generator().manual_seed(5)
    opt = torch.optim.AdamW(
        b.parameters(),
        lr=tcfg["learning_rate"],
        betas=(tcfg["beta1"], tcfg["beta2"]),
        weight_decay=tcfg["weight_decay"],
    )
    for p in b.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt.step()
    one = opt.state_dict()
    assert assembled["param_groups"] == one["param_groups"]
    assert assembled["state"].keys() == one["state"].keys()
    for i, st in one["state"].items():
        for key, value in st.items():
            assert torch.equal(assembled["state"][i][key], value), (i, key)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=False))


def test_variant_spellings_of_the_release():
    for name in ("Q-K=V", "Q!=K=V", "Q≠K=V", "Q–K=V", "q-k=v"):
        assert qkvx.ModelSpec.from_paper_name(name, preset="paper-300m").paper_name == "Q-K=V"
    assert qkvx.ModelSpec.from_paper_name("Q=K–V", preset="paper-300m").paper_name == "Q=K-V"


def test_loading_never_reads_the_optimizer_state(tmp_path, monkeypatch):
    """The checkpoint is memory-mapped: torch.load(mmap=True), so the AdamW moments (2x the weights)
    are never read. Checked on what torch.load was asked to do, and on the tensors it returned."""
    path, _, _ = release(tmp_path, "Q-K=V")
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        obj = real(*args, **kwargs)
        calls.append(obj)
        return obj

    monkeypatch.setattr(torch, "load", spy)
    qkvx.load(path)
    assert calls[0].get("mmap") is True and calls[0].get("weights_only") is True
    moment = calls[1]["optimizer_state_dict"]["state"][0]["exp_avg"]
    # the moments' memory is the file's mapping (pages read only if touched), not a heap copy
    maps = [line.split() for line in open("/proc/self/maps") if line.rstrip().endswith(str(path))]
    spans = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps]
    assert any(lo <= moment.data_ptr() < hi for lo, hi in spans), spans


def test_paper_to_native_is_exact(tmp_path):
    """An import written in the native format reads back unchanged (later steps start there)."""
    first = qkvx.load(release(tmp_path, "Q-GQA-2")[0])
    again = qkvx.load(qkvx.save(first, tmp_path / "native"))
    assert again.spec == first.spec and again.source["format"] == "native"
    tokens = torch.arange(20).view(1, 20)
    with torch.no_grad():
        assert torch.equal(again(tokens), first(tokens))


def test_compiled_ddp_prefixes(tmp_path):
    """torch.compile inside DDP (`module._orig_mod.`): the release comments it out, others do not."""
    path, _, _ = release(tmp_path, "Q-MQA")
    obj = torch.load(path, weights_only=True)
    obj["model_state_dict"] = {
        k.replace("module.", "module._orig_mod.", 1): v for k, v in obj["model_state_dict"].items()
    }
    assert qkvx.load(resave(path, obj)).spec.paper_name == "Q-MQA"


# ---- unknown config keys --------------------------------------------------------------------------


def test_unknown_key_names_the_flag_that_proceeds(tmp_path, load_error):
    path, _, _ = release(tmp_path, "Q-K=V")
    obj = torch.load(path, weights_only=True)
    obj["model_config"]["use_fused_adam"] = True
    resave(path, obj)
    msg = load_error(path, path, "use_fused_adam", "--ignore-config-key use_fused_adam")
    assert "not known" in msg
    assert qkvx.load(path, ignore_config_keys=("use_fused_adam",)).spec.paper_name == "Q-K=V"


@pytest.mark.parametrize(
    "key,value,why",
    [
        ("rotary", True, "rotary positions"),
        ("activation_function", "relu", "MLP activation"),
        ("scale_attn_by_inverse_layer_idx", True, "rescales"),
    ],
)
def test_math_keys_refused_with_reason_and_not_ignorable(tmp_path, load_error, key, value, why):
    path, _, _ = release(tmp_path, "QKV")
    obj = torch.load(path, weights_only=True)
    obj["model_config"][key] = value
    resave(path, obj)
    load_error(path, path, f"{key}={value!r}", why)
    with pytest.raises(qkvx.QkvxError, match="cannot be ignored"):
        qkvx.load(path, ignore_config_keys=(key,))


def test_release_encoders_have_no_kv_cache(tmp_path, load_error):
    """The release's synthetic-task encoders and ViT classifiers: one line saying exactly why."""
    for model, task in (("Encoder", "sorting"), ("ViT", "cifar10")):
        path = tmp_path / f"{model}.pt"
        torch.save(
            {
                "task": task,
                "variant": "Q-K=V",
                "model": model,
                "config": {"d_model": 64, "n_layers": 2},
                "test_accuracy": 0.97,
                "model_state_dict": {"encoder.weight": torch.zeros(2, 2)},
            },
            path,
        )
        load_error(path, path, model, task, "no KV cache")


# ---- bad inputs: one QkvxError line naming the file and the key or shape at fault ---------------


def test_missing_keys(tmp_path, load_error):
    path, _, _ = release(tmp_path, "QKV")
    obj = torch.load(path, weights_only=True)
    del obj["model_state_dict"]["module.h.1.mlp.c_fc.weight"], obj["model_state_dict"]["module.ln_f.weight"]
    load_error(resave(path, obj), path, "missing keys", "blocks.1.mlp.fc.weight", "norm_f.weight")


def test_unexpected_keys(tmp_path, load_error):
    path, _, _ = release(tmp_path, "Q-K=V")
    obj = torch.load(path, weights_only=True)
    obj["model_state_dict"]["module.h.0.mlp.gate.weight"] = torch.zeros(C, C)
    load_error(resave(path, obj), path, "unexpected keys", "h.0.mlp.gate.weight")


@pytest.mark.parametrize(
    "name,shape",
    [
        ("h.1.mlp.c_fc.weight", (4 * C, C + 1)),
        ("h.1.attn.c_k.weight", (C, C - 1)),
        ("wpe.weight", (P - 1, C)),
    ],
)
def test_shape_mismatch_names_tensor(tmp_path, load_error, name, shape):
    path, _, _ = release(tmp_path, "Q-K=V")
    obj = torch.load(path, weights_only=True)
    obj["model_state_dict"][f"module.{name}"] = torch.randn(shape)
    load_error(resave(path, obj), path, name, str(list(shape)))


class _Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_in_pickle_is_never_run(tmp_path, load_error):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(
        {"model_state_dict": {"wte.weight": _Payload(marker)}, "model_config": model_config("QKV")}, path
    )
    load_error(path, path, "never runs code")
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_file(tmp_path, load_error):
    good = release(tmp_path, "QKV")[0].read_bytes()
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
    path, _, _ = release(tmp_path, "GQA-2")
    obj = torch.load(path, weights_only=True)
    obj["model_config"]["n_kv_groups"] = 3
    load_error(resave(path, obj), path, "n_kv_groups=3")


@pytest.mark.parametrize(
    "variant,groups,tensor",
    [
        ("MQA", 4, "h.0.attn.c_kv.weight"),  # [2D, C]
        ("Q-GQA-2", 1, "h.0.attn.c_k.weight"),  # [2D, C]
        ("QKV", 2, "h.0.attn.c_attn.weight"),
    ],
)
def test_config_contradicts_weights(tmp_path, load_error, variant, groups, tensor):
    path, _, _ = release(tmp_path, variant)
    obj = torch.load(path, weights_only=True)
    obj["model_config"]["n_kv_groups"] = groups
    load_error(resave(path, obj), path, tensor, f"n_kv_groups={groups}")


def test_nan_weights(tmp_path, load_error):
    path, _, _ = release(tmp_path, "Q-MQA")
    obj = torch.load(path, weights_only=True)
    obj["model_state_dict"]["module.h.1.attn.c_q.weight"][0, 0] = float("nan")
    load_error(resave(path, obj), path, "NaN")


def test_unknown_attention_layout(tmp_path, load_error):
    path, _, _ = release(tmp_path, "QKV")
    obj = torch.load(path, weights_only=True)
    obj["model_state_dict"]["module.h.0.attn.c_q.weight"] = torch.randn(C, C)
    load_error(resave(path, obj), path, "c_attn, c_q")


def test_tied_config_but_different_lm_head(tmp_path, load_error):
    path, _, _ = release(tmp_path, "QKV")
    obj = torch.load(path, weights_only=True)
    obj["model_state_dict"]["module.lm_head.weight"] = torch.randn(V, C)
    load_error(resave(path, obj), path, "lm_head.weight", "wte.weight")


def test_tied_checkpoint_may_repeat_lm_head(tmp_path):
    # nanoGPT-style state dicts list the tied tensor twice (wte and lm_head): that is fine.
    path, _, _ = release(tmp_path, "Q-K=V")
    obj = torch.load(path, weights_only=True)
    obj["model_state_dict"]["module.lm_head.weight"] = obj["model_state_dict"]["module.wte.weight"]
    assert qkvx.load(resave(path, obj)).spec.tie_embeddings
