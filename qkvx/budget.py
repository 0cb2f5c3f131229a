"""Memory-budget reports (DESIGN.md 7): for (model, weights/cache dtypes, device, context) the bytes an
app needs, whether it fits the device's app budget, the longest context that fits, and the decode
speed ceiling the device's memory bandwidth allows. Reads specs, profiles and artifacts; builds nothing.

Memory model (all terms exact except the activation estimate, which a .pte's memory plan replaces):
  total(ctx) = weights + kv_cache(ctx) + activations(ctx) + runtime
  weights     artifact file size when an export is given; else parameters x bytes per weight
  kv_cache    cache_layout(spec, cache dtype).bytes_at(ctx)   (scales included)
  activations decode-time working set for one prefill chunk of T tokens (see activation_bytes)
  runtime     the backend's own resident memory (RUNTIME_BYTES: an estimate, not yet measured)
Decode ceiling: every weight and every cached byte is read once per token, so
  tokens/s <= bandwidth / (weights + kv_cache(ctx)).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

from qkvx.errors import QkvxError
from qkvx.spec import ModelSpec, cache_layout

# Bytes per weight of the Linear layers by weight scheme (scales included: int8 per output channel,
# int4 groups of 32 with an fp32 scale each). Embeddings stay fp32 unless the scheme says fp16.
WEIGHT_SCHEMES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 32}
# Resident memory of each runtime itself (program, kernels, thread pool, allocator slack). ESTIMATES
# for the C++ runtimes on a device; not yet checked against measured RSS (issue 6, part 3).
RUNTIME_BYTES = {"pte": 16 * 2**20, "onnx": 48 * 2**20}
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


def activation_bytes(spec: ModelSpec, context: int, chunk: int = 64) -> int:
    """Decode working set (fp32) for a prefill chunk of `chunk` tokens at `context`: the residual
    stream and its normed copy, q/k/v, the attention output, the MLP hidden state(s), the logits, and
    where k = v with RoPE the one-layer transient of rotated keys and sliced values [context, G, D]."""
    T, C = min(chunk, context), spec.n_embd
    qkv = spec.q_dim + 2 * spec.kv_dim
    mlp = spec.n_inner * (3 if spec.mlp == "swiglu" else 2)
    per_chunk = T * (3 * C + qkv + spec.q_dim + mlp + spec.vocab_size)
    rope_read = 2 * context * spec.kv_dim if spec.kv_shared and spec.positions == "rope" else 0
    return 4 * (per_chunk + rope_read)


def budget_row(spec: ModelSpec, device, context: int, weights: str = "fp32", cache_dtype: str = "fp32",
               backend: str = "pte", chunk: int = 64, artifact_bytes: int | None = None,
               planned_activation_bytes: int | None = None) -> BudgetRow:
    """One report row. `device` is a qkvx.devices.DeviceProfile; `planned_activation_bytes` is a
    .pte memory plan's arena minus its cache buffers (valid for the context it was planned at)."""
    if context < 1:
        raise QkvxError(f"context must be >= 1, got {context}")
    layout = cache_layout(spec, cache_dtype)
    w = artifact_bytes if artifact_bytes is not None else weight_bytes(spec, weights)
    runtime = RUNTIME_BYTES.get(backend, RUNTIME_BYTES["pte"])

    def total(ctx: int, act: int | None = None) -> int:
        return w + layout.bytes_at(ctx) + (act if act is not None else activation_bytes(spec, ctx, chunk)) + runtime

    act = planned_activation_bytes if planned_activation_bytes is not None else activation_bytes(spec, context, chunk)
    budget = device.app_budget_bytes
    def largest_fitting(limit: int) -> int:  # total() grows linearly in ctx: bisect
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid - 1)
        return lo

    mem_max = largest_fitting(MAX_CONTEXT_SEARCH)
    read = w + layout.bytes_at(context)
    return BudgetRow(
        variant=spec.paper_name, device=device.name, context=context, weights_bytes=int(w),
        kv_cache_bytes=layout.bytes_at(context), activation_bytes=int(act), runtime_bytes=runtime,
        total_bytes=int(total(context, act)), budget_bytes=budget, fits=total(context, act) <= budget,
        max_context=min(mem_max, spec.max_positions), max_context_memory=mem_max, bytes_read_per_token=int(read),
        decode_tokens_per_s_ceiling=device.mem_bandwidth_bytes_per_s / read,
        weights_source="artifact" if artifact_bytes is not None else "estimate",
        activation_source="pte plan" if planned_activation_bytes is not None else "estimate",
    )


def compare_specs(spec: ModelSpec, variants: Iterable[str] = COMPARE_VARIANTS) -> list[ModelSpec]:
    """The same dims under each paper variant (the paper's side-by-side cache table)."""
    dims = dict(n_layer=spec.n_layer, n_embd=spec.n_embd, n_head=spec.n_head, vocab_size=spec.vocab_size,
                max_positions=spec.max_positions, head_dim=spec.head_dim, positions=spec.positions,
                rope_theta=spec.rope_theta, norm=spec.norm, norm_eps=spec.norm_eps, mlp=spec.mlp,
                n_inner=spec.n_inner, bias=spec.bias, tie_embeddings=spec.tie_embeddings)
    return [ModelSpec.from_paper_name(v, **dims) for v in variants]


def report(specs: list[ModelSpec], devices: list, contexts: list[int], weights: str = "fp32",
           cache_dtype: str = "fp32", backend: str = "pte", chunk: int = 64,
           artifact_bytes: int | None = None, plan: dict | None = None) -> list[BudgetRow]:
    """Rows for every (variant, device, context). Artifact size and plan apply only to the single
    spec they came from; the plan only at the context it was planned for."""
    rows = []
    for spec in specs:
        own = len(specs) == 1
        for device in devices:
            for ctx in contexts:
                act = None
                if own and plan and ctx <= plan.get("context", 0):  # planned for the max shapes
                    act = plan["planned_bytes"] - plan["cache_bytes"]
                rows.append(budget_row(spec, device, ctx, weights, cache_dtype, backend, chunk,
                                       artifact_bytes if own else None, act))
    return rows
