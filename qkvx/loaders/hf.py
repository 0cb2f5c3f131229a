"""Hugging Face folders: GPT2LMHeadModel and LlamaForCausalLM, config.json plus
model.safetensors, sharded safetensors (with the index json) or pytorch_model.bin.

The config is parsed with transformers' config classes (the same defaults HF would apply to keys
save_pretrained omits); the HF model itself is never instantiated (it would double memory).
A model whose key and value projections are equal in every layer loads as Q-K=V (Q-GQA-g / Q-MQA
with fewer kv heads) and keeps only k_proj: one cache tensor per layer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from qkvx.errors import QkvxError
from qkvx.loaders import paper
from qkvx.loaders.common import (
    Checkpoint,
    check_state,
    make_spec,
    read_safetensors,
    rename,
    strip_prefixes,
    torch_load,
)
from qkvx.spec import ModelSpec

CONFIG_FILE = "config.json"
FAMILIES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}

LLAMA_RULES = [
    (re.compile(p), r)
    for p, r in [
        (r"^model\.embed_tokens\.", "tok_emb."),
        (r"^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.", r"blocks.\1.attn.\2_proj."),
        (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"blocks.\1.mlp.gate."),
        (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"blocks.\1.mlp.fc."),
        (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.proj."),
        (r"^model\.layers\.(\d+)\.input_layernorm\.", r"blocks.\1.norm1."),
        (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.norm2."),
        (r"^model\.norm\.", "norm_f."),
    ]
]
# Non-weights some checkpoints carry: rotary inv_freq (old Llama), GPT-2 causal-mask buffers.
LLAMA_BUFFER = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# GPT-2 Conv1D weights are stored [in, out]; qkvx (nn.Linear) wants [out, in].
GPT2_CONV1D = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def is_hf(path: Path) -> bool:
    """Any folder with config.json: read() then names an architecture it does not support."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read(path: Path) -> Checkpoint:
    cfg = _read_json(path / CONFIG_FILE)
    gpt2 = _family(cfg, path / CONFIG_FILE) == "gpt2"
    spec = _gpt2_spec(cfg, path) if gpt2 else _llama_spec(cfg, path)  # config errors before any I/O
    weights = load_weights(path)
    state, origin = _gpt2_state(weights, spec, path) if gpt2 else _llama_state(weights)
    if share_kv(state, spec.n_layer):
        spec = spec.replace(sharing="q-kv")  # same kv heads: Q-K=V, Q-GQA-g or Q-MQA
    check_state(spec, state, origin, path)
    return Checkpoint(spec=spec, state=state, format="hf", path=path)


def share_kv(state: dict[str, torch.Tensor], n_layer: int) -> bool:
    """If k_proj == v_proj (weight and bias, exactly) in EVERY layer, drop v_proj and return True.
    Equal in some layers only is a coincidence of training, not the architecture: keep both."""
    pairs = [
        (f"blocks.{i}.attn.k_proj.{s}", f"blocks.{i}.attn.v_proj.{s}")
        for i in range(n_layer)
        for s in ("weight", "bias")
    ]
    for k, v in pairs:
        if (k in state) != (v in state):
            return False
        if k.endswith("weight") and k not in state:
            return False  # build_model reports the missing tensor
        if k in state and not (state[k].shape == state[v].shape and torch.equal(state[k], state[v])):
            return False
    for _, v in pairs:
        state.pop(v, None)
    return True


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors | model.safetensors.index.json | pytorch_model.bin(.index.json)."""
    for name, reader in (("model.safetensors", read_safetensors), ("pytorch_model.bin", _read_bin)):
        if (path / name).is_file():
            return reader(path / name)
        index = path / f"{name}.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise QkvxError(f"{index}: expected an object with a 'weight_map'")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                file = (path / shard).resolve()
                if file.parent != path.resolve() or not file.is_file():
                    raise QkvxError(f"{index}: shard {shard!r} is not a file in {path}")
                state.update(reader(file))
            return state
    raise QkvxError(
        f"{path}: no weights (expected model.safetensors, model.safetensors.index.json "
        f"or pytorch_model.bin beside {CONFIG_FILE})"
    )


def _read_bin(file: Path) -> dict[str, torch.Tensor]:
    state = torch_load(file)  # weights_only=True
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QkvxError(f"{file}: expected a state dict (names -> tensors)")
    return state


def _gpt2_spec(cfg: dict[str, Any], path: Path) -> ModelSpec:
    from transformers import GPT2Config

    c = _config(GPT2Config, cfg, path)
    where = path / CONFIG_FILE
    for key, ok in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("add_cross_attention", False),
    ):
        if getattr(c, key) != ok:
            raise QkvxError(f"{where}: {key}={getattr(c, key)} is not supported (qkvx needs {ok})")
    act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(
        c.activation_function
    )
    if act is None:
        raise QkvxError(
            f"{where}: activation_function={c.activation_function!r} is not supported "
            f"(gelu_new, gelu_pytorch_tanh or gelu)"
        )
    # GPT-2 always has biases (Linear and LayerNorm); n_inner None means 4C (ModelSpec's default).
    return make_spec(
        where,
        n_layer=c.n_layer,
        n_embd=c.n_embd,
        n_head=c.n_head,
        vocab_size=c.vocab_size,
        max_positions=c.n_positions,
        n_inner=c.n_inner,
        norm_eps=float(c.layer_norm_epsilon),
        mlp=act,
        bias=True,
        tie_embeddings=bool(c.tie_word_embeddings),
        positions="learned",
        norm="layernorm",
        sharing="qkv",
    )


def _gpt2_state(weights: dict[str, torch.Tensor], spec: ModelSpec, path: Path):
    raw = strip_prefixes(weights, ("transformer.",), path)
    raw = {
        k: (v.t() if GPT2_CONV1D.match(k) and v.dim() == 2 else v)
        for k, v in raw.items()
        if not paper.MASK_BUFFER.match(k)
    }
    # Same names and fused c_attn [3C, C] (once transposed) as the paper's QKV variant.
    C = spec.n_embd
    return paper.to_qkvx(raw, spec.n_layer, paper.attention_layout("qkv", "c_attn", C, C), C, path)


def _llama_spec(cfg: dict[str, Any], path: Path) -> ModelSpec:
    from transformers import LlamaConfig

    c = _config(LlamaConfig, cfg, path)
    where = path / CONFIG_FILE
    if c.hidden_act != "silu":
        raise QkvxError(f"{where}: hidden_act={c.hidden_act!r} is not supported (qkvx's SwiGLU needs silu)")
    if c.rope_scaling is not None:
        raise QkvxError(
            f"{where}: rope_scaling={json.dumps(c.rope_scaling)} is not supported (plain RoPE only)"
        )
    if bool(c.attention_bias) != bool(getattr(c, "mlp_bias", False)):
        raise QkvxError(
            f"{where}: attention_bias={c.attention_bias} with mlp_bias={c.mlp_bias} is not "
            f"supported (qkvx has one bias flag for all projections)"
        )
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return make_spec(
        where,
        n_layer=c.num_hidden_layers,
        n_embd=c.hidden_size,
        n_head=c.num_attention_heads,
        n_kv_head=c.num_key_value_heads or c.num_attention_heads,
        head_dim=head_dim,
        vocab_size=c.vocab_size,
        max_positions=c.max_position_embeddings,
        n_inner=c.intermediate_size,
        positions="rope",
        rope_theta=float(c.rope_theta),
        norm="rmsnorm",
        norm_eps=float(c.rms_norm_eps),
        mlp="swiglu",
        bias=bool(c.attention_bias),
        tie_embeddings=bool(c.tie_word_embeddings),
        sharing="qkv",
    )


def _llama_state(weights: dict[str, torch.Tensor]):
    return rename({k: v for k, v in weights.items() if not LLAMA_BUFFER.search(k)}, LLAMA_RULES)


def _family(cfg: dict[str, Any], where: Path) -> str:
    archs = cfg.get("architectures") or []
    known = [FAMILIES[a] for a in archs if a in FAMILIES]
    if known:
        return known[0]
    if not archs and cfg.get("model_type") in ("gpt2", "llama"):
        return cfg["model_type"]
    what = ", ".join(map(str, archs)) or f"model_type {cfg.get('model_type')!r}"
    raise QkvxError(f"{where}: unsupported architecture {what} (qkvx reads {' and '.join(FAMILIES)})")


def _config(cls, cfg: dict[str, Any], path: Path):
    try:
        return cls.from_dict(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise QkvxError(f"{path / CONFIG_FILE}: invalid config ({str(e).splitlines()[0]})") from None


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QkvxError(f"{file}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise QkvxError(f"{file}: expected a JSON object")
    return data
