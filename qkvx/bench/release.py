"""Checkpoints exactly as the paper's released training scripts write them, with random weights:
what tests and benchmarks feed the loader, so they meet the real format, not a guess of it.

The release (Brainchip-Inc/Do-Transformers-Need-3-Projections, one training script per variant and
scale) builds a GPT-2 style model, wraps it in DistributedDataParallel and saves
  training:  {step, epoch, tokens_seen, model_state_dict, optimizer_state_dict, model_config, train_config}
  final:     {step, epoch, tokens_seen, model_state_dict, val_metrics, model_config, train_config}
model_state_dict is the DDP module's (every key starts with `module.`), and holds each attention's
causal-mask buffer `bias` [1, 1, P, P]; a tied head is a lambda over wte, so no lm_head key.
model_config / train_config are asdict() of its dataclasses, fields in their order; only the
GQA / MQA / Q-GQA / Q-MQA scripts have n_kv_groups. The optimizer is torch.optim.AdamW over
model.parameters() (one group), its state after real steps: two fp32 moments per parameter.
The module tree below mirrors the release's names and registration order (state-dict order).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkvx.spec import ModelSpec, canonical_variant
from qkvx.util import variant_slug

# variant -> attention Linear layers in the release's order: (name, rows in units of C, or of the
# kv width G = g * D when the second element is "G", with the multiplier)
ATTENTION = {
    "QKV": [("c_attn", "C", 3)],
    "Q=K-V": [("c_kv", "C", 2)],
    "Q-K=V": [("c_q", "C", 1), ("c_k", "C", 1)],
    "Q=K=V": [("c_k", "C", 1)],
    "GQA": [("c_q", "C", 1), ("c_kv", "G", 2)],
    "MQA": [("c_q", "C", 1), ("c_kv", "G", 2)],
    "Q-GQA": [("c_q", "C", 1), ("c_k", "G", 1)],
    "Q-MQA": [("c_q", "C", 1), ("c_kv", "G", 1)],
}
GROUPED = ("GQA", "MQA", "Q-GQA", "Q-MQA")  # the scripts whose ModelConfig has n_kv_groups

# asdict(TrainingConfig) of the 300M and 1.2B scripts (output_dir / clearml_task name the variant).
_TRAIN_300M = dict(
    train_data_path="./slimpajama_train",
    val_data_path="./slimpajama_validation",
    total_tokens=10_000_000_000,
    micro_batch_size=6,
    gradient_accumulation=24,
    num_workers=16,
    prefetch_factor=6,
    learning_rate=2e-4,
    min_lr=2e-5,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,
    warmup_steps=500,
    lr_scheduler="cosine",
    save_interval=1000,
    eval_interval=200,
    log_interval=10,
    eval_tokens=10_000_000,
    seed=42,
    output_dir="./outputs_{slug}",
    clearml_project="GPT-QKV-Comparison",
    clearml_task="GPT-300M-{name}-10B",
)
TRAIN_CONFIG = {  # the 1.2B scripts change these fields, and keep the order
    "300m": _TRAIN_300M,
    "1.2b": {
        **_TRAIN_300M,
        "train_data_path": "./slimpajama_data/train",
        "micro_batch_size": 2,
        "gradient_accumulation": 36,
        "num_workers": 12,
        "learning_rate": 6e-5,
        "min_lr": 6e-6,
        "warmup_steps": 1000,
        "eval_interval": 500,
        "output_dir": "./outputs_1.2B_{slug}",
        "clearml_task": "GPT-1.2B-{name}-10B",
    },
}


def _family(variant: str) -> str:
    name = canonical_variant(variant)
    return name.rsplit("-", 1)[0] if name.startswith(("GQA-", "Q-GQA-")) else name


class _Attention(nn.Module):
    def __init__(self, family: str, C: int, G: int, P: int, use_bias: bool):
        super().__init__()
        for name, unit, mult in ATTENTION[family]:
            setattr(self, name, nn.Linear(C, mult * (C if unit == "C" else G), bias=use_bias))
        self.c_proj = nn.Linear(C, C, bias=use_bias)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.0), nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(P, P)).view(1, 1, P, P))


class _Block(nn.Module):
    def __init__(self, family: str, C: int, G: int, P: int, inner: int, eps: float, use_bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(C, eps=eps)  # the release's LayerNorms always have a bias
        self.attn = _Attention(family, C, G, P, use_bias)
        self.ln_2 = nn.LayerNorm(C, eps=eps)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(C, inner, bias=use_bias)
        self.mlp.c_proj = nn.Linear(inner, C, bias=use_bias)
        self.mlp.act, self.mlp.dropout = nn.GELU(), nn.Dropout(0.1)


class ReleaseGPT(nn.Module):
    """The release's module tree (wte, wpe, drop, h.{i}, ln_f[, lm_head]) with its init: N(0, 0.02)
    Linear and Embedding weights, zero biases, unit LayerNorm gains. Weights only; no forward."""

    def __init__(self, cfg: dict[str, Any], family: str):
        super().__init__()
        C, P = cfg["n_embd"], cfg["n_positions"]
        G = cfg.get("n_kv_groups", cfg["n_head"]) * (C // cfg["n_head"])
        self.wte = nn.Embedding(cfg["vocab_size"], C)
        self.wpe = nn.Embedding(P, C)
        self.drop = nn.Dropout(cfg["embd_pdrop"])
        self.h = nn.ModuleList(
            _Block(family, C, G, P, cfg["n_inner"], cfg["layer_norm_epsilon"], cfg["use_bias"])
            for _ in range(cfg["n_layer"])
        )
        self.ln_f = nn.LayerNorm(C, eps=cfg["layer_norm_epsilon"])
        if not cfg["tie_word_embeddings"]:
            self.lm_head = nn.Linear(C, cfg["vocab_size"], bias=False)


class DDP(nn.Module):
    """What torch.nn.parallel.DistributedDataParallel adds to a state dict: the `module.` prefix."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def model_config(
    variant: str,
    *,
    vocab_size: int = 50304,
    n_positions: int = 2048,
    n_layer: int = 20,
    n_embd: int = 1024,
    n_head: int = 16,
    n_inner: int = 4096,
    use_bias: bool = True,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.02,
) -> dict[str, Any]:
    """asdict(ModelConfig) of the variant's script, fields in its order."""
    family = _family(variant)
    spec = ModelSpec.from_paper_name(
        variant,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab_size,
        max_positions=n_positions,
    )
    cfg: dict[str, Any] = dict(
        vocab_size=vocab_size, n_positions=n_positions, n_layer=n_layer, n_embd=n_embd, n_head=n_head
    )
    if family in GROUPED:
        cfg["n_kv_groups"] = spec.n_kv_head
    cfg.update(
        n_inner=n_inner,
        embd_pdrop=0.0,
        resid_pdrop=0.1,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        initializer_range=initializer_range,
        use_bias=use_bias,
        tie_word_embeddings=tie_word_embeddings,
        use_flash_attention=True,
    )
    return cfg


def train_config(variant: str, scale: str = "300m") -> dict[str, Any]:
    name = canonical_variant(variant)
    return {
        k: v.format(slug=variant_slug(name), name=name) if isinstance(v, str) else v
        for k, v in TRAIN_CONFIG[scale].items()
    }


def build(cfg: dict[str, Any], variant: str, seed: int = 0, drift: float = 0.0) -> ReleaseGPT:
    """The release's model for `cfg` with its initialization (seeded), in fp32. drift > 0 adds
    N(0, drift) to every parameter, biases and LayerNorm gains included, as training would: tests
    need non-zero biases to see that each one lands where it belongs."""
    gen = torch.Generator().manual_seed(seed)
    model = ReleaseGPT(cfg, _family(variant))
    std = cfg["initializer_range"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in f".{name}":
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            if drift:
                p.add_(torch.randn(p.shape, generator=gen) * drift)
    return model


def adamw_state(model: nn.Module, train_cfg: dict[str, Any], steps: int = 1, seed: int = 0) -> dict[str, Any]:
    """torch.optim.AdamW(model.parameters(), lr, betas, weight_decay).state_dict() after `steps` steps
    on random gradients. AdamW's state is per parameter, so it is stepped one parameter at a time
    (at most one gradient alive: a 1.2B model's state fits beside its weights) and assembled into
    the one-group state dict a single optimizer writes; tests check that the two are equal."""
    gen = torch.Generator().manual_seed(seed)
    hyper = dict(
        lr=train_cfg["learning_rate"],
        betas=(train_cfg["beta1"], train_cfg["beta2"]),
        weight_decay=train_cfg["weight_decay"],
    )
    params = list(model.parameters())
    state: dict[int, Any] = {}
    group: dict[str, Any] = {}
    for i, p in enumerate(params):
        opt = torch.optim.AdamW([p], **hyper)
        for _ in range(steps):
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            opt.step()
        p.grad = None
        sd = opt.state_dict()
        state[i] = sd["state"][0]
        group = sd["param_groups"][0]
    return {"state": state, "param_groups": [{**group, "params": list(range(len(params)))}]}


def write_checkpoint(
    path: str | os.PathLike,
    variant: str,
    *,
    kind: str = "training",
    scale: str = "300m",
    seed: int = 0,
    step: int = 7000,
    drift: float = 0.0,
    **dims: Any,
) -> Path:
    """Write `variant` with random weights as the release's training checkpoint (kind="training":
    checkpoint_step_N.pt with the AdamW state) or its final one (kind="final": final_model.pt with
    val_metrics). dims override model_config fields (default: the paper-300m shape)."""
    cfg = model_config(variant, **dims)
    tcfg = train_config(variant, scale)
    model = build(cfg, variant, seed, drift)
    tokens_per_step = tcfg["micro_batch_size"] * cfg["n_positions"] * tcfg["gradient_accumulation"] * 8
    ckpt: dict[str, Any] = {
        "step": step,
        "epoch": 0,
        "tokens_seen": step * tokens_per_step,
        "model_state_dict": DDP(model).state_dict(),
    }
    if kind == "training":
        ckpt["optimizer_state_dict"] = adamw_state(model, tcfg, seed=seed)
    elif kind == "final":
        loss = math.log(21.28)  # the published 300M Q-K=V checkpoint's validation perplexity
        ckpt["val_metrics"] = {"loss": loss, "perplexity": math.exp(loss), "bpc": loss / math.log(2)}
    else:
        raise ValueError(f"kind must be training or final, got {kind!r}")
    ckpt["model_config"], ckpt["train_config"] = cfg, tcfg
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path
