"""Runtime harness: one runner interface over eager, ExecuTorch and onnxruntime; parity checks."""
