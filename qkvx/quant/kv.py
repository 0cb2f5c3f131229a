"""int8 KV cache arithmetic: symmetric quantization with one fp32 scale per (token, kv head).

Plain torch ops, so the same code runs eagerly, exports to ExecuTorch (portable kernels) and to
ONNX. Symmetric: x ~= q * scale with q in [-127, 127] and no zero point, so one int8 tensor plus
its scale tensor is the whole cache (the ONNX contract).
"""

from __future__ import annotations

import torch
from torch import Tensor

QMAX = 127
_TINY = 1e-12  # an all-zero row gets this scale; its values quantize to 0 either way


def quantize_int8(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """x float [..., D] -> (int8 [..., D], fp32 scale [..., 1]) with x ~= q * scale, reducing over `dim`."""
    scale = x.abs().amax(dim, keepdim=True).float().clamp(min=_TINY) / QMAX
    q = torch.round(x / scale).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """int8 values and their fp32 scales (broadcast over the last dim) -> fp32."""
    return q.to(torch.float32) * scale
