"""ExecuTorch export: (torchao weight quantization) -> torch.export -> XNNPACK lowering -> .pte with
the cache as mutable buffers.

Uses ExecuTorch's LLM custom ops (llama::update_cache, llama::custom_sdpa): plain-op static caches
lowered to XNNPACK decode several times slower than eager. A K=V layer keeps ONE buffer, passed
as key and value cache, so the planned cache memory exactly halves. An int8 cache keeps an int8
buffer and an fp32 scale buffer per cache tensor and attends through llama::custom_quantized_sdpa
(qkvx.decode). After lowering the program is checked: the custom ops are in it and it holds
exactly the cache buffers (count and bytes) that qkvx.spec.cache_layout says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qkvx.decode import DecodeModel
from qkvx.errors import QkvxError
from qkvx.models.transformer import Transformer
from qkvx.spec import ModelSpec, cache_layout


def custom_ops(spec: ModelSpec, kv_cache: str = "fp32", kernels: str = "qkvx") -> tuple[str, ...]:
    """The cache and attention ops the program must hold. qkvx's kernels: update_cache (int8:
    update_cache_int8) and attend. ExecuTorch's LLM ops: an int8 cache is read by the quantized
    kernel, except with RoPE and k = v, where the dequantized prefix is rotated and read by the
    float one."""
    if kernels == "qkvx":
        return ("qkvx::update_cache_int8" if kv_cache == "int8" else "qkvx::update_cache", "qkvx::attend")
    int8_kernel = kv_cache == "int8" and not (spec.kv_shared and spec.positions == "rope")
    return ("llama::update_cache", "llama::custom_quantized_sdpa" if int8_kernel else "llama::custom_sdpa")


@dataclass
class PtePlan:
    """What a .pte's forward plan holds: its named mutable (cache) buffers and planned arenas."""

    cache_buffers: dict[str, list[int]]  # fully qualified name -> shape
    cache_bytes: int
    planned_bytes: int  # sum of non_const_buffer_sizes: activations + caches
    operators: list[str] = field(default_factory=list)
    # int8 constants outside any delegate, [1, T, G, 1]: the zero points an int8 cache's kernel
    # reads (all zero, ONE tensor shared by every layer; qkvx.decode.DecodeModel)
    zero_points: list[list[int]] = field(default_factory=list)

    @property
    def cache_seq_len(self) -> int:
        """Positions the cache buffers hold: qkvx's kernels keep [B, G, S, D] (each head's rows
        contiguous), ExecuTorch's llama ops [B, S, G, D]."""
        dim = 2 if any(op.startswith("qkvx::") for op in self.operators) else 1
        return max(shape[dim] for shape in self.cache_buffers.values())

    @property
    def zero_point_bytes(self) -> int:
        return sum(math.prod(s) for s in self.zero_points)

    def to_dict(self) -> dict:
        return {
            "cache_buffers": self.cache_buffers,
            "cache_bytes": self.cache_bytes,
            "zero_points": self.zero_points,
            "zero_point_bytes": self.zero_point_bytes,
            "planned_bytes": self.planned_bytes,
            "operators": self.operators,
        }


def read_plan(pte: bytes | str | Path) -> PtePlan:
    """Read the forward plan of a serialized program (bytes or a path), no runtime needed. Only
    the program flatbuffer is read: constants and delegate payloads (the weights) are segments after
    it, and deserializing them would copy the whole file into memory twice."""
    from executorch.exir._serialize._program import _flatbuffer_to_program, _get_extended_header

    head = pte[:64] if isinstance(pte, bytes) else Path(pte).open("rb").read(64)
    if head[4:6] != b"ET":  # flatbuffer file identifier "ET" + schema version
        raise QkvxError("not a readable .pte program (no ExecuTorch file identifier)")
    try:
        eh = _get_extended_header(head)
        size = eh.program_size if eh and eh.is_valid() else None
        if isinstance(pte, bytes):
            data = pte[:size] if size else pte
        else:
            with Path(pte).open("rb") as f:
                data = f.read(size) if size else f.read()
        program = _flatbuffer_to_program(data)
        plans = [p for p in program.execution_plan if p.name == "forward"]
    except Exception as e:  # the flatbuffer parser raises many types on a corrupt file
        raise QkvxError(
            f"not a readable .pte program ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not plans:
        raise QkvxError("the .pte program has no 'forward' method")
    plan = plans[0]
    buffers: dict[str, list[int]] = {}
    zero_points: list[list[int]] = []
    nbytes = 0
    for value in plan.values:
        t = value.val
        info = getattr(t, "extra_tensor_info", None)
        if info is not None and getattr(info, "fully_qualified_name", None):
            buffers[info.fully_qualified_name] = list(t.sizes)
            nbytes += math.prod(t.sizes) * _SCALAR_BYTES.get(int(t.scalar_type), 4)
        elif (
            getattr(t, "data_buffer_idx", 0)
            and int(t.scalar_type) == _CHAR
            and len(t.sizes) == 4
            and t.sizes[0] == 1
            and t.sizes[3] == 1
        ):  # a constant int8 [1, T, G, 1]
            zero_points.append(list(t.sizes))
    return PtePlan(
        cache_buffers=buffers,
        cache_bytes=nbytes,
        planned_bytes=sum(plan.non_const_buffer_sizes),
        operators=sorted({op.name for op in plan.operators}),
        zero_points=zero_points,
    )


# executorch ScalarType codes -> bytes (Byte, Char, Short, Int, Long, Half, Float, Double, ..., BFloat16)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 4, 4: 8, 5: 2, 6: 4, 7: 8, 15: 2}
_CHAR = 1  # int8


def constant_methods(
    max_seq_len: int, prefill_chunk: int, eos_ids: list[int], vocab_size: int, n_layers: int
) -> dict:
    """The constants ExecuTorch's LLM runner reads (extension/llm/runner/constants.h). Note the
    runner's naming: get_max_seq_len is the prefill chunk it may pass at once, get_max_context_len
    the cache length."""
    return {
        "get_max_seq_len": prefill_chunk,
        "get_max_context_len": max_seq_len,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "use_sdpa_with_kv_cache": True,
        "get_eos_ids": list(eos_ids),
        "get_vocab_size": vocab_size,
        "get_n_layers": n_layers,
    }


def export_pte(
    model: Transformer,
    path: str | Path,
    max_seq_len: int,
    prefill_chunk: int = 64,
    eos_ids: list[int] | None = None,
    *,
    weights: str = "none",
    group_size: int = 32,
    quantize_lm_head: bool = False,
    kv_cache: str = "fp32",
    kernels: str = "qkvx",
    inplace: bool = False,
) -> PtePlan:
    """Lower `model` to an XNNPACK-delegated .pte at `path`, with a static cache of max_seq_len tokens.

    forward(tokens int64 [1, T], input_pos int64 [1]) -> logits [1, T, vocab], 1 <= T <= prefill_chunk.
    weights: none | 8da4w | 8da8w (qkvx.quant.weights; on a copy unless `inplace`, which spares a
    copy of the weights when the caller no longer needs the fp32 model); kv_cache: fp32 | fp16
    (qkvx kernels) | int8; kernels: qkvx | llama (qkvx.decode.static). The program is streamed to
    the file. Returns its checked plan.
    """
    from qkvx.quant.weights import quantize_for_pte

    prefill_chunk = min(prefill_chunk, max_seq_len)
    if prefill_chunk < 2:
        raise QkvxError(
            f"prefill chunk must be >= 2 (export specializes a length-1 sequence), got {prefill_chunk}"
        )
    spec = model.spec
    quantized = quantize_for_pte(model.eval(), weights, group_size, quantize_lm_head, inplace=inplace)
    decode = DecodeModel(quantized, max_seq_len, kv_cache, kernels).eval()
    lower_decode(decode, spec, path, max_seq_len, prefill_chunk, eos_ids)
    plan = read_plan(path)
    check_plan(plan, spec, max_seq_len, kv_cache, kernels)
    return plan


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [1, 2], input_pos [1]): length 2, not 1, which would specialize the dynamic dim."""
    return torch.zeros(1, 2, dtype=torch.long), torch.tensor([0], dtype=torch.long)


def lower_decode(
    decode: torch.nn.Module,
    spec: ModelSpec,
    path: str | Path,
    max_seq_len: int,
    prefill_chunk: int,
    eos_ids: list[int] | None = None,
    *,
    initial_cache: bool = False,
) -> None:
    """torch.export a decode-form module (DecodeModel, or a graph module with its forward) with a
    dynamic sequence of 1..prefill_chunk tokens, delegate to XNNPACK, write the program to `path`
    (streamed: joining it into one bytes object first would hold another copy of the weights).
    initial_cache: the cache buffers' current values become the program's initial state, copied
    into the planned cache at load (benchmarks: a cache full of real values without a prefill)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
    from torch.export import Dim

    seq = Dim("seq", min=1, max=prefill_chunk)
    with torch.no_grad():
        ep = torch.export.export(decode, example_inputs(), dynamic_shapes=({1: seq}, None), strict=False)
    edge = to_edge_transform_and_lower(
        ep,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),  # custom ops are not core ATen
        constant_methods=constant_methods(
            max_seq_len, prefill_chunk, eos_ids or [], spec.vocab_size, spec.n_layer
        ),
    )
    program = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),  # the caller owns inputs
            run_reinplace_pass=True,  # update_cache writes into the buffer, no copy-back
            emit_mutable_buffer_names=True,  # so the plan names each cache buffer
            passes=[InitializedMutableBufferPass(["caches_"])] if initial_cache else [],
        )
    )
    with open(path, "wb") as f:
        program.write_to_file(f)


def check_plan(
    plan: PtePlan, spec: ModelSpec, max_seq_len: int, kv_cache: str = "fp32", kernels: str = "qkvx"
) -> None:
    """Fail the export unless the custom ops are in the program, no (de)quantization runs outside
    XNNPACK (a quantized Linear it did not take would dequantize its weight at every call), and the
    program holds exactly the cache buffers (count and bytes) that the spec's cache layout says:
    per layer one buffer per cache tensor, with int8 one scale buffer beside each."""
    ops = custom_ops(spec, kv_cache, kernels)
    missing = [op for op in ops if op not in plan.operators]
    if missing:
        raise QkvxError(
            f"export check: custom op(s) {', '.join(missing)} missing from the program "
            f"(the cache would run on slow plain ops)"
        )
    undelegated = [
        op for op in plan.operators if op not in ops and ("quantize" in op or "choose_qparams" in op)
    ]
    if undelegated:
        raise QkvxError(f"export check: quantized op(s) {', '.join(undelegated)} not delegated to XNNPACK")
    want_zp = [[1, max_seq_len, spec.n_kv_head, 1]] if "llama::custom_quantized_sdpa" in ops else []
    if plan.zero_points != want_zp:
        raise QkvxError(
            f"export check: program holds int8 zero-point constants {plan.zero_points}; "
            f"expected {want_zp} (one shared by every layer)"
        )
    layout = cache_layout(spec, kv_cache)
    want = layout.n_layer * layout.tensors_per_layer * (2 if layout.scale_bytes_per_head else 1)
    if len(plan.cache_buffers) != want or plan.cache_bytes != layout.bytes_at(max_seq_len):
        raise QkvxError(
            f"export check: program holds {len(plan.cache_buffers)} cache buffers of "
            f"{plan.cache_bytes} bytes; the {spec.paper_name} spec says {want} of "
            f"{layout.bytes_at(max_seq_len)} bytes ({kv_cache} cache)"
        )
