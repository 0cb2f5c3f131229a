""".pte on emulated arm64: qkvx-run cross-built against ExecuTorch's aarch64 wheel, under
qemu-aarch64-static (XNNPACK's and qkvx's arm64 kernels). The issue's four cases x three recipes
pass `validate` against eager there, beside the host's qkvx-run, and the report carries their
difference; bad inputs are one line and exit 2 inside the emulator as on the host.

Skipped only when the emulator is not set up AND this machine cannot set it up (conftest.arm64)."""

import json
import subprocess
import time

import pytest
import torch

import qkvx
from qkvx import QkvxError
from qkvx.artifact import Manifest
from qkvx.harness import emulator
from qkvx.recipes import Gates

from pte_cases import CASES, case_id, check_bad_inputs, cli


def run_arm64(*args, stdin=None, cpu="cortex-a76"):
    """qkvx-run's aarch64 build under qemu, as the arm64 runner starts it."""
    cmd = emulator.command(list(map(str, args)), cpu, program=emulator.pte_runner())
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=300, env=emulator.env())


@pytest.mark.slow
@pytest.mark.parametrize("family,variant,recipe", CASES, ids=[case_id(*c) for c in CASES])
def test_validate_pte_arm64_against_eager_and_the_host(arm64, pte_artifact, family, variant, recipe):
    from qkvx.validate import validate

    t0 = time.perf_counter()
    v = validate(pte_artifact(family, variant, recipe), runtimes=["pte-native", "arm64"])
    seconds = time.perf_counter() - t0
    host, arm = v.runtimes["pte-native"], v.runtimes["arm64"]
    a = v.agreement["arm64 vs pte-native"]
    print(
        f"{case_id(family, variant, recipe)}: arm64 vs eager max|dlogit| {arm['max_abs_dlogit']:.2e} "
        f"top-1 {arm['top1_agreement']:.4f}; host {host['max_abs_dlogit']:.2e}; arm64 vs host "
        f"{a['max_abs_dlogit']:.2e}, same top-1 {a['same_top1']:.4f}; {seconds:.1f} s"
    )
    assert v.passed and arm["passed"] and host["passed"], (arm, host)
    assert arm["positions"] == a["positions"] == v.stream["tokens"] and v.stream["windows"] == 4
    if recipe == "pte-fp32":  # the fp32 gate against eager, restated, and against the host
        assert arm["max_abs_dlogit"] <= Gates().bound(arm["max_abs_logit"]) and arm["top1_agreement"] == 1.0
        assert a["max_abs_dlogit"] <= Gates().bound(host["max_abs_logit"]), a
    else:  # dynamic int8 activations round differently per ISA; the quantization error dominates
        assert a["max_abs_dlogit"] <= 0.1 * arm["max_abs_dlogit"], a


@pytest.mark.slow
def test_cli_prints_the_host_vs_arm64_difference(arm64, pte_artifact, tmp_path):
    d = pte_artifact("llama", "Q-K=V", "pte-8da4w")
    r = cli("validate", d, "--runtimes", "pte-native,arm64", "--json", tmp_path / "v.json")
    assert r.returncode == 0, r.stderr
    v = json.loads((tmp_path / "v.json").read_text())
    a = v["agreement"]["arm64 vs pte-native"]
    assert v["runtimes"]["arm64"]["runtime"] == "arm64" and v["runtimes"]["arm64"]["passed"]
    assert f"arm64 vs pte-native: max |dlogit| {a['max_abs_dlogit']:.2e}" in r.stdout, r.stdout


@pytest.mark.slow
def test_arm64_bad_inputs_are_one_line_and_exit_2(arm64, fp32_dir, llama_kernel_pte, tmp_path):
    check_bad_inputs(run_arm64, fp32_dir / "model.pte", llama_kernel_pte, tmp_path)


@pytest.mark.slow
def test_arm64_runner_device_profile_errors_and_reuse(arm64, pte_artifact, llama_kernel_pte):
    """The device profile picks the emulated core (SME off: see devices/*.toml); a bad id and an
    overflow are QkvxErrors that keep the emulated process, which then passes the recipe's gates
    on an int8 model and cache."""
    from qkvx.harness.arm64 import Arm64Runner
    from qkvx.harness.parity import check_parity

    d = pte_artifact("gpt", "Q-MQA", "pte-8da4w-kv8")
    model = qkvx.load(json.loads((d / "manifest.json").read_text())["source"]["path"])
    with Arm64Runner(d / "model.pte", device="galaxy-s24-ultra") as runner:
        assert runner.cpu == "max,sve=off,sme=off" and runner.info["machine"] == "aarch64"
        assert (runner.max_seq_len, runner.prefill_chunk) == (128, 64)
        with pytest.raises(QkvxError, match="arm64 ExecuTorch .* outside the vocabulary"):
            runner.prefill([1, 999])
        runner.prefill(torch.arange(127) % 256)
        with pytest.raises(QkvxError, match="context overflow: 127 cached"):
            runner._forward(torch.tensor([1, 2]))
        runner.reset()
        p = check_parity(model, runner, torch.arange(40) + 40, 16, Manifest.read(d).recipe.gates)
        assert p.passed and p.top1_agreement == 1.0, p
        s = runner.stats()
    # counted since the process started: the 127-token prefill, then parity's 16 + 24 (the
    # refused id ran nothing)
    assert (s["prefill_tokens"], s["decode_tokens"]) == (127 + 16, 24) and s["peak_rss_kb"] > 1000
    print(f"emulated qkvx-run (max): load {s['load_ms']:.0f} ms, {s['ms_per_token']:.1f} ms/token decode")
    with pytest.raises(QkvxError) as e:
        Arm64Runner(llama_kernel_pte)
    assert "\n" not in str(e.value) and "needs operator(s) llama::update_cache.out" in str(e.value)


def test_arm64_pte_runtime_missing_says_how_to_fix(tmp_path):
    from qkvx.harness.arm64 import Arm64Runner

    (tmp_path / "model.pte").write_bytes(b"\0" * 64)  # never read: the emulator check comes first
    with pytest.raises(QkvxError, match="qkvx emulator setup") as e:
        Arm64Runner(tmp_path / "model.pte", cache_dir=tmp_path / "empty")
    assert "\n" not in str(e.value)
