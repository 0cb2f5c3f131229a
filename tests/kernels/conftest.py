"""Kernel tests: the library is built once per source change (qkvx.kernels builds on import)."""

import pytest
import torch


@pytest.fixture(scope="session")
def kernels():
    import qkvx.kernels

    return qkvx.kernels


@pytest.fixture(scope="session")
def reference():
    return reference_attend


def reference_attend(q, k_cache, v_cache=None, k_scale=None, v_scale=None, cos=None, sin=None, start_pos=0):
    """float64 causal attention written from the op's definition: dequantize, rotate key rows by
    position (HF rotate_half), softmax(q k^T / sqrt(D)) with query t at start_pos + t seeing keys
    0..start_pos + t, values as stored; query head h reads kv head h // (H / G)."""
    _, T, H, D = q.shape
    G, n = k_cache.shape[1], start_pos + T
    k = k_cache[0, :, :n].double()
    if k_scale is not None:
        k = k * k_scale[0, :, :n].double()
    if v_cache is None:
        v = k
    else:
        v = v_cache[0, :, :n].double()
        if v_scale is not None:
            v = v * v_scale[0, :, :n].double()
    if cos is not None:
        half = D // 2  # half tables [P, D/2], repeated over both halves as HF's full tables
        c, s = cos[:n].double().repeat(1, 2), sin[:n].double().repeat(1, 2)
        k = k * c + torch.cat([-k[..., half:], k[..., :half]], -1) * s
    k, v = k.repeat_interleave(H // G, 0), v.repeat_interleave(H // G, 0)  # [H, n, D]
    scores = torch.einsum("thd,hsd->ths", q[0].double(), k) / D**0.5
    pos = torch.arange(n)
    visible = pos[None, :] <= (start_pos + torch.arange(T))[:, None]  # [T, n]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("ths,hsd->thd", scores.softmax(-1), v)[None]  # [1, T, H, D]
