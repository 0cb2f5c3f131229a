"""What `qkvx bench` measures: model sizes, variants, backends, contexts (data, not code paths).

Every (size, variant, backend) is one configuration; each is measured in fresh processes. The
standard GPT-2 exported by optimum-onnx is the anchor: it exists only in the QKV form.
"""

from __future__ import annotations

from dataclasses import dataclass

# Same family (GPT-2 style: learned positions, LayerNorm, GELU-tanh, tied head) and vocabulary for
# both sizes, so the optimum anchor is the same architecture. max_positions = largest context.
COMMON = dict(vocab_size=256, max_positions=2048)
SIZES = {
    "20M": dict(n_layer=6, n_embd=512, n_head=8),  # 20.1M parameters
    "100M": dict(n_layer=14, n_embd=768, n_head=12),  # 101.0M parameters
}
VARIANTS = ("QKV", "Q-K=V", "MQA", "Q-MQA")
CONTEXTS = (256, 1024, 2048)
PREFILL_TOKENS = 512


@dataclass(frozen=True)
class Backend:
    recipe: str | None  # the qkvx recipe exported for it (None: eager, or optimum's own export)
    scheme: str  # weight storage, for the bytes read per token (qkvx.budget.WEIGHT_SCHEMES)
    format: str  # eager | pte | onnx
    artifact_of: str | None = None  # runs another backend's artifact, with other session options
    ort_optimize: bool = True  # onnxruntime graph optimizations (ORT_ENABLE_ALL, its default)
    io_binding: bool = False  # onnxruntime: presents stay OrtValues and are bound as the next past


BACKENDS = {
    "eager-kv": Backend(None, "fp32", "eager"),  # qkvx's decode form in eager: static cache, llama custom ops
    "eager-cat": Backend(
        None, "fp32", "eager"
    ),  # eager with a past/present cache in plain ops (torch.cat per step, as HF's eager generate)
    "pte-fp32": Backend("pte-fp32", "fp32", "pte"),
    "pte-8da4w": Backend("pte-8da4w", "int4", "pte"),  # the fastest quantized .pte recipe meeting its gates
    "onnx-fp32": Backend("onnx-fp32", "fp32", "onnx"),
    "onnx-int8": Backend("onnx-int8", "int8", "onnx"),
    "optimum-onnx": Backend(None, "fp32", "onnx"),  # optimum-onnx's export of the HF GPT2LMHeadModel (QKV)
    # What each onnxruntime step buys: optimizer off, then on (= onnx-fp32), then the fused
    # MultiHeadAttention graph, then IO binding on top. Measured on one model only (ABLATION_MODEL).
    "onnx-fp32-noopt": Backend(None, "fp32", "onnx", artifact_of="onnx-fp32", ort_optimize=False),
    "onnx-fp32-mha": Backend("onnx-fp32-mha", "fp32", "onnx"),
    "onnx-fp32-mha-iobind": Backend(None, "fp32", "onnx", artifact_of="onnx-fp32-mha", io_binding=True),
}
ABLATION = ("onnx-fp32-noopt", "onnx-fp32-mha", "onnx-fp32-mha-iobind")
ABLATION_MODEL = ("20M", "Q-K=V")
# Left out to keep `make bench` under 30 minutes: the quantized exports of the 100M model take
# ~3.5 min (.pte 8da4w: lowering the quantized graph) and ~1 min (ONNX int8) each, so at 100M the
# quantized backends are measured for the two forms the paper compares head to head only.
SKIP = {("100M", v, b) for v in ("MQA", "Q-MQA") for b in ("pte-8da4w", "onnx-int8")}
SKIP |= {
    (s, v, "eager-cat") for s in SIZES for v in ("MQA", "Q-MQA")
}  # a second eager baseline: QKV vs Q-K=V only


@dataclass(frozen=True)
class Config:
    size: str
    variant: str
    backend: str

    @property
    def key(self) -> str:
        return f"{self.size}/{self.variant}/{self.backend}"


def configs(sizes=tuple(SIZES), variants=VARIANTS, backends=tuple(BACKENDS)) -> list[Config]:
    """Every configuration but SKIP; the optimum anchor only as QKV (it has no shared form), the
    onnxruntime ablation only on ABLATION_MODEL."""
    return [
        Config(s, v, b)
        for s in sizes
        for v in variants
        for b in backends
        if (b != "optimum-onnx" or v == "QKV")
        and (s, v, b) not in SKIP
        and (b not in ABLATION or (s, v) == ABLATION_MODEL)
    ]


def spec_for(size: str, variant: str):
    from qkvx.spec import ModelSpec

    return ModelSpec.from_paper_name(variant, **SIZES[size], **COMMON)
