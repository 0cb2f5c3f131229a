"""Bad inputs to `qkvx convert` and `qkvx distill`: each is ONE line on stderr starting `error:`,
exit code 2, no traceback, and nothing written."""

import json
import subprocess
import sys

import pytest

import qkvx
from qkvx.bench.release import write_checkpoint
from qkvx.models.transformer import Transformer

DIMS = dict(n_layer=1, n_embd=32, n_head=4, vocab_size=256, max_positions=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    for name in ("QKV", "Q-K=V"):
        spec = qkvx.ModelSpec.from_paper_name(name, **DIMS)
        qkvx.save(Transformer(spec).init_weights(0), d / name.replace("=", "_"))
    small = qkvx.ModelSpec.from_paper_name("Q-K=V", **{**DIMS, "vocab_size": 128})
    qkvx.save(Transformer(small).init_weights(0), d / "vocab128")
    write_checkpoint(
        d / "gqa2.pt",
        "GQA-2",
        kind="final",
        n_layer=1,
        n_embd=32,
        n_head=4,
        n_inner=64,
        vocab_size=96,
        n_positions=32,
    )
    (d / "empty.txt").write_text("")
    (d / "text.txt").write_text("some text to read\n" * 200)
    # a word-level tokenizer with 300 ids: not the byte-level model's
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(299)} | {"[UNK]": 299}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "words.json"))
    return d


# The command line of each case, split on spaces ({d}: the fixture folder, no spaces in it).
DISTILL = "distill {d}/Q-K_V --teacher {d}/QKV --tokens 1000 --out {d}/o --data"
CASES = [
    ("already-kv", "convert {d}/Q-K_V --out {d}/o", ["already Q-K=V", "nothing to convert"]),
    ("unknown-init", "convert {d}/QKV --init median --out {d}/o", ["unknown init 'median'", "avg, keep-k"]),
    ("not-kv-target", "convert {d}/QKV --to MQA --out {d}/o", ["not a K=V target"]),
    ("unknown-target", "convert {d}/QKV --to Q-XYZ --out {d}/o", ["unknown variant"]),
    ("more-kv-heads", "convert {d}/gqa2.pt --to Q-K=V --out {d}/o", ["needs 4 kv heads", "has 2"]),
    ("fit-needs-text", "convert {d}/QKV --init fit --out {d}/o", ["--calib"]),
    (
        "fit-tokenizer",
        "convert {d}/QKV --init fit --calib {d}/text.txt --tokenizer {d}/words.json --out {d}/o",
        ["300 ids", "256 rows"],
    ),
    ("out-exists", "convert {d}/QKV --out {d}/QKV", ["already exists"]),
    ("empty-data", DISTILL + " {d}/empty.txt", ["no tokens", "empty"]),
    ("tokenizer", DISTILL + " {d}/text.txt --tokenizer {d}/words.json", ["300 ids", "256 rows"]),
    ("missing-data", DISTILL + " {d}/nope.txt", ["nope.txt: no such file"]),
    (
        "vocab",
        "distill {d}/vocab128 --teacher {d}/QKV --data {d}/text.txt --tokens 1000 --out {d}/o",
        ["vocabulary (128)", "(256)"],
    ),
    ("seq-len", DISTILL + " {d}/text.txt --seq-len 65", ["exceeds the models' max positions (64)"]),
    ("bad-kl", DISTILL + " {d}/text.txt --kl sideways", ["--kl must be forward or reverse"]),
]


@pytest.mark.parametrize("name,argv,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(world, name, argv, needles):
    args = [a.format(d=world) for a in argv.split()]
    r = subprocess.run([sys.executable, "-m", "qkvx", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (world / "o").exists()
    assert json.loads((world / "QKV" / "qkvx.json").read_text())["variant"] == "QKV"  # the source untouched
