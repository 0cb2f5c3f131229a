"""Long-context decode at the paper's width: ms/token at 1k / 4k / 16k / 32k for QKV, Q-K=V and
Q-MQA in the GPT (learned positions) and Llama (RoPE) families, on 1 and 2 threads, for

  .pte   qkvx's kernels with an fp32 / fp16 / int8 cache, and ExecuTorch's LLM ops (llama::*) with
         an fp32 / int8 cache; ETDump's attention share of each step (1 thread);
  ONNX   each attention graph (plain ONNX ops, mha, rotary, the qkvx custom op).

    python -m qkvx.bench.longctx --out DIR [--formats pte,onnx] [--rounds 3] [--contexts ...]

A paper-300m-wide model (d 1024, 16 heads of 64, n_inner 4096) with fewer layers (LAYERS) so that
every cell fits in the time, vocab 256, random weights, fp32 weights. Each artifact is exported
once, then measured `rounds` times, each in a fresh process (qkvx.bench.longctx_worker), the
artifacts interleaved round by round, and the median over rounds reported. Each round also
measures a single-thread streaming read (numpy sum over 1 GiB, in its own fresh process), the
bound the GB/s figures are compared with, and a vectorized read (torch.sum) on 1 and on 2 threads
(what a second core adds to the memory bandwidth: the bound of a memory-bound step's 2-thread
speedup). Each round also times pairs in ONE process with their steps alternated: a family's fp32
QKV and Q-K=V .pte, and Llama's QKV and Q-K=V ONNX graphs of onnxruntime's built-in ops
(`rotary`): the paired ratios the QKV / Q-K=V goals are judged on (on this noisy VM separate
processes minutes apart move a ratio by up to 1.2x). Every cache position a step reads holds real
values (longctx_worker).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LAYERS = 2
WIDTH = dict(n_layer=LAYERS, n_embd=1024, n_head=16, n_inner=4096, vocab_size=256, max_positions=32768)
FAMILIES = ("gpt", "llama")
VARIANTS = ("QKV", "Q-K=V", "Q-MQA")
CONTEXTS = (1024, 4096, 16384, 32768)
PTE_CACHES = ("qkvx-fp32", "qkvx-fp16", "qkvx-int8", "llama-fp32", "llama-int8")  # kernels-cache dtype
ONNX_ATTENTION = ("plain", "mha", "rotary", "custom")
# The paired QKV / Q-K=V measurements: the .pte kind, onnxruntime's built-in-op RoPE graph, steps.
PAIR_KIND, ONNX_BUILTIN_PAIR, PAIR_STEPS = "qkvx-fp32", "rotary", 24


@dataclass(frozen=True)
class Config:
    format: str  # pte | onnx
    family: str
    variant: str
    kind: str  # pte: "<kernels>-<cache dtype>"; onnx: the attention graph

    @property
    def key(self) -> str:
        return f"{self.format}/{self.family}/{self.variant}/{self.kind}"

    def path(self, out: Path) -> Path:
        name = f"{self.format}-{self.family}-{self.variant.replace('=', '')}-{self.kind}"
        return out / "models" / name / ("model.pte" if self.format == "pte" else "model.onnx")


def spec_for(family: str, variant: str):
    from qkvx.spec import ModelSpec

    return ModelSpec.for_family(family, variant, **WIDTH)


def configs(formats, families, variants, pte_caches, onnx_attention) -> list[Config]:
    out = []
    for family in families:
        for variant in variants:
            if "pte" in formats:
                out += [Config("pte", family, variant, k) for k in pte_caches]
            if "onnx" in formats:  # rotary differs from mha only where keys are rotated (RoPE)
                kinds = [a for a in onnx_attention if not (a == "rotary" and family != "llama")]
                out += [Config("onnx", family, variant, a) for a in kinds]
    return out


def fill_cache(decode) -> None:
    """Random real values in every cache buffer: N(0, 1) floats; int8 rows over the whole range
    with scales of a typical magnitude."""
    import torch

    gen = torch.Generator().manual_seed(0)
    for name, buf in decode.caches.named_buffers():
        if buf.dtype == torch.int8:
            buf.copy_(torch.randint(-127, 128, buf.shape, generator=gen, dtype=torch.int8))
        elif name.endswith("_scale"):
            buf.copy_(torch.rand(buf.shape, generator=gen) * 0.02 + 0.01)
        else:
            buf.copy_(torch.randn(buf.shape, generator=gen).to(buf.dtype))


def export(config: Config, path: Path) -> None:
    """Write the artifact at `path` (temp dir, then rename: an interrupted export leaves none)."""
    import shutil

    from qkvx.models.transformer import Transformer

    spec = spec_for(config.family, config.variant)
    model = Transformer(spec).init_weights(0).eval()
    tmp = path.parent.with_name(path.parent.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if config.format == "pte":
        from qkvx.decode import DecodeModel
        from qkvx.export.executorch import check_plan, lower_decode, read_plan

        kernels, kv = config.kind.split("-")
        decode = DecodeModel(model, spec.max_positions, kv, kernels).eval()
        fill_cache(decode)
        lower_decode(decode, spec, tmp / path.name, spec.max_positions, 8, initial_cache=True)
        check_plan(read_plan(tmp / path.name), spec, spec.max_positions, kv, kernels)
    else:
        from qkvx.export.onnx import export_onnx

        export_onnx(model, tmp, attention=config.kind)
    shutil.rmtree(path.parent, ignore_errors=True)
    tmp.rename(path.parent)


def measure(config: Config, path: Path, contexts, threads, steps: int, profile: bool) -> dict:
    arg = dict(
        format=config.format,
        path=str(path),
        contexts=list(contexts),
        threads=list(threads),
        steps=steps,
        profile=profile,
    )
    return _worker(arg, config.key)


def _worker(arg: dict, what: str = "stream") -> dict:
    """Run qkvx.bench.longctx_worker in a fresh process; its last stdout line is the JSON result."""
    cmd = [sys.executable, "-m", "qkvx.bench.longctx_worker", json.dumps(arg)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{what}: worker failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(out: Path, cfgs: list[Config], contexts, threads, rounds: int, steps: int) -> dict:
    """Export what is missing, then measure every config `rounds` times, interleaved. Returns (and
    writes to out/longctx.json) {"stream_gbs": [...], "runs": {key: [worker result per round]}}."""
    out.mkdir(parents=True, exist_ok=True)
    for cfg in cfgs:
        path = cfg.path(out)
        if not path.exists():
            t0 = time.perf_counter()
            export(cfg, path)
            print(f"exported {cfg.key} in {time.perf_counter() - t0:.0f} s", flush=True)
    result: dict = {"contexts": list(contexts), "threads": list(threads), "stream_gbs": [], "runs": {}}
    for r in range(rounds):
        result.setdefault("load", []).append(os.getloadavg()[0])
        stream = _worker({"format": "stream"})
        result["stream_gbs"].append(stream["stream_gbs"])
        result.setdefault("read_gbs", []).append(stream["read_gbs"])
        for i, cfg in enumerate(cfgs):
            profile = cfg.format == "pte" and r == 0  # ETDump once: shares vary less than times
            res = measure(cfg, cfg.path(out), contexts, threads, steps, profile)
            result["runs"].setdefault(cfg.key, []).append(res)
            one = res["ms"][str(threads[0])]
            print(
                f"round {r + 1}/{rounds} [{i + 1}/{len(cfgs)}] {cfg.key}: "
                + " ".join(f"{c}={v:.1f}" for c, v in one.items()),
                flush=True,
            )
        for label, (qkv, kv) in paired_configs(cfgs).items():
            res = _worker(
                {
                    "format": "pair",
                    "formats": [qkv.format, kv.format],
                    "paths": [str(qkv.path(out)), str(kv.path(out))],
                    "contexts": list(contexts),
                    "steps": PAIR_STEPS,
                },
                f"{label} pair",
            )
            result.setdefault("pairs", {}).setdefault(label, []).append(res)
            print(
                f"round {r + 1}/{rounds} {label} QKV / Q-K=V paired: "
                + " ".join(f"{c}={v:.2f}x" for c, v in res["ratio"].items()),
                flush=True,
            )
        (out / "longctx.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def paired_configs(cfgs: list[Config]) -> dict[str, tuple[Config, Config]]:
    """The (QKV, Q-K=V) pairs to time in one process, by label ("<format>/<family>/<kind>"), of
    those measured: each family's .pte with PAIR_KIND, Llama's ONNX with ONNX_BUILTIN_PAIR."""
    have = {(c.format, c.family, c.variant, c.kind): c for c in cfgs}
    wanted = [("pte", f, PAIR_KIND) for f in FAMILIES] + [("onnx", "llama", ONNX_BUILTIN_PAIR)]
    return {
        f"{fmt}/{fam}/{kind}": (have[(fmt, fam, "QKV", kind)], have[(fmt, fam, "Q-K=V", kind)])
        for fmt, fam, kind in wanted
        if (fmt, fam, "QKV", kind) in have and (fmt, fam, "Q-K=V", kind) in have
    }


def median_ms(result: dict, key: str, threads: int, context: int) -> float | None:
    runs = result["runs"].get(key)
    return statistics.median(r["ms"][str(threads)][str(context)] for r in runs) if runs else None


def main(argv: list[str] | None = None) -> int:
    from qkvx.bench.longctx_report import to_markdown

    ap = argparse.ArgumentParser(prog="python -m qkvx.bench.longctx", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--formats", default="pte,onnx")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--pte-caches", default=",".join(PTE_CACHES))
    ap.add_argument("--onnx-attention", default=",".join(ONNX_ATTENTION))
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--report-only", action="store_true", help="render out/longctx.json again")
    a = ap.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    if a.report_only:
        result = json.loads((a.out / "longctx.json").read_text())
    else:
        cfgs = configs(
            split(a.formats),
            split(a.families),
            split(a.variants),
            split(a.pte_caches),
            split(a.onnx_attention),
        )
        contexts = [int(c) for c in split(a.contexts)]
        threads = [int(t) for t in split(a.threads)]
        result = run(a.out, cfgs, contexts, threads, a.rounds, a.steps)
    text = to_markdown(result)
    (a.out / "longctx.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
