"""The .pte of a trained model: same greedy text as eager, and ExecuTorch's stock LLM runner drives it."""

import json

import pytest

import qkvx
from qkvx.api import export
from qkvx.harness.generate import generate
from qkvx.harness.pte import PteRunner
from qkvx.harness.runners import EagerRunner
from qkvx.tokenizer import BYTE_EOS, byte_tokenizer

TOK = byte_tokenizer()
encode, decode = TOK.encode, TOK.decode

PROMPT = "The default value of the"
NEW = 48


@pytest.fixture(scope="module")
def pte_dir(trained_kv, tmp_path_factory):
    out = tmp_path_factory.mktemp("pte") / "export"
    export(trained_kv, "pte-fp32", out)
    return out


def test_export_writes_manifest_with_passing_parity(pte_dir, trained_kv):
    m = json.loads((pte_dir / "manifest.json").read_text())
    assert m["variant"] == "Q-K=V" and m["max_seq_len"] == 256
    assert m["parity"]["pte"]["passed"] and m["parity"]["pte"]["top1_agreement"] == 1.0
    assert m["cache"]["tensors_per_layer"] == 1
    assert m["cache"]["program_cache_bytes"] == m["cache"]["bytes_at_context"] == 2 * 256 * 64 * 4
    art = m["artifacts"][0]
    assert art["file"] == "model.pte" and art["bytes"] == (pte_dir / "model.pte").stat().st_size
    assert {"model.pte", "tokenizer.json", "manifest.json"} <= {p.name for p in pte_dir.iterdir()}


def test_greedy_text_pte_equals_eager(pte_dir, trained_kv):
    model = qkvx.load(trained_kv)
    ids = encode(PROMPT)
    eager = generate(EagerRunner(model=model), ids, NEW, eos_ids=(BYTE_EOS,)).new_ids
    pte = generate(PteRunner(pte_dir / "model.pte"), ids, NEW, eos_ids=(BYTE_EOS,)).new_ids
    assert pte == eager and len(eager) == NEW
    assert decode(eager).strip()  # the trained model writes something


def test_stock_executorch_llm_runner_matches_our_loop(pte_dir, capfd):
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    ours = decode(
        generate(PteRunner(pte_dir / "model.pte"), encode(PROMPT), NEW, eos_ids=(BYTE_EOS,)).new_ids
    )
    if not ours.isascii():
        pytest.skip("the stock runner's Python callback cannot take a non-UTF-8 single byte")
    pieces = []
    runner = TextLLMRunner(str(pte_dir / "model.pte"), str(pte_dir / "tokenizer.json"))
    config = GenerationConfig(echo=False, max_new_tokens=NEW, temperature=0.0, num_bos=0, num_eos=0)
    runner.generate(PROMPT, config, token_callback=pieces.append)
    capfd.readouterr()  # the runner also prints every piece itself
    assert "".join(pieces) == ours
