"""Property tests (hypothesis) for ModelSpec validation and the cache arithmetic."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkvx import ModelSpec, QkvxError, cache_layout
from qkvx.spec import SHARINGS


@st.composite
def specs(draw, sharing=None):
    n_head = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    head_dim = draw(st.sampled_from([8, 16, 32, 64, 128]))
    sharing = sharing or draw(st.sampled_from(SHARINGS))
    divisors = [g for g in range(1, n_head + 1) if n_head % g == 0]
    kv = n_head if sharing in ("qk-v", "q=k=v") else draw(st.sampled_from(divisors))
    return ModelSpec(
        n_layer=draw(st.integers(1, 48)),
        n_embd=n_head * head_dim,
        n_head=n_head,
        n_kv_head=kv,
        vocab_size=draw(st.integers(2, 200_000)),
        max_positions=draw(st.integers(1, 1 << 20)),
        sharing=sharing,
        positions=draw(st.sampled_from(["learned", "rope"])),
    )


@given(
    specs(),
    st.sampled_from(["fp32", "fp16", "bf16", "int8"]),
    st.integers(0, 1 << 20),
    st.integers(0, 1 << 20),
)
def test_cache_bytes_are_linear_in_context(spec, dtype, a, b):
    lay = cache_layout(spec, dtype)
    assert lay.bytes_at(a + b) == lay.bytes_at(a) + lay.bytes_at(b)
    assert lay.bytes_at(a) == a * lay.bytes_per_token


@given(specs(sharing="qkv"), st.sampled_from(["fp32", "fp16", "int8"]))
def test_kv_shared_is_exactly_half_of_the_same_heads(spec, dtype):
    shared = spec.replace(sharing="q-kv")
    assert 2 * cache_layout(shared, dtype).bytes_per_token == cache_layout(spec, dtype).bytes_per_token
    assert cache_layout(shared, dtype).tensors_per_layer == 1


@given(specs())
def test_int8_cache_never_exceeds_fp16(spec):
    assert cache_layout(spec, "int8").bytes_per_token <= cache_layout(spec, "fp16").bytes_per_token
    assert cache_layout(spec, "fp16").bytes_per_token * 2 == cache_layout(spec, "fp32").bytes_per_token


@given(specs())
def test_spec_round_trips_and_names_itself(spec):
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    again = ModelSpec.from_paper_name(
        spec.paper_name,
        n_layer=spec.n_layer,
        n_embd=spec.n_embd,
        n_head=spec.n_head,
        vocab_size=spec.vocab_size,
        max_positions=spec.max_positions,
        positions=spec.positions,
    )
    assert (again.sharing, again.n_kv_head) == (spec.sharing, spec.n_kv_head) or spec.n_head == 1


@settings(max_examples=200)
@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 4096))
def test_invalid_head_counts_are_rejected_naming_the_field(n_head, n_kv_head, n_embd):
    try:
        s = ModelSpec(
            n_layer=1, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head, vocab_size=10, max_positions=8
        )
    except QkvxError as e:
        assert "ModelSpec.n_head" in str(e) or "ModelSpec.n_kv_head" in str(e)
        assert n_embd % n_head or n_head % n_kv_head
    else:
        assert n_embd % n_head == 0 and n_head % n_kv_head == 0 and s.head_dim * n_head == n_embd


@given(st.text(min_size=1, max_size=12))
def test_unknown_paper_names_are_rejected(name):
    known = {"QKV", "Q=K-V", "Q-K=V", "Q=K=V", "MQA", "Q-MQA", "GQA", "Q-GQA"}
    if name in known or name.startswith(("GQA-", "Q-GQA-")):
        return
    with pytest.raises(QkvxError, match="unknown variant"):
        ModelSpec.from_paper_name(name, n_layer=1, n_embd=64, n_head=4, vocab_size=10, max_positions=8)
