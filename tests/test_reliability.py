"""Reliability: kill -9 during export leaves the previous output or nothing; exports are
reproducible byte for byte; decoding past max_seq_len is refused by every runner."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import qkvx
from qkvx import QkvxError
from qkvx.api import export
from qkvx.models.transformer import Transformer


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    spec = qkvx.ModelSpec.from_paper_name(
        "Q-K=V", n_layer=2, n_embd=64, n_head=4, vocab_size=256, max_positions=64
    )
    return qkvx.save(Transformer(spec).init_weights(0, std=0.1), tmp_path_factory.mktemp("rel") / "native")


@pytest.mark.parametrize("delay", [1.5, 4.0, 7.0])
def test_kill_9_during_export_leaves_previous_output_or_nothing(native, tmp_path, delay):
    """SIGKILL at several points of `qkvx export --force` over an existing export: the destination
    is exactly the previous export (or, with no previous one, absent); only hidden temp dirs remain."""
    out = tmp_path / "out"
    (out).mkdir()
    (out / "manifest.json").write_text('{"previous": true}')
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qkvx",
            "export",
            str(native),
            "--recipe",
            "pte-fp32",
            "--out",
            str(out),
            "--force",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(delay)
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait()
    visible = sorted(x.name for x in tmp_path.iterdir() if not x.name.startswith("."))
    assert visible == ["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    if p.returncode == -signal.SIGKILL:
        assert manifest == {"previous": True}, "a killed export must leave the previous output untouched"
        assert sorted(x.name for x in out.iterdir()) == ["manifest.json"]
    else:  # it finished before the signal: then it is whole
        assert manifest["artifacts"][0]["file"] == "model.pte" and (out / "model.pte").is_file()


@pytest.mark.parametrize("recipe", ["pte-fp32", "onnx-fp32"])
def test_exports_are_byte_identical(native, tmp_path, recipe):
    a = export(native, recipe, tmp_path / "a", validate=False)
    b = export(native, recipe, tmp_path / "b", validate=False)
    assert a.artifact.sha256 == b.artifact.sha256
    assert (tmp_path / "a" / a.artifact.file).read_bytes() == (tmp_path / "b" / b.artifact.file).read_bytes()


@pytest.mark.parametrize("recipe", ["pte-fp32", "onnx-fp32"])
def test_decoding_past_max_seq_len_is_refused(native, tmp_path, recipe):
    from qkvx.harness.runners import open_runner

    out = tmp_path / "e"
    export(native, recipe, out, max_seq_len=32, validate=False)
    fmt = json.loads((out / "manifest.json").read_text())["artifacts"][0]["format"]
    runner = open_runner(fmt, out)
    assert runner.max_seq_len == 32
    runner.prefill(torch.arange(30))
    runner.decode(1)
    runner.decode(2)
    with pytest.raises(QkvxError, match="context overflow"):
        runner.decode(3)
    runner.reset()
    with pytest.raises(QkvxError, match="context overflow"):
        runner.prefill(torch.arange(33))
