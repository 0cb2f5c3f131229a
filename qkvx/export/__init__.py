"""Exporters: the decode form lowered to an ExecuTorch .pte (executorch.py) or an ONNX graph
(onnx.py, its op translations and weight quantization), each read back and checked against the
cache layout the spec says. The orchestration around them is qkvx.pipeline."""
