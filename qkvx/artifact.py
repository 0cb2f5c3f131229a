"""What an export directory holds, typed: manifest.json (read and written here only, validated like
the recipes: an unknown, missing or mistyped key is one error naming it) and the artifact files it
lists with their sizes and sha256."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkvx.config import typed
from qkvx.errors import QkvxError
from qkvx.recipes import Recipe
from qkvx.spec import ModelSpec
from qkvx.util import sha256_file

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ArtifactFile:
    """One file of an export: the program or graph first, its external data files in `data`."""

    file: str
    format: str  # pte | onnx | onnx-data
    bytes: int
    sha256: str
    data: tuple[ArtifactFile, ...] = ()

    @classmethod
    def of(cls, directory: Path, name: str, fmt: str, data: tuple[str, ...] = ()) -> "ArtifactFile":
        p = Path(directory) / name
        return cls(
            file=name,
            format=fmt,
            bytes=p.stat().st_size,
            sha256=sha256_file(p),
            data=tuple(cls.of(directory, d, f"{fmt}-data") for d in data),
        )

    @property
    def total_bytes(self) -> int:
        return self.bytes + sum(d.bytes for d in self.data)


@dataclass(frozen=True)
class Source:
    """The checkpoint an export came from; validation reloads it and checks the sha256."""

    path: str
    format: str  # paper | hf | native
    sha256: str
    ignored_config_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenizerInfo:
    file: str
    source: str
    vocab_size: int
    eos_ids: tuple[int, ...]


@dataclass(frozen=True)
class CacheFacts:
    """The cache layout (qkvx.spec.CacheLayout at the export's context) and what the artifact was
    read back to hold: a .pte's cache buffers, or an ONNX graph's cache inputs."""

    tensors_per_layer: int
    names: tuple[str, ...]
    n_layer: int
    kv_heads: int
    head_dim: int
    dtype: str
    element_bytes: int
    scale_bytes_per_head: int
    bytes_per_token: int
    context: int
    bytes_at_context: int
    program_cache_buffers: Mapping[str, tuple[int, ...]] | None = None  # .pte: name -> shape
    program_cache_bytes: int | None = None
    program_zero_point_bytes: int | None = None
    graph_cache_inputs: Mapping[str, Any] | None = None  # ONNX: name -> {dtype, shape}
    graph_cache_bytes_per_token: int | None = None


@dataclass(frozen=True)
class ExportInfo:
    seconds: float
    torch: str
    host: str
    planned_bytes: int | None = None  # .pte: the forward plan's non-constant arenas
    prefill_chunk: int | None = None  # .pte: tokens per call
    weight_matmuls: int | None = None  # ONNX: MatMul / Gemm nodes with a weight operand
    weights: Mapping[str, Any] | None = None  # ONNX: what the weight quantizer did


@dataclass(frozen=True)
class Manifest:
    """manifest.json: the contract between `qkvx export` and every later step."""

    qkvx_version: str
    source: Source
    variant: str
    spec: ModelSpec
    recipe: Recipe
    max_seq_len: int
    artifacts: tuple[ArtifactFile, ...]
    cache: CacheFacts
    export: ExportInfo
    tokenizer: TokenizerInfo | None = None
    parity: Mapping[str, Mapping[str, Any]] | None = None  # runtime -> Parity.to_dict()

    @property
    def artifact(self) -> ArtifactFile:
        return self.artifacts[0]

    @property
    def format(self) -> str:
        return self.artifact.format

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise QkvxError(f"{directory}: not an export (no {MANIFEST})")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise QkvxError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return typed(cls, data, str(path))

    def check_files(self, directory: Path) -> None:
        """Refuse an export whose files do not match the sha256 its manifest recorded."""
        for art in self.artifacts:
            for entry in (art, *art.data):
                path = Path(directory) / entry.file
                if not path.is_file():
                    raise QkvxError(f"{path}: missing (listed in {Path(directory) / MANIFEST})")
                if sha256_file(path) != entry.sha256:
                    raise QkvxError(
                        f"{path}: sha256 does not match {MANIFEST} (the file changed after export)"
                    )


def _plain(value: Any) -> Any:
    """asdict() output as JSON types: tuples and read-only mappings become lists and dicts."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_manifest(directory: str | Path) -> Manifest:
    return Manifest.read(directory)
