"""K=V weight surgery: the student's spec (`target_spec`), kv heads mean-pooled in groups
(`pool_heads`) and the student's weights from a paper init (`surgery`: avg, keep-k, keep-v).
qkvx.convert.fit starts from these; qkvx.convert.run writes the result."""

from __future__ import annotations

import torch

from qkvx.errors import QkvxError
from qkvx.spec import ModelSpec, canonical_variant

PAPER_INITS = ("avg", "keep-k", "keep-v")
DATA_INITS = ("fit",)
INITS = PAPER_INITS + DATA_INITS
TARGETS_HELP = "Q-K=V, Q-GQA-g or Q-MQA"


def target_spec(source: ModelSpec, to: str) -> ModelSpec:
    """The student's spec: the source's, with k = v and the target's kv head count."""
    if source.kv_shared:
        raise QkvxError(
            f"the source is already {source.paper_name}: its keys and values share one "
            f"projection, so there is nothing to convert"
        )
    try:
        wanted = ModelSpec.from_paper_name(
            to, n_layer=1, n_embd=source.n_head, n_head=source.n_head, vocab_size=1, max_positions=1
        )
    except QkvxError as e:
        raise QkvxError(f"--to {to!r}: {e}") from None
    if wanted.sharing != "q-kv":
        raise QkvxError(f"--to {canonical_variant(to)}: not a K=V target; use {TARGETS_HELP}")
    g_src, g_tgt = source.n_kv_head, wanted.n_kv_head
    if g_tgt > g_src or g_src % g_tgt:
        raise QkvxError(
            f"--to {canonical_variant(to)} needs {g_tgt} kv heads, but the source "
            f"({source.paper_name}) has {g_src}: a target's kv heads must divide the source's "
            f"(mean-pooled in groups); use Q-GQA-g with g dividing {g_src}, or Q-MQA"
        )
    return source.replace(sharing="q-kv", n_kv_head=g_tgt)


def pool_heads(t: torch.Tensor, g_src: int, g_tgt: int) -> torch.Tensor:
    """Rows of a kv projection (weight [g_src*D, C] or bias [g_src*D]) mean-pooled to g_tgt heads:
    target head j = mean of source heads j*r .. j*r + r - 1 (r = g_src / g_tgt)."""
    if g_src == g_tgt:
        return t.clone()
    r = g_src // g_tgt
    D = t.shape[0] // g_src
    return t.reshape(g_tgt, r, D, *t.shape[1:]).mean(dim=1).reshape(g_tgt * D, *t.shape[1:])


def surgery(
    state: dict[str, torch.Tensor], source: ModelSpec, target: ModelSpec, init: str
) -> dict[str, torch.Tensor]:
    """The student's state dict (qkvx names) for a paper init (avg | keep-k | keep-v): every tensor
    copied, the shared projection from the pooled K and V. `fit` starts from one of these."""
    if init not in PAPER_INITS:
        raise QkvxError(f"unknown init {init!r}; known: {', '.join(INITS)}")
    out = {k: v.clone() for k, v in state.items() if ".attn." not in k}
    for i in range(source.n_layer):
        a = f"blocks.{i}.attn."
        suffixes = ("weight", "bias") if source.bias else ("weight",)
        for s in suffixes:
            k = pool_heads(state[f"{a}k_proj.{s}"].float(), source.n_kv_head, target.n_kv_head)
            v = pool_heads(state[f"{a}v_proj.{s}"].float(), source.n_kv_head, target.n_kv_head)
            out[f"{a}k_proj.{s}"] = {"avg": (k + v) / 2, "keep-k": k, "keep-v": v}[init]
            # Q=K-V sources have no query projection: their queries are the keys.
            out[f"{a}q_proj.{s}"] = state[f"{a}{'q' if source.has_q_proj else 'k'}_proj.{s}"].clone()
            out[f"{a}o_proj.{s}"] = state[f"{a}o_proj.{s}"].clone()
    return out
