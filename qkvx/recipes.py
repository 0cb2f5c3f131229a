"""Export recipes (export_recipes/*.yaml): small validated dataclasses; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qkvx.config import resolve_named_file
from qkvx.config import typed as _typed
from qkvx.errors import QkvxError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "export_recipes"
FORMATS = {"pte": ("xnnpack",), "onnx": ("cpu",)}
# Weight schemes per format: ExecuTorch uses torchao (8-bit dynamic activations with int4 groups or
# int8 channels); ONNX uses onnxruntime's dynamic int8 (optimum ORTQuantizer) and MatMulNBits int4.
WEIGHTS = {"pte": ("none", "8da4w", "8da8w"), "onnx": ("none", "int8", "int4")}
KV_CACHE = ("fp32", "fp16", "int8")
# How each format's artifact attends; the first is the default. pte: qkvx's kernels (qkvx.kernels),
# or ExecuTorch's LLM custom ops (llama::custom_sdpa) for apps that link only those. onnx: plain
# ONNX ops; mha:
# onnxruntime's MultiHeadAttention reading the one K=V cache as key and value; rotary: mha, and a
# RoPE K=V layer's keys rotated by onnxruntime's RotaryEmbedding; custom: qkvx.CachedAttention,
# qkvx's onnxruntime op (append and attend in one pass, keys rotated as they are read).
ATTENTION = {"pte": ("qkvx", "llama"), "onnx": ("plain", "mha", "rotary", "custom")}
INT8_PRESETS = ("arm64", "avx2", "avx512_vnni")


@dataclass(frozen=True)
class Gates:
    """Parity gates. fp32 artifacts: max |dlogit| <= max_rel_dlogit * max|logit| + abs_dlogit_floor.
    Quantized ones: the mean KL divergence (reference || artifact) per position and its 99th
    percentile (llama.cpp's KLD evaluation), and on text the perplexity change. Both: top-1
    agreement >= min_top1, counted only where the reference's top-2 margin exceeds the near-tie
    margin (a logit error within the noise can flip a near tie; those positions are reported)."""

    max_rel_dlogit: float | None = 1e-4  # None: no logit gate (quantized artifacts)
    abs_dlogit_floor: float = 1e-5
    min_top1: float = 1.0
    max_ppl_change: float | None = None  # relative, e.g. 0.03 = 3 %
    top1_margin: float | None = None  # near-tie margin in nats (logit units); None: twice the logit bound
    max_kl: float | None = None  # mean KL(reference || artifact) per position, nats
    max_kl_p99: float | None = None  # its 99th percentile over positions

    def __post_init__(self) -> None:
        for name in ("max_rel_dlogit", "max_ppl_change", "top1_margin", "max_kl", "max_kl_p99"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise QkvxError(f"gates.{name} must be >= 0, got {value!r}")
        if not 0 <= self.min_top1 <= 1:
            raise QkvxError(f"gates.min_top1 must be between 0 and 1, got {self.min_top1!r}")

    def bound(self, max_abs_logit: float) -> float:
        if self.max_rel_dlogit is None:
            return math.inf
        return self.max_rel_dlogit * max_abs_logit + self.abs_dlogit_floor

    def tie_margin(self, max_abs_logit: float) -> float:
        """A top-2 margin at or below this is a near tie: an error within the recipe's noise flips it.
        Quantized recipes state it in nats (the reference prefers its top-1 by at most e^margin),
        set from the noise their quantization puts on the top-2 gap of trained models; fp32 ones
        use twice their logit bound (rounding grows with the logits' magnitude)."""
        if self.top1_margin is not None:
            return self.top1_margin
        return 2 * self.bound(max_abs_logit) if self.max_rel_dlogit is not None else 0.0


@dataclass(frozen=True)
class Recipe:
    name: str
    format: str  # pte | onnx
    backend: str
    weights: str = "none"
    group_size: int = 32  # int4 group / block size (8da4w, onnx int4)
    accuracy_level: int | None = 4  # onnx int4: MatMulNBits accuracy_level (4 = int8 compute)
    int8_preset: str | None = None  # onnx int8: optimum preset; None = from the device, else the host
    quantize_lm_head: bool = False  # the (often tied) output projection, quantized or kept fp32
    kv_cache: str = "fp32"  # fp32 | fp16 | int8 (symmetric, one scale per token and kv head)
    attention: str | None = None  # how the artifact attends (ATTENTION); None: the format's first
    max_seq_len: int | None = None  # None: the model's max_positions
    prefill_chunk: int = 64
    gates: Gates = field(default_factory=Gates)
    description: str = ""

    def __post_init__(self) -> None:
        src = f"recipe {self.name!r}"
        if self.format not in FORMATS:
            raise QkvxError(f"{src}: format {self.format!r} unknown; known: {', '.join(FORMATS)}")
        if self.backend not in FORMATS[self.format]:
            raise QkvxError(
                f"{src}: backend {self.backend!r} not available for {self.format}; "
                f"known: {', '.join(FORMATS[self.format])}"
            )
        if self.weights not in WEIGHTS[self.format]:
            raise QkvxError(
                f"{src}: weights {self.weights!r} not available for {self.format}; "
                f"known: {', '.join(WEIGHTS[self.format])}"
            )
        if self.int8_preset is not None and self.int8_preset not in INT8_PRESETS:
            raise QkvxError(
                f"{src}: int8_preset {self.int8_preset!r} unknown; known: {', '.join(INT8_PRESETS)}"
            )
        if self.group_size < 1 or self.group_size & (self.group_size - 1):
            raise QkvxError(f"{src}: group_size must be a power of two, got {self.group_size}")
        if self.kv_cache not in KV_CACHE:
            raise QkvxError(f"{src}: kv_cache {self.kv_cache!r} unknown; known: {', '.join(KV_CACHE)}")
        if self.attention is not None and self.attention not in ATTENTION[self.format]:
            raise QkvxError(
                f"{src}: attention {self.attention!r} not available for {self.format}; "
                f"known: {', '.join(ATTENTION[self.format])}"
            )
        if self.kv_cache == "fp16" and (self.format, self.attention_kind) != ("pte", "qkvx"):
            raise QkvxError(
                f"{src}: an fp16 cache needs qkvx's ExecuTorch kernels (format pte, attention qkvx)"
            )
        if self.attention in ("rotary", "custom") and (self.kv_cache != "fp32" or self.weights != "none"):
            raise QkvxError(f"{src}: attention {self.attention!r} is built for fp32 weights and cache only")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise QkvxError(f"{src}: max_seq_len must be >= 1, got {self.max_seq_len}")
        if self.prefill_chunk < 2:
            raise QkvxError(f"{src}: prefill_chunk must be >= 2, got {self.prefill_chunk}")

    @property
    def attention_kind(self) -> str:
        return self.attention or ATTENTION[self.format][0]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (export_recipes/NAME.yaml) or by path to a YAML file."""
    path = resolve_named_file(name_or_path, RECIPE_DIR, (".yaml", ".yml"), "recipe", "recipe file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise QkvxError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return _typed(Recipe, data, str(path))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
