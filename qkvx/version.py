"""The qkvx version: written into every artifact (ONNX metadata, manifest)."""

__version__ = "0.1.0"
