"""The Python API behind every CLI command: typed functions that return data, never print."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qkvx.spec import ModelSpec, cache_layout


def cache_summary(spec: ModelSpec, context: int | None = None) -> dict[str, Any]:
    """Cache tensors per layer and bytes per token / at `context` (default max_positions), fp32 and
    fp16, for `spec` and for the unshared QKV model of the same size, with the saving."""
    context = spec.max_positions if context is None else context
    baseline = spec.replace(sharing="qkv", n_kv_head=spec.n_head)
    out: dict[str, Any] = {"context": context}
    for name, s in (("model", spec), ("qkv_baseline", baseline)):
        out[name] = {
            "variant": s.paper_name,
            "kv_tensors_per_layer": cache_layout(s).tensors_per_layer,
            **{f"kv_bytes_per_token_{dt}": cache_layout(s, dt).bytes_per_token for dt in ("fp32", "fp16")},
            **{f"kv_bytes_at_context_{dt}": cache_layout(s, dt).bytes_at(context) for dt in ("fp32", "fp16")},
        }
    base = out["qkv_baseline"]["kv_bytes_per_token_fp16"]
    out["saving_percent"] = 100.0 * (1 - out["model"]["kv_bytes_per_token_fp16"] / base)
    return out


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """What `qkvx inspect` reports: format, variant, spec, parameters and the KV-cache arithmetic."""
    from qkvx.loaders import load

    model = load(path)
    spec: ModelSpec = model.spec
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    cache = cache_summary(spec)
    return {
        "path": str(Path(path)),
        "format": model.source["format"],
        "variant": spec.paper_name,
        "spec": spec.to_dict(),
        "params": params,
        "kv_tensors_per_layer": cache["model"]["kv_tensors_per_layer"],
        "kv_bytes_per_token": {dt: cache["model"][f"kv_bytes_per_token_{dt}"] for dt in ("fp32", "fp16")},
        "kv_bytes_at_max_positions": {dt: cache["model"][f"kv_bytes_at_context_{dt}"] for dt in ("fp32", "fp16")},
        "qkv_baseline": cache["qkv_baseline"],
        "kv_saving_percent": cache["saving_percent"],
        "meta": model.meta,
    }
