"""ONNX export: OnnxDecodeModel through torch.onnx (dynamo) -> model.onnx [+ model.onnx.data].

The graph follows the ONNX contract of docs/architecture.md and the optimum naming: inputs
input_ids, attention_mask, position_ids and per layer past_key_values.{i}.kv (k = v: ONE tensor) or
.key / .value; outputs logits and present.{i}.*. Batch, sequence and past length are dynamic, and
past length 0 is the prefill, so one graph serves prefill and decode. With an int8 cache each cache
tensor is int8 with an fp32 `_scale` [batch, kv_heads, past, 1] beside it. After saving, the graph
is read back and checked: exactly the cache inputs and outputs the spec's cache layout says, with
its kv heads, head dim, dtypes and bytes per token. Weight quantization (qkvx.export.onnx_quant)
rewrites the saved graph and checks it again with the same functions.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qkvx.decode import OnnxDecodeModel, cache_io_names
from qkvx.errors import QkvxError
from qkvx.export.onnx_translations import attention_translations
from qkvx.models.transformer import Transformer
from qkvx.spec import CacheLayout, ModelSpec, cache_layout
from qkvx.util import check_max_seq_len, quiet
from qkvx.version import __version__

ONNX_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
# Dimension names as optimum writes them, so tools that read optimum graphs read ours.
BATCH, SEQ, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = f"{PAST} + {SEQ}"
# Weights go to external data above this: one protobuf file cannot exceed 2 GiB.
EXTERNAL_DATA_BYTES = 256 * 2**20
_DEDUP_MAX_BYTES = 1 << 24
_ELEM_BYTES = {"float32": 4, "float16": 2, "int8": 1, "int64": 8}
_NP_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}  # cache dtype -> graph element type
SCALE_SUFFIX = "_scale"


@dataclass
class OnnxGraph:
    """What a saved graph declares: inputs / outputs (name -> (dtype, shape with symbolic dims as
    names)), metadata_props and node counts. Read without loading the weights."""

    inputs: dict[str, tuple[str, list[int | str]]]
    outputs: dict[str, tuple[str, list[int | str]]]
    metadata: dict[str, str]
    op_counts: dict[str, int] = field(default_factory=dict)
    weight_matmuls: int = 0  # MatMul / Gemm nodes with a weight (initializer) operand

    @property
    def cache_inputs(self) -> dict[str, tuple[str, list[int | str]]]:
        return {n: v for n, v in self.inputs.items() if n.startswith("past_key_values.")}

    def cache_bytes_per_token(self) -> int:
        """Bytes one token adds to the cache: per cache input, the static dims (kv heads x head dim)
        times the element size; the symbolic batch and past dims are excluded."""
        return sum(
            math.prod(d for d in shape if isinstance(d, int)) * _ELEM_BYTES[dtype]
            for dtype, shape in self.cache_inputs.values()
        )

    def to_dict(self) -> dict:
        return {
            "cache_inputs": {
                n: {"dtype": dtype, "shape": shape} for n, (dtype, shape) in self.cache_inputs.items()
            },
            "cache_bytes_per_token": self.cache_bytes_per_token(),
            "weight_matmuls": self.weight_matmuls,
        }


def read_graph(path: str | Path) -> OnnxGraph:
    """Read a saved model's interface and node counts (external data is not loaded)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and others on a corrupt file
        raise QkvxError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None

    def io(values):
        out = {}
        for v in values:
            t = v.type.tensor_type
            out[v.name] = (
                str(tensor_dtype_to_np_dtype(t.elem_type)),
                [d.dim_param or d.dim_value for d in t.shape.dim],
            )
        return out

    # Weights: initializers and what nodes compute from them alone (a tied lm_head's Transpose).
    weights = {init.name for init in proto.graph.initializer}
    for n in proto.graph.node:  # nodes are topologically sorted
        if n.op_type == "Constant" or (n.input and all(i in weights for i in n.input)):
            weights.update(n.output)
    matmuls = sum(1 for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and weights & set(n.input))
    return OnnxGraph(
        inputs=io(proto.graph.input),
        outputs=io(proto.graph.output),
        metadata={p.key: p.value for p in proto.metadata_props},
        op_counts=dict(Counter(n.op_type for n in proto.graph.node)),
        weight_matmuls=matmuls,
    )


def cache_tensor_type(layout: CacheLayout, name: str) -> tuple[str, int]:
    """(element type, last dim) of cache input / output `name`: the layout's dtype and head_dim, or
    for an int8 cache's `_scale` tensor float32 and 1."""
    if name.endswith(SCALE_SUFFIX):
        return "float32", 1
    return _NP_DTYPES[layout.dtype], layout.head_dim


def check_graph(graph: OnnxGraph, spec: ModelSpec, kv_cache: str = "fp32") -> None:
    """Fail the export unless the graph has exactly the contract's inputs and outputs, one cache
    tensor per K=V layer (two otherwise), each [batch, kv_heads, past, head_dim] of the cache dtype
    (int8: with its float32 `_scale` [batch, kv_heads, past, 1]), and the cache layout's bytes per
    token (int8: head_dim bytes + a 4-byte scale per kv head and tensor)."""
    layout = cache_layout(spec, kv_cache)
    past, present = cache_io_names(layout)
    want_in, want_out = ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]
    if list(graph.inputs) != want_in or list(graph.outputs) != want_out:
        raise QkvxError(
            f"export check: graph inputs {list(graph.inputs)} / outputs {list(graph.outputs)} "
            f"are not the contract's {want_in} / {want_out}"
        )
    for name, (dtype, shape) in {**graph.cache_inputs, **{n: graph.outputs[n] for n in present}}.items():
        want_dtype, last = cache_tensor_type(layout, name)
        if dtype != want_dtype or len(shape) != 4 or shape[1] != layout.kv_heads or shape[3] != last:
            raise QkvxError(
                f"export check: {name} is {dtype} {shape}; the {spec.paper_name} spec with a "
                f"{kv_cache} cache says {want_dtype} [batch, {layout.kv_heads}, seq, {last}]"
            )
    if graph.cache_bytes_per_token() != layout.bytes_per_token:
        raise QkvxError(
            f"export check: the graph's cache holds {graph.cache_bytes_per_token()} bytes per "
            f"token; the spec says {layout.bytes_per_token}"
        )


def onnx_metadata(spec: ModelSpec, max_seq_len: int, kv_cache: str = "fp32") -> dict[str, str]:
    """metadata_props (docs/architecture.md), plus the context length the export was made for."""
    return {
        "qkvx.spec": spec.to_json(),
        "qkvx.cache": json.dumps(cache_layout(spec, kv_cache).to_dict()),
        "qkvx.version": __version__,
        "qkvx.max_seq_len": str(max_seq_len),
    }


def _example(decode: OnnxDecodeModel):
    """Example inputs and dynamic shapes. Sizes 2, 3 and 4: torch.export specializes a dim whose
    example is 0 or 1, and distinct sizes keep batch, sequence and past from being unified."""
    spec, layout = decode.spec, decode.layout
    B, T, P = 2, 3, 4
    dtypes = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
    past = []
    for name in decode.input_names[3:]:
        dtype, last = cache_tensor_type(layout, name)
        past.append(torch.zeros(B, spec.n_kv_head, P, last, dtype=dtypes[dtype]))
    past = tuple(past)
    args = (
        torch.zeros(B, T, dtype=torch.long),
        torch.ones(B, P + T, dtype=torch.long),
        (torch.arange(P, P + T) % spec.max_positions).expand(B, T).contiguous(),
        *past,
    )
    shapes = (
        {0: BATCH, 1: SEQ},
        {0: BATCH, 1: TOTAL},
        {0: BATCH, 1: SEQ},
        tuple({0: BATCH, 2: PAST} for _ in past),
    )  # *past is one tuple argument to torch.export
    return args, shapes


def _tidy(model) -> None:
    """Drop what the exporter leaves that no runtime reads: per-node metadata (stack traces with
    absolute source paths, so another checkout would write other bytes) and copies of constants
    (the RoPE tables are folded once per use), then merge the nodes that became identical."""
    import hashlib

    from onnx_ir.passes import common

    common.ClearMetadataAndDocStringPass()(model)
    # onnx_ir's DeduplicateHashedInitializersPass needs C-contiguous arrays; the exporter's
    # tensors are torch views (a tied lm_head transposed), so hash their bytes here. Only small
    # tensors: the copies are tables and vectors, and hashing gigabytes of weights buys nothing.
    graph, seen = model.graph, {}
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor.nbytes > _DEDUP_MAX_BYTES:
            continue
        key = (tensor.dtype, tuple(tensor.shape), hashlib.sha256(tensor.tobytes()).hexdigest())
        if key in seen:
            value.replace_all_uses_with(seen[key])
            graph.initializers.pop(value.name)
        else:
            seen[key] = value
    common.CommonSubexpressionEliminationPass()(model)
    _fold_transposes(model.graph)
    common.RemoveUnusedNodesPass()(model)


def _fold_transposes(graph) -> None:
    """Transpose(Transpose(x)) -> x, or one Transpose. The attention protocol hands the cache over
    as [B, S, G, D] and attention reads it as [B, G, S, D]: without this the file holds two copies
    of every cache tensor per step, and only runtimes that fold transposes themselves skip them.
    (onnxscript's TransposeTranspose rule leaves them: the inner output has several users.)"""
    import onnx_ir as ir

    for node in list(graph):  # topological order: an inner Transpose is already folded
        inner = node.inputs[0].producer() if node.op_type == "Transpose" and node.inputs else None
        if (
            inner is None
            or inner.op_type != "Transpose"
            or "perm" not in node.attributes
            or "perm" not in inner.attributes
            or node.domain
            or inner.domain
        ):
            continue
        first, second = inner.attributes["perm"].as_ints(), node.attributes["perm"].as_ints()
        perm = [first[i] for i in second]  # out axis i = x axis first[second[i]]
        if perm == sorted(perm) and not node.outputs[0].is_graph_output():
            node.outputs[0].replace_all_uses_with(inner.inputs[0])
        else:
            node.replace_input_with(0, inner.inputs[0])
            node.attributes["perm"] = ir.AttrInt64s("perm", perm)


def export_onnx(
    model: Transformer,
    out_dir: str | Path,
    max_seq_len: int | None = None,
    external_data: bool | None = None,
    kv_cache: str = "fp32",
    attention: str = "plain",
) -> tuple[list[str], OnnxGraph]:
    """Export `model` to out_dir/model.onnx (weights in model.onnx.data when external_data, by
    default when they exceed EXTERNAL_DATA_BYTES). attention (recipes.ATTENTION["onnx"]): plain
    ONNX ops; mha (onnxruntime's MultiHeadAttention); rotary (mha, and a RoPE K=V layer's keys rotated
    by onnxruntime's RotaryEmbedding); custom (qkvx.CachedAttention: the graph needs onnxruntime and
    qkvx's op library, qkvx.export.ortops). mha / rotary / custom graphs need onnxruntime. kv_cache:
    fp32 or int8 (int8 tensors with `_scale` tensors beside them). Returns the files written and the
    checked graph."""
    import onnx_ir as ir

    spec = model.spec
    max_seq_len = check_max_seq_len(max_seq_len or spec.max_positions, spec.max_positions)
    decode = OnnxDecodeModel(model.eval(), kv_cache, attention).eval()
    args, shapes = _example(decode)
    # the exporter warns per skipped op and about shared dim names: the export either works or raises
    with torch.no_grad(), quiet("torch.onnx"):
        program = torch.onnx.export(
            decode,
            args,
            dynamo=True,
            input_names=decode.input_names,
            output_names=decode.output_names,
            dynamic_shapes=shapes,
            verbose=False,
            custom_translation_table=attention_translations(),
        )
    _tidy(program.model)
    graph = program.model.graph
    for value in list(graph.outputs)[1:]:  # presents: name the exporter's "past + seq" sum once
        value.shape = ir.Shape(
            [BATCH, spec.n_kv_head, TOTAL, cache_tensor_type(decode.layout, value.name)[1]]
        )
    program.model.metadata_props.update(onnx_metadata(spec, max_seq_len, kv_cache))
    if external_data is None:
        external_data = sum(v.const_value.nbytes for v in graph.initializers.values()) > EXTERNAL_DATA_BYTES
    out_dir = Path(out_dir)
    ir.save(program.model, out_dir / ONNX_FILE, external_data=DATA_FILE if external_data else None)
    return [ONNX_FILE] + ([DATA_FILE] if external_data else []), check_saved(out_dir, spec, kv_cache)


def save_proto(proto, out_dir: str | Path, external_data: bool | None = None) -> list[str]:
    """Write an onnx ModelProto as out_dir/model.onnx the way export_onnx does: weights in
    model.onnx.data when external_data (None: when they exceed EXTERNAL_DATA_BYTES), else one file;
    a stale data file is removed. Returns the files written."""
    import onnx

    out_dir = Path(out_dir)
    if external_data is None:
        external_data = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    (out_dir / DATA_FILE).unlink(missing_ok=True)
    onnx.save(
        proto,
        str(out_dir / ONNX_FILE),
        save_as_external_data=external_data,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
    )  # small tensors stay inline
    return [ONNX_FILE] + ([DATA_FILE] if external_data else [])


def check_saved(out_dir: str | Path, spec: ModelSpec, kv_cache: str) -> OnnxGraph:
    """onnx.checker, then the contract (check_graph) on out_dir/model.onnx; returns its graph."""
    import onnx

    out_dir = Path(out_dir)
    try:
        onnx.checker.check_model(str(out_dir / ONNX_FILE))  # by path: follows external data
    except onnx.checker.ValidationError as e:
        raise QkvxError(f"export check: onnx.checker rejects the graph ({str(e).splitlines()[0]})") from None
    checked = read_graph(out_dir / ONNX_FILE)
    check_graph(checked, spec, kv_cache)
    return checked
