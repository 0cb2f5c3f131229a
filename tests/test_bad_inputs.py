"""A corpus of bad inputs: each is one line on stderr naming what is wrong, exit code 2, no
traceback, and nothing left in the output location."""

import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import qkvx
from qkvx.api import export
from qkvx.models.transformer import Transformer

MARKER = "qkvx_pwned_marker"


class _Payload:
    """Unpickling this would create a marker file: loading must refuse it without running it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny native model, its .pte and .onnx exports, and a paper-format checkpoint."""
    d = tmp_path_factory.mktemp("bad")
    spec = qkvx.ModelSpec.from_paper_name(
        "Q-K=V", n_layer=1, n_embd=32, n_head=4, vocab_size=256, max_positions=48
    )
    model = Transformer(spec).init_weights(0, std=0.1)
    native = qkvx.save(model, d / "native")
    export(native, "pte-fp32", d / "pte", validate=False)
    export(native, "onnx-fp32", d / "onnx", validate=False)
    state = {"wte.weight": model.tok_emb.weight, "wpe.weight": model.pos_emb.weight}
    for i, b in enumerate(model.blocks):
        h = f"h.{i}."
        a = b.attn
        state.update(
            {
                h + "ln_1.weight": b.norm1.weight,
                h + "ln_1.bias": b.norm1.bias,
                h + "attn.c_q.weight": a.q_proj.weight,
                h + "attn.c_q.bias": a.q_proj.bias,
                h + "attn.c_k.weight": a.k_proj.weight,
                h + "attn.c_k.bias": a.k_proj.bias,
                h + "attn.c_proj.weight": a.o_proj.weight,
                h + "attn.c_proj.bias": a.o_proj.bias,
                h + "ln_2.weight": b.norm2.weight,
                h + "ln_2.bias": b.norm2.bias,
                h + "mlp.c_fc.weight": b.mlp.fc.weight,
                h + "mlp.c_fc.bias": b.mlp.fc.bias,
                h + "mlp.c_proj.weight": b.mlp.proj.weight,
                h + "mlp.c_proj.bias": b.mlp.proj.bias,
            }
        )
    state.update({"ln_f.weight": model.norm_f.weight, "ln_f.bias": model.norm_f.bias})
    config = dict(
        vocab_size=256,
        n_positions=48,
        n_layer=1,
        n_embd=32,
        n_head=4,
        n_inner=128,
        layer_norm_epsilon=1e-5,
        use_bias=True,
        tie_word_embeddings=True,
    )
    state = {k: v.detach().clone() for k, v in state.items()}
    torch.save({"model_state_dict": state, "model_config": config}, d / "paper.pt")
    return d


def _paper(world, tmp, edit_state=None, edit_config=None, name="p.pt"):
    ckpt = torch.load(world / "paper.pt", weights_only=True)
    if edit_state:
        edit_state(ckpt["model_state_dict"])
    if edit_config:
        edit_config(ckpt["model_config"])
    torch.save(ckpt, tmp / name)
    return tmp / name


def _copy(world, tmp, name):
    shutil.copytree(world / name, tmp / name)
    return tmp / name


def _native_with(world, tmp, key, value):
    d = _copy(world, tmp, "native")
    st = load_file(d / "model.safetensors")
    st[key] = value
    save_file(st, d / "model.safetensors")
    return d


def _yaml(tmp, text):
    (tmp / "r.yaml").write_text(text)
    return tmp / "r.yaml"


GOOD_RECIPE = "format: pte\nbackend: xnnpack\n"
GOOD_DEVICE = (
    'device = "x"\nkind = "sbc"\nsoc = "x"\ncpu_cores = 4\ncpu_core_types = "4x A76"\nisa_features '
    '= ["neon"]\n'
    "ram_bytes = 8000000000\napp_budget_bytes = 6000000000\nmem_bandwidth_bytes_per_s = 1.7e10\n"
    'mem_bandwidth_kind = "theoretical"\nbackends = ["xnnpack"]\n[sources]\ncpu_cores = '
    '"s"\nram_bytes = "s"\n'
    'app_budget_bytes = "s"\nmem_bandwidth_bytes_per_s = "s"\n'
)


def _pte_corrupt(world, tmp):
    d = _copy(world, tmp, "pte")
    (d / "model.pte").write_bytes((d / "model.pte").read_bytes()[:5000])
    return d


def _onnx_corrupt(world, tmp):
    d = _copy(world, tmp, "onnx")
    (d / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    return d


def _hash_mismatch(world, tmp):
    d = _copy(world, tmp, "onnx")
    m = json.loads((d / "manifest.json").read_text())
    m["artifacts"][0]["sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def _existing(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return tmp / "out"


# (case id, argv builder (world, tmp) -> argv, substring the one-line error must contain)
CASES = [
    ("missing-path", lambda w, t: ["inspect", t / "nope.pt"], "no such file"),
    ("dir-without-model", lambda w, t: ["inspect", t], "not a model"),
    ("truncated-pt", lambda w, t: ["inspect", _trunc(w / "paper.pt", t / "trunc.pt")], "trunc.pt"),
    ("truncated-safetensors", lambda w, t: ["inspect", _trunc_st(w, t)], "safetensors"),
    ("zero-byte", lambda w, t: ["inspect", _write(t / "zero.pt", b"")], "zero.pt"),
    (
        "unexpected-key",
        lambda w, t: [
            "inspect",
            _paper(w, t, lambda s: s.update({"h.0.mlp.c_gate.weight": torch.zeros(32, 32)})),
        ],
        "h.0.mlp.c_gate.weight",
    ),
    (
        "missing-key",
        lambda w, t: ["inspect", _paper(w, t, lambda s: s.pop("h.0.mlp.c_fc.weight"))],
        "missing",
    ),
    (
        "shape-mismatch",
        lambda w, t: [
            "inspect",
            _paper(w, t, lambda s: s.update({"h.0.mlp.c_fc.weight": torch.zeros(100, 32)})),
        ],
        "c_fc.weight",
    ),
    (
        "nan-weights",
        lambda w, t: [
            "inspect",
            _native_with(w, t, "blocks.0.mlp.fc.weight", torch.full((128, 32), float("nan"))),
        ],
        "NaN",
    ),
    (
        "inf-weights",
        lambda w, t: [
            "inspect",
            _native_with(w, t, "blocks.0.mlp.fc.bias", torch.full((128,), float("inf"))),
        ],
        "Inf",
    ),
    (
        "config-contradicts-weights",
        lambda w, t: ["inspect", _paper(w, t, edit_config=lambda c: c.update(n_embd=64))],
        "p.pt",
    ),
    (
        "kv-groups-not-dividing",
        lambda w, t: ["inspect", _paper(w, t, edit_config=lambda c: c.update(n_kv_groups=3))],
        "3",
    ),
    (
        "unknown-variant",
        lambda w, t: ["train", "--variant", "Q-K=W", "--out", t / "o", "--steps", "1"],
        "unknown variant",
    ),
    (
        "unknown-recipe",
        lambda w, t: ["export", w / "native", "--recipe", "pte-fp64", "--out", t / "o"],
        "unknown recipe",
    ),
    (
        "recipe-unknown-key",
        lambda w, t: [
            "export",
            w / "native",
            "--recipe",
            _yaml(t, GOOD_RECIPE + "turbo: true\n"),
            "--out",
            t / "o",
        ],
        "turbo",
    ),
    (
        "recipe-wrong-type",
        lambda w, t: [
            "export",
            w / "native",
            "--recipe",
            _yaml(t, GOOD_RECIPE + "prefill_chunk: many\n"),
            "--out",
            t / "o",
        ],
        "prefill_chunk",
    ),
    ("unknown-device", lambda w, t: ["budget", w / "native", "-d", "nokia-3310"], "unknown device"),
    (
        "device-missing-key",
        lambda w, t: [
            "budget",
            w / "native",
            "-d",
            _write(t / "d.toml", GOOD_DEVICE.replace('soc = "x"\n', "").encode()),
        ],
        "soc",
    ),
    (
        "max-seq-len-above-positions",
        lambda w, t: [
            "export",
            w / "native",
            "--recipe",
            "pte-fp32",
            "--max-seq-len",
            "4096",
            "--out",
            t / "o",
        ],
        "max_positions",
    ),
    ("context-zero", lambda w, t: ["budget", w / "native", "--context", "0"], "--context"),
    ("context-negative", lambda w, t: ["budget", w / "native", "--context", "-5"], "--context"),
    (
        "output-is-a-file",
        lambda w, t: ["export", w / "native", "--recipe", "pte-fp32", "--out", _write(t / "f", b"x")],
        "not a directory",
    ),
    (
        "unwritable-output",
        lambda w, t: ["export", w / "native", "--recipe", "onnx-fp32", "--out", "/proc/qkvx-out/x"],
        "/proc",
    ),
    (
        "existing-output-no-force",
        lambda w, t: ["export", w / "native", "--recipe", "pte-fp32", "--out", _existing(t)],
        "--force",
    ),
    ("corrupt-pte", lambda w, t: ["generate", _pte_corrupt(w, t), "--prompt", "hi"], "model.pte"),
    ("corrupt-onnx", lambda w, t: ["generate", _onnx_corrupt(w, t), "--prompt", "hi"], "model.onnx"),
    ("manifest-hash-mismatch", lambda w, t: ["validate", _hash_mismatch(w, t)], "sha256"),
    ("prompt-too-long", lambda w, t: ["generate", w / "pte", "--prompt", "x" * 100], "max_seq_len"),
    ("unknown-runtime", lambda w, t: ["validate", w / "pte", "--runtimes", "tpu"], "tpu"),
]


def _write(path, data):
    path.write_bytes(data)
    return path


def _trunc(src, dst):
    return _write(dst, src.read_bytes()[: src.stat().st_size // 2])


def _trunc_st(world, tmp):
    d = _copy(world, tmp, "native")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return d


@pytest.mark.parametrize("case,argv,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, tmp_path, case, argv, expect):
    args = [str(a) for a in argv(world, tmp_path)]
    before = sorted(p.name for p in tmp_path.iterdir())
    r = subprocess.run([sys.executable, "-m", "qkvx", *args], capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (case, r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, r.stderr[-2000:])
    assert expect in lines[0], (case, lines[0])
    assert "Traceback" not in r.stderr
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == before, f"{case}: left {set(after) - set(before)} in the output location"
    if case == "existing-output-no-force":
        assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / MARKER
    (tmp_path / "evil.pt").write_bytes(
        pickle.dumps({"model_state_dict": _Payload(str(marker)), "model_config": {}})
    )
    r = subprocess.run(
        [sys.executable, "-m", "qkvx", "inspect", str(tmp_path / "evil.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not marker.exists()
    pickle.loads((tmp_path / "evil.pt").read_bytes())  # the payload is real: unsafe loading runs it
    assert marker.exists()
