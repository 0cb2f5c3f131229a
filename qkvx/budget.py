"""Memory-budget reports: for (model, weights/cache dtypes, device, context) the bytes an
app needs, whether it fits the device's app budget, the longest context that fits, and the decode
speed ceiling the device's memory bandwidth allows. Reads specs, profiles and artifacts; builds nothing.

Memory model (peak resident bytes; checked against measured peak RSS by qkvx.budget_measure):
  total(ctx) = weights + kv_cache(ctx) + activations(ctx) + runtime
  weights     artifact file size when an export is given; else parameters x bytes per weight
  kv_cache    cache_layout(spec, cache dtype).bytes_at(ctx)   (scales included); a .pte holds the
              cache buffers of its memory plan, sized for its max_seq_len whatever the context
  activations decode-time working set for one prefill chunk of T tokens (see activation_bytes), or
              a .pte's memory plan; onnxruntime adds its attention scores and the present copy of the cache
  runtime     the backend itself (code, session) plus the extra copies of the weights it keeps
              (BackendMemory: measured; a device app and this host's Python process differ)
Decode ceiling: every weight and every cached byte is read once per token, so
  tokens/s <= bandwidth / (weights + kv_cache(ctx)).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qkvx.errors import QkvxError
from qkvx.spec import ModelSpec, cache_layout

# Bytes per weight of the Linear layers by weight scheme (scales included: int8 per output channel,
# int4 groups of 32 with an fp32 scale each). Embeddings stay fp32 unless the scheme says fp16.
WEIGHT_SCHEMES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 32}
MiB = 2**20


@dataclass(frozen=True)
class BackendMemory:
    """How one runtime holds a model, beyond the model's own tensors (all measured: see below)."""

    base_bytes: int  # the process with the runtime loaded, before any model
    session_bytes: int  # added by loading and running any model: code paged in, session state
    extra_weight_copies: (
        float  # resident bytes beyond one copy, per byte of packable (Linear) weight, at peak
    )
    cache_copies: int = 1  # caches alive during a call (onnxruntime: past inputs + present outputs)
    score_copies: int = 0  # [n_head, chunk, context] fp32 tensors alive at once (0: fused SDPA)


# The runtimes' own terms, measured on this repo's host (x86-64 builds; how, and the numbers behind
# each constant: README, "Memory budget" / "the runtime terms"). `qkvx budget EXPORT --measure`
# re-checks them on any machine. HOST_PYTHON: a Python process driving the pybindings (what
# --measure runs); DEVICE_APP: a C++ app that maps the artifact and links only the runtime.
HOST_PYTHON_BACKENDS = {
    "pte": BackendMemory(int(367.4 * MiB), int(3.6 * MiB), 0.05),
    "onnx": BackendMemory(int(251.4 * MiB), int(11.1 * MiB), 0.25, cache_copies=2, score_copies=5),
}
DEVICE_BACKENDS = {
    "pte": BackendMemory(5 * MiB, 1 * MiB, 0.05),
    "onnx": BackendMemory(21 * MiB, 1 * MiB, 0.25, cache_copies=2, score_copies=5),
}
# A device runtime's own bytes, before the weight copies it makes (the first version's table).
RUNTIME_BYTES = {k: b.base_bytes + b.session_bytes for k, b in DEVICE_BACKENDS.items()}
MAX_CONTEXT_SEARCH = 2**24
COMPARE_VARIANTS = ("QKV", "Q-K=V", "GQA-4", "MQA", "Q-GQA-4", "Q-MQA")


@dataclass
class BudgetRow:
    variant: str
    device: str
    context: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    runtime_bytes: int
    total_bytes: int
    budget_bytes: int
    fits: bool
    max_context: int  # longest context that fits the budget, at most the model's max positions
    max_context_memory: int  # longest context the memory alone allows (positions ignored), <= 2**24
    bytes_read_per_token: int
    decode_tokens_per_s_ceiling: float
    weights_source: str  # "artifact" | "estimate"
    activation_source: str  # "pte plan" | "estimate"
    weight_copies_bytes: int = 0  # the part of runtime_bytes that is the runtime's extra weight copies

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weight_bytes(spec: ModelSpec, scheme: str = "fp32") -> int:
    """Stored weight bytes: Linear weights at the scheme's bytes per weight, the rest fp32."""
    if scheme not in WEIGHT_SCHEMES:
        raise QkvxError(f"unknown weight scheme {scheme!r}; known: {', '.join(WEIGHT_SCHEMES)}")
    C = spec.n_embd
    embed = spec.vocab_size * C + (spec.max_positions * C if spec.positions == "learned" else 0)
    head = 0 if spec.tie_embeddings else spec.vocab_size * C
    linear = spec.param_count() - embed - head  # includes norms and biases: small, counted as linear
    emb_bytes = 2.0 if scheme == "fp16" else 4.0
    return int(linear * WEIGHT_SCHEMES[scheme] + (embed + head) * emb_bytes)


def lookup_table_bytes(spec: ModelSpec, scheme: str = "fp32") -> int:
    """Tables only ever gathered from (learned positions; the token embedding unless the head is tied
    to it): no runtime packs them, so they are resident once."""
    C = spec.n_embd
    n = (spec.max_positions * C if spec.positions == "learned" else 0) + (
        0 if spec.tie_embeddings else spec.vocab_size * C
    )
    return n * (2 if scheme == "fp16" else 4)


def activation_bytes(spec: ModelSpec, context: int, chunk: int = 64, score_copies: int = 0) -> int:
    """Decode working set (fp32) for a prefill chunk of `chunk` tokens at `context`: the residual
    stream and its normed copy, q/k/v, the attention output, the MLP hidden state(s), the logits,
    where k = v with RoPE the one-layer transient of rotated keys and sliced values [context, G, D],
    and `score_copies` unfused attention-score tensors [n_head, chunk, context]."""
    T, C = min(chunk, context), spec.n_embd
    qkv = spec.q_dim + 2 * spec.kv_dim
    mlp = spec.n_inner * (3 if spec.mlp == "swiglu" else 2)
    per_chunk = T * (3 * C + qkv + spec.q_dim + mlp + spec.vocab_size)
    rope_read = 2 * context * spec.kv_dim if spec.kv_shared and spec.positions == "rope" else 0
    scores = score_copies * spec.n_head * T * context
    return 4 * (per_chunk + rope_read + scores)


def backend_memory(backend: str, host_python: bool = False) -> BackendMemory:
    table = HOST_PYTHON_BACKENDS if host_python else DEVICE_BACKENDS
    return table.get(backend, table["pte"])


def budget_row(
    spec: ModelSpec,
    device,
    context: int,
    weights: str = "fp32",
    cache_dtype: str = "fp32",
    backend: str = "pte",
    chunk: int = 64,
    artifact_bytes: int | None = None,
    planned_activation_bytes: int | None = None,
    planned_cache_bytes: int | None = None,
    host_python: bool = False,
) -> BudgetRow:
    """One report row. `device` is a qkvx.devices.DeviceProfile; `planned_activation_bytes` is a
    .pte memory plan's arena minus its cache buffers (valid for the context it was planned at) and
    `planned_cache_bytes` those buffers, resident at their max_seq_len size from load on.
    `host_python`: the runtime as a Python process on this host holds it (qkvx budget --measure)."""
    if context < 1:
        raise QkvxError(f"context must be >= 1, got {context}")
    layout = cache_layout(spec, cache_dtype)
    mem = backend_memory(backend, host_python)
    w = artifact_bytes if artifact_bytes is not None else weight_bytes(spec, weights)
    copies = int(mem.extra_weight_copies * max(w - lookup_table_bytes(spec, weights), 0))
    runtime = mem.base_bytes + mem.session_bytes + copies

    def working_set(ctx: int) -> int:
        return activation_bytes(spec, ctx, chunk, mem.score_copies) + (
            mem.cache_copies - 1
        ) * layout.bytes_at(ctx)

    def total(ctx: int) -> int:  # at a context the artifact was not planned for: the estimate
        return w + layout.bytes_at(ctx) + working_set(ctx) + runtime

    act = planned_activation_bytes if planned_activation_bytes is not None else working_set(context)
    kv = max(layout.bytes_at(context), planned_cache_bytes or 0)
    budget = device.app_budget_bytes

    def largest_fitting(limit: int) -> int:  # total() grows linearly in ctx: bisect
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid - 1)
        return lo

    mem_max = largest_fitting(MAX_CONTEXT_SEARCH)
    read = w + layout.bytes_at(context)
    row_total = int(w + kv + act + runtime)
    return BudgetRow(
        variant=spec.paper_name,
        device=device.name,
        context=context,
        weights_bytes=int(w),
        kv_cache_bytes=kv,
        activation_bytes=int(act),
        runtime_bytes=runtime,
        total_bytes=row_total,
        budget_bytes=budget,
        fits=row_total <= budget,
        max_context=min(mem_max, spec.max_positions),
        max_context_memory=mem_max,
        bytes_read_per_token=int(read),
        decode_tokens_per_s_ceiling=device.mem_bandwidth_bytes_per_s / read,
        weights_source="artifact" if artifact_bytes is not None else "estimate",
        activation_source="pte plan" if planned_activation_bytes is not None else "estimate",
        weight_copies_bytes=copies,
    )


def compare_specs(spec: ModelSpec, variants: Iterable[str] = COMPARE_VARIANTS) -> list[ModelSpec]:
    """The same dims under each paper variant (the paper's side-by-side cache table)."""
    dims = dict(
        n_layer=spec.n_layer,
        n_embd=spec.n_embd,
        n_head=spec.n_head,
        vocab_size=spec.vocab_size,
        max_positions=spec.max_positions,
        head_dim=spec.head_dim,
        positions=spec.positions,
        rope_theta=spec.rope_theta,
        norm=spec.norm,
        norm_eps=spec.norm_eps,
        mlp=spec.mlp,
        n_inner=spec.n_inner,
        bias=spec.bias,
        tie_embeddings=spec.tie_embeddings,
    )
    return [ModelSpec.from_paper_name(v, **dims) for v in variants]


def report(
    specs: list[ModelSpec],
    devices: list,
    contexts: list[int],
    weights: str = "fp32",
    cache_dtype: str = "fp32",
    backend: str = "pte",
    chunk: int = 64,
    artifact_bytes: int | None = None,
    plan: dict | None = None,
    host_python: bool = False,
) -> list[BudgetRow]:
    """Rows for every (variant, device, context). Artifact size and plan apply only to the single
    spec they came from; the plan only at the context it was planned for."""
    rows = []
    for spec in specs:
        own = len(specs) == 1
        for device in devices:
            for ctx in contexts:
                act = cache = None
                if own and plan and ctx <= plan.get("context", 0):  # planned for the max shapes
                    act, cache = plan["planned_bytes"] - plan["cache_bytes"], plan["cache_bytes"]
                rows.append(
                    budget_row(
                        spec,
                        device,
                        ctx,
                        weights,
                        cache_dtype,
                        backend,
                        chunk,
                        artifact_bytes if own else None,
                        act,
                        cache,
                        host_python,
                    )
                )
    return rows


@dataclass
class ExportFacts:
    """What a budget reads from an export directory's manifest.json."""

    spec: ModelSpec
    backend: str  # the first artifact's format: pte | onnx
    cache_dtype: str
    artifact_bytes: int
    chunk: int  # prefill tokens per call
    plan: dict | None  # a .pte's memory plan: context, planned_bytes, cache_bytes
    max_seq_len: int


def read_export(path: str | Path) -> ExportFacts | None:
    """The facts of an export directory; None when `path` holds no manifest.json."""
    from qkvx.artifact import MANIFEST, Manifest

    path = Path(path)
    if not (path / MANIFEST).is_file():
        return None
    m = Manifest.read(path)
    plan = None
    if m.export.planned_bytes is not None:
        plan = {
            "context": m.max_seq_len,
            "planned_bytes": m.export.planned_bytes,
            "cache_bytes": m.cache.program_cache_bytes,
        }
    return ExportFacts(
        spec=m.spec,
        backend=m.format,
        cache_dtype=m.recipe.kv_cache,
        artifact_bytes=sum(a.total_bytes for a in m.artifacts),
        chunk=m.export.prefill_chunk or 64,
        plan=plan,
        max_seq_len=m.max_seq_len,
    )
