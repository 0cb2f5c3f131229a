"""Decode forms: the trained model plus a KV cache, one tensor per layer where k = v.

The attention code is the model's own (qkvx.models.attention.Attention); only the cache strategy
differs from the reference (full recompute): static.py holds the cache as in-place buffers for
ExecuTorch, past_present.py as past -> present tensors for ONNX, onnx_ops.py the ONNX-side ops.
"""

from qkvx.decode.past_present import OnnxDecodeModel, cache_io_names
from qkvx.decode.static import DecodeModel, load_custom_ops, load_kernels

__all__ = ["DecodeModel", "OnnxDecodeModel", "cache_io_names", "load_custom_ops", "load_kernels"]
