"""ONNX export: parity through onnxruntime, one past/present tensor per K=V layer, left-padded
batches, the graph contract (DESIGN.md 4), the optimum anchor, and export -> generate on the CLI."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import qkvx
from qkvx import ModelSpec, QkvxError, cache_layout
from qkvx.export.onnx import export_onnx, read_graph
from qkvx.harness.ort import OrtRunner, ort_session
from qkvx.harness.parity import check_parity
from qkvx.models.transformer import Transformer
from qkvx.recipes import Gates

from tiny import DIMS, EXPORT_CASES, case_ids
from tiny import model as _tiny

PREFILL, STEPS = 16, 64


def _model(name, family, seed=0):
    return _tiny(name, family, seed)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(family, name, attention) -> (model, model.onnx): one export per case for the session."""
    cache: dict = {}

    def get(family, name, attention="plain"):
        if (family, name, attention) not in cache:
            model = _model(name, family)
            out = tmp_path_factory.mktemp(f"{family}-{name}-{attention}")
            export_onnx(model, out, attention=attention)
            cache[family, name, attention] = model, out / "model.onnx"
        return cache[family, name, attention]

    return get


def _close(got, ref):
    """The fp32 gate: max |dlogit| <= 1e-4 * max|logit| + 1e-5, top-1 identical."""
    got, ref = torch.as_tensor(got).float(), ref.float()
    dl = (got - ref).abs().max().item()
    assert dl <= Gates().bound(ref.abs().max().item()), dl
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    return dl


@pytest.mark.parametrize("family,name", EXPORT_CASES, ids=case_ids(EXPORT_CASES))
def test_onnx_parity_and_graph_contract(exported, family, name, fp32_parity):
    model, path = exported(family, name)
    fp32_parity(model, OrtRunner(path), f"{family} {name}")
    _check_graph(read_graph(path), model.spec)


def _check_graph(graph, spec):
    """DESIGN.md 4: names, one cache input per K=V layer (two otherwise) of the spec's shape, the
    spec's bytes per token, metadata; and no duplicate projection (the weight MatMul count)."""
    layout = cache_layout(spec, "fp32")
    names = [
        f"{i}.{n}" for i in range(spec.n_layer) for n in (("kv",) if spec.kv_shared else ("key", "value"))
    ]
    assert list(graph.inputs) == [
        "input_ids",
        "attention_mask",
        "position_ids",
        *(f"past_key_values.{n}" for n in names),
    ]
    assert list(graph.outputs) == ["logits", *(f"present.{n}" for n in names)]
    assert len(graph.cache_inputs) == spec.n_layer * (1 if spec.kv_shared else 2)
    for dtype, (batch, heads, past, dim) in graph.cache_inputs.values():
        assert dtype == "float32" and (heads, dim) == (spec.n_kv_head, spec.head_dim)
        assert isinstance(batch, str) and isinstance(past, str)  # symbolic: any batch and past length
    assert graph.inputs["input_ids"] == ("int64", ["batch_size", "sequence_length"])
    assert graph.inputs["attention_mask"][0] == "int64" and graph.inputs["position_ids"][0] == "int64"
    assert graph.outputs["logits"] == ("float32", ["batch_size", "sequence_length", spec.vocab_size])
    assert graph.cache_bytes_per_token() == layout.bytes_per_token
    assert ModelSpec.from_dict(json.loads(graph.metadata["qkvx.spec"])) == spec
    assert json.loads(graph.metadata["qkvx.cache"]) == layout.to_dict()
    assert graph.metadata["qkvx.version"] == qkvx.__version__
    assert int(graph.metadata["qkvx.max_seq_len"]) == spec.max_positions
    # MatMuls with a weight operand: per layer the attention projections (QKV 3, Q=K-V and Q-K=V 2
    # -- ONE for the shared k = v --, Q=K=V 1), o_proj, the MLP's 2 (GELU) or 3 (SwiGLU); + lm_head.
    projections = {"qkv": 3, "qk-v": 2, "q-kv": 2, "q=k=v": 1}[spec.sharing]
    mlp = 3 if spec.mlp == "swiglu" else 2
    assert graph.weight_matmuls == spec.n_layer * (projections + 1 + mlp) + 1


@pytest.mark.parametrize(
    "family,name,attention",
    [
        ("gpt", "Q-K=V", "plain"),
        ("llama", "Q-K=V", "plain"),
        ("llama", "QKV", "plain"),
        ("llama", "Q-K=V", "rotary"),
        ("llama", "Q-K=V", "custom"),
        ("llama", "Q-MQA", "custom"),
        ("gpt", "QKV", "custom"),
    ],
)
def test_left_padded_batch_matches_each_prompt_alone(exported, family, name, attention):
    """Two prompts of different lengths, left-padded into one batch (HF conventions: mask 0 on the
    left, position_ids = cumsum(mask) - 1 with padding at 1), prefill then 4 decode steps; the real
    tokens' logits equal the eager model's on each unpadded prompt alone."""
    model, path = exported(family, name, attention)
    session, spec = ort_session(path), model.spec
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (n,), generator=g) for n in (11, 4)]
    width = max(len(p) for p in prompts)
    ids, mask = np.zeros((2, width), np.int64), np.zeros((2, width), np.int64)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :], mask[b, width - len(p) :] = p.numpy(), 1
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    past = {n: np.zeros((2, spec.n_kv_head, 0, spec.head_dim), np.float32) for n in past_names}
    worst = 0.0
    with torch.no_grad():
        for _ in range(5):
            T = ids.shape[1]
            pos = np.where(mask == 0, 1, mask.cumsum(-1) - 1)[:, -T:]
            logits, *present = session.run(
                None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}
            )
            past = dict(zip(past_names, present, strict=False))
            for b, p in enumerate(prompts):  # the real tokens of this call: all of p, then the new one
                n = min(T, len(p))
                worst = max(worst, _close(logits[b, T - n :], model(p[None])[0, -n:]))
            ids = torch.randint(0, 128, (2, 1), generator=g).numpy()  # next tokens, one per row
            prompts = [torch.cat([p, torch.from_numpy(ids[b])]) for b, p in enumerate(prompts)]
            mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    print(f"left-padded {family} {name} {attention}: max|dlogit| {worst:.2e}")


@pytest.mark.parametrize("family,name", [("gpt", "Q-K=V"), ("gpt", "Q-MQA"), ("llama", "Q-K=V")])
def test_fused_attention_reads_the_one_cache_as_key_and_value(tmp_path, family, name):
    """fused_attention: one onnxruntime MultiHeadAttention per layer (kv heads as its heads), fed
    the K=V layer's one present tensor as both key and value; with RoPE the keys are the rotated
    one-layer transient and the values the cache as stored. Same parity and contract."""

    model = _model(name, family)
    export_onnx(model, tmp_path, attention="mha")
    path = tmp_path / "model.onnx"
    tokens = torch.randint(
        0, DIMS["vocab_size"], (PREFILL + STEPS,), generator=torch.Generator().manual_seed(1)
    )
    assert check_parity(model, OrtRunner(path), tokens, PREFILL, Gates()).passed
    _check_graph(read_graph(path), model.spec)
    mha = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MultiHeadAttention"]
    assert [n.domain for n in mha] == ["com.microsoft"] * DIMS["n_layer"]
    for i, node in enumerate(mha):
        assert node.input[2] == f"present.{i}.kv"  # values: the cache itself, no copy
        assert (node.input[1] == f"present.{i}.kv") == (family == "gpt")  # keys: the same tensor


# rotary changes RoPE K=V layers only: the GPT family is checked once (no RotaryEmbedding there)
ATTENTION_CASES = [
    (f, n, a)
    for a in ("rotary", "custom")
    for f in ("llama", "gpt")
    for n in ("QKV", "Q-K=V", "Q-MQA")
    if f == "llama" or a == "custom" or n == "Q-K=V"
]


@pytest.mark.parametrize("family,name,attention", ATTENTION_CASES)
def test_attention_graphs_parity_and_contract(exported, family, name, attention, fp32_parity):
    """attention="rotary": one com.microsoft MultiHeadAttention per layer, and a RoPE K=V layer
    rotates its present into keys with ONE com.microsoft RotaryEmbedding; attention="custom": ONE
    qkvx.CachedAttention per layer (append + attend, keys rotated on read), no Softmax left in the
    graph, the layer's past and present are the op's own input and output. Same parity and contract."""
    model, path = exported(family, name, attention)
    fp32_parity(model, OrtRunner(path), f"{family} {name} {attention}")
    _check_graph(read_graph(path), model.spec)
    nodes = onnx.load(str(path)).graph.node
    ops = [n.op_type for n in nodes]
    if attention == "rotary":
        assert ops.count("MultiHeadAttention") == DIMS["n_layer"]
        rotary = [n for n in nodes if n.op_type == "RotaryEmbedding"]
        assert len(rotary) == (DIMS["n_layer"] if family == "llama" and model.spec.kv_shared else 0)
        producer = {o: n for n in nodes for o in n.output}
        for i, node in enumerate(rotary):  # the layer's present, its kv heads' rows as one sequence each
            assert node.domain == "com.microsoft" and producer[node.input[0]].op_type == "Reshape"
            assert producer[node.input[0]].input[0] == f"present.{i}.kv"
    else:
        cached = [n for n in nodes if n.op_type == "CachedAttention"]
        assert [n.domain for n in cached] == ["qkvx"] * DIMS["n_layer"] and "Softmax" not in ops
        kinds = ("kv",) if model.spec.kv_shared else ("key", "value")
        for i, node in enumerate(cached):
            assert (
                node.input[1] == f"past_key_values.{i}.{kinds[0]}"
                and node.output[1] == f"present.{i}.{kinds[0]}"
            )
            has_tables = bool(node.input[6:7] and node.input[6])
            assert has_tables == (family == "llama" and model.spec.kv_shared)  # rotate on read: RoPE K=V only


def _op_graph(H, G, D, shared, rope, max_pos):
    from onnx import TensorProto as TP
    from onnx import helper as h

    F = TP.FLOAT
    ins = [
        h.make_tensor_value_info("query", F, ["B", "T", H * D]),
        h.make_tensor_value_info("past_key", F, ["B", G, "P", D]),
        h.make_tensor_value_info("key", F, ["B", "T", G, D]),
        h.make_tensor_value_info("mask", TP.INT64, ["B", "S"]),
    ]
    node_in = ["query", "past_key", "key", "", "", "mask"]
    outs = ["output", "present_key"]
    if not shared:
        ins += [
            h.make_tensor_value_info("past_value", F, ["B", G, "P", D]),
            h.make_tensor_value_info("value", F, ["B", "T", G, D]),
        ]
        node_in[3:5] = ["past_value", "value"]
        outs.append("present_value")
    if rope:
        ins += [h.make_tensor_value_info(n, F, [max_pos, D // 2]) for n in ("cos", "sin")]
        node_in += ["cos", "sin"]
    node = h.make_node(
        "CachedAttention", node_in, outs, domain="qkvx", num_heads=H, kv_num_heads=G, scale=D**-0.5
    )
    graph = h.make_graph([node], "g", ins, [h.make_tensor_value_info(o, F, None) for o in outs])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 20), h.make_opsetid("qkvx", 1)])


@pytest.mark.parametrize(
    "shared,rope,G,T,D",
    [
        (True, True, 4, 1, 16),
        (True, True, 4, 1, 64),  # the kernels' unrolled head size, one query row per kv head
        (True, True, 1, 3, 16),
        (True, False, 2, 1, 16),
        (False, False, 2, 1, 16),
        (True, True, 1, 20, 16),
        (False, False, 4, 150, 16),
    ],
)
def test_cached_attention_op_matches_its_reference(tmp_path, shared, rope, G, T, D):
    """qkvx.CachedAttention alone against qkvx::cached_attention[_kv]'s torch reference, past 5000
    slots (the keys split into chunks combined at the end; 150 new tokens span several key blocks), batch
    2: the second row left-padded, the first with a hole and its last new token masked."""
    import onnxruntime as ort

    from qkvx.decode.onnx_ops import cached_attention, cached_attention_kv
    from qkvx.export import ortops

    H, P, max_pos = 4, 5000, 6000
    g = torch.Generator().manual_seed(5)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    query, past_k, key = rnd(2, T, H * D), rnd(2, G, P, D), rnd(2, T, G, D)
    past_v, value = rnd(2, G, P, D), rnd(2, T, G, D)
    mask = torch.ones(2, P + T, dtype=torch.long)
    mask[1, :1234] = 0  # left padding
    mask[0, 100:300] = mask[0, -1] = 0  # a hole, and a padding query that sees its own slot too
    ang = rnd(max_pos, D // 2)
    cos, sin = (ang.cos(), ang.sin()) if rope else (None, None)
    with torch.no_grad():
        if shared:
            ref = cached_attention_kv(query, past_k, key, mask, cos, sin, H, D**-0.5)
        else:
            ref = cached_attention(query, past_k, key, past_v, value, mask, H, D**-0.5)
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(ortops.library_path()))
    session = ort.InferenceSession(
        _op_graph(H, G, D, shared, rope, max_pos).SerializeToString(),
        opts,
        providers=["CPUExecutionProvider"],
    )
    feed = {"query": query, "past_key": past_k, "key": key, "mask": mask}
    feed |= {} if shared else {"past_value": past_v, "value": value}
    feed |= {"cos": cos, "sin": sin} if rope else {}
    got = session.run(None, {k: v.numpy() for k, v in feed.items()})
    assert len(got) == len(ref)
    for a, b in zip(got[1:], ref[1:], strict=False):
        assert np.array_equal(a, b.numpy())  # presents: the past then the new rows, exactly
    err = np.abs(got[0] - ref[0].numpy()).max()
    print(f"CachedAttention shared={shared} rope={rope} G={G} T={T} D={D}: max|dout| {err:.2e}")
    assert err <= 1e-5 * np.abs(ref[0].numpy()).max() + 1e-6


def test_recipe_onnx_fp32_custom_exports_validates_and_needs_the_library(tmp_path):
    """The onnx-fp32-custom recipe: export, the manifest's parity through qkvx's runner (which loads
    the op library), and the recipe checks."""
    from qkvx.api import export
    from qkvx.export import ortops
    from qkvx.recipes import Recipe

    src = qkvx.save(_model("Q-K=V", "llama"), tmp_path / "m")
    manifest = export(src, "onnx-fp32-custom", tmp_path / "out")
    assert manifest.parity["onnx"]["passed"] and manifest.recipe.attention == "custom"
    assert ortops.uses_custom_ops(tmp_path / "out/model.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "out/model.onnx")).graph.node]
    assert ops.count("CachedAttention") == DIMS["n_layer"]
    for bad, match in [
        (dict(format="pte", backend="xnnpack", attention="custom"), "not available for pte"),
        (dict(format="onnx", backend="cpu", attention="fused"), "not available for onnx"),
        (dict(format="onnx", backend="cpu", attention="custom", kv_cache="int8"), "fp32 weights and cache"),
    ]:
        with pytest.raises(QkvxError, match=match):
            Recipe(name="bad", **bad)
    from qkvx.validate import validate

    with pytest.raises(QkvxError, match="built for the host only"):
        validate(tmp_path / "out", runtimes=["arm64"])
    plain = tmp_path / "plain"
    plain.mkdir()
    export_onnx(_model("Q-K=V", "llama"), plain)
    assert not ortops.uses_custom_ops(plain / "model.onnx")


def test_io_binding_stepper_matches_full_recompute(tmp_path):
    """IoBoundStepper (presents kept as OrtValues, bound as the next past) on the fused RoPE K=V
    graph: prefill + 8 decode steps agree with the eager full recompute at the fp32 bound."""
    from qkvx.harness.ort_feed import IoBoundStepper

    model = _model("Q-K=V", "llama")
    export_onnx(model, tmp_path, attention="mha")
    stepper = IoBoundStepper(ort_session(tmp_path / "model.onnx"))
    tokens = torch.randint(0, DIMS["vocab_size"], (PREFILL + 8,), generator=torch.Generator().manual_seed(2))
    got = np.concatenate(
        [stepper.step(tokens[:PREFILL].numpy())]
        + [stepper.step(tokens[i : i + 1].numpy()) for i in range(PREFILL, PREFILL + 8)]
    )
    with torch.no_grad():
        ref = model(tokens[None])[0].numpy()
    assert got.shape == ref.shape and stepper.pos == PREFILL + 8
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-5


def test_recipe_onnx_fp32_mha_exports_the_fused_graph_and_validates(tmp_path):
    from qkvx.api import export
    from qkvx.recipes import Recipe

    src = qkvx.save(_model("Q-K=V", "gpt"), tmp_path / "m")
    manifest = export(src, "onnx-fp32-mha", tmp_path / "out")
    assert manifest.parity["onnx"]["passed"] and manifest.recipe.attention == "mha"
    ops = [n.op_type for n in onnx.load(str(tmp_path / "out/model.onnx")).graph.node]
    assert ops.count("MultiHeadAttention") == DIMS["n_layer"]
    with pytest.raises(QkvxError, match="attention 'mha' not available for pte"):
        Recipe(name="bad", format="pte", backend="xnnpack", attention="mha")


def test_export_is_deterministic_and_external_data_works(exported, tmp_path):
    model, path = exported("llama", "Q-K=V")
    assert export_onnx(model, tmp_path)[0] == ["model.onnx"]
    assert (tmp_path / "model.onnx").read_bytes() == path.read_bytes()  # same model, same bytes
    (tmp_path / "ext").mkdir()
    assert export_onnx(model, tmp_path / "ext", external_data=True)[0] == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "ext/model.onnx").stat().st_size < 50_000  # the weights are in the data file
    tokens = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(3))
    assert check_parity(model, OrtRunner(tmp_path / "ext/model.onnx"), tokens, 8, Gates()).passed


def test_runner_limits_and_bad_file(tmp_path):
    model = _model("Q-MQA", "gpt")
    export_onnx(model, tmp_path, max_seq_len=20)
    runner = OrtRunner(tmp_path / "model.onnx")
    assert runner.max_seq_len == runner.prefill_chunk == 20
    runner.prefill(list(range(19)))
    runner.decode(1)
    with pytest.raises(QkvxError, match="context overflow"):
        runner.decode(2)
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage" * 8)
    with pytest.raises(QkvxError, match="onnxruntime cannot load"):
        OrtRunner(tmp_path / "bad.onnx")


def _greedy_logits(session, prompt, steps):
    """Prefill + greedy decode through a past/present graph, feeding by input NAME only (so it runs
    any graph that follows the optimum convention, in whatever input order)."""
    inputs = {i.name: i for i in session.get_inputs()}
    past = {
        n: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        for n, i in inputs.items()
        if n.startswith("past_key_values.")
    }
    ids, total, out = np.array([prompt], np.int64), 0, []
    for _ in range(steps + 1):
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((1, total + ids.shape[1]), np.int64),
            "position_ids": np.arange(total, total + ids.shape[1], dtype=np.int64)[None],
            **past,
        }
        outputs = dict(
            zip(
                [o.name for o in session.get_outputs()],
                session.run(None, {k: v for k, v in feed.items() if k in inputs}),
                strict=False,
            )
        )
        past = {n: outputs[n.replace("past_key_values.", "present.")] for n in past}
        out.append(outputs["logits"][0])
        total += ids.shape[1]
        ids = np.array([[int(out[-1][-1].argmax())]], np.int64)
    return np.concatenate(out, 0)


def test_optimum_anchor_same_logits_as_qkvx(tmp_path, monkeypatch):
    """optimum-onnx's export of a standard HF GPT-2 (QKV) and qkvx's export of the same folder
    compute the same logits in onnxruntime, with the same input and output names. (qkvx's export
    is forced to external data, so the manifest's listing of the data file is checked here too.)"""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("qkvx.export.onnx.EXTERNAL_DATA_BYTES", 0)
    from optimum.exporters.onnx import main_export
    from transformers import GPT2Config, GPT2LMHeadModel

    from qkvx.api import export

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128, initializer_range=0.1
    )
    GPT2LMHeadModel(config).eval().save_pretrained(tmp_path / "hf")
    main_export(
        str(tmp_path / "hf"),
        output=tmp_path / "optimum",
        task="text-generation-with-past",
        local_files_only=True,
        do_validation=False,
    )
    manifest = export(tmp_path / "hf", "onnx-fp32", tmp_path / "qkvx").to_dict()
    assert manifest["variant"] == "QKV" and manifest["parity"]["onnx"]["passed"]
    data = manifest["artifacts"][0]["data"]
    assert [d["file"] for d in data] == ["model.onnx.data"] and data[0]["bytes"] > 400_000
    theirs, ours = ort_session(tmp_path / "optimum/model.onnx"), ort_session(tmp_path / "qkvx/model.onnx")
    assert {i.name for i in theirs.get_inputs()} == {i.name for i in ours.get_inputs()}
    assert [o.name for o in theirs.get_outputs()] == [o.name for o in ours.get_outputs()]
    prompt = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    a, b = _greedy_logits(theirs, prompt, 6), _greedy_logits(ours, prompt, 6)
    print(f"optimum vs qkvx: max|dlogit| {np.abs(a - b).max():.2e} max|logit| {np.abs(a).max():.2f}")
    assert np.abs(a).max() > 1.0  # logits of real size, not a trivially small comparison
    assert np.abs(a - b).max() <= 1e-4


def test_cli_export_then_generate(tmp_path):
    spec = ModelSpec.from_paper_name("Q-K=V", **{**DIMS, "vocab_size": 256})
    src = qkvx.save(Transformer(spec).init_weights(0, std=0.1), tmp_path / "model")
    qkvx_cli = [sys.executable, "-m", "qkvx"]
    r = subprocess.run(
        [*qkvx_cli, "export", src, "--recipe", "onnx-fp32", "--out", tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["artifacts"][0]["format"] == "onnx" and manifest["artifacts"][0]["file"] == "model.onnx"
    assert manifest["cache"]["graph_cache_bytes_per_token"] == cache_layout(spec).bytes_per_token
    r = subprocess.run(
        [*qkvx_cli, "generate", tmp_path / "out", "-p", "def main", "-n", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def main") and "tokens/s" in r.stdout
