"""arm64 emulator and runner: fp32 ONNX artifacts of Q-K=V and QKV on onnxruntime's
aarch64 build under qemu pass the fp32 parity gate, and match the host onnxruntime; the emulator's
setup / status and the runner's failures are one actionable line each.

Emulated tests skip only when the emulator is not set up AND this machine cannot set it up (not
root, no qemu-user-static / debootstrap); any other setup failure (network, mirror) fails them."""

import io
import json

import numpy as np
import pytest
import torch

from qkvx import QkvxError
from qkvx.export.onnx import export_onnx
from qkvx.harness import emulator
from qkvx.harness.arm64 import Arm64Runner, onnx_max_seq_len
from qkvx.harness.arm64_driver import from_npy, read_frame, serve, to_npy, write_frame
from qkvx.harness.ort import OrtRunner, ort_session
from qkvx.harness.ort_feed import OrtStepper
from qkvx.harness.parity import check_parity
from qkvx.recipes import Gates

from tiny import DIMS as TINY
from tiny import model as _tiny

DIMS = {**TINY, "max_positions": 64}
PREFILL, STEPS = 8, 24  # a few seconds emulated: ~3 s to start onnxruntime, milliseconds a step


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """name -> (model, model.onnx): one export per variant for the session."""
    cache: dict = {}

    def get(name):
        if name not in cache:
            model = _tiny(name, max_positions=DIMS["max_positions"])
            out = tmp_path_factory.mktemp(name)
            export_onnx(model, out)
            cache[name] = model, out / "model.onnx"
        return cache[name]

    return get


def _tokens(n=PREFILL + STEPS, seed=1):
    return torch.randint(0, DIMS["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed))


def _run(runner, tokens):
    runner.reset()
    return torch.cat(
        [runner.prefill(tokens[:PREFILL])] + [runner.decode(int(t))[None] for t in tokens[PREFILL:]]
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Q-K=V", "QKV"])
def test_arm64_fp32_parity_and_host_agreement(arm64, exported, name):
    model, path = exported(name)
    tokens = _tokens()
    with Arm64Runner(path) as runner:
        assert runner.info["machine"] == "aarch64" and runner.cpu == "cortex-a76"
        assert runner.max_seq_len == runner.prefill_chunk == DIMS["max_positions"]
        p = check_parity(model, runner, tokens, PREFILL, Gates())
        assert p.passed and p.top1_agreement == 1.0, p
        assert p.max_abs_dlogit <= Gates().bound(p.max_abs_logit)
        arm = _run(runner, tokens)  # a second run after reset(): the cache really restarts
    host = _run(OrtRunner(path), tokens)
    d = (arm - host).abs().max().item()
    print(f"{name}: arm64 vs eager max|dlogit| {p.max_abs_dlogit:.2e}, arm64 vs host ORT {d:.2e}")
    assert d <= Gates().bound(host.abs().max().item())
    assert torch.equal(arm.argmax(-1), host.argmax(-1))


@pytest.mark.slow
def test_arm64_device_profile_cpu_and_errors_keep_the_driver(arm64, exported):
    model, path = exported("Q-K=V")
    with Arm64Runner(path, device="galaxy-s24-ultra") as runner:  # qemu_cpu "max,...": Armv9 features
        assert runner.cpu == "max,sve=off,sme=off"  # the SoC has no SVE; SME int8 kernels emulate wrongly
        with pytest.raises(QkvxError, match="arm64 onnxruntime"):
            runner.prefill([DIMS["vocab_size"] + 5])  # out of vocab: the driver answers with an error
        assert runner.pos == 0  # ... and nothing advanced, so the runner goes on
        p = check_parity(model, runner, _tokens(16), PREFILL, Gates())
        assert p.passed, p
    assert runner.proc is None  # closed by the context manager


def test_arm64_runner_when_not_set_up(exported, tmp_path):
    _, path = exported("Q-K=V")
    with pytest.raises(QkvxError, match="qkvx emulator setup"):
        Arm64Runner(path, cache_dir=tmp_path / "empty")
    with pytest.raises(QkvxError, match="not an arm64 target"):
        Arm64Runner(path, device="host")
    assert onnx_max_seq_len(path) == DIMS["max_positions"]


def test_emulator_status_and_setup_say_how_to_fix(tmp_path, monkeypatch):
    info = emulator.status(tmp_path)
    assert not info.ready and any("emulator setup" in m for m in info.missing), info
    monkeypatch.setattr(emulator.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(emulator.shutil, "which", lambda name: None)
    info = emulator.status(tmp_path)
    assert not info.ready and "not ready" in info.summary()
    with pytest.raises(QkvxError) as e:
        emulator.setup(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and emulator.FIX_TOOLS in msg and "root" in msg, msg


def test_emulator_setup_is_idempotent(arm64):
    again = emulator.setup()
    assert again.ready and again.action == "ready"
    assert again.versions["onnxruntime"] == emulator.wanted()["onnxruntime"]
    print(f"arm64 emulator set up in {again.versions['setup_seconds']} s")


def test_cpuinfo_text_per_core():
    text = emulator.cpuinfo_text("cortex-a76")
    assert "CPU implementer\t: 0x41" in text and "CPU part\t: 0xd0b" in text and "asimddp" in text
    assert text.count("processor\t:") >= 1
    assert "sve2" in emulator.cpuinfo_text("max") and "i8mm" in emulator.cpuinfo_text("max")
    no_sve = emulator.cpuinfo_text("max,sve=off").split("\n")[2]  # qemu feature options
    assert " sve" not in no_sve and "i8mm" in no_sve, no_sve
    with pytest.raises(QkvxError, match="known"):
        emulator.cpuinfo_text("cortex-x4")


def test_ort_feed_stepper_matches_host_runner(exported):
    """The numpy-only stepper the driver uses computes what the host runner computes, bit for bit."""
    _, path = exported("QKV")
    tokens = _tokens()
    stepper = OrtStepper(ort_session(path))
    got = np.concatenate(
        [stepper.step(tokens[:PREFILL].numpy())]
        + [stepper.step(tokens[i : i + 1].numpy()) for i in range(PREFILL, len(tokens))]
    )
    assert stepper.pos == len(tokens) and stepper.max_seq_len == DIMS["max_positions"]
    assert np.array_equal(got, _run(OrtRunner(path), tokens).numpy())


def test_driver_protocol_on_the_host(exported):
    """The driver's serve loop over in-memory pipes, with the host's onnxruntime."""
    _, path = exported("Q-K=V")
    tokens = _tokens(12)
    requests = io.BytesIO()
    write_frame(requests, b"S", to_npy(tokens[:PREFILL].numpy()))
    write_frame(requests, b"S", to_npy(tokens[PREFILL:].numpy()))
    write_frame(requests, b"X")
    write_frame(requests, b"R")
    write_frame(requests, b"S", to_npy(tokens.numpy()))
    requests.seek(0)
    out = io.BytesIO()
    assert serve(str(path), 1, requests, out) == 0
    out.seek(0)
    frames = [read_frame(out) for _ in range(6)]
    assert read_frame(out) is None
    assert [k for k, _ in frames] == [b"H", b"L", b"L", b"E", b"K", b"L"]
    assert json.loads(frames[0][1])["max_seq_len"] == DIMS["max_positions"]
    incremental = np.concatenate([from_npy(frames[1][1]), from_npy(frames[2][1])])
    np.testing.assert_allclose(incremental, from_npy(frames[5][1]), atol=1e-5)
