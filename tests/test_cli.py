"""The console script: JSON output, --help on every command, one-line errors with exit code 2."""

import json
import os
import subprocess
import sys

import pytest
import torch

import qkvx
from qkvx.models.transformer import Transformer

QKVX = [sys.executable, "-m", "qkvx"]


def run(*args, check=False):
    return subprocess.run([*QKVX, *map(str, args)], capture_output=True, text=True, check=check, timeout=300)


@pytest.fixture(scope="module")
def qkv_native(tmp_path_factory):
    spec = qkvx.ModelSpec.from_paper_name(
        "Q-MQA", n_layer=2, n_embd=32, n_head=4, vocab_size=64, max_positions=32
    )
    return qkvx.save(Transformer(spec).init_weights(0), tmp_path_factory.mktemp("m") / "model")


def test_inspect_json(qkv_native):
    r = run("inspect", qkv_native, "--json", check=True)
    info = json.loads(r.stdout)
    assert info["variant"] == "Q-MQA" and info["format"] == "native"
    assert info["kv_tensors_per_layer"] == 1
    assert info["kv_bytes_per_token"]["fp32"] == 2 * 1 * 8 * 4  # layers * kv heads * head_dim * 4 B
    assert info["qkv_baseline"]["kv_bytes_per_token_fp32"] == 2 * 2 * 4 * 8 * 4
    assert info["kv_saving_percent"] == pytest.approx(100 * (1 - 1 / 8))
    assert info["params"] == sum(p.numel() for p in qkvx.load(qkv_native).parameters())
    assert {"variant", "spec", "params", "kv_tensors_per_layer", "kv_bytes_per_token"} <= set(info)


def test_help_on_every_command():
    from qkvx.cli import app

    assert run("--help").returncode == 0
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"inspect", "train", "convert", "distill"} <= set(commands)
    for cmd in commands:
        assert run(cmd, "--help").returncode == 0, cmd


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make_bad,expect",
    [
        (lambda d: d / "missing.pt", "no such file"),
        (lambda d: _write(d / "empty.pt", b""), "empty.pt"),
        (lambda d: _write(d / "junk.pt", b"not a checkpoint at all"), "junk.pt"),
        (lambda d: (d / "dir").mkdir() or d / "dir", "not a model"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, make_bad, expect):
    r = run("inspect", make_bad(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_native_weights_name_the_tensor(tmp_path, qkv_native):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(qkv_native, bad)
    state = load_file(bad / "model.safetensors")
    state["blocks.0.attn.k_proj.weight"] = torch.zeros(3, 3)
    save_file(state, bad / "model.safetensors")
    r = run("inspect", bad)
    assert r.returncode == 2 and "blocks.0.attn.k_proj.weight" in r.stderr and "[3, 3]" in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("devices",),
        ("budget", "--preset", "paper-300m", "--compare", "-c", "2048,32768"),
        ("budget", "--preset", "paper-1.2b", "--variant", "Q-GQA-8", "-d", "pixel-9"),
    ],
)
def test_tables_readable_in_an_80_column_log(args, fits_80):
    r = subprocess.run(
        [*QKVX, *args], capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "80"}
    )
    assert r.returncode == 0, r.stderr
    fits_80(r.stdout)


def test_inspect_release_checkpoint_in_80_columns(tmp_path, fits_80):
    from qkvx.bench.release import write_checkpoint

    path = write_checkpoint(
        tmp_path / "final_model.pt",
        "Q≠K=V",
        kind="final",
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_inner=128,
        vocab_size=64,
        n_positions=32,
    )
    r = subprocess.run(
        [*QKVX, "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert r.returncode == 0, r.stderr
    fits_80(r.stdout)
    assert "Q-K=V" in r.stdout and "val perplexity" in r.stdout and "21.28" in r.stdout
    info = json.loads(run("inspect", path, "--json", check=True).stdout)
    assert info["meta"]["release"]["val_metrics"]["perplexity"] == pytest.approx(21.28, abs=5e-3)


def test_ignore_config_key_flag(tmp_path):
    from qkvx.bench.release import write_checkpoint

    path = write_checkpoint(
        tmp_path / "c.pt", "Q-MQA", n_layer=2, n_embd=32, n_head=4, n_inner=128, vocab_size=64, n_positions=32
    )
    obj = torch.load(path, weights_only=True)
    obj["model_config"]["use_liger_kernels"] = True
    torch.save(obj, path)
    r = run("inspect", path)
    assert (
        r.returncode == 2
        and r.stderr.count("\n") == 1
        and "--ignore-config-key use_liger_kernels" in r.stderr
    )
    r = run("inspect", path, "--ignore-config-key", "use_liger_kernels", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["meta"]["ignored_config_keys"] == ["use_liger_kernels"]
