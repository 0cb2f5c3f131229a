"""Token streams for calibration (`qkvx convert`) and distillation (`qkvx distill`): text files or
Hugging Face `datasets` folders (written by Dataset.save_to_disk), read in chunks and tokenized with
the model's tokenizer (bytes for byte-level models), with a position that can be saved and restored.

A stream is the concatenation of its sources in the order given, looped over epochs. Text files are
read in chunks of about `chunk_bytes`, cut after a newline so a chunk boundary never splits a
word (a chunk is tokenized on its own). A datasets folder is read `rows_per_chunk` rows at a time
(column `text`). Documents (files, rows) are separated by the tokenizer's end-of-sequence id, except
for byte-level models, which see the bytes as they are (rows get a trailing newline).

WindowLoader cuts the stream into windows of seq_len + 1 tokens (stride seq_len: every token but the
first is a target exactly once per epoch) and shuffles them through a fixed-size buffer; its
state_dict() (stream position, leftover tokens, buffer, generator state) restores it exactly, so a
resumed run reads the very windows an uninterrupted one would have.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from qkvx.errors import QkvxError
from qkvx.tokenizer import Tokenizer

DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_dataset_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in DATASET_MARKERS)


class Encoder:
    """text -> token ids: UTF-8 bytes for a byte-level model (vocab 256, no tokenizer given), else
    the tokenizer without special tokens (a text stream is not a prompt)."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self.byte_level = tokenizer is None
        eos = tokenizer.eos_ids if tokenizer is not None else []
        self.separator = [] if self.byte_level or not eos else [eos[0]]

    def __call__(self, text: str | bytes) -> np.ndarray:
        """Files arrive as bytes (a byte-level model sees them exactly as stored), dataset rows as str."""
        if self.byte_level:
            data = text if isinstance(text, bytes) else text.encode("utf-8")
            return np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self.tokenizer.encode(text, prompt=False), dtype=np.int32)


class _Source:
    """One file or datasets folder: chunks of text from a position (byte offset or row index)."""

    def __init__(self, path: Path, text_column: str, split: str | None):
        self.path = path
        self.dataset = None
        if is_dataset_folder(path):
            self.dataset = _load_dataset(path, text_column, split)
            self.text_column = text_column
        elif not path.is_file():
            raise QkvxError(f"{path}: not a text file or a datasets folder (save_to_disk)")

    def chunks(
        self, position: int, chunk_bytes: int, rows_per_chunk: int
    ) -> Iterator[tuple[str | bytes, int, bool]]:
        """(text, position after it, ends a document) from `position` to the end: a file's raw bytes,
        a dataset's rows as str."""
        if self.dataset is not None:
            n = len(self.dataset)
            for start in range(position, n, rows_per_chunk):
                stop = min(n, start + rows_per_chunk)
                for i, text in enumerate(self.dataset[start:stop][self.text_column]):
                    yield (text or ""), start + i + 1, True
            return
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            f.seek(position)
            while position < size:
                data = f.read(chunk_bytes)
                if not data:
                    break
                if position + len(data) < size:  # cut after the last newline (or keep whole UTF-8 chars)
                    cut = data.rfind(b"\n") + 1
                    if cut == 0:
                        cut = _utf8_boundary(data)
                    f.seek(position + cut)
                    data = data[:cut]
                position += len(data)
                yield data, position, position >= size


def _utf8_boundary(data: bytes) -> int:
    """Largest cut <= len(data) that does not split a UTF-8 character."""
    cut = len(data)
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # a lead byte (or ASCII): is its character complete?
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4
            return cut if need <= back else len(data) - back
    return cut


def _load_dataset(path: Path, column: str, split: str | None):
    try:
        import datasets
    except ImportError:
        raise QkvxError(
            f"{path}: reading a datasets folder needs the `datasets` package "
            f"(pip install datasets); text files need nothing"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a folder it cannot read
        raise QkvxError(
            f"{path}: not a readable datasets folder ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        pick = split or ("train" if "train" in ds else names[0] if len(names) == 1 else None)
        if pick not in ds:
            raise QkvxError(f"{path}: a dataset with splits {', '.join(names)}; name one with --split")
        ds = ds[pick]
    if column not in ds.column_names:
        raise QkvxError(f"{path}: no {column!r} column (columns: {', '.join(ds.column_names)})")
    return ds


class TokenStream:
    """The tokens of `paths` in order, looped over epochs; position() / restore() make it resumable.

    skip_tokens: the first tokens of every epoch are left out (they are the held-out set when no
    separate evaluation data is given)."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        encoder: Encoder,
        *,
        text_column: str = "text",
        split: str | None = None,
        chunk_bytes: int = 1 << 20,
        rows_per_chunk: int = 256,
        skip_tokens: int = 0,
    ):
        if not paths:
            raise QkvxError("no data: give at least one text file or datasets folder")
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            if not p.exists():
                raise QkvxError(f"{p}: no such file or directory")
        self.sources = [_Source(p, text_column, split) for p in self.paths]
        self.encoder = encoder
        self.chunk_bytes, self.rows_per_chunk, self.skip_tokens = chunk_bytes, rows_per_chunk, skip_tokens
        self.source = self.offset = self.epoch = self.skipped = self.epoch_tokens = 0

    _FIELDS = ("source", "offset", "epoch", "skipped", "epoch_tokens")

    def position(self) -> dict:
        return {k: getattr(self, k) for k in self._FIELDS}

    def restore(self, pos: dict) -> None:
        for k in self._FIELDS:
            setattr(self, k, int(pos[k]))

    def chunks(self, loop: bool = True) -> Iterator[np.ndarray]:
        """Token chunks from the current position; the position advances past each chunk as it is
        yielded. Raises QkvxError if a whole epoch holds no token past skip_tokens."""
        while True:
            while self.source < len(self.sources):
                src = self.sources[self.source]
                for text, after, doc_end in src.chunks(self.offset, self.chunk_bytes, self.rows_per_chunk):
                    ids = self.encoder(text)
                    if doc_end and self.encoder.separator:
                        ids = np.concatenate([ids, np.asarray(self.encoder.separator, dtype=np.int32)])
                    elif (
                        doc_end
                        and self.encoder.byte_level
                        and isinstance(text, str)
                        and text
                        and not text.endswith("\n")
                    ):
                        ids = np.concatenate([ids, np.asarray([10], dtype=np.int32)])
                    self.offset = after
                    if self.skipped < self.skip_tokens:
                        drop = min(len(ids), self.skip_tokens - self.skipped)
                        self.skipped += drop
                        ids = ids[drop:]
                    if len(ids):
                        self.epoch_tokens += len(ids)
                        yield ids
                self.source, self.offset = self.source + 1, 0
            if not loop:
                return
            if self.epoch_tokens == 0:
                what = f" beyond the {self.skip_tokens:,} held out" if self.skip_tokens else ""
                raise QkvxError(f"no tokens in the data{what}: {', '.join(map(str, self.paths))}")
            self.source = self.offset = self.skipped = self.epoch_tokens = 0
            self.epoch += 1

    def take(self, n: int) -> torch.Tensor:
        """The first n tokens from the current position (fewer if one pass holds fewer)."""
        out, have = [], 0
        for ids in self.chunks(loop=False):
            out.append(ids[: n - have])
            have += len(out[-1])
            if have >= n:
                break
        return (
            torch.from_numpy(np.concatenate(out).astype(np.int64))
            if out
            else torch.zeros(0, dtype=torch.long)
        )


class WindowLoader:
    """Windows of seq_len + 1 tokens from a TokenStream, shuffled through a buffer of
    `shuffle_buffer` windows (1 = stream order). Deterministic for a seed; exactly resumable."""

    def __init__(self, stream: TokenStream, seq_len: int, shuffle_buffer: int = 1024, seed: int = 0):
        if seq_len < 1 or shuffle_buffer < 1:
            raise QkvxError("seq_len and shuffle_buffer must be >= 1")
        self.stream, self.seq_len, self.capacity = stream, seq_len, shuffle_buffer
        self.pending = np.zeros(0, dtype=np.int32)  # tokens read but not yet cut into windows
        self.buffer = np.zeros((0, seq_len + 1), dtype=np.int32)
        self.gen = torch.Generator().manual_seed(seed)
        self._chunks: Iterator[np.ndarray] | None = None

    def _window(self) -> np.ndarray:
        """The next window in stream order (consecutive windows share one token)."""
        L = self.seq_len
        while len(self.pending) < L + 1:
            if self._chunks is None:
                self._chunks = self.stream.chunks(loop=True)
            self.pending = np.concatenate([self.pending, next(self._chunks)])
        w = self.pending[: L + 1].copy()
        self.pending = self.pending[L:]
        return w

    def next(self, n: int) -> torch.Tensor:
        """n windows [n, seq_len + 1] (int64)."""
        rows = []
        for _ in range(n):
            while len(self.buffer) < self.capacity:
                self.buffer = np.concatenate([self.buffer, self._window()[None]])
            j = int(torch.randint(0, self.capacity, (1,), generator=self.gen))
            rows.append(self.buffer[j].copy())
            self.buffer[j] = self._window()
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def state_dict(self) -> dict:
        return {
            "stream": self.stream.position(),
            "pending": torch.from_numpy(self.pending.copy()),
            "buffer": torch.from_numpy(self.buffer.copy()),
            "generator": self.gen.get_state(),
            "seq_len": self.seq_len,
            "capacity": self.capacity,
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["seq_len"], state["capacity"]) != (self.seq_len, self.capacity):
            raise QkvxError(
                f"the checkpoint's data windows (seq_len {state['seq_len']}, shuffle buffer "
                f"{state['capacity']}) differ from this run's ({self.seq_len}, {self.capacity})"
            )
        self.stream.restore(state["stream"])
        self.pending = state["pending"].numpy().astype(np.int32)
        self.buffer = state["buffer"].numpy().astype(np.int32)
        self.gen.set_state(state["generator"])
        self._chunks = None  # re-opened at the restored position on the next read
