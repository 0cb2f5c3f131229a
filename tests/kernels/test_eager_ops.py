"""torch.ops.qkvx.* eagerly (CPU kernels through the C ABI) against float64 torch references."""

import pytest
import torch

from qkvx.models.attention import Rope, sdpa
from qkvx.quant.kv import quantize_int8

DTYPES = [torch.float32, torch.float16, torch.int8]


def make_cache(G, S, D, dtype, n_valid, gen):
    """A cache whose rows >= n_valid are NaN (fp) or carry NaN scales (int8): never to be read."""
    x = torch.rand(1, G, S, D, generator=gen) * 3 - 1.5
    if dtype == torch.int8:
        q, scale = quantize_int8(x)
        scale[:, :, n_valid:] = float("nan")
        return q, scale
    x[:, :, n_valid:] = float("nan")
    return x.to(dtype), None


def rope_tables(P, D):
    r = Rope(D, P, 10000.0)
    return r.cos.contiguous(), r.sin.contiguous()


CASES = [  # T, H, G, S, D, start_pos
    (1, 4, 4, 33, 64, 0),  # context 1
    (1, 4, 4, 33, 64, 17),  # odd length
    (1, 8, 2, 33, 64, 32),  # GQA, full cache
    (1, 6, 1, 40, 32, 21),  # MQA
    (5, 4, 2, 40, 32, 0),  # prefill from 0
    (7, 4, 4, 40, 16, 11),  # prefill in the middle
    (3, 2, 1, 25, 6, 9),  # head size the SIMD path does not take
    (2, 4, 2, 30, 128, 27),  # D = 128 (its own unrolled instantiation)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "int8"])
@pytest.mark.parametrize("shared", [True, False], ids=["kv_shared", "k_v"])
@pytest.mark.parametrize("rope", [False, True], ids=["norope", "rope"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}H{}G{}S{}D{}p{}".format(*c))
def test_attend_matches_float64_reference(kernels, reference, dtype, shared, rope, case):
    T, H, G, S, D, start = case
    gen = torch.Generator().manual_seed(hash((T, H, G, S, D, start, str(dtype), shared, rope)) % 2**31)
    n = start + T
    q = torch.randn(1, T, H, D, generator=gen) * 2
    k, ks = make_cache(G, S, D, dtype, n, gen)
    v, vs = (None, None) if shared else make_cache(G, S, D, dtype, n, gen)
    cos, sin = rope_tables(n, D) if rope else (None, None)
    out = torch.ops.qkvx.attend(q, k, v, ks, vs, cos, sin, start)
    want = reference(q, k, v, ks, vs, cos, sin, start)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


def test_rope_kv_shared_matches_model_attention(kernels):
    """K=V with RoPE: the model's own math (qkvx.models.attention: keys = rope(stored rows), values
    = stored rows, causal sdpa over the prefix) equals attend reading the un-rotated cache."""
    gen = torch.Generator().manual_seed(3)
    H, G, D, S, T = 4, 2, 32, 48, 6
    rope = Rope(D, S, 10000.0)
    kv = torch.randn(1, S, G, D, generator=gen)  # the shared projection of S tokens, [B, S, G, D]
    q = torch.randn(1, S, H, D, generator=gen)
    pos = torch.arange(S)
    q_rot = rope(q, pos)
    want = sdpa(q_rot, rope(kv, pos), kv, causal=True)  # full recompute, [1, S, H, D]
    cache = torch.full((1, G, S, D), float("nan"))
    cache[0, :, :S] = kv[0].transpose(0, 1)
    # a prefill chunk of T tokens ending at S, then decode the last token alone
    start = S - T
    got = torch.ops.qkvx.attend(
        q_rot[:, start:].contiguous(), cache, None, None, None, rope.cos, rope.sin, start
    )
    torch.testing.assert_close(got, want[:, start:], atol=2e-5, rtol=2e-5)
    last = torch.ops.qkvx.attend(
        q_rot[:, S - 1 :].contiguous(), cache, None, None, None, rope.cos, rope.sin, S - 1
    )
    torch.testing.assert_close(last, want[:, S - 1 :], atol=2e-5, rtol=2e-5)


def test_two_threads_split_the_sequence_and_agree(kernels, reference):
    gen = torch.Generator().manual_seed(5)
    G, S, D = 2, 6000, 64  # long enough for the automatic split into two chunks
    k, _ = make_cache(G, S, D, torch.float32, S, gen)
    q = torch.randn(1, 1, 4, D, generator=gen)
    want = reference(q, k, start_pos=S - 1)
    prev = kernels.num_threads()
    try:
        for threads in (1, 2):
            assert kernels.set_num_threads(threads) == threads
            out = torch.ops.qkvx.attend(q, k, None, None, None, None, None, S - 1)
            torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-4)
    finally:
        kernels.set_num_threads(prev)


def test_update_cache_writes_rows_per_head(kernels):
    gen = torch.Generator().manual_seed(7)
    T, G, S, D, start = 3, 2, 10, 8, 4
    value = torch.randn(1, T, G, D, generator=gen) * 100
    for dtype in (torch.float32, torch.float16):
        cache = torch.full((1, G, S, D), 7.0, dtype=dtype)
        torch.ops.qkvx.update_cache(value, cache, start)
        want = torch.full((1, G, S, D), 7.0, dtype=dtype)
        want[0, :, start : start + T] = value[0].transpose(0, 1).to(dtype)  # torch's rounding
        assert torch.equal(cache, want), dtype


def test_update_cache_int8_is_quantize_int8_bit_for_bit(kernels):
    gen = torch.Generator().manual_seed(9)
    T, G, S, D, start = 4, 3, 12, 16, 5
    value = torch.randn(1, T, G, D, generator=gen) * torch.logspace(-3, 2, T)[None, :, None, None]
    value[0, 1, 2] = 0.0  # an all-zero row
    value[0, 2, 0, :4] = torch.tensor([0.5, -0.5, 1.5, 127.0])  # ties for round-half-even
    cache = torch.full((1, G, S, D), 99, dtype=torch.int8)
    scale = torch.full((1, G, S, 1), -1.0)
    torch.ops.qkvx.update_cache_int8(value, cache, scale, start)
    q, s = quantize_int8(value)  # [1, T, G, D], [1, T, G, 1]
    assert torch.equal(cache[0, :, start : start + T], q[0].transpose(0, 1))
    assert torch.equal(scale[0, :, start : start + T], s[0].transpose(0, 1))
    assert (cache[0, :, :start] == 99).all() and (scale[0, :, start + T :] == -1).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: torch.ops.qkvx.attend(
                torch.randn(1, 1, 4, 8), torch.randn(1, 2, 16, 8), None, None, None, None, None, 16
            ),
            "start_pos 16",
        ),
        (
            lambda: torch.ops.qkvx.attend(
                torch.randn(1, 1, 3, 8), torch.randn(1, 2, 16, 8), None, None, None, None, None, 0
            ),
            "not a multiple",
        ),
        (
            lambda: torch.ops.qkvx.attend(
                torch.randn(1, 1, 4, 8), torch.randn(1, 2, 16, 4), None, None, None, None, None, 0
            ),
            "head_dim",
        ),
        (
            lambda: torch.ops.qkvx.attend(
                torch.randn(2, 1, 4, 8), torch.randn(2, 2, 16, 8), None, None, None, None, None, 0
            ),
            "batch must be 1",
        ),
        (
            lambda: torch.ops.qkvx.attend(
                torch.randn(1, 1, 4, 8),
                torch.randn(1, 2, 16, 8).transpose(1, 2),
                None,
                None,
                None,
                None,
                None,
                0,
            ),
            "contiguous",
        ),
        (
            lambda: torch.ops.qkvx.attend(
                torch.randn(1, 1, 4, 8),
                torch.zeros(1, 2, 16, 8, dtype=torch.int8),
                None,
                None,
                None,
                None,
                None,
                0,
            ),
            "k_scale is required",
        ),
        (
            lambda: torch.ops.qkvx.attend(
                torch.randn(1, 2, 4, 8),
                torch.randn(1, 2, 16, 8),
                None,
                None,
                None,
                torch.ones(3, 8),
                torch.ones(3, 8),
                2,
            ),
            "rope table",
        ),
        (
            lambda: torch.ops.qkvx.update_cache(torch.randn(1, 2, 2, 8), torch.zeros(1, 2, 16, 8), 15),
            "start_pos 15",
        ),
        (
            lambda: torch.ops.qkvx.update_cache(torch.randn(1, 1, 3, 8), torch.zeros(1, 2, 16, 8), 0),
            "does not match",
        ),
        (
            lambda: torch.ops.qkvx.update_cache_int8(
                torch.randn(1, 1, 2, 8),
                torch.zeros(1, 2, 16, 8, dtype=torch.int8),
                torch.zeros(1, 2, 15, 1),
                0,
            ),
            "scale",
        ),
    ],
)
def test_bad_arguments_raise_one_line_value_error(kernels, call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("T, start", [(1, 0), (1, 200), (16, 100)])
def test_attend_agrees_with_executorch_custom_sdpa(kernels, T, start):
    """A second, independent implementation: ExecuTorch's llama::custom_sdpa on the same cache in
    its [1, S, H, D] layout (fp32, no RoPE), keys and values the same tensor for K=V."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401

    gen = torch.Generator().manual_seed(11)
    H, D, S = 4, 32, 256
    q = torch.randn(1, T, H, D, generator=gen)
    kv = torch.randn(1, H, S, D, generator=gen)
    other = torch.randn(1, H, S, D, generator=gen)
    lk, lv = kv.transpose(1, 2).contiguous(), other.transpose(1, 2).contiguous()
    torch.testing.assert_close(
        torch.ops.qkvx.attend(q, kv, None, None, None, None, None, start),
        torch.ops.llama.custom_sdpa(q, lk, lk, start, None, 0.0, True),
        atol=1e-5,
        rtol=1e-5,
    )
    torch.testing.assert_close(
        torch.ops.qkvx.attend(q, kv, other, None, None, None, None, start),
        torch.ops.llama.custom_sdpa(q, lk, lv, start, None, 0.0, True),
        atol=1e-5,
        rtol=1e-5,
    )
