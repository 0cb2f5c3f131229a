"""Small helpers with one home each: output directories and files written atomically, the
context-length check, quiet third-party loggers, /proc/cpuinfo, byte formatting, variant slugs.
No torch."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from qkvx.errors import QkvxError


def check_new_output(out: Path, force: bool) -> None:
    """Fail before any slow work when `out` exists (and --force was not given) or is not a directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QkvxError(f"{out}: exists and is not a directory")
    if out.exists() and not force:
        raise QkvxError(f"{out}: already exists (use --force to replace it)")


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success it replaces `out` by rename, on any failure it is
    removed and `out` (if it existed) is left as it was: never half an artifact."""
    out = Path(out)
    check_new_output(out, force)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise QkvxError(f"{parent}: cannot create the output there ({e.strerror})") from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rename(out, old / "prev")
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temp file path beside `path` (not yet created) to write; on success it replaces
    `path` by rename, on any failure it is removed: a reader sees the old file or the new one,
    never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_source(path: Path) -> str:
    """A file's sha256; for a folder, the sha256 of its files' (name, sha256) list in name order."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def check_max_seq_len(max_seq_len: int, max_positions: int) -> int:
    """A cache length the model's positions cover: 1 <= max_seq_len <= max_positions."""
    if not isinstance(max_seq_len, int) or not 1 <= max_seq_len <= max_positions:
        raise QkvxError(
            f"max_seq_len {max_seq_len} must be between 1 and the model's max_positions ({max_positions})"
        )
    return max_seq_len


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Third-party loggers at ERROR and Python warnings off for a block: exporters and quantizers log
    per node and warn about what they skip; the user's export either works or raises."""
    logs = [logging.getLogger(name) for name in loggers]
    levels = [lg.level for lg in logs]
    for lg in logs:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(logs, levels, strict=False):
            lg.setLevel(level)


def proc_fields(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """`key: value` lines of a /proc file, first occurrence of each (in cpuinfo: the first processor)."""
    out: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def cpu_flags() -> list[str]:
    """This CPU's instruction-set flags: /proc/cpuinfo `flags` (x86) or `Features` (arm64)."""
    fields = proc_fields()
    return (fields.get("flags") or fields.get("Features") or "").split()


def fmt_bytes(n: float) -> str:
    """1,536 B / 1.50 KiB / 2.25 MiB / 1.25 GiB: binary units, two decimals above bytes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)


def fmt_mib(n: float, decimals: int = 1) -> str:
    return f"{n / 2**20:,.{decimals}f} MiB"


def variant_slug(variant: str) -> str:
    """A variant name as a folder name: Q-K=V -> q_kv, Q-GQA-4 -> q_gqa_4."""
    return variant.replace("=", "").replace("-", "_").lower()
