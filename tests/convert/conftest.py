"""What the convert / distill tests share: small trained QKV teachers of both families (the
data-aware init and distillation need weights that mean something), and the pydoc text as files."""

import pytest

from tiny import TRAIN

TEACHER = {**TRAIN, "max_positions": 128}


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    """{"gpt": path, "llama": path}: QKV byte models trained for a few seconds each."""
    from qkvx.train import train

    root = tmp_path_factory.mktemp("teachers")
    return {
        family: train("QKV", family=family, seed=0, out=root / family, **TEACHER).out
        for family in ("gpt", "llama")
    }


@pytest.fixture(scope="session")
def text_files(tmp_path_factory):
    """(train.txt, heldout.txt): the pydoc split the teachers were trained and evaluated on, as bytes."""
    from qkvx.corpus import split_corpus

    root = tmp_path_factory.mktemp("text")
    train, heldout = split_corpus()
    (root / "train.txt").write_bytes(bytes(train.tolist()))
    (root / "heldout.txt").write_bytes(bytes(heldout.tolist()))
    return root / "train.txt", root / "heldout.txt"


@pytest.fixture(scope="session")
def fit_options():
    """--init fit, small enough for a test: 4 + 2 held-out batches of 4 windows of 64 bytes, 30 Adam steps."""
    return dict(batches=4, heldout_batches=2, batch_size=4, seq_len=64, steps=30)
