"""`qkvx validate` / `qkvx eval`: an export directory's artifact, run by each runtime, against its
source model.

The reference is the eager model the artifact was exported from (manifest source path, or --model),
checked by sha256 so a CI job can never validate against the wrong weights. Every runtime sees the
same token stream: the user's --text through the export's tokenizer.json, held-out text for
byte-level models, else seeded random tokens. Gates are the recipe's, from the manifest, unless
overridden. Results are keyed by the runtime names as passed (`ort` stays `ort`).
"""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qkvx.artifact import Manifest
from qkvx.errors import QkvxError
from qkvx.harness.parity import Parity, check_parity, runtime_agreement
from qkvx.harness.runners import check_runtime, open_runner, runtimes_for
from qkvx.recipes import Gates
from qkvx.util import sha256_source

PREFILL = 16
BYTE_WINDOWS = 4  # byte-level models: windows of held-out text (perplexity over many predictions)


@dataclass
class Validation:
    artifact_dir: str
    passed: bool
    runtimes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name as passed -> Parity.to_dict()
    stream: dict[str, Any] = field(default_factory=dict)  # what was fed: source, tokens, windows
    # with several runtimes, each against each earlier one: "arm64 vs pte-native" -> max_abs_dlogit,
    # same_top1 (share of positions), positions (parity.runtime_agreement)
    agreement: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def reference_model(
    manifest: Manifest, model: str | os.PathLike | None, ignore_config_keys: tuple[str, ...] = ()
):
    """The fp32 model the artifact was exported from, sha256-checked."""
    from qkvx.loaders import load

    src = Path(model) if model is not None else Path(manifest.source.path)
    if not src.exists():
        raise QkvxError(f"{src}: the source model of this export is not there (pass --model PATH)")
    if sha256_source(src) != manifest.source.sha256:
        raise QkvxError(
            f"{src}: sha256 differs from the manifest's source; it is not the model this "
            f"artifact was exported from"
        )
    return load(src, tuple(dict.fromkeys((*manifest.source.ignored_config_keys, *ignore_config_keys))))


def token_stream(
    spec, text: str | None, n_tokens: int, seed: int = 0, directory: Path | None = None
) -> tuple[torch.Tensor, bool, str]:
    """(tokens, is_text, description): the --text file through the export's tokenizer.json, else
    held-out pydoc text for byte-level models, else seeded random tokens."""
    if text is not None:
        from qkvx.tokenizer import TOKENIZER_FILE, load_tokenizer

        if directory is None or not (directory / TOKENIZER_FILE).is_file():
            raise QkvxError(f"--text needs the export's {TOKENIZER_FILE} (re-export with --tokenizer PATH)")
        try:
            data = Path(text).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise QkvxError(f"{text}: {e.strerror}") from None
        ids = load_tokenizer(directory / TOKENIZER_FILE).encode(data, prompt=False)[:n_tokens]
        return torch.tensor(ids, dtype=torch.long), True, f"{text} ({len(ids)} tokens)"
    if spec.byte_level:
        from qkvx.corpus import split_corpus

        return split_corpus()[1][:n_tokens].clone(), True, "held-out pydoc_data text"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab_size, (n_tokens,), generator=g), False, f"random tokens (seed {seed})"


def validate(
    artifact_dir: str | os.PathLike,
    runtimes: list[str] | None = None,
    model: str | os.PathLike | None = None,
    text: str | None = None,
    tokens: int | None = None,
    steps: int = 64,
    windows: int | None = None,
    prefill: int = PREFILL,
    device: str | None = None,
    gates: Gates | None = None,
    ignore_config_keys: tuple[str, ...] = (),
) -> Validation:
    """Run the artifact through each runtime against the eager reference and apply the gates."""
    directory = Path(artifact_dir)
    manifest = Manifest.read(directory)
    manifest.check_files(directory)
    for name in runtimes or ():
        check_runtime(name, manifest.format)  # before the slow part
    if steps < 1:
        raise QkvxError(f"--steps must be >= 1, got {steps}")
    ref = reference_model(manifest, model, ignore_config_keys)
    names = list(runtimes or runtimes_for(manifest.format)[:1])
    gates = gates or manifest.recipe.gates
    window = min(prefill + steps, manifest.max_seq_len)
    if window <= prefill:
        raise QkvxError(f"--steps {steps} leaves no decode step within max_seq_len {manifest.max_seq_len}")
    n_windows = windows or (BYTE_WINDOWS if ref.spec.byte_level else 1)
    stream, is_text, what = token_stream(ref.spec, text, tokens or window * n_windows, directory=directory)
    if len(stream) <= prefill + 1:
        raise QkvxError(f"{what}: {len(stream)} tokens; validation needs more than {prefill + 1}")
    window = min(window, len(stream))
    n_windows = max(1, min(n_windows, len(stream) // window))
    result = Validation(
        str(directory),
        True,
        stream={"source": what, "tokens": window * n_windows, "windows": n_windows, "prefill": prefill},
    )
    logits = {}
    for name in names:
        runner = open_runner(name, directory, device=device)
        record: dict = {}
        try:
            p = check_parity(
                ref, runner, stream[: window * n_windows], prefill, gates, n_windows, is_text, record
            )
        finally:
            runner.close()
        result.runtimes[name] = p.to_dict()
        result.passed &= p.passed
        logits[name] = record["logits"]
    result.agreement = runtime_agreement(logits)
    return result


def junit_xml(v: Validation) -> str:
    """One <testcase> per (runtime, check), so CI systems show each failed gate natively."""
    suite = ET.Element("testsuite", name="qkvx.validate", tests="0", failures="0")
    n = fails = 0
    for name, d in v.runtimes.items():
        p = Parity.from_dict(d)
        for check, text in p.checks().items():
            case = ET.SubElement(suite, "testcase", classname=f"qkvx.{name}", name=check)
            ET.SubElement(case, "system-out").text = text
            n += 1
            if check in p.failed or (check == "kl" and "kl_p99" in p.failed):
                fails += 1
                ET.SubElement(case, "failure", message=f"{name} {check} gate failed: {text}").text = text
    suite.set("tests", str(n))
    suite.set("failures", str(fails))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)
