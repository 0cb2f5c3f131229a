"""manifest.json beside every export (DESIGN.md 4), and the atomic output directory it lives in."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from qkvx.errors import QkvxError

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_source(path: Path) -> str:
    """A file's sha256; for a folder, the sha256 of its files' (name, sha256) list in name order."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def artifact_entry(directory: Path, name: str, fmt: str) -> dict[str, Any]:
    p = directory / name
    return {"file": name, "format": fmt, "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise QkvxError(f"{directory}: not an export (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QkvxError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success it replaces `out` by rename, on any failure it is
    removed and `out` (if it existed) is left as it was."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QkvxError(f"{out}: exists and is not a directory")
    if out.exists() and not force:
        raise QkvxError(f"{out}: already exists (use --force to replace it)")
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
