"""`qkvx export --tokenizer`: a BPE tokenizer trained here with the `tokenizers` library (no
downloads), as a tokenizer.json file and as Hugging Face tokenizer folders, written beside the
artifact, and used by generate, validate --text and ExecuTorch's stock LLM runner."""

import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qkvx.bench.release import write_checkpoint
from qkvx.corpus import corpus_bytes

EOS = "<|endoftext|>"
DIMS = dict(n_layer=2, n_embd=32, n_head=4, n_inner=128, n_positions=128, initializer_range=0.2)


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "qkvx", *map(str, args)], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE of 400 ids (GPT-2's recipe, smaller) trained on Python's help texts, with
    <|endoftext|> as a special token: saved as tokenizer.json, and as a GPT-2 style folder of
    vocab.json + merges.txt + tokenizer_config.json (no tokenizer.json)."""
    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = corpus_bytes()[:200_000].decode("utf-8", errors="ignore")
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    tok.save(str(d / "tokenizer.json"))
    folder = d / "gpt2-style"
    folder.mkdir()
    tok.model.save(str(folder))  # vocab.json + merges.txt
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": EOS})
    )
    return d / "tokenizer.json", folder, tok


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A release checkpoint whose embedding (512 rows) is larger than the tokenizer (400 ids)."""
    return write_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "final_model.pt", "Q-K=V", kind="final", vocab_size=512, **DIMS
    )


@pytest.mark.parametrize("recipe", ["onnx-fp32", "pte-fp32"])
def test_export_with_tokenizer_file(bpe, checkpoint, tmp_path, recipe):
    file, _, reference = bpe
    out = tmp_path / recipe
    r = run("export", checkpoint, "--recipe", recipe, "--out", out, "--tokenizer", file)
    assert r.returncode == 0, r.stderr
    written = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "def main():\n    return the default value"
    assert written.encode(text).ids == reference.encode(text).ids
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"]["vocab_size"] == 400 and m["tokenizer"]["eos_ids"] == [reference.token_to_id(EOS)]
    g = run("generate", out, "--prompt", "The default value of", "-n", "8")
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("The default value of") and "8 new tokens" in g.stdout + g.stderr
    sample = tmp_path / "sample.txt"
    sample.write_text(corpus_bytes()[-4000:].decode("utf-8", errors="ignore"))
    v = run("validate", out, "--text", sample, "--json", tmp_path / "v.json")
    assert v.returncode == 0, v.stderr
    stream = json.loads((tmp_path / "v.json").read_text())["stream"]
    assert stream["source"].startswith(str(sample)) and "tokens" in stream["source"]


def test_stock_executorch_runner_reads_the_bpe(bpe, checkpoint, tmp_path, capfd):
    """ExecuTorch's TextLLMRunner loads the tokenizer.json written beside the .pte and generates
    the same greedy ids as qkvx's own loop through the same program."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from qkvx.harness.generate import generate
    from qkvx.harness.pte import PteRunner

    file, _, reference = bpe
    # The runner hands each piece to Python as UTF-8: zero the (tied) embedding rows of pieces that
    # are not whole ASCII text, so random weights still generate decodable text.
    obj = torch.load(checkpoint, weights_only=True)
    wte = obj["model_state_dict"]["module.wte.weight"]
    for i in range(wte.shape[0]):
        if (
            i >= reference.get_vocab_size()
            or i == reference.token_to_id(EOS)
            or not reference.decode([i]).isascii()
        ):
            wte[i] = 0
    ascii_only = tmp_path / "ascii.pt"
    torch.save(obj, ascii_only)
    out = tmp_path / "pte"
    r = run("export", ascii_only, "--recipe", "pte-fp32", "--out", out, "--tokenizer", file, "--no-validate")
    assert r.returncode == 0, r.stderr
    prompt = "The default value of the"
    ours = generate(
        PteRunner(out / "model.pte"), reference.encode(prompt).ids, 12, eos_ids=(reference.token_to_id(EOS),)
    ).new_ids
    pieces = []
    runner = TextLLMRunner(str(out / "model.pte"), str(out / "tokenizer.json"))
    runner.generate(
        prompt,
        GenerationConfig(echo=False, max_new_tokens=len(ours), temperature=0.0, num_bos=0, num_eos=0),
        token_callback=pieces.append,
    )
    capfd.readouterr()
    assert len(ours) == 12 and "".join(pieces) == reference.decode(ours)


def test_hf_tokenizer_folder_without_tokenizer_json(bpe, checkpoint, tmp_path):
    """A GPT-2 style folder (vocab.json + merges.txt + tokenizer_config.json): transformers builds
    the fast tokenizer, and its eos_token is what generation stops at."""
    _, folder, reference = bpe
    out = tmp_path / "onnx"
    r = run(
        "export", checkpoint, "--recipe", "onnx-fp32", "--out", out, "--tokenizer", folder, "--no-validate"
    )
    assert r.returncode == 0, r.stderr
    written = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert written.encode("x = [1, 2]  # list").ids == reference.encode("x = [1, 2]  # list").ids
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["eos_ids"] == [
        reference.token_to_id(EOS)
    ]


def test_model_vocabulary_smaller_than_tokenizer_is_one_line(bpe, tmp_path):
    small = write_checkpoint(tmp_path / "small.pt", "Q-K=V", kind="final", vocab_size=300, **DIMS)
    r = run("export", small, "--recipe", "onnx-fp32", "--out", tmp_path / "o", "--tokenizer", bpe[0])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "400 ids" in r.stderr and "300" in r.stderr, (
        r.stderr
    )
    assert not (tmp_path / "o").exists()


def test_bad_tokenizer_file_is_one_line(checkpoint, tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    r = run("export", checkpoint, "--recipe", "onnx-fp32", "--out", tmp_path / "o", "--tokenizer", bad)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "tokenizer.json" in r.stderr, r.stderr


def test_byte_tokenizer_is_utf8_bytes():
    from qkvx.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    text = "naïve café – 1 ≠ 2\n\tend"
    assert tok.encode(text) == list(text.encode("utf-8")) and tok.decode(tok.encode(text)) == text
    assert torch.tensor(tok.encode(text)).max() < 256
