"""ONNX weight quantization of an exported model.onnx, with the libraries built for it.

  int8  dynamic int8 through optimum's ORTQuantizer (MatMulInteger: int8 weights per channel,
        activations quantized per call), preset AutoQuantizationConfig.arm64 / avx512_vnni / avx2:
        the recipe's int8_preset, else the device profile's ISA, else this host's CPU flags.
  int4  onnxruntime's MatMulNBitsQuantizer (MatMulNBits: 4-bit blocks of recipe.group_size along
        the input dim, accuracy_level from the recipe; 4 = int8 compute, the fastest here).

Both are RESTRICTED to the weight MatMuls: MatMul nodes whose B input is an initializer. Left in
fp32: the attention MatMuls (q @ k^T and weights @ v read the cache, not weights: optimum would
otherwise quantize both operands of each on every call) and the LM head unless
recipe.quantize_lm_head. A tied head reads the embedding through a Transpose, so it is never an
initializer MatMul; to quantize it, the transposed embedding becomes an initializer of its own
(the fp32 embedding stays for the token lookup). After quantization a node census proves that
exactly the chosen MatMuls became quantized nodes, and the contract check (check_graph) runs again.
"""

from __future__ import annotations

import json
import platform
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from qkvx.errors import QkvxError
from qkvx.util import cpu_flags, quiet

# Chosen by measurement (README, quantization): per channel is as accurate as per tensor and
# faster; asymmetric int4 blocks cost less perplexity than symmetric ones; restricting to weight
# MatMuls is both faster and more accurate than optimum's default (attention MatMuls, tied head).
PER_CHANNEL = True  # int8: one scale per output channel
INT4_SYMMETRIC = False  # int4: asymmetric blocks with a uint4 zero point (MatMulNBits' default)
QUANT_OPS = {"int8": "MatMulInteger", "int4": "MatMulNBits"}
LM_HEAD_OUTPUT = "logits"


# ---------------------------------------------------------------- preset choice


def host_isa() -> tuple[str, ...]:
    """This CPU's architecture and flags (/proc/cpuinfo "flags" on x86, "Features" on arm64)."""
    return (platform.machine(), *cpu_flags())


def preset_for_isa(features: tuple[str, ...] | list[str]) -> str:
    """optimum's preset for a CPU: arm64 for an Arm core, avx512_vnni where VNNI exists, else avx2."""
    feats = {f.lower() for f in features}
    if feats & {"aarch64", "arm64", "neon", "asimd"} or any(f.startswith("armv") for f in feats):
        return "arm64"
    return "avx512_vnni" if "avx512_vnni" in feats else "avx2"


def int8_preset(recipe, device=None) -> tuple[str, str]:
    """(preset, where it came from): the recipe's, else the device profile's, else the host's."""
    if recipe.int8_preset:
        return recipe.int8_preset, "recipe"
    if device is not None:
        return preset_for_isa(device.isa_features), f"device {device.name}"
    return preset_for_isa(host_isa()), "host"


# ---------------------------------------------------------------- which MatMuls


def weight_matmuls(proto, quantize_lm_head: bool = False) -> list[str]:
    """Names of the MatMul nodes to quantize: those whose B is an initializer, the LM head (the
    MatMul that writes `logits`) only with quantize_lm_head. A tied head (B = Transpose of the
    embedding) is given its own transposed initializer first, so it can be quantized at all."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    head = _lm_head(graph)
    if quantize_lm_head and head is not None and head.input[1] not in inits:
        producer = next((n for n in graph.node if head.input[1] in n.output), None)
        if producer is None or producer.op_type != "Transpose" or producer.input[0] not in inits:
            raise QkvxError(
                "quantize_lm_head: the LM head's weight is neither an initializer nor a "
                "transposed one; cannot quantize it"
            )
        w = numpy_helper.to_array(inits[producer.input[0]])
        perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), None)
        name = f"{producer.input[0]}.T"
        graph.initializer.append(numpy_helper.from_array(w.transpose(perm).copy(), name))
        head.input[1] = name
        inits[name] = graph.initializer[-1]
        if not any(producer.output[0] in n.input for n in graph.node) and producer.output[0] not in {
            o.name for o in graph.output
        }:
            graph.node.remove(producer)
    return [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and (quantize_lm_head or n is not head)
    ]


def _lm_head(graph):
    """The MatMul that computes `logits`: its producer, or up to a few ops before it (a bias Add)."""
    producers = {o: n for n in graph.node for o in n.output}
    node = producers.get(LM_HEAD_OUTPUT)
    for _ in range(4):
        if node is None or node.op_type == "MatMul":
            return node
        node = producers.get(node.input[0]) if node.input else None
    return None


def census(proto) -> dict[str, int]:
    """Node counts of the ops weight quantization creates or leaves."""
    counts = Counter(n.op_type for n in proto.graph.node)
    return {
        op: counts.get(op, 0)
        for op in ("MatMul", "MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulNBits")
    }


def _check_census(before, after, chosen: list[str], scheme: str) -> dict[str, int]:
    """Exactly the chosen MatMuls were replaced: every other MatMul is still there, by name."""
    all_matmuls = {n.name for n in before.graph.node if n.op_type == "MatMul"}
    left = {n.name for n in after.graph.node if n.op_type == "MatMul"}
    counts = census(after)
    want = all_matmuls - set(chosen)
    if left != want or counts[QUANT_OPS[scheme]] != len(chosen):
        raise QkvxError(
            f"weight quantization ({scheme}) census: {counts[QUANT_OPS[scheme]]} {QUANT_OPS[scheme]} "
            f"nodes for {len(chosen)} weight MatMuls; fp32 MatMuls left {sorted(left)}, "
            f"expected {sorted(want)}"
        )
    return counts


# ---------------------------------------------------------------- quantizers


def _int8(proto, nodes: list[str], preset: str, work: Path):
    """optimum's ORTQuantizer, dynamic, preset `preset`, only `nodes`. It reads a model file and
    writes one into save_dir (with ort_config.json and the HF config beside it, dropped here); it
    wants a transformers config, and qkvx models have none: an empty PretrainedConfig stands in."""
    import onnx
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig
    from transformers import PretrainedConfig

    from qkvx.export.onnx import save_proto

    src = work / "in" / "model.onnx"
    src.parent.mkdir()
    large = len(save_proto(proto, src.parent)) > 1  # over 2 GiB a protobuf needs external data
    config = getattr(AutoQuantizationConfig, preset)(
        is_static=False, per_channel=PER_CHANNEL, nodes_to_quantize=nodes, operators_to_quantize=["MatMul"]
    )
    ORTQuantizer(src, config=PretrainedConfig()).quantize(
        config, save_dir=work / "out", file_suffix=None, use_external_data_format=large
    )
    return onnx.load(str(work / "out" / "model.onnx"))


def _int4(proto, nodes: list[str], block_size: int, accuracy_level: int | None):
    """onnxruntime's MatMulNBitsQuantizer. Its nodes_to_include ADDS to op_types_to_quantize, so the
    restriction is nodes_to_exclude = every other MatMul."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in set(nodes)]
    q = MatMulNBitsQuantizer(
        proto,
        bits=4,
        block_size=block_size,
        is_symmetric=INT4_SYMMETRIC,
        accuracy_level=accuracy_level,
        nodes_to_exclude=others,
        op_types_to_quantize=("MatMul",),
    )
    q.process()
    return q.model.model


def quantize_onnx_weights(out_dir: str | Path, recipe, spec, device=None) -> tuple[list[str], Any, dict]:
    """Quantize out_dir/model.onnx in place per recipe.weights (int8 | int4), keep its cache
    contract (recipe.kv_cache) and metadata, save it as export_onnx saves (external data only when
    large) and check it again. Returns (files, checked OnnxGraph, info for the manifest)."""
    import onnx

    from qkvx.export.onnx import ONNX_FILE, check_saved, save_proto

    scheme = recipe.weights
    if scheme not in QUANT_OPS:
        raise QkvxError(
            f"recipe {recipe.name!r}: ONNX weights {scheme!r} unknown; known: none, {', '.join(QUANT_OPS)}"
        )
    out_dir = Path(out_dir)
    proto = onnx.load(str(out_dir / ONNX_FILE))
    before = onnx.load(str(out_dir / ONNX_FILE), load_external_data=False)  # structure only, for the census
    nodes = weight_matmuls(proto, recipe.quantize_lm_head)
    if not nodes:
        raise QkvxError(f"recipe {recipe.name!r}: the graph has no weight MatMul to quantize")
    info: dict[str, Any] = {
        "scheme": scheme,
        "quantized_matmuls": len(nodes),
        "lm_head": "quantized" if recipe.quantize_lm_head else "fp32",
    }
    with quiet("", "optimum", "onnxruntime"):  # the quantizers log per node
        if scheme == "int8":
            preset, source = int8_preset(recipe, device)
            info.update(
                library="optimum ORTQuantizer (dynamic)",
                preset=preset,
                preset_from=source,
                per_channel=PER_CHANNEL,
            )
            with tempfile.TemporaryDirectory(dir=out_dir, prefix=".quant-") as work:
                quantized = _int8(proto, nodes, preset, Path(work))
        else:
            info.update(
                library="onnxruntime MatMulNBitsQuantizer",
                block_size=recipe.group_size,
                accuracy_level=recipe.accuracy_level,
                symmetric=INT4_SYMMETRIC,
            )
            quantized = _int4(proto, nodes, recipe.group_size, recipe.accuracy_level)
    info["census"] = _check_census(before, quantized, nodes, scheme)
    meta = {p.key: p.value for p in before.metadata_props}
    meta["qkvx.weights"] = json.dumps({k: v for k, v in info.items() if k != "census"}, sort_keys=True)
    del quantized.metadata_props[:]
    for key, value in meta.items():
        quantized.metadata_props.add(key=key, value=value)
    files = save_proto(quantized, out_dir)  # external data by the size rule of export_onnx
    return files, check_saved(out_dir, spec, recipe.kv_cache), info
