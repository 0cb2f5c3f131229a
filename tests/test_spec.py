"""ModelSpec validation, paper names, and the cache arithmetic against DESIGN.md's numbers."""

import pytest

from qkvx import ModelSpec, QkvxError, cache_layout

PAPER_300M_QKV_FP16_32K = 2_684_354_560  # 20 layers * 2 tensors * 1024 * 2 bytes * 32768 (paper: 2.62 GB)


def cache_bytes(name, dtype="fp16", context=32768, preset="paper-300m"):
    return cache_layout(ModelSpec.from_paper_name(name, preset=preset), dtype).bytes_at(context)


def test_paper_300m_cache_column():
    qkv = cache_bytes("QKV")
    assert qkv == PAPER_300M_QKV_FP16_32K
    assert cache_bytes("Q-K=V") * 2 == qkv
    assert cache_bytes("MQA") * 16 == qkv
    assert cache_bytes("Q-MQA") * 32 == qkv
    assert 1 - cache_bytes("Q-MQA") / qkv == pytest.approx(0.96875)  # the paper's 96.9 %
    assert cache_bytes("Q-GQA-4") * 8 == qkv  # 87.5 % smaller with 16 heads
    assert cache_bytes("Q=K=V") * 2 == qkv and cache_bytes("Q=K-V") == qkv


def test_cache_layout_tensors_and_fp32():
    s = ModelSpec.from_paper_name("Q-K=V", preset="paper-1.2b")
    lay = cache_layout(s, "fp32")
    assert (lay.tensors_per_layer, lay.names) == (1, ("kv",))
    assert lay.bytes_per_token == 22 * 1 * 32 * 64 * 4
    assert cache_layout(s.replace(sharing="qkv"), "fp32").names == ("key", "value")


def test_int8_cache_counts_scales():
    s = ModelSpec.from_paper_name("Q-K=V", preset="paper-300m")
    int8, fp16 = cache_layout(s, "int8").bytes_per_token, cache_layout(s, "fp16").bytes_per_token
    assert int8 == 20 * 16 * (64 + 4)  # one fp32 scale per token and kv head
    assert int8 / fp16 <= 0.55


@pytest.mark.parametrize(
    "name,sharing,kv",
    [
        ("QKV", "qkv", 16),
        ("Q=K-V", "qk-v", 16),
        ("Q-K=V", "q-kv", 16),
        ("Q=K=V", "q=k=v", 16),
        ("GQA-4", "qkv", 4),
        ("MQA", "qkv", 1),
        ("Q-GQA-4", "q-kv", 4),
        ("Q-MQA", "q-kv", 1),
    ],
)
def test_paper_names_round_trip(name, sharing, kv):
    s = ModelSpec.from_paper_name(name, preset="paper-300m")
    assert (s.sharing, s.n_kv_head, s.paper_name) == (sharing, kv, name)
    assert (s.n_layer, s.n_embd, s.n_head, s.n_inner, s.max_positions, s.vocab_size) == (
        20,
        1024,
        16,
        4096,
        2048,
        50304,
    )
    assert ModelSpec.from_dict(s.to_dict()) == s


def test_paper_300m_param_count_is_about_300m():
    assert 300e6 < ModelSpec.from_paper_name("QKV", preset="paper-300m").param_count() < 360e6


@pytest.mark.parametrize(
    "fields,field_named",
    [
        (dict(n_embd=100, n_head=3), "n_head"),
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(sharing="q-k-v"), "sharing"),
        (dict(sharing="q=k=v", n_kv_head=2), "n_kv_head"),
        (dict(n_layer=0), "n_layer"),
        (dict(positions="alibi"), "positions"),
    ],
)
def test_invalid_specs_name_the_field(fields, field_named):
    base = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, max_positions=128)
    with pytest.raises(QkvxError, match=rf"ModelSpec\.{field_named}"):
        ModelSpec(**{**base, **fields})


def test_unknown_variant_and_keys():
    with pytest.raises(QkvxError, match="unknown variant 'QKVV'"):
        ModelSpec.from_paper_name("QKVV", preset="paper-300m")
    with pytest.raises(QkvxError, match="do not divide"):
        ModelSpec.from_paper_name("GQA-3", preset="paper-300m")
    with pytest.raises(QkvxError, match="unknown ModelSpec key.*n_heads"):
        ModelSpec.from_dict({"n_heads": 4})
