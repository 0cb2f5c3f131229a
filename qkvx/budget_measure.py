"""Check the memory-budget estimator (qkvx.budget) against measured peak RSS on this host.

Each (artifact, context) runs in a fresh `python -m qkvx.budget_measure --worker` process, so no
allocator state, cached kernels or earlier peak of another run leaks into the number. The worker
imports its runtime, reads VmRSS (the baseline: interpreter, torch, runtime module), resets the
peak (clear_refs 5), loads the artifact, feeds real tokens up to `context` in prefill chunks of the
estimator's chunk and one decode step, then reads VmHWM (the peak). One thread everywhere: the
numbers must not depend on how many cores the host has.

The estimate is budget_row(..., host_python=True): the same terms as a device report, with the
runtime constants measured for a Python process on this host (qkvx.budget.HOST_PYTHON_BACKENDS).
The model-attributable part (peak - baseline vs estimate - the constant baseline) is reported beside
the total because for a small model the interpreter and runtime dominate the total.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qkvx.errors import QkvxError
from qkvx.util import fmt_mib

# File mappings whose resident pages are the runtime's native code (what a C++ app would map too).
NATIVE_LIBS = {"pte": ("/executorch/",), "onnx": ("/onnxruntime/",)}
WORKER_TIMEOUT = 1800.0  # seconds: a 100M-parameter fp32 prefill to 2048 on one thread, with margin


@dataclass
class MeasureRow:
    artifact: str
    format: str  # pte | onnx
    context: int
    chunk: int  # prefill tokens per call
    baseline_rss_bytes: int  # VmRSS after imports, before the artifact is loaded
    loaded_rss_bytes: int  # VmRSS after loading
    peak_rss_bytes: int  # VmHWM at the end (the whole process)
    native_code_bytes: int  # resident pages of the runtime's shared libraries at the end
    # The estimator's terms (budget_row with host_python=True); they add up to estimate_bytes.
    weights_bytes: int  # one copy: the artifact's bytes
    weight_copies_bytes: int  # the extra copies the runtime keeps
    kv_cache_bytes: int
    activation_bytes: int
    session_bytes: int  # code paged in and session state of any model
    runtime_baseline_bytes: int  # interpreter + torch + runtime: what the measured baseline is
    estimate_bytes: int
    seconds: float

    @property
    def model_peak_bytes(self) -> int:
        return self.peak_rss_bytes - self.baseline_rss_bytes

    @property
    def estimate_model_bytes(self) -> int:
        return self.estimate_bytes - self.runtime_baseline_bytes

    @property
    def error(self) -> float:
        """(estimate - measured) / measured, whole process."""
        return self.estimate_bytes / self.peak_rss_bytes - 1

    @property
    def model_error(self) -> float:
        return self.estimate_model_bytes / max(self.model_peak_bytes, 1) - 1

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "model_peak_bytes": self.model_peak_bytes,
            "estimate_model_bytes": self.estimate_model_bytes,
            "error": self.error,
            "model_error": self.model_error,
        }


def measure_artifact(export_dir: str | os.PathLike, contexts: list[int]) -> list[MeasureRow]:
    """For each context, the artifact of `export_dir` run in a fresh process on this host: its
    measured baseline and peak RSS beside the estimator's terms (host_python) for that context."""
    from qkvx import budget as b
    from qkvx.devices import load_device

    directory = Path(export_dir)
    facts = b.read_export(directory)
    if facts is None:
        raise QkvxError(f"{directory}: --measure needs an export directory (no manifest.json there)")
    if facts.backend not in NATIVE_LIBS:
        raise QkvxError(
            f"{directory}: cannot measure a {facts.backend!r} artifact; known: {', '.join(NATIVE_LIBS)}"
        )
    if not contexts:
        raise QkvxError("--measure needs --context (the contexts to run to)")
    for ctx in contexts:
        if not 1 <= ctx <= facts.max_seq_len:
            raise QkvxError(
                f"--context {ctx}: the artifact runs 1..{facts.max_seq_len} tokens (its max_seq_len)"
            )
    host = load_device("host")
    mem = b.backend_memory(facts.backend, host_python=True)
    rows = []
    for ctx in contexts:
        got = _run_worker(facts.backend, directory, ctx, facts.chunk)
        est = b.report(
            [facts.spec],
            [host],
            [ctx],
            "fp32",
            facts.cache_dtype,
            facts.backend,
            facts.chunk,
            facts.artifact_bytes,
            facts.plan,
            host_python=True,
        )[0]
        rows.append(
            MeasureRow(
                artifact=str(directory),
                format=facts.backend,
                context=ctx,
                chunk=facts.chunk,
                baseline_rss_bytes=got["baseline"]["VmRSS"],
                loaded_rss_bytes=got["loaded"]["VmRSS"],
                peak_rss_bytes=got["end"]["VmHWM"],
                native_code_bytes=got["native_code_bytes"],
                weights_bytes=est.weights_bytes,
                weight_copies_bytes=est.weight_copies_bytes,
                kv_cache_bytes=est.kv_cache_bytes,
                activation_bytes=est.activation_bytes,
                session_bytes=mem.session_bytes,
                runtime_baseline_bytes=mem.base_bytes,
                estimate_bytes=est.total_bytes,
                seconds=got["seconds"],
            )
        )
    return rows


def _run_worker(fmt: str, directory: Path, context: int, chunk: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "qkvx.budget_measure",
        "--worker",
        fmt,
        str(directory),
        str(context),
        str(chunk),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise QkvxError(
            f"{directory}: measuring context {context} took over {WORKER_TIMEOUT:.0f} s"
        ) from None
    lines = r.stdout.strip().splitlines()
    if r.returncode or not lines:
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise QkvxError(f"{directory}: the {fmt} run to context {context} failed ({why})")
    return json.loads(lines[-1])


def markdown_table(rows: list[MeasureRow]) -> str:
    """Estimate vs measured peak RSS, whole process and the model's part (peak - baseline; the
    estimate's terms beside it), as a Markdown table."""
    out = [
        "| artifact | context | estimate | measured peak RSS | error | model part: estimate | measured | "
        "error | estimate = weights + copies + KV + activations + session |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        terms = (
            r.weights_bytes,
            r.weight_copies_bytes,
            r.kv_cache_bytes,
            r.activation_bytes,
            r.session_bytes,
        )
        out.append(
            f"| {r.artifact} ({r.format}) | {r.context:,} | {fmt_mib(r.estimate_bytes)} | "
            f"{fmt_mib(r.peak_rss_bytes)} | "
            f"{100 * r.error:+.1f} % | {fmt_mib(r.estimate_model_bytes)} | {fmt_mib(r.model_peak_bytes)} | "
            f"{100 * r.model_error:+.1f} % | {' + '.join(f'{t / 2**20:,.1f}' for t in terms)} MiB |"
        )
    return "\n".join(out)


# ---------------------------------------------------------------- worker (a fresh process per run)


def _status() -> dict[str, int]:
    from qkvx.bench.peak import proc_status

    return proc_status("VmRSS", "VmHWM", "RssAnon", "RssFile")


def _native_code_bytes(fmt: str) -> int:
    """Resident bytes of the file mappings of the runtime's own libraries (/proc/self/smaps)."""
    total, ours = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                ours = len(head) >= 6 and ".so" in head[-1] and any(p in head[-1] for p in NATIVE_LIBS[fmt])
            elif ours and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


def _import_runtime(fmt: str):
    """Import torch, the runtime and its runner module, one thread each."""
    from qkvx.harness.runners import one_thread, runner_class

    one_thread(fmt)
    if fmt == "pte":
        from executorch.runtime import Runtime

        from qkvx.decode import load_kernels

        Runtime.get()
        load_kernels()
    else:
        import onnxruntime  # noqa: F401
    runner_class(fmt)  # the runner modules import their runtime now, before the baseline is read


def run_worker(fmt: str, path: str, context: int, chunk: int) -> dict[str, Any]:
    """In this (fresh) process: baseline, load, prefill to context - 1 in chunks, one decode step."""
    import gc
    import time

    from qkvx.budget import read_export
    from qkvx.harness.runners import one_thread_runner
    from qkvx.validate import token_stream

    _import_runtime(fmt)
    directory = Path(path)
    tokens, _, _ = token_stream(read_export(directory).spec, None, context)
    tokens = tokens.repeat(-(-context // len(tokens)))[:context]  # a short held-out text repeats
    gc.collect()
    baseline = _status()
    try:  # peak := current: import transients are not the model's (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # then VmHWM may include them; here it equalled the baseline RSS
        pass
    t0 = time.perf_counter()
    runner = one_thread_runner(fmt, directory)
    loaded = _status()
    # ORT would take a whole prompt in one call; the estimate (and an app that bounds its memory)
    # feeds `chunk` tokens per call. A .pte's chunk is its program's and already <= chunk.
    step = min(runner.prefill_chunk, chunk)
    for i in range(0, context - 1, step):  # one call per chunk; logits dropped as an app would
        runner.prefill(tokens[i : min(i + step, context - 1)])
    runner.decode(int(tokens[context - 1]))
    end = _status()
    return {
        "baseline": baseline,
        "loaded": loaded,
        "end": end,
        "native_code_bytes": _native_code_bytes(fmt),
        "seconds": time.perf_counter() - t0,
    }


def _worker_main(argv: list[str]) -> None:
    fmt, path, context, chunk = argv
    print(json.dumps(run_worker(fmt, path, int(context), int(chunk))))


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 6:
        sys.exit("usage: python -m qkvx.budget_measure --worker pte|onnx EXPORT_DIR CONTEXT CHUNK")
    _worker_main(sys.argv[2:])
