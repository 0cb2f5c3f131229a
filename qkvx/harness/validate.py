"""`qkvx validate`: an export directory's artifact, run by each runtime, against its source model.

The reference is the eager model the artifact was exported from (manifest source path, or --model),
checked by sha256 so a CI job can never validate against the wrong weights. Every runtime sees the
same token stream: held-out text for byte-level models (or the user's --text), else seeded random
tokens. Gates are the recipe's, from the manifest, unless overridden.
"""
from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qkvx.errors import QkvxError
from qkvx.export.manifest import read_manifest, sha256_file, sha256_source
from qkvx.recipes import Gates

# Runtimes that can run each artifact format; "ort" is accepted for onnxruntime on the host.
RUNTIMES_FOR = {"pte": ("pte",), "onnx": ("onnx", "arm64")}
ALIASES = {"ort": "onnx"}


@dataclass
class Validation:
    artifact_dir: str
    passed: bool
    runtimes: dict[str, dict[str, Any]] = field(default_factory=dict)
    stream: dict[str, Any] = field(default_factory=dict)  # what was fed: source, tokens, windows

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_artifacts(directory: Path, manifest: dict) -> None:
    """Refuse an export whose files do not match the sha256 its manifest recorded."""
    for art in manifest["artifacts"]:
        for entry in [art, *art.get("data", [])]:
            path = directory / entry["file"]
            if not path.is_file():
                raise QkvxError(f"{path}: missing (listed in {directory}/manifest.json)")
            if sha256_file(path) != entry["sha256"]:
                raise QkvxError(f"{path}: sha256 does not match manifest.json (the file changed after export)")


def reference_model(manifest: dict, model: str | os.PathLike | None, ignore_config_keys: tuple[str, ...] = ()):
    import qkvx

    src = Path(model) if model is not None else Path(manifest["source"]["path"])
    if not src.exists():
        raise QkvxError(f"{src}: the source model of this export is not there (pass --model PATH)")
    if sha256_source(src) != manifest["source"]["sha256"]:
        raise QkvxError(f"{src}: sha256 differs from the manifest's source; it is not the model this "
                        f"artifact was exported from")
    ignored = (*manifest["source"].get("ignored_config_keys", []), *ignore_config_keys)
    return qkvx.load(src, tuple(dict.fromkeys(ignored)))


def token_stream(spec, text: str | None, n_tokens: int, seed: int = 0, directory: Path | None = None
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
    if spec.vocab_size == 256:
        from qkvx.train import split_corpus

        return split_corpus()[1][:n_tokens].clone(), True, "held-out pydoc_data text"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab_size, (n_tokens,), generator=g), False, f"random tokens (seed {seed})"


def open_runtime(name: str, directory: Path, manifest: dict, device: str | None):
    from qkvx.harness.runners import get_runner

    fmt = manifest["artifacts"][0]["format"]
    path = directory / manifest["artifacts"][0]["file"]
    if name not in RUNTIMES_FOR.get(fmt, ()):
        raise QkvxError(f"runtime {name!r} cannot run a {fmt} artifact; use {', '.join(RUNTIMES_FOR.get(fmt, ()))}")
    if name == "arm64":
        from qkvx.harness.arm64 import Arm64Runner

        if (manifest.get("recipe") or {}).get("attention") == "custom":
            raise QkvxError("runtime 'arm64' cannot run this artifact: its qkvx.CachedAttention op library is "
                            "built for the host only (export with onnx-fp32 or onnx-fp32-rotary for arm64)")

        return Arm64Runner(path, device=device)
    return get_runner(name)(path)


def validate(artifact_dir: str | os.PathLike, runtimes: list[str] | None = None, model: str | os.PathLike | None = None,
             text: str | None = None, tokens: int | None = None, steps: int = 64, windows: int | None = None,
             prefill: int = 16, device: str | None = None, gates: Gates | None = None,
             ignore_config_keys: tuple[str, ...] = ()) -> Validation:
    """Run the artifact through each runtime against the eager reference and apply the gates.
    Results are keyed by the runtime names as passed (`ort` stays `ort`)."""
    from qkvx.harness.parity import check_parity

    directory = Path(artifact_dir)
    manifest = read_manifest(directory)
    check_artifacts(directory, manifest)
    ref = reference_model(manifest, model, ignore_config_keys)
    fmt = manifest["artifacts"][0]["format"]
    names = list(runtimes or RUNTIMES_FOR[fmt][:1])
    if gates is None:
        from qkvx.config import typed

        gates = typed(Gates, manifest["recipe"]["gates"], f"{directory}/manifest.json recipe.gates")
    window = min(prefill + steps, manifest["max_seq_len"])
    if window <= prefill:
        raise QkvxError(f"--steps {steps} leaves no decode step within max_seq_len {manifest['max_seq_len']}")
    n_windows = windows or (4 if ref.spec.vocab_size == 256 else 1)
    stream, is_text, what = token_stream(ref.spec, text, tokens or window * n_windows, directory=directory)
    if len(stream) <= prefill + 1:
        raise QkvxError(f"{what}: {len(stream)} tokens; validation needs more than {prefill + 1}")
    window = min(window, len(stream))
    n_windows = max(1, min(n_windows, len(stream) // window))
    result = Validation(str(directory), True, stream={"source": what, "tokens": window * n_windows,
                                                      "windows": n_windows, "prefill": prefill})
    for name in names:
        runner = open_runtime(ALIASES.get(name, name), directory, manifest, device)
        try:
            p = check_parity(ref, runner, stream[:window * n_windows], prefill, gates, n_windows, is_text)
        finally:
            getattr(runner, "close", lambda: None)()
        result.runtimes[name] = p.to_dict()
        result.passed &= p.passed
    return result


def junit_xml(v: Validation) -> str:
    """One <testcase> per (runtime, check), so CI systems show each failed gate natively."""
    suite = ET.Element("testsuite", name="qkvx.validate", tests="0", failures="0")
    n = fails = 0
    for name, p in v.runtimes.items():
        checks = {"dlogit": f"max |dlogit| {p['max_abs_dlogit']:.3g}" + (f" <= {p['bound']:.3g}" if p["bound"] is not None else " (no gate)"),
                  "top1": f"top-1 agreement {p['top1_agreement']:.4f} ({p['near_ties']} of {p['positions']} near ties excluded)",
                  "kl": f"KL(reference || runtime) mean {p['kl_mean']:.3g}, p99 {p['kl_p99']:.3g}"}
        if p["ppl"] is not None:
            checks["ppl"] = f"perplexity {p['ppl']:.4f} vs eager {p['ppl_ref']:.4f} ({100 * p['ppl_change']:+.2f} %)"
        for check, text in checks.items():
            case = ET.SubElement(suite, "testcase", classname=f"qkvx.{name}", name=check)
            ET.SubElement(case, "system-out").text = text
            n += 1
            failed = [f for f in p["failed"] if f == check or (check == "kl" and f == "kl_p99")]
            if failed:
                fails += 1
                ET.SubElement(case, "failure", message=f"{name} {check} gate failed: {text}").text = text
    suite.set("tests", str(n))
    suite.set("failures", str(fails))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)
