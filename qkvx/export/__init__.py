"""Exporters (ExecuTorch .pte, ONNX) and the manifest written beside every artifact."""
