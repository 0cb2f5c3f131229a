"""The paper's code-release checkpoints (DESIGN.md 3.1): a `.pt` dict with `model_state_dict` (GPT-2
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
GPT2_RULES = [(re.compile(p), r) for p, r in [
    (r"^wte\.", "tok_emb."),
    (r"^wpe\.", "pos_emb."),
    (r"^h\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^h\.(\d+)\.attn\.c_proj\.", r"blocks.\1.attn.o_proj."),
    (r"^h\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^h\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc."),
    (r"^h\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.proj."),
    (r"^ln_f\.", "norm_f."),
]]

REQUIRED = ("vocab_size", "n_positions", "n_layer", "n_embd", "n_head", "n_inner",
            "layer_norm_epsilon", "use_bias", "tie_word_embeddings")
# Config keys that do not change what the trained model computes at inference.
HARMLESS = {"n_kv_groups", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "attn_dropout",
            "resid_dropout", "embd_dropout", "initializer_range", "init_std", "model_type", "variant",
            "attention_type", "attn_type", "name", "block_size", "gradient_checkpointing", "flash",
            "use_flash_attn", "flash_attn", "bos_token_id", "eos_token_id", "pad_token_id"}
# Semantic keys we accept only at the value the paper architecture has.
FIXED = {"activation_function": ("gelu",), "scale_attn_weights": (True,),
         "scale_attn_by_inverse_layer_idx": (False,), "position_embedding_type": ("absolute", "learned")}

# Attention layout per variant: source tensor -> [(qkvx projection, rows)], rows in units of
# C = n_embd, D = head dim, G = g * D (the kv width). Rows are split in this order.
Layout = dict[str, list[tuple[str, int]]]


def attention_layout(sharing: str, k_tensor: str, C: int, G: int) -> Layout:
    """(sharing, the tensor that holds k, kv width G = g*D) -> which checkpoint tensor holds which
    projection (DESIGN.md 3.1 table)."""
    if sharing == "qkv" and k_tensor == "c_attn":
        return {"c_attn": [("q_proj", C), ("k_proj", C), ("v_proj", C)]}  # QKV [3C, C]
    if sharing == "qkv":
        return {"c_q": [("q_proj", C)], "c_kv": [("k_proj", G), ("v_proj", G)]}  # GQA/MQA [2gD, C]
    if sharing == "qk-v":
        return {"c_kv": [("k_proj", C), ("v_proj", C)]}  # Q=K-V: q = k
    if sharing == "q=k=v":
        return {"c_k": [("k_proj", C)]}
    return {"c_q": [("q_proj", C)], k_tensor: [("k_proj", G)]}  # Q-K=V / Q-GQA (c_k), Q-MQA (c_kv)


def to_qkvx(raw: dict[str, torch.Tensor], n_layer: int, layout: Layout, C: int, path: Path
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
                for (proj, _), piece in zip(parts, torch.split(t, [n for _, n in parts])):
                    key = f"blocks.{i}.attn.{proj}.{kind}"
                    sliced[key], origin[key] = piece, name
    state, renamed = rename(raw, GPT2_RULES)
    return {**state, **sliced}, {**renamed, **origin}


def read(path: Path) -> Checkpoint:
    obj = torch_load(path)
    if not isinstance(obj, dict) or not {"model_state_dict", "model_config"} <= set(obj):
        what = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else type(obj).__name__
        raise QkvxError(f"{path}: not a paper checkpoint (expected a dict with model_state_dict and "
                        f"model_config, got {what})")
    sd, cfg = obj["model_state_dict"], _config(obj["model_config"], path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise QkvxError(f"{path}: model_state_dict must map names to tensors")
    raw = {k: v for k, v in strip_prefixes(sd, WRAPPER_PREFIXES, path).items() if not MASK_BUFFER.match(k)}
    C, H = cfg["n_embd"], cfg["n_head"]
    D = C // H
    sharing, n_kv, k_tensor = _detect(raw, cfg, D, path)
    # The paper's models are GPT-2 style: learned positions, LayerNorm, exact-erf GELU (nn.GELU).
    spec = make_spec(path, n_layer=cfg["n_layer"], n_embd=C, n_head=H, n_kv_head=n_kv, sharing=sharing,
                     vocab_size=cfg["vocab_size"], max_positions=cfg["n_positions"], n_inner=cfg["n_inner"],
                     norm_eps=float(cfg["layer_norm_epsilon"]), bias=cfg["use_bias"],
                     tie_embeddings=cfg["tie_word_embeddings"], positions="learned", norm="layernorm", mlp="gelu")
    state, origin = to_qkvx(raw, spec.n_layer, attention_layout(sharing, k_tensor, C, n_kv * D), C, path)
    check_state(spec, state, origin, path)
    return Checkpoint(spec=spec, state=state, format="paper", path=path)


def _config(cfg: Any, path: Path) -> dict[str, Any]:
    """Validate model_config: required keys, types, no semantics we would silently get wrong."""
    if not isinstance(cfg, dict):
        raise QkvxError(f"{path}: model_config must be a dict, got {type(cfg).__name__}")
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise QkvxError(f"{path}: model_config is missing {', '.join(missing)}")
    unknown = sorted(k for k in cfg if k not in HARMLESS and k not in FIXED and k not in REQUIRED)
    if unknown:
        raise QkvxError(f"{path}: model_config key(s) {', '.join(map(str, unknown))} not understood "
                        f"(qkvx cannot tell whether they change the model)")
    for key, allowed in FIXED.items():
        if key in cfg and cfg[key] not in allowed:
            raise QkvxError(f"{path}: model_config.{key}={cfg[key]!r} is not supported (only {allowed[0]!r})")
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
        raise QkvxError(f"{path}: model_config.block_size={cfg['block_size']} contradicts n_positions={cfg['n_positions']}")
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
    names = sorted(k.split(".")[3] for k in raw
                   if re.match(r"^h\.0\.attn\.c_\w+\.weight$", k) and k != "h.0.attn.c_proj.weight")
    for n in names:
        if raw[f"h.0.attn.{n}.weight"].dim() != 2:
            raise QkvxError(f"{path}: h.0.attn.{n}.weight has shape {list(raw[f'h.0.attn.{n}.weight'].shape)}, "
                            f"expected a matrix [out, {C}]")
    if names in (["c_attn"], ["c_kv"], ["c_k"]):
        # QKV [3C, C], Q=K-V [2C, C], Q=K=V [C, C]: every head has its own k (q = k needs all heads).
        sharing, name = {"c_attn": ("qkv", "c_attn"), "c_kv": ("qk-v", "c_kv"), "c_k": ("q=k=v", "c_k")}[names[0]]
        if g not in (None, H):
            shape = list(raw[f"h.0.attn.{name}.weight"].shape)
            raise QkvxError(f"{path}: model_config.n_kv_groups={g} contradicts h.0.attn.{name}.weight "
                            f"{shape} (a layer whose k has all {H} heads)")
        return sharing, H, name
    if names not in (["c_k", "c_q"], ["c_kv", "c_q"]):
        raise QkvxError(f"{path}: h.0.attn has attention weights [{', '.join(names) or 'none'}]; expected "
                        f"one of c_attn | c_kv | c_q + c_k | c_k | c_q + c_kv (DESIGN.md 3.1)")
    name = names[0]
    shape = list(raw[f"h.0.attn.{name}.weight"].shape)
    if name == "c_kv" and shape[0] == D and g in (None, 1):
        return "q-kv", 1, "c_kv"  # Q-MQA: c_kv [D, C] is the one shared k = v head
    # Q-K=V / Q-GQA-g: c_k [gD, C] (k = v); GQA-g / MQA: c_kv [2gD, C] (k, then v).
    per_head = D if name == "c_k" else 2 * D
    kv = g if g is not None else shape[0] // per_head
    if shape[0] != kv * per_head or kv < 1 or H % kv:
        want = (f"n_kv_groups={g} needs [{g * per_head}, {C}]" if g is not None else
                f"{H} heads of dim {D} need [g*{per_head}, {C}] for some g dividing {H}")
        raise QkvxError(f"{path}: h.0.attn.{name}.weight has shape {shape}, but {want}")
    return ("q-kv" if name == "c_k" else "qkv"), kv, name
