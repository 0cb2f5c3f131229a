"""The paper's code-release checkpoints: a `.pt` dict with `model_state_dict` (GPT-2
names: wte, wpe, h.{i}.ln_1, h.{i}.attn.*, h.{i}.ln_2, h.{i}.mlp.c_fc / c_proj, ln_f, lm_head) and
`model_config`. The variant is read from which attention tensors exist and their shapes, checked
against n_kv_groups; `c_kv` means different things in different variants, so the name alone never
decides.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from qkvx.errors import QkvxError
from qkvx.loaders.common import Checkpoint, check_state, make_spec, rename, strip_prefixes, torch_load

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile (possibly both, any order)
# Causal-mask buffers ([1,1,P,P] `bias`, old GPT-2 `masked_bias`), not weights. Note the real
# projection biases are h.{i}.attn.c_*.bias and do not match.
MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")

# Everything but the q/k/v projections: GPT-2 module names -> qkvx names. Shared with the HF GPT-2
# reader, whose checkpoints use the same names (once `transformer.` is stripped).
GPT2_RULES = [
    (re.compile(p), r)
    for p, r in [
        (r"^wte\.", "tok_emb."),
        (r"^wpe\.", "pos_emb."),
        (r"^h\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
        (r"^h\.(\d+)\.attn\.c_proj\.", r"blocks.\1.attn.o_proj."),
        (r"^h\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
        (r"^h\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc."),
        (r"^h\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.proj."),
        (r"^ln_f\.", "norm_f."),
    ]
]

REQUIRED = (
    "vocab_size",
    "n_positions",
    "n_layer",
    "n_embd",
    "n_head",
    "n_inner",
    "layer_norm_epsilon",
    "use_bias",
    "tie_word_embeddings",
)
# Keys that do not change what a trained model computes at inference, each with the reason. The
# first six are the rest of the release's ModelConfig (its own evaluation script drops
# use_flash_attention and the dropouts the same way).
NEUTRAL = {
    "n_kv_groups": "read from the attention weights' shapes, and checked against them",
    "embd_pdrop": "dropout acts in training only",
    "resid_pdrop": "dropout acts in training only",
    "attn_pdrop": "dropout acts in training only",
    "initializer_range": "initialization only",
    "use_flash_attention": "F.scaled_dot_product_attention instead of the explicit masked softmax: "
    "the same math",
    "dropout": "dropout acts in training only",
    "gradient_checkpointing": "training memory only",
    "bos_token_id": "a tokenizer id",
    "eos_token_id": "a tokenizer id",
    "pad_token_id": "a tokenizer id",
}
# Keys known to change the math: accepted only at the paper architecture's value, refused otherwise
# (with the reason), and never ignorable.
MATH = {
    "activation_function": (("gelu",), "the MLP activation (the paper's is nn.GELU, exact erf)"),
    "scale_attn_weights": ((True,), "attention scores are scaled by 1/sqrt(head_dim)"),
    "scale_attn_by_inverse_layer_idx": ((False,), "it rescales each layer's attention scores"),
    "position_embedding_type": (("absolute", "learned"), "positions are a learned table (wpe)"),
    "rotary": ((False,), "rotary positions replace the learned table"),
    "use_rope": ((False,), "rotary positions replace the learned table"),
    "parallel_residual": ((False,), "it changes the residual wiring"),
    "use_rmsnorm": ((False,), "the norms are LayerNorm"),
    "qk_norm": ((False,), "it normalizes queries and keys"),
    "block_size": ((None,), "it must equal n_positions"),  # checked against n_positions below
}
# Attention layout per variant: source tensor -> [(qkvx projection, rows)], rows in units of
# C = n_embd, D = head dim, G = g * D (the kv width). Rows are split in this order.
Layout = dict[str, list[tuple[str, int]]]


def attention_layout(sharing: str, k_tensor: str, C: int, G: int) -> Layout:
    """(sharing, the tensor that holds k, kv width G = g*D) -> which checkpoint tensor holds which
    projection (the attention table in docs/architecture.md)."""
    if sharing == "qkv" and k_tensor == "c_attn":
        return {"c_attn": [("q_proj", C), ("k_proj", C), ("v_proj", C)]}  # QKV [3C, C]
    if sharing == "qkv":
        return {"c_q": [("q_proj", C)], "c_kv": [("k_proj", G), ("v_proj", G)]}  # GQA/MQA [2gD, C]
    if sharing == "qk-v":
        return {"c_kv": [("k_proj", C), ("v_proj", C)]}  # Q=K-V: q = k
    if sharing == "q=k=v":
        return {"c_k": [("k_proj", C)]}
    return {"c_q": [("q_proj", C)], k_tensor: [("k_proj", G)]}  # Q-K=V / Q-GQA (c_k), Q-MQA (c_kv)


def to_qkvx(
    raw: dict[str, torch.Tensor], n_layer: int, layout: Layout, C: int, path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """GPT-2 names -> qkvx names, slicing the fused attention tensors of every layer per `layout`.
    Returns (state, origin: qkvx name -> checkpoint name). Unknown keys keep their own name."""
    raw = dict(raw)
    sliced: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for i in range(n_layer):
        for src, parts in layout.items():
            rows = sum(n for _, n in parts)
            for kind, shape in (("weight", [rows, C]), ("bias", [rows])):  # nn.Linear: [out, in]
                name = f"h.{i}.attn.{src}.{kind}"
                if name not in raw:
                    continue  # reported as missing by build_model, under the qkvx name
                t = raw.pop(name)
                if list(t.shape) != shape:
                    raise QkvxError(f"{path}: {name} has shape {list(t.shape)}, expected {shape}")
                for (proj, _), piece in zip(parts, torch.split(t, [n for _, n in parts]), strict=False):
                    key = f"blocks.{i}.attn.{proj}.{kind}"
                    sliced[key], origin[key] = piece, name
    state, renamed = rename(raw, GPT2_RULES)
    return {**state, **sliced}, {**renamed, **origin}


ENCODERS = ("Encoder", "ViT")


def read(path: Path, ignore_config_keys: tuple[str, ...] = ()) -> Checkpoint:
    """A release checkpoint: the training format (step, epoch, tokens_seen, model_state_dict,
    optimizer_state_dict, model_config, train_config) or the published one (val_metrics instead of
    the optimizer state). The file is mapped: the optimizer state is never read."""
    obj = torch_load(path)
    if (
        isinstance(obj, dict)
        and "model_config" not in obj
        and (obj.get("model") in ENCODERS or "test_accuracy" in obj)
    ):
        raise QkvxError(
            f"{path}: the paper's {obj.get('model', 'encoder')} for task {obj.get('task')!r} "
            f"({obj.get('variant')}) is an encoder with no KV cache: qkvx exports decoder "
            f"language models, so there is nothing to export"
        )
    if not isinstance(obj, dict) or not {"model_state_dict", "model_config"} <= set(obj):
        what = (
            f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else type(obj).__name__
        )
        raise QkvxError(
            f"{path}: not a paper checkpoint (expected a dict with model_state_dict and "
            f"model_config, got {what})"
        )
    sd, cfg = obj["model_state_dict"], _config(obj["model_config"], path, ignore_config_keys)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise QkvxError(f"{path}: model_state_dict must map names to tensors")
    raw = {k: v for k, v in strip_prefixes(sd, WRAPPER_PREFIXES, path).items() if not MASK_BUFFER.match(k)}
    C, H = cfg["n_embd"], cfg["n_head"]
    D = C // H
    sharing, n_kv, k_tensor = _detect(raw, cfg, D, path)
    # The paper's models are GPT-2 style: learned positions, LayerNorm, exact-erf GELU (nn.GELU).
    # Its LayerNorms keep their bias whatever use_bias says (use_bias is the Linear layers').
    spec = make_spec(
        path,
        n_layer=cfg["n_layer"],
        n_embd=C,
        n_head=H,
        n_kv_head=n_kv,
        sharing=sharing,
        vocab_size=cfg["vocab_size"],
        max_positions=cfg["n_positions"],
        n_inner=cfg["n_inner"],
        norm_eps=float(cfg["layer_norm_epsilon"]),
        bias=cfg["use_bias"],
        norm_bias=_norm_bias(raw),
        tie_embeddings=cfg["tie_word_embeddings"],
        positions="learned",
        norm="layernorm",
        mlp="gelu",
    )
    state, origin = to_qkvx(raw, spec.n_layer, attention_layout(sharing, k_tensor, C, n_kv * D), C, path)
    check_state(spec, state, origin, path)
    return Checkpoint(
        spec=spec, state=state, format="paper", path=path, meta=_release_meta(obj, ignore_config_keys)
    )


def _norm_bias(raw: dict[str, torch.Tensor]) -> bool:
    """Whether the LayerNorms have a bias: the release's nn.LayerNorm always has one; a checkpoint
    without ln_f.bias (other trainers' use_bias=False) has none."""
    return "ln_f.bias" in raw


def _release_meta(obj: dict, ignored: tuple[str, ...]) -> dict[str, Any]:
    """What `inspect` shows about the training run; the optimizer state is only noted, never read."""
    scalars = {k: obj[k] for k in ("step", "epoch", "tokens_seen") if isinstance(obj.get(k), (int, float))}
    meta: dict[str, Any] = {"release": {**scalars, "optimizer_state": "optimizer_state_dict" in obj}}
    if isinstance(obj.get("val_metrics"), dict):
        meta["release"]["val_metrics"] = {
            k: float(v)
            for k, v in obj["val_metrics"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    if isinstance(obj.get("train_config"), dict):
        meta["release"]["train_config"] = {
            str(k): v
            for k, v in obj["train_config"].items()
            if isinstance(v, (str, int, float, bool)) or v is None
        }
    if ignored:
        meta["ignored_config_keys"] = list(ignored)
    return meta


def _config(cfg: Any, path: Path, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Validate model_config: required keys, types, no semantics we would silently get wrong."""
    if not isinstance(cfg, dict):
        raise QkvxError(f"{path}: model_config must be a dict, got {type(cfg).__name__}")
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise QkvxError(f"{path}: model_config is missing {', '.join(missing)}")
    if locked := [k for k in ignore if k in MATH or k in REQUIRED]:
        raise QkvxError(
            f"{path}: model_config.{locked[0]} cannot be ignored: it changes the model "
            f"({MATH[locked[0]][1] if locked[0] in MATH else 'qkvx reads it'})"
        )
    unknown = sorted(
        str(k) for k in cfg if k not in NEUTRAL and k not in MATH and k not in REQUIRED and k not in ignore
    )
    if unknown:
        flags = " ".join(f"--ignore-config-key {k}" for k in unknown)
        raise QkvxError(
            f"{path}: model_config key(s) {', '.join(unknown)} not known to qkvx, which cannot "
            f"tell whether they change the model; if they do not, pass {flags}"
        )
    for key, (allowed, why) in MATH.items():
        if key in cfg and cfg[key] not in allowed and key != "block_size":
            raise QkvxError(
                f"{path}: model_config.{key}={cfg[key]!r} is not supported: {why} "
                f"(qkvx reads only {allowed[0]!r})"
            )
    cfg = dict(cfg)
    if cfg["n_inner"] is None:
        cfg["n_inner"] = 4 * cfg["n_embd"]  # GPT-2 convention
    for key in ("vocab_size", "n_positions", "n_layer", "n_embd", "n_head", "n_inner"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise QkvxError(f"{path}: model_config.{key} must be a positive integer, got {cfg[key]!r}")
    eps = cfg["layer_norm_epsilon"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise QkvxError(f"{path}: model_config.layer_norm_epsilon must be a positive number, got {eps!r}")
    for key in ("use_bias", "tie_word_embeddings"):
        if not isinstance(cfg[key], bool):
            raise QkvxError(f"{path}: model_config.{key} must be true or false, got {cfg[key]!r}")
    if cfg.get("block_size") not in (None, cfg["n_positions"]):
        raise QkvxError(
            f"{path}: model_config.block_size={cfg['block_size']} contradicts "
            f"n_positions={cfg['n_positions']}"
        )
    C, H, g = cfg["n_embd"], cfg["n_head"], cfg.get("n_kv_groups")
    if C % H:
        raise QkvxError(f"{path}: model_config.n_head={H} does not divide n_embd={C}")
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1 or H % g):
        raise QkvxError(f"{path}: model_config.n_kv_groups={g!r} does not divide n_head={H}")
    return cfg


def _detect(raw: dict[str, torch.Tensor], cfg: dict[str, Any], D: int, path: Path) -> tuple[str, int, str]:
    """(sharing, kv heads, the tensor holding k) from layer 0's attention weights and n_kv_groups.
    Later layers are mapped with the same layout; a layer that differs surfaces as missing and
    unexpected keys."""
    C, H, g = cfg["n_embd"], cfg["n_head"], cfg.get("n_kv_groups")
    names = sorted(
        k.split(".")[3]
        for k in raw
        if re.match(r"^h\.0\.attn\.c_\w+\.weight$", k) and k != "h.0.attn.c_proj.weight"
    )
    for n in names:
        if raw[f"h.0.attn.{n}.weight"].dim() != 2:
            raise QkvxError(
                f"{path}: h.0.attn.{n}.weight has shape {list(raw[f'h.0.attn.{n}.weight'].shape)}, "
                f"expected a matrix [out, {C}]"
            )
    if names in (["c_attn"], ["c_kv"], ["c_k"]):
        # QKV [3C, C], Q=K-V [2C, C], Q=K=V [C, C]: every head has its own k (q = k needs all heads).
        sharing, name = {"c_attn": ("qkv", "c_attn"), "c_kv": ("qk-v", "c_kv"), "c_k": ("q=k=v", "c_k")}[
            names[0]
        ]
        if g not in (None, H):
            shape = list(raw[f"h.0.attn.{name}.weight"].shape)
            raise QkvxError(
                f"{path}: model_config.n_kv_groups={g} contradicts h.0.attn.{name}.weight "
                f"{shape} (a layer whose k has all {H} heads)"
            )
        return sharing, H, name
    if names not in (["c_k", "c_q"], ["c_kv", "c_q"]):
        raise QkvxError(
            f"{path}: h.0.attn has attention weights [{', '.join(names) or 'none'}]; expected "
            f"one of c_attn | c_kv | c_q + c_k | c_k | c_q + c_kv"
        )
    name = names[0]
    shape = list(raw[f"h.0.attn.{name}.weight"].shape)
    if name == "c_kv" and shape[0] == D and g in (None, 1):
        return "q-kv", 1, "c_kv"  # Q-MQA: c_kv [D, C] is the one shared k = v head
    # Q-K=V / Q-GQA-g: c_k [gD, C] (k = v); GQA-g / MQA: c_kv [2gD, C] (k, then v).
    per_head = D if name == "c_k" else 2 * D
    kv = g if g is not None else shape[0] // per_head
    if shape[0] != kv * per_head or kv < 1 or H % kv:
        want = (
            f"n_kv_groups={g} needs [{g * per_head}, {C}]"
            if g is not None
            else f"{H} heads of dim {D} need [g*{per_head}, {C}] for some g dividing {H}"
        )
        raise QkvxError(f"{path}: h.0.attn.{name}.weight has shape {shape}, but {want}")
    return ("q-kv" if name == "c_k" else "qkv"), kv, name
