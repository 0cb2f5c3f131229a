"""The text corpus that ships with Python: `pydoc_data.topics.topics` (the help() texts), values
concatenated in sorted key order, UTF-8 encoded. The first 90 % of the bytes train, the last 10 %
are held out: keys are sorted, so the held-out part is whole help topics a model never saw."""

from __future__ import annotations

import functools
import hashlib
import platform

import torch

HELDOUT_FRACTION = 0.1


@functools.lru_cache(maxsize=1)
def corpus_bytes() -> bytes:
    """pydoc_data.topics values in sorted key order, UTF-8 (about 466 kB on Python 3.11)."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics)).encode("utf-8")


def split_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, heldout) int64 byte tokens: the first 90 % and the last 10 % of corpus_bytes()."""
    data = torch.frombuffer(bytearray(corpus_bytes()), dtype=torch.uint8).long()
    cut = int(len(data) * (1 - HELDOUT_FRACTION))
    return data[:cut], data[cut:]


def corpus_info() -> dict:
    """What the checkpoint records about its data, so a later reader can tell whether it matches."""
    data = corpus_bytes()
    cut = len(split_corpus()[0])
    return {
        "corpus": f"pydoc_data.topics (Python {platform.python_version()}), sorted keys, UTF-8 bytes",
        "corpus_bytes": len(data),
        "corpus_sha256": hashlib.sha256(data).hexdigest(),
        "split": f"train = bytes [0, {cut}), held-out = bytes [{cut}, {len(data)}) (last 10 %)",
    }
