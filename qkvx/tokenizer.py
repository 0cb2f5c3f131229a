"""Tokenizers: a Hugging Face `tokenizer.json` (or a tokenizer folder), or the byte-level one of
qkvx-trained models (token id = byte value), all used through the `tokenizers` library.

Every export writes `tokenizer.json` beside its artifact: ExecuTorch's LLM runner reads it there
(pytorch_tokenizers), and `generate`, `eval` and `validate --text` tokenize through it, so the
text a user types is encoded the same way on every runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from qkvx.errors import QkvxError

TOKENIZER_FILE = "tokenizer.json"
BYTE_EOS = 0  # byte-level models: NUL never occurs in text, so it is the end-of-sequence id
# End-of-sequence tokens of common families, used when no tokenizer_config.json names one.
EOS_NAMES = ("<|endoftext|>", "</s>", "<|eot_id|>", "<|end_of_text|>", "<eos>", "<|im_end|>")


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` with the end-of-sequence ids generation stops at."""

    backend: object = field(repr=False)  # tokenizers.Tokenizer
    eos_ids: list[int]
    source: str

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, prompt: bool = True) -> list[int]:
        """prompt: add the tokenizer's special tokens (a Llama BOS); a text stream gets none."""
        return self.backend.encode(text, add_special_tokens=prompt).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def to_json(self) -> str:
        return self.backend.to_str()

    def describe(self) -> dict:
        return {"source": self.source, "vocab_size": self.vocab_size, "eos_ids": self.eos_ids}


def byte_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    return Tokenizer(Backend.from_str(byte_tokenizer_json()), [BYTE_EOS], "byte-level (id = byte value)")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json file, or a Hugging Face tokenizer folder (tokenizer.json, or files that
    transformers turns into a fast tokenizer, e.g. GPT-2's vocab.json + merges.txt). Read offline."""
    from tokenizers import Tokenizer as Backend

    p = Path(path)
    if not p.exists():
        raise QkvxError(f"{p}: no such tokenizer file or folder")
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if file.is_file():
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # the Rust library raises its own exception type
            raise QkvxError(
                f"{file}: not a readable tokenizer.json ({str(e).splitlines()[0][:160]})"
            ) from None
    else:
        backend = _from_transformers(p)
    config = p / "tokenizer_config.json" if p.is_dir() else p.with_name("tokenizer_config.json")
    return Tokenizer(backend, _eos_ids(backend, config), str(p))


def _from_transformers(folder: Path):
    import logging

    from transformers import AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise QkvxError(
            f"{folder}: no {TOKENIZER_FILE} and no tokenizer transformers can read "
            f"({str(e).splitlines()[0][:160]})"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise QkvxError(
            f"{folder}: transformers reads only a slow tokenizer here; save it with "
            f"tokenizer.save_pretrained() to get a {TOKENIZER_FILE}"
        )
    return tok.backend_tokenizer


def _eos_ids(backend, config: Path) -> list[int]:
    """tokenizer_config.json's eos_token where there is one, else a special token named like EOS."""
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise QkvxError(f"{config}: not valid JSON") from None
        name = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(name, str) and backend.token_to_id(name) is not None:
            return [backend.token_to_id(name)]
    specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    return [backend.token_to_id(n) for n in EOS_NAMES if n in specials]


def check_vocab(tokenizer: Tokenizer, vocab_size: int, model: str) -> None:
    """A model may have more embedding rows than the tokenizer has ids (padded, e.g. 50304 for
    GPT-2's 50257), never fewer."""
    if tokenizer.vocab_size > vocab_size:
        raise QkvxError(
            f"{tokenizer.source}: the tokenizer has {tokenizer.vocab_size} ids, more than the "
            f"{vocab_size} rows of {model}'s vocabulary"
        )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (what ByteLevel pre-tokenizers use)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=False)}


def byte_tokenizer_json() -> str:
    """A BPE of the 256 byte tokens and no merges: encodes text to its UTF-8 bytes, and loads in
    ExecuTorch's stock runner."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    return json.dumps(
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [],
            "normalizer": None,
            "pre_tokenizer": byte_level,
            "post_processor": None,
            "decoder": byte_level,
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "vocab": vocab,
                "merges": [],
            },
        },
        ensure_ascii=False,
    )
