"""pte-native: a .pte in qkvx-run, ExecuTorch's C++ runtime with XNNPACK and qkvx's kernels and no
Python or libtorch in the process. Every check is against the eager model (full recompute): the
issue's four cases x three recipes pass `validate`, the batch mode's logits file equals eager, and
bad inputs are one line on stderr with exit code 2, never a crash."""

import json
import os
import random
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import qkvx
from qkvx import QkvxError
from qkvx.recipes import Gates

from pte_cases import CASES, case_id, check_bad_inputs, cli, one_line_error


@pytest.fixture(scope="session")
def qkvx_run():
    from qkvx.native_build import runner_path

    return runner_path()


def run(binary, *args, stdin=None):
    return subprocess.run([str(binary), *map(str, args)], input=stdin, capture_output=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("family,variant,recipe", CASES, ids=[case_id(*c) for c in CASES])
def test_validate_pte_native(pte_artifact, family, variant, recipe):
    from qkvx.validate import validate

    v = validate(pte_artifact(family, variant, recipe), runtimes=["pte-native"])
    p = v.runtimes["pte-native"]
    print(
        f"{case_id(family, variant, recipe)}: max|dlogit| {p['max_abs_dlogit']:.2e} (max|logit| "
        f"{p['max_abs_logit']:.1f}) top-1 {p['top1_agreement']:.4f} KL {p['kl_mean']:.2e} "
        f"ppl {p['ppl']:.4f} vs {p['ppl_ref']:.4f} eager"
    )
    assert v.passed and p["passed"], p
    assert p["positions"] == v.stream["tokens"] and v.stream["windows"] == 4  # held-out text
    if recipe == "pte-fp32":  # the fp32 gate, restated: the logit bound and 100 % top-1
        assert p["max_abs_dlogit"] <= Gates().bound(p["max_abs_logit"]) and p["top1_agreement"] == 1.0


@pytest.mark.slow
def test_cli_validate_same_fields_and_agreement_with_the_python_runtime(fp32_dir, tmp_path):
    r = cli("validate", fp32_dir, "--runtimes", "pte,pte-native", "--json", tmp_path / "v.json")
    assert r.returncode == 0, r.stderr
    v = json.loads((tmp_path / "v.json").read_text())
    native, python = v["runtimes"]["pte-native"], v["runtimes"]["pte"]
    assert native.keys() == python.keys() and native["passed"]
    assert native["runtime"] == "pte-native" and native["positions"] == python["positions"]
    a = v["agreement"]["pte-native vs pte"]  # two runtimes of one program: XNNPACK both times
    assert a["same_top1"] == 1.0 and a["max_abs_dlogit"] <= Gates().bound(python["max_abs_logit"])
    assert "pte-native vs pte: max |dlogit|" in r.stdout
    print(f"pte-native vs pte (Python bindings): max |dlogit| {a['max_abs_dlogit']:.2e}")


@pytest.mark.slow
def test_runner_process_holds_no_python_or_torch_and_reports_timings(fp32_dir):
    from qkvx.harness.parity import check_parity
    from qkvx.harness.pte_native import PteNativeRunner

    model = qkvx.load(json.loads((fp32_dir / "manifest.json").read_text())["source"]["path"])
    with PteNativeRunner(fp32_dir / "model.pte", threads=1) as runner:
        maps = open(f"/proc/{runner.proc.pid}/maps").read()
        libs = {line.split()[-1].rsplit("/", 1)[-1] for line in maps.splitlines() if ".so" in line}
        assert {"libexecutorch.so", "libexecutorch_backend_xnnpack.so", "libqkvx_kernels.so"} <= libs
        assert not [lib for lib in libs if lib.startswith(("libtorch", "libc10", "libpython"))], libs
        assert runner.info["threads"] == 1 and runner.max_seq_len == 128 and runner.prefill_chunk == 64
        tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3))
        assert check_parity(model, runner, tokens, 16, Gates()).passed
        s = runner.stats()
    assert (s["prefill_tokens"], s["decode_tokens"]) == (16, 24)
    assert s["load_ms"] > 0 and s["ms_per_token"] > 0 and s["peak_rss_kb"] > 1000
    print(
        f"host qkvx-run: load {s['load_ms']:.1f} ms, {s['ms_per_token']:.3f} ms/token decode, "
        f"peak RSS {s['peak_rss_kb'] / 1024:.1f} MiB"
    )


@pytest.mark.slow
def test_batch_mode_logits_file_equals_eager(qkvx_run, fp32_dir, tmp_path):
    """Prefill 5 (in chunks), 4 teacher-forced steps, 6 greedy steps: the .npy rows are eager's
    logits over the fed sequence, and the greedy ids are the argmax chain."""
    model = qkvx.load(json.loads((fp32_dir / "manifest.json").read_text())["source"]["path"])
    prompt = list(b"def f(x):")
    r = run(
        qkvx_run,
        fp32_dir / "model.pte",
        "--tokens",
        "-",
        "--prefill",
        5,
        "--steps",
        6,
        "--logits",
        tmp_path / "l.npy",
        stdin=" ".join(map(str, prompt)).encode(),
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.decode().splitlines()[-1])
    got = np.load(tmp_path / "l.npy")
    fed = prompt + report["generated"]
    with torch.no_grad():
        ref = model(torch.tensor([fed]))[0].numpy()
    assert got.shape == (len(fed), 256) == (report["rows"], report["vocab_size"])
    assert np.abs(got - ref).max() <= Gates().bound(np.abs(ref).max())
    assert report["generated"] == [int(ref[i].argmax()) for i in range(len(prompt) - 1, len(fed) - 1)]
    assert (report["prefill_tokens"], report["decode_tokens"]) == (5, 4 + 6)
    assert report["machine"] == os.uname().machine and report["max_seq_len"] == 128
    assert not (tmp_path / "l.npy.partial").exists()
    # the same ids from a file, comma separated, all prefilled: the same logits
    (tmp_path / "ids.txt").write_text(",".join(map(str, fed)))
    r = run(
        qkvx_run, fp32_dir / "model.pte", "--tokens", tmp_path / "ids.txt", "--logits", tmp_path / "m.npy"
    )
    assert r.returncode == 0, r.stderr
    assert np.abs(np.load(tmp_path / "m.npy") - ref).max() <= Gates().bound(np.abs(ref).max())


def _corrupt(data: bytes, seed: int) -> bytes:
    """1-4 bytes flipped in the program flatbuffer (before the first segment: the plan, not weights)."""
    program_size = struct.unpack_from("<Q", data, 16)[0]  # extended header "eh00": size, program size
    rng, b = random.Random(seed), bytearray(data)
    for _ in range(1 + seed % 4):
        b[rng.randrange(program_size)] ^= rng.randrange(1, 256)
    return bytes(b)


@pytest.mark.slow
def test_bad_inputs_are_one_line_and_exit_2(qkvx_run, fp32_dir, llama_kernel_pte, tmp_path):
    pte, ids = fp32_dir / "model.pte", tmp_path / "ids.txt"
    check_bad_inputs(lambda *a, stdin=None: run(qkvx_run, *a, stdin=stdin), pte, llama_kernel_pte, tmp_path)
    for tokens, match in [("1 x", "'x' (item 1) is not a token id"), ("", "no token ids")]:
        assert match in one_line_error(run(qkvx_run, pte, "--tokens", "-", stdin=tokens.encode())), tokens
    for args, match in [
        ((tmp_path / "none.pte", "--tokens", ids), "no such file"),
        ((pte, "--tokens", ids, "--bogus"), "unknown option --bogus"),
        ((pte,), "no --tokens"),
        ((pte, "--tokens", ids, "--logits", tmp_path / "no/dir/l.npy"), "cannot write the logits file"),
    ]:
        assert match in one_line_error(run(qkvx_run, *args))


@pytest.mark.slow
def test_corrupted_programs_never_crash(qkvx_run, fp32_dir, tmp_path):
    """Random byte flips in the program flatbuffer: verification, or an error ExecuTorch logs
    while loading, fails the load with exit 2; a flip it cannot see runs (0) or fails a call (3).
    Never a signal, always one line."""
    data, ids = (fp32_dir / "model.pte").read_bytes(), tmp_path / "ids.txt"
    ids.write_text("1 2 3 4")
    codes = []
    for seed in range(60):
        (tmp_path / "c.pte").write_bytes(_corrupt(data, seed))
        r = run(qkvx_run, tmp_path / "c.pte", "--tokens", ids)
        codes.append(r.returncode)
        if r.returncode:
            one_line_error(r, r.returncode)
    assert set(codes) <= {0, 2, 3} and codes.count(2) >= 40, codes
    print(f"60 corrupted programs: exit 2 x{codes.count(2)}, 3 x{codes.count(3)}, 0 x{codes.count(0)}")


@pytest.mark.slow
def test_serve_errors_keep_the_runner(fp32_dir):
    """Through the frame protocol: a bad id and an overflow are QkvxErrors, the position does not
    move, and the same runner goes on to pass parity."""
    from qkvx.harness.parity import check_parity
    from qkvx.harness.pte_native import PteNativeRunner

    model = qkvx.load(json.loads((fp32_dir / "manifest.json").read_text())["source"]["path"])
    with PteNativeRunner(fp32_dir / "model.pte") as runner:
        with pytest.raises(QkvxError, match="outside the vocabulary"):
            runner.prefill([1, 999])
        runner.prefill(torch.arange(127) % 256)
        with pytest.raises(QkvxError, match="context overflow: 127 cached"):
            runner._forward(torch.tensor([1, 2]))  # past the Python side's own check: C++ answers
        assert runner.pos == 127
        runner.reset()
        assert check_parity(model, runner, torch.arange(30) + 40, 8, Gates()).passed
    with pytest.raises(QkvxError, match="no such .pte"):
        PteNativeRunner(fp32_dir / "absent.pte")


STOCK_RUNNER = """
import sys
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
if sys.argv[3] == "qkvx":
    import qkvx.kernels  # qkvx's kernel library, and nothing else of qkvx's
pieces = []
runner = TextLLMRunner(sys.argv[1], sys.argv[2])
config = GenerationConfig(echo=False, max_new_tokens=24, temperature=0.0, num_bos=0, num_eos=0)
runner.generate("def main(", config, token_callback=pieces.append)
sys.stdout.flush()
print("\\nPIECES=" + repr("".join(pieces)))
"""


@pytest.mark.slow
def test_stock_llm_runner_needs_only_qkvx_kernels(fp32_dir):
    """ExecuTorch's TextLLMRunner (C++, through its Python binding) generates eager's greedy text
    from a qkvx-kernel .pte in a process where only qkvx's kernel library is added (ExecuTorch's
    llama ops are never loaded), and cannot load it without."""
    from qkvx.export.executorch import read_plan
    from qkvx.harness.generate import generate
    from qkvx.harness.runners import EagerRunner
    from qkvx.tokenizer import BYTE_EOS, byte_tokenizer

    assert "qkvx::attend" in read_plan(fp32_dir / "model.pte").operators
    model = qkvx.load(json.loads((fp32_dir / "manifest.json").read_text())["source"]["path"])
    tok = byte_tokenizer()
    ids = generate(EagerRunner(model=model), tok.encode("def main("), 24, eos_ids=(BYTE_EOS,)).new_ids
    want = tok.decode(ids)
    out = {}
    for kernels in ("qkvx", "none"):
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                STOCK_RUNNER,
                fp32_dir / "model.pte",
                fp32_dir / "tokenizer.json",
                kernels,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        out[kernels] = r
    assert out["qkvx"].returncode == 0, out["qkvx"].stderr[-2000:]
    got = eval(out["qkvx"].stdout.rsplit("PIECES=", 1)[1])
    if not want.isascii():
        pytest.skip("eager's greedy text is not ASCII: the stock runner's callback takes UTF-8 only")
    assert got == want and "llama" not in out["qkvx"].stderr
    assert out["none"].returncode != 0 or "PIECES=''" in out["none"].stdout  # needs the kernels
    assert "qkvx::attend" in out["none"].stderr + out["none"].stdout
