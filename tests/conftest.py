"""Shared fixtures: a small model trained in the test session (quality checks need trained weights)."""
import pytest

SMALL = dict(n_layer=2, n_embd=64, n_head=4, max_positions=256, steps=150, batch_size=16, seq_len=64,
             lr=3e-3, warmup=15, threads=1, quiet=True)


@pytest.fixture(scope="session")
def trained_kv(tmp_path_factory):
    """A Q-K=V byte-level GPT trained for a few seconds: it writes plausible ASCII, which is all the
    parity and runner tests need."""
    from qkvx.train import train

    return train("Q-K=V", seed=0, out=tmp_path_factory.mktemp("trained") / "q_kv", **SMALL).out
