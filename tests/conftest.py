"""Shared fixtures: a small model trained in the test session (quality checks need trained weights)."""

import pytest

from tiny import TRAIN_SMALL as SMALL


@pytest.fixture(scope="session")
def trained_kv(tmp_path_factory):
    """A Q-K=V byte-level GPT trained for a few seconds: it writes plausible ASCII, which is all the
    parity and runner tests need."""
    from qkvx.train import train

    return train("Q-K=V", seed=0, out=tmp_path_factory.mktemp("trained") / "q_kv", **SMALL).out


@pytest.fixture
def fits_80():
    """fits_80(text): what a CI log with no terminal shows is readable: nothing cut to an
    ellipsis, no line wider than 80 columns."""

    def check(text):
        lines = text.splitlines()
        assert lines and "…" not in text, text
        assert max(len(line) for line in lines) <= 80, max(lines, key=len)

    return check
