"""Quantization of the PyTorch model before export: weights through torchao for ExecuTorch
(weights.py) and the int8 KV cache arithmetic both backends share (kv.py). ONNX weights are
quantized on the exported graph (qkvx.export.onnx_quant).

Nothing heavy is imported here: torchao loads only when a recipe asks for quantized weights.
"""

from qkvx.quant.kv import dequantize_int8, quantize_int8

__all__ = ["dequantize_int8", "quantize_int8", "quantize_for_pte", "PTE_SCHEMES"]


def __getattr__(name: str):
    if name in ("quantize_for_pte", "PTE_SCHEMES"):
        from qkvx.quant import weights

        return getattr(weights, name)
    raise AttributeError(f"module 'qkvx.quant' has no attribute {name!r}")
