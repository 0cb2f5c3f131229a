"""ModelSpec: the one description of an architecture, and the cache arithmetic.

Every stage (load, decode form, export, budget, tests) reads a ModelSpec; nothing re-derives the
architecture from weights twice. This module needs no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from qkvx.errors import QkvxError

SHARINGS = ("qkv", "qk-v", "q-kv", "q=k=v")
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "swiglu")

# Bytes per element of a cache dtype. int8 caches also store one fp32 scale per (token, kv head,
# cache tensor): symmetric quantization needs no zero point. (ExecuTorch's int8 attention kernel
# insists on zero-point tensors anyway: the .pte carries ONE all-zero int8 constant of max_seq_len x
# kv_heads bytes shared by every layer - not cache state, reported as PtePlan.zero_point_bytes.)
CACHE_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
INT8_SCALE_BYTES = 4

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's two scales (GPT-2 style: learned positions, LayerNorm, GELU, biases, tied).
    "paper-300m": dict(
        n_layer=20, n_embd=1024, n_head=16, n_inner=4096, max_positions=2048, vocab_size=50304
    ),
    "paper-1.2b": dict(
        n_layer=22, n_embd=2048, n_head=32, n_inner=8192, max_positions=2048, vocab_size=50304
    ),
}
# Model families: the spec fields that make one (everything else is a size or a choice such as tied
# embeddings). GPT: the paper's GPT-2 semantics; Llama: RoPE, RMSNorm, SwiGLU with an inner width of
# ~8/3 C (rounded up to a multiple of 32, so the MLP costs what GELU's 4 C does), no biases.
FAMILIES: dict[str, dict[str, Any]] = {
    "gpt": dict(positions="learned", norm="layernorm", mlp="gelu", bias=True),
    "llama": dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False),
}
BYTE_VOCAB = 256  # qkvx-trained models: a token is a byte
# Group count used for "GQA" / "Q-GQA" without an explicit -g suffix.
DEFAULT_GQA_GROUPS = 4

_PAPER_NAME = re.compile(r"^(Q-)?(GQA|MQA)(?:-(\d+))?$")


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer with possibly shared attention projections.

    sharing: "qkv" (Wq, Wk, Wv), "qk-v" (q = k, Wv), "q-kv" (Wq, k = v), "q=k=v" (one projection).
    n_kv_head: heads of the key/value projection; query head h reads kv head h // (n_head // n_kv_head).
    """

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    max_positions: int
    n_kv_head: int | None = None  # defaults to n_head
    head_dim: int | None = None  # defaults to n_embd // n_head
    sharing: str = "qkv"
    positions: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    n_inner: int | None = None  # defaults to 4 * n_embd
    bias: bool = True  # every Linear's bias (and the norms', unless norm_bias says otherwise)
    tie_embeddings: bool = True
    norm_bias: bool | None = None  # LayerNorm bias; defaults to `bias`. The paper's release keeps
    # nn.LayerNorm's bias even with use_bias=False, so a loader sets it apart.

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        for name in ("n_layer", "n_embd", "n_head", "vocab_size", "max_positions"):
            _positive_int(name, getattr(self, name))
        if self.n_kv_head is None:
            set_("n_kv_head", self.n_head)
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise QkvxError(f"ModelSpec.n_head: {self.n_head} heads do not divide n_embd={self.n_embd}")
            set_("head_dim", self.n_embd // self.n_head)
        if self.n_inner is None:
            set_("n_inner", 4 * self.n_embd)
        if self.norm_bias is None:
            set_("norm_bias", self.bias)
        for name in ("n_kv_head", "head_dim", "n_inner"):
            _positive_int(name, getattr(self, name))
        if self.n_head % self.n_kv_head:
            raise QkvxError(
                f"ModelSpec.n_kv_head: {self.n_kv_head} kv heads do not divide n_head={self.n_head}"
            )
        _choice("sharing", self.sharing, SHARINGS)
        _choice("positions", self.positions, POSITIONS)
        _choice("norm", self.norm, NORMS)
        _choice("mlp", self.mlp, MLPS)
        if self.sharing in ("qk-v", "q=k=v") and self.n_kv_head != self.n_head:
            raise QkvxError(
                f"ModelSpec.n_kv_head: sharing {self.sharing!r} makes q = k, so it needs "
                f"n_kv_head == n_head ({self.n_head}), got {self.n_kv_head}"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise QkvxError(
                f"ModelSpec.head_dim: rotary positions need an even head_dim, got {self.head_dim}"
            )
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            raise QkvxError("ModelSpec.norm_eps / rope_theta: must be positive")

    # ---- projection sharing -------------------------------------------------------------------
    @property
    def kv_shared(self) -> bool:
        """k = v: one projection and ONE cache tensor per layer."""
        return self.sharing in ("q-kv", "q=k=v")

    @property
    def has_q_proj(self) -> bool:
        return self.sharing in ("qkv", "q-kv")

    @property
    def has_v_proj(self) -> bool:
        return self.sharing in ("qkv", "qk-v")

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    # ---- names ---------------------------------------------------------------------------------
    @property
    def paper_name(self) -> str:
        if self.sharing == "qk-v":
            return "Q=K-V"
        if self.sharing == "q=k=v":
            return "Q=K=V"
        prefix = "Q-" if self.sharing == "q-kv" else ""
        if self.n_kv_head == self.n_head:
            return "Q-K=V" if prefix else "QKV"
        if self.n_kv_head == 1:
            return prefix + "MQA"
        return f"{prefix}GQA-{self.n_kv_head}"

    @property
    def byte_level(self) -> bool:
        """A byte-level model (qkvx's trainer): its tokens are UTF-8 bytes, its text the pydoc corpus."""
        return self.vocab_size == BYTE_VOCAB

    @property
    def family(self) -> str | None:
        """The FAMILIES entry whose fields this spec has, else None (a mix, e.g. GPT-2's tanh GELU)."""
        return next(
            (
                name
                for name, fields in FAMILIES.items()
                if all(getattr(self, k) == v for k, v in fields.items())
            ),
            None,
        )

    @classmethod
    def for_family(cls, family: str, variant: str, **fields: Any) -> "ModelSpec":
        """A `variant` spec of `family` (FAMILIES) with the given sizes; Llama's n_inner defaults to
        ~8/3 n_embd. Fields given override the family's."""
        if family not in FAMILIES:
            raise QkvxError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
        base = dict(FAMILIES[family])
        if family == "llama" and "n_inner" not in fields and "n_embd" in fields:
            base["n_inner"] = 32 * math.ceil(8 * fields["n_embd"] / 3 / 32)
        return cls.from_paper_name(variant, **{**base, **fields})

    @classmethod
    def from_paper_name(cls, name: str, preset: str | None = None, **overrides: Any) -> "ModelSpec":
        """Build a spec from a paper variant name (QKV, Q=K-V, Q-K=V, Q=K=V, GQA-g, MQA, Q-GQA-g,
        Q-MQA, in any spelling canonical_variant accepts) and a preset (paper-300m, paper-1.2b) or
        explicit fields."""
        if preset is not None and preset not in PRESETS:
            raise QkvxError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        fields = dict(PRESETS[preset]) if preset else {}
        fields.update(overrides)
        n_head = fields.get("n_head")
        if n_head is None:
            raise QkvxError("ModelSpec.n_head: needed to build a spec from a paper name")
        fields.update(_sharing_from_paper_name(name, n_head))
        return cls(**fields)

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "spec") -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QkvxError(f"{source}: unknown ModelSpec key(s) {', '.join(unknown)}")
        missing = sorted(
            f.name for f in dataclasses.fields(cls) if f.name not in data and f.default is dataclasses.MISSING
        )
        if missing:
            raise QkvxError(f"{source}: missing ModelSpec key(s) {', '.join(missing)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    # ---- size ----------------------------------------------------------------------------------
    def param_count(self) -> int:
        """Parameters as stored (tied embeddings counted once)."""
        C = self.n_embd
        b = 1 if self.bias else 0
        proj_out = (
            (self.q_dim if self.has_q_proj else 0) + self.kv_dim + (self.kv_dim if self.has_v_proj else 0)
        )
        attn = proj_out * (C + b) + (self.q_dim + b) * C
        n_mlp_in = 2 if self.mlp == "swiglu" else 1
        mlp = n_mlp_in * self.n_inner * (C + b) + (self.n_inner + b) * C
        norm = C * (2 if self.norm == "layernorm" and self.norm_bias else 1)
        per_layer = attn + mlp + 2 * norm
        emb = self.vocab_size * C + (self.max_positions * C if self.positions == "learned" else 0)
        head = 0 if self.tie_embeddings else self.vocab_size * C
        return self.n_layer * per_layer + emb + norm + head


@dataclass(frozen=True)
class CacheLayout:
    """What the KV cache of a spec holds, for one dtype. The one place of cache arithmetic."""

    tensors_per_layer: int  # 1 where k = v, else 2
    names: tuple[str, ...]  # ("kv",) or ("key", "value")
    n_layer: int
    kv_heads: int
    head_dim: int
    dtype: str
    element_bytes: int
    scale_bytes_per_head: int  # per token, per kv head, per tensor (0 unless int8)
    bytes_per_token: int = field(init=False)

    def __post_init__(self) -> None:
        per_tensor = self.kv_heads * (self.head_dim * self.element_bytes + self.scale_bytes_per_head)
        object.__setattr__(self, "bytes_per_token", self.n_layer * self.tensors_per_layer * per_tensor)

    def bytes_at(self, context: int) -> int:
        if context < 0:
            raise QkvxError(f"context must be >= 0, got {context}")
        return self.bytes_per_token * context

    def to_dict(self, context: int | None = None) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["names"] = list(self.names)
        if context is not None:
            d["context"] = context
            d["bytes_at_context"] = self.bytes_at(context)
        return d


def cache_layout(spec: ModelSpec, dtype: str = "fp32") -> CacheLayout:
    """Cache tensors per layer and bytes per token for `dtype` (fp32 | fp16 | bf16 | int8)."""
    if dtype not in CACHE_DTYPE_BYTES:
        raise QkvxError(f"unknown cache dtype {dtype!r}; known: {', '.join(CACHE_DTYPE_BYTES)}")
    n = 1 if spec.kv_shared else 2
    return CacheLayout(
        tensors_per_layer=n,
        names=("kv",) if n == 1 else ("key", "value"),
        n_layer=spec.n_layer,
        kv_heads=spec.n_kv_head,
        head_dim=spec.head_dim,
        dtype=dtype,
        element_bytes=CACHE_DTYPE_BYTES[dtype],
        scale_bytes_per_head=INT8_SCALE_BYTES if dtype == "int8" else 0,
    )


def canonical_variant(name: str) -> str:
    """A variant name as qkvx writes it. The paper's release also writes Q-K=V as "Q!=K=V" or
    "Q≠K=V" (q differs from k, k equals v) and uses en dashes ("Q–K=V"); case is free."""
    text = str(name).strip().upper().replace("–", "-").replace("—", "-").replace("−", "-")
    return {"Q!=K=V": "Q-K=V", "Q≠K=V": "Q-K=V"}.get(text, text)


def _sharing_from_paper_name(name: str, n_head: int) -> dict[str, Any]:
    name = canonical_variant(name)
    simple = {
        "QKV": ("qkv", n_head),
        "Q=K-V": ("qk-v", n_head),
        "Q-K=V": ("q-kv", n_head),
        "Q=K=V": ("q=k=v", n_head),
    }
    if name in simple:
        sharing, kv = simple[name]
        return {"sharing": sharing, "n_kv_head": kv}
    m = _PAPER_NAME.match(name)
    if not m:
        raise QkvxError(
            f"unknown variant {name!r}; known: {', '.join(PAPER_NAMES)} (GQA-g / Q-GQA-g for any g)"
        )
    shared, kind, groups = m.groups()
    if kind == "MQA":
        if groups:
            raise QkvxError(f"unknown variant {name!r}: MQA takes no group count (use GQA-{groups})")
        kv = 1
    else:
        kv = int(groups) if groups else DEFAULT_GQA_GROUPS
    if kv < 1 or n_head % kv:
        raise QkvxError(f"variant {name!r}: {kv} kv groups do not divide n_head={n_head}")
    return {"sharing": "q-kv" if shared else "qkv", "n_kv_head": kv}


PAPER_NAMES = ("QKV", "Q=K-V", "Q-K=V", "Q=K=V", "GQA-g", "MQA", "Q-GQA-g", "Q-MQA")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise QkvxError(f"ModelSpec.{name}: must be a positive integer, got {value!r}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise QkvxError(f"ModelSpec.{name}: unknown value {value!r}; allowed: {', '.join(allowed)}")
