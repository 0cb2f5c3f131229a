"""qkvx: deploy shared-projection (K=V) transformers to devices with ONE KV tensor per layer."""

from qkvx.errors import QkvxError
from qkvx.spec import ModelSpec, cache_layout
from qkvx.version import __version__


def load(path, ignore_config_keys=()):
    """Load a paper checkpoint (.pt), a Hugging Face folder or a native qkvx folder.
    Returns the model (torch.nn.Module in eval mode) with `.spec` (its ModelSpec).
    ignore_config_keys: paper model_config keys known not to change the model."""
    from qkvx.loaders import load as _load

    return _load(path, tuple(ignore_config_keys))


def save(model, directory):
    """Write the native format: model.safetensors + qkvx.json (the ModelSpec)."""
    from qkvx.loaders.native import save as _save

    return _save(model, directory)


__all__ = ["ModelSpec", "QkvxError", "cache_layout", "load", "save", "__version__"]
