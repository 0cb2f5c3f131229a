"""What a run reads besides the models: the tokenizer the data is encoded with and the window
length the model was trained at."""

from __future__ import annotations

from pathlib import Path

from qkvx.errors import QkvxError


def resolve_tokenizer(student: Path, teacher: Path, spec, given):
    """The tokenizer the data is encoded with: --tokenizer, else the student folder's tokenizer.json,
    else the teacher folder's; None means bytes (byte-level models). Checked against both models."""
    from qkvx.tokenizer import TOKENIZER_FILE, check_vocab, load_tokenizer

    def folder_tok(p: Path):
        return load_tokenizer(p) if p.is_dir() and (p / TOKENIZER_FILE).is_file() else None

    tok = load_tokenizer(given) if given is not None else None
    if tok is None:
        s_tok, t_tok = folder_tok(student), folder_tok(teacher)
        if s_tok is not None and t_tok is not None and s_tok.to_json() != t_tok.to_json():
            raise QkvxError(
                f"{student} and {teacher} carry different tokenizer.json files: the student "
                f"must read the teacher's tokens (pass --tokenizer to choose)"
            )
        tok = s_tok or t_tok
    if tok is None:
        if spec.vocab_size == 256:
            return None
        raise QkvxError(f"{student}: no tokenizer.json beside the student or the teacher; pass --tokenizer")
    check_vocab(tok, spec.vocab_size, str(student))
    if tok.vocab_size < spec.vocab_size // 2:
        raise QkvxError(
            f"{tok.source}: the tokenizer has {tok.vocab_size} ids, but the model's vocabulary "
            f"has {spec.vocab_size} rows: not this model's tokenizer"
        )
    if spec.vocab_size == 256 and tok.vocab_size == 256:
        return None  # byte-level: bytes directly
    return tok


def trained_seq_len(meta: dict) -> int | None:
    """The window length the model (or the model it was converted from) was trained at."""
    for m in (
        meta,
        (meta.get("conversion") or {}).get("source", {}).get("meta") or {},
        meta.get("distillation") or {},
    ):
        seq = (m.get("training") or {}).get("seq_len") if "training" in m else m.get("seq_len")
        if isinstance(seq, int) and seq > 0:
            return seq
    return None
