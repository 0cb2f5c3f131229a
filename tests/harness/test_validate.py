"""`qkvx validate`: what users put in CI. Passing artifacts pass; a changed weight fails with exit 1
and a JUnit file that names the failed check; a file changed after export is refused."""

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qkvx
from qkvx.api import export
from qkvx.models.transformer import Transformer
from qkvx.util import sha256_file

from pte_cases import cli

run = cli  # `qkvx ARGS` in a fresh process


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("val")
    spec = qkvx.ModelSpec.from_paper_name(
        "Q-K=V", n_layer=2, n_embd=64, n_head=4, vocab_size=128, max_positions=96
    )
    src = qkvx.save(Transformer(spec).init_weights(0, std=0.1), d / "model")
    out = d / "onnx"
    export(src, "onnx-fp32", out)
    return out


def test_validate_passes_with_json_and_junit(onnx_export, tmp_path, fits_80):
    r = run(
        "validate",
        onnx_export,
        "--runtimes",
        "ort",
        "--json",
        tmp_path / "v.json",
        "--junit",
        tmp_path / "v.xml",
    )
    assert r.returncode == 0, r.stderr
    fits_80(r.stdout)
    v = json.loads((tmp_path / "v.json").read_text())
    assert list(v["runtimes"]) == ["ort"]  # keyed by the name that was passed
    p = v["runtimes"]["ort"]
    assert v["passed"] and p["passed"] and p["top1_agreement"] == 1.0
    assert p["max_abs_dlogit"] <= 1e-4 * p["max_abs_logit"] + 1e-5
    assert p["ppl"] is None and p["ppl_change"] is None  # random tokens: no perplexity
    cases = ET.parse(tmp_path / "v.xml").getroot().findall("testcase")
    assert {(c.get("classname"), c.get("name")) for c in cases} == {
        ("qkvx.ort", "dlogit"),
        ("qkvx.ort", "top1"),
        ("qkvx.ort", "kl"),
    }
    assert p["kl_mean"] < 1e-9 and p["near_ties"] <= p["positions"] and "KL" in r.stdout
    assert not any(c.find("failure") is not None for c in cases)


def test_changed_weight_fails_with_exit_1_and_junit_names_the_check(onnx_export, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(onnx_export, bad)
    model = onnx.load(bad / "model.onnx")
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
    w = numpy_helper.to_array(init).copy()
    w[0, 0] += 1.0  # one weight changed
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, bad / "model.onnx")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["artifacts"][0]["sha256"] = sha256_file(
        bad / "model.onnx"
    )  # a bad export, consistently recorded
    manifest["artifacts"][0]["bytes"] = (bad / "model.onnx").stat().st_size
    (bad / "manifest.json").write_text(json.dumps(manifest))
    r = run("validate", bad, "--junit", tmp_path / "bad.xml")
    assert r.returncode == 1 and "dlogit" in r.stderr and "Traceback" not in r.stderr
    failed = [
        c
        for c in ET.parse(tmp_path / "bad.xml").getroot().findall("testcase")
        if c.find("failure") is not None
    ]
    assert ("qkvx.onnx", "dlogit") in {(c.get("classname"), c.get("name")) for c in failed}


def test_file_changed_after_export_is_refused(onnx_export, tmp_path):
    import shutil

    bad = tmp_path / "tampered"
    shutil.copytree(onnx_export, bad)
    with open(bad / "model.onnx", "ab") as f:
        f.write(b"\0")
    r = run("validate", bad)
    assert r.returncode == 2 and "sha256 does not match" in r.stderr


def test_int8_onnx_on_x86_and_emulated_arm64(trained_kv, tmp_path):
    """Quantized kernels differ by ISA: the same int8 artifact is validated on the host and on an
    emulated arm64 CPU, and both results (and their difference) are reported."""
    from qkvx.harness import emulator

    if not emulator.status().ready:
        pytest.skip("arm64 emulator not set up (qkvx emulator setup; .ci/run does it)")
    out = tmp_path / "int8"
    export(trained_kv, "onnx-int8", out)
    r = run(
        "validate",
        out,
        "--runtimes",
        "ort,arm64",
        "--device",
        "raspberry-pi-5",
        "--json",
        tmp_path / "v.json",
    )
    assert r.returncode == 0, r.stderr
    v = json.loads((tmp_path / "v.json").read_text())["runtimes"]
    x86, arm = v["ort"], v["arm64"]
    assert x86["passed"] and arm["passed"]
    print(
        f"int8 onnx: x86 ppl {x86['ppl']:.4f} top-1 {x86['top1_agreement']:.4f} max|dlogit| "
        f"{x86['max_abs_dlogit']:.3g}; "
        f"arm64 ppl {arm['ppl']:.4f} top-1 {arm['top1_agreement']:.4f} max|dlogit| "
        f"{arm['max_abs_dlogit']:.3g}; "
        f"ppl difference {abs(x86['ppl'] - arm['ppl']):.2e}"
    )
    assert x86["ppl_ref"] == arm["ppl_ref"]  # the same eager reference and token stream
    assert abs(x86["ppl"] - arm["ppl"]) / x86["ppl_ref"] < 0.02


def test_eval_table_in_80_columns(onnx_export, fits_80):
    r = run("eval", onnx_export, "--windows", "1")
    assert r.returncode == 0, r.stderr
    fits_80(r.stdout)
    assert "onnx" in r.stdout and "pass" in r.stdout


def test_runtime_agreement_each_later_runtime_against_each_earlier():
    import torch

    from qkvx.harness.parity import runtime_agreement

    a = torch.tensor([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0]])
    b = a + torch.tensor([[0.0, 0.0, 0.25], [0.0, 0.0, 2.5]])  # row 1's argmax moves to index 2
    c = a.clone()
    out = runtime_agreement({"pte": a, "pte-native": b, "arm64": c})
    assert list(out) == ["pte-native vs pte", "arm64 vs pte", "arm64 vs pte-native"]
    assert out["pte-native vs pte"] == {"max_abs_dlogit": 2.5, "same_top1": 0.5, "positions": 2}
    assert out["arm64 vs pte"] == {"max_abs_dlogit": 0.0, "same_top1": 1.0, "positions": 2}
    assert out["arm64 vs pte-native"]["max_abs_dlogit"] == 2.5
    assert runtime_agreement({"pte": a}) == {}  # one runtime: nothing to compare
