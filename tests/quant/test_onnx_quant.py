"""ONNX quantization (issue 5, ONNX half) on a small trained Q-K=V model: every onnx recipe exports,
runs in onnxruntime and meets its gates; only the weight MatMuls are quantized (attention and the
tied head stay fp32); the int8 cache graph follows DESIGN.md 4 and cache_layout; a broken
quantization fails `qkvx export` with exit code 1 naming the gate; generate runs on int4-kv8."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import qkvx
from qkvx import ModelSpec, cache_layout
from qkvx.api import export
from qkvx.devices import load_device
from qkvx.export import onnx_quant as onnx_weights
from qkvx.export.onnx import export_onnx, read_graph
from qkvx.harness.ort import OrtRunner, ort_session
from qkvx.harness.ort_feed import OrtStepper
from qkvx.harness.parity import check_parity
from qkvx.models.transformer import Transformer
from qkvx.recipes import Gates, load_recipe

from tiny import model as _tiny

RECIPES = ["onnx-int8", "onnx-int4", "onnx-int4-kv8", "onnx-fp32-kv8"]
QUANT_OP = {"int8": "MatMulInteger", "int4": "MatMulNBits"}


@pytest.fixture(scope="session")
def exported(trained_kv, tmp_path_factory):
    """recipe -> (manifest dict, out dir): one export per recipe for the session."""
    cache: dict = {}

    def get(recipe):
        if recipe not in cache:
            out = tmp_path_factory.mktemp(recipe) / "out"
            cache[recipe] = export(trained_kv, recipe, out).to_dict(), out
        return cache[recipe]

    return get


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_exports_runs_and_meets_its_gates(exported, recipe):
    manifest, out = exported(recipe)
    r = load_recipe(recipe)
    p = manifest["parity"]["onnx"]
    print(
        f"{recipe}: ppl {p['ppl']:.3f} vs {p['ppl_ref']:.3f} ({100 * p['ppl_change']:+.2f} %), "
        f"top-1 {p['top1_agreement']:.3f}, {manifest['artifacts'][0]['bytes']:,} B"
    )
    assert p["passed"] and p["failed"] == [] and p["bound"] is None  # quantized: no logit gate
    assert p["ppl_change"] <= r.gates.max_ppl_change and p["top1_agreement"] >= r.gates.min_top1
    assert manifest["recipe"]["weights"] == r.weights and manifest["cache"]["dtype"] == r.kv_cache
    spec = ModelSpec.from_dict(manifest["spec"])
    graph = read_graph(out / "model.onnx")
    assert graph.cache_bytes_per_token() == cache_layout(spec, r.kv_cache).bytes_per_token
    assert manifest["cache"]["graph_cache_bytes_per_token"] == cache_layout(spec, r.kv_cache).bytes_per_token
    if r.weights != "none":
        info = manifest["export"]["weights"]
        assert (
            info["scheme"] == r.weights and json.loads(graph.metadata["qkvx.weights"])["scheme"] == r.weights
        )
        # the artifact IS the quantized model: well under the fp32 weights
        assert manifest["artifacts"][0]["bytes"] < 0.7 * 4 * spec.param_count()
    # the runtime the manifest names runs the artifact: prefill then decode
    runner = OrtRunner(out / "model.onnx")
    prompt = list(b"def main(")
    first = runner.prefill(prompt)
    assert first.shape == (len(prompt), 256) and torch.isfinite(runner.decode(int(first[-1].argmax()))).all()


@pytest.mark.parametrize("recipe", ["onnx-int8", "onnx-int4"])
def test_only_weight_matmuls_are_quantized(exported, recipe):
    """Node census: per layer the Q-K=V projections (q and the ONE shared kv), o_proj and the two
    MLP MatMuls become quantized nodes; the attention MatMuls (q @ k^T, weights @ v: both operands
    activations) and the tied LM head stay fp32 MatMuls."""
    manifest, out = exported(recipe)
    spec = ModelSpec.from_dict(manifest["spec"])
    proto = onnx.load(str(out / "model.onnx"))
    inits = {t.name for t in proto.graph.initializer}
    op = QUANT_OP[load_recipe(recipe).weights]
    counts = onnx_weights.census(proto)
    assert counts[op] == spec.n_layer * 5 == manifest["export"]["weights"]["quantized_matmuls"]
    assert counts == manifest["export"]["weights"]["census"]
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == spec.n_layer * 2 + 1  # attention (2 per layer) + the tied head
    assert not any(n.input[1] in inits for n in matmuls)  # no weight MatMul left in fp32
    head = next(n for n in matmuls if "logits" in n.output)
    assert next(n for n in proto.graph.node if head.input[1] in n.output).op_type == "Transpose"  # tied, fp32
    if op == "MatMulInteger":  # activations quantized per call only in front of weight MatMuls
        quantized_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "MatMulInteger"}
        dql = [n for n in proto.graph.node if n.op_type == "DynamicQuantizeLinear"]
        assert {n.output[0] for n in dql} == quantized_inputs and len(dql) <= counts[op]


def test_quantize_lm_head_and_external_data(trained_kv, tmp_path, monkeypatch):
    """quantize_lm_head: the tied head gets its own transposed initializer and is quantized too
    (the fp32 embedding stays for the token lookup); a model saved with external data is
    quantized and saved the same way (model.onnx + model.onnx.data)."""
    monkeypatch.setattr("qkvx.export.onnx.EXTERNAL_DATA_BYTES", 0)
    model = qkvx.load(trained_kv)
    assert export_onnx(model, tmp_path)[0] == ["model.onnx", "model.onnx.data"]
    recipe = dataclasses.replace(load_recipe("onnx-int4"), quantize_lm_head=True)
    files, graph, info = onnx_weights.quantize_onnx_weights(tmp_path, recipe, model.spec)
    assert files == ["model.onnx", "model.onnx.data"] and info["lm_head"] == "quantized"
    assert graph.op_counts["MatMulNBits"] == model.spec.n_layer * 5 + 1
    assert graph.op_counts["MatMul"] == model.spec.n_layer * 2  # attention only
    assert (tmp_path / "model.onnx").stat().st_size < 100_000  # weights in the data file
    p = check_parity(model, OrtRunner(tmp_path / "model.onnx"), _heldout(80), 16, Gates(None, min_top1=0.8))
    assert p.passed, p


def test_int8_preset_recipe_device_host(monkeypatch):
    recipe = load_recipe("onnx-int8")
    assert recipe.int8_preset is None
    assert onnx_weights.int8_preset(dataclasses.replace(recipe, int8_preset="avx2")) == ("avx2", "recipe")
    pi = load_device("raspberry-pi-5")
    assert onnx_weights.int8_preset(recipe, pi) == ("arm64", "device raspberry-pi-5")
    monkeypatch.setattr(onnx_weights, "host_isa", lambda: ("x86_64", "avx2", "avx512f", "avx512_vnni"))
    assert onnx_weights.int8_preset(recipe) == ("avx512_vnni", "host")
    monkeypatch.setattr(onnx_weights, "host_isa", lambda: ("x86_64", "avx2", "fma"))
    assert onnx_weights.int8_preset(recipe) == ("avx2", "host")
    assert onnx_weights.preset_for_isa(("aarch64", "asimd", "asimddp")) == "arm64"


@pytest.mark.parametrize(
    "family,name,fused",
    [("gpt", "Q-K=V", False), ("llama", "Q-K=V", False), ("llama", "GQA-2", False), ("llama", "Q-K=V", True)],
)
def test_int8_cache_graph_contract_and_parity(tmp_path, family, name, fused):
    """DESIGN.md 4: per cache tensor an int8 [batch, kv_heads, past, head_dim] input and output with
    a float32 `_scale` [batch, kv_heads, past, 1] beside it; the graph's bytes per token equal
    cache_layout(spec, "int8"). One int8 tensor per K=V layer (with RoPE rotated on read), two
    otherwise. Decoding appends: the past comes back unchanged, only new tokens are quantized.
    fused: attention through onnxruntime's MultiHeadAttention (the present dequantized for it)."""
    model = _tiny(name, family)
    spec = model.spec
    export_onnx(model, tmp_path, kv_cache="int8", attention="mha" if fused else "plain")
    graph, layout = read_graph(tmp_path / "model.onnx"), cache_layout(spec, "int8")
    names = [f"{i}.{n}{s}" for i in range(spec.n_layer) for n in layout.names for s in ("", "_scale")]
    assert list(graph.inputs)[3:] == [f"past_key_values.{n}" for n in names]
    assert list(graph.outputs)[1:] == [f"present.{n}" for n in names]
    G, D = spec.n_kv_head, spec.head_dim
    for n in names:
        want = ("float32", 1) if n.endswith("_scale") else ("int8", D)
        past, present = graph.inputs[f"past_key_values.{n}"], graph.outputs[f"present.{n}"]
        assert past == (want[0], ["batch_size", G, "past_sequence_length", want[1]])
        assert present == (want[0], ["batch_size", G, "past_sequence_length + sequence_length", want[1]])
    assert (
        graph.cache_bytes_per_token()
        == layout.bytes_per_token
        == spec.n_layer * len(layout.names) * G * (D + 4)
    )
    assert json.loads(graph.metadata["qkvx.cache"]) == layout.to_dict()
    # the runner's empty past comes from the graph: int8 [1, G, 0, D] and float32 [1, G, 0, 1]
    stepper = OrtStepper(ort_session(tmp_path / "model.onnx"))
    assert {n: (a.dtype, a.shape) for n, a in stepper.past.items()} == {
        f"past_key_values.{n}": (np.dtype(np.float32), (1, G, 0, 1))
        if n.endswith("_scale")
        else (np.dtype(np.int8), (1, G, 0, D))
        for n in names
    }
    tokens = torch.randint(0, 128, (80,), generator=torch.Generator().manual_seed(1))
    p = check_parity(model, OrtRunner(tmp_path / "model.onnx"), tokens, 16, Gates(None, min_top1=0.95))
    assert p.passed and p.max_abs_dlogit < 0.05 * p.max_abs_logit, p
    stepper.step(tokens[:16].numpy())
    before = {n: a.copy() for n, a in stepper.past.items()}
    stepper.step(tokens[16:17].numpy())
    for n, a in before.items():  # the past is concatenated as stored, never requantized
        assert np.array_equal(stepper.past[n][:, :, :16], a) and stepper.past[n].shape[2] == 17
    scales = [a for n, a in stepper.past.items() if n.endswith("_scale")]
    values = [a for n, a in stepper.past.items() if not n.endswith("_scale")]
    assert (
        all((s > 0).all() for s in scales) and max(np.abs(v).max() for v in values) == 127
    )  # symmetric, max|x| -> 127


@pytest.mark.parametrize("name,reference,bound", [("Q-K=V", "Q-K=V", 0.55), ("Q-MQA", "QKV", 1.1 / 64)])
def test_paper_300m_int8_cache_from_the_graph(tmp_path, name, reference, bound):
    """Issue 5 acceptance, from the exported graph's cache tensors: paper-300m Q-K=V with the int8
    cache holds <= 0.55 of the fp16 Q-K=V cache per token (scales included), Q-MQA + int8 <= 1.1/64
    of the fp16 QKV cache. Every layer's cache tensors are alike, so one exported layer (of the
    300m width, heads and head dim) times the preset's 20 layers is the whole model's."""
    full = ModelSpec.from_paper_name(name, preset="paper-300m")
    spec = full.replace(n_layer=1, vocab_size=256)
    export_onnx(Transformer(spec).init_weights(0, std=0.02).eval(), tmp_path, max_seq_len=64, kv_cache="int8")
    per_token = read_graph(tmp_path / "model.onnx").cache_bytes_per_token() * full.n_layer
    assert per_token == cache_layout(full, "int8").bytes_per_token
    fp16 = cache_layout(ModelSpec.from_paper_name(reference, preset="paper-300m"), "fp16").bytes_per_token
    print(
        f"paper-300m {name} int8: {per_token} B/token = {per_token / fp16:.4f} of fp16 {reference} ({fp16} B)"
    )
    assert per_token <= bound * fp16


def test_broken_quantization_fails_export_with_exit_1(trained_kv, tmp_path, monkeypatch, capsys):
    """Scales x10 in the quantized model (a post-edit of its initializers): `qkvx export` exits 1,
    names the failed gate(s), and writes nothing."""
    real = onnx_weights._int4

    def broken(*args, **kwargs):
        proto = real(*args, **kwargs)
        for t in proto.graph.initializer:
            if t.name.endswith("_scales"):  # MatMulNBits' per-block scales
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 10, t.name))
        return proto

    monkeypatch.setattr(onnx_weights, "_int4", broken)
    from qkvx.cli import app

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        app(["export", str(trained_kv), "--recipe", "onnx-int4", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    assert "validation failed" in err and "gate(s)" in err and "ppl" in err and "kl" in err, err
    assert not out.exists()


def test_cli_generate_on_int4_kv8(exported):
    _, out = exported("onnx-int4-kv8")
    r = subprocess.run(
        [sys.executable, "-m", "qkvx", "generate", str(out), "-p", "def main", "-n", "16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def main") and "tokens/s" in r.stdout


def _heldout(n):
    from qkvx.corpus import split_corpus

    return split_corpus()[1][:n]
