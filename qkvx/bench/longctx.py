"""Long-context decode at the paper's width: ms/token at 1k / 4k / 16k / 32k for QKV, Q-K=V and
Q-MQA in the GPT (learned positions) and Llama (RoPE) families, on 1 and 2 threads, for

  .pte   qkvx's kernels with an fp32 / fp16 / int8 cache, and ExecuTorch's LLM ops (llama::*) with
         an fp32 / int8 cache; ETDump's attention share of each step (1 thread, every round);
  ONNX   each attention graph (plain ONNX ops, mha, rotary, the qkvx custom op).

    python -m qkvx.bench.longctx --out DIR [--formats pte,onnx] [--rounds 3] [--contexts ...]

A paper-300m-wide model (d 1024, 16 heads of 64, n_inner 4096) with fewer layers (LAYERS) so that
every cell fits in the time, vocab 256, random weights, fp32 weights. Each artifact is exported
once, then measured `rounds` times, each in a fresh process (qkvx.bench.longctx_worker), the
artifacts interleaved round by round, and the median over rounds reported. Each round also
measures a single-thread streaming read (numpy sum over 1 GiB, in its own fresh process), the
bound the GB/s figures are compared with, and a vectorized read (torch.sum) on 1 and on 2 threads
(what a second core adds to the memory bandwidth: the bound of a memory-bound step's 2-thread
speedup). Each round also times pairs (pairs()): two processes, each holding one artifact,
their single-token steps alternated, so both sides see the same moments: QKV vs Q-K=V, 1 vs 2
threads (a 1 vs 2 threads read alternated right after as the control; a .pte's threads pinned one
per core, longctx_worker.pin_threads), fp32 vs int8 cache, the
.pte vs each ONNX graph. The goals are judged on those paired
ratios (on this noisy VM separate processes minutes apart move a ratio by up to 1.2x). Every
cache position a step reads holds real values (longctx_worker).
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
# Paired measurements (pairs()): the .pte kind, Llama's ONNX graphs with onnxruntime's built-in ops
# for RoPE and with qkvx's custom op, steps per context.
PAIR_KIND, ONNX_BUILTIN_PAIR, ONNX_CUSTOM_PAIR, PAIR_STEPS = "qkvx-fp32", "rotary", "custom", 24


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
    from qkvx.bench import machine

    result: dict = {"machine": machine(), "contexts": list(contexts), "threads": list(threads)}
    result.update(stream_gbs=[], runs={})
    for r in range(rounds):
        result.setdefault("load", []).append(os.getloadavg()[0])
        stream = _worker({"format": "stream"})
        result["stream_gbs"].append(stream["stream_gbs"])
        result.setdefault("read_gbs", []).append(stream["read_gbs"])
        for i, cfg in enumerate(cfgs):
            res = measure(cfg, cfg.path(out), contexts, threads, steps, profile=cfg.format == "pte")
            result["runs"].setdefault(cfg.key, []).append(res)
            one = res["ms"][str(threads[0])]
            print(
                f"round {r + 1}/{rounds} [{i + 1}/{len(cfgs)}] {cfg.key}: "
                + " ".join(f"{c}={v:.1f}" for c, v in one.items()),
                flush=True,
            )
        for pair in pairs(cfgs, threads):
            res = alternate(pair, out, contexts, PAIR_STEPS)
            result.setdefault("pairs", {}).setdefault(pair.label, []).append(res)
            print(
                f"round {r + 1}/{rounds} {pair.label}: "
                + " ".join(f"{c}={v:.2f}x" for c, v in res["ratio"].items()),
                flush=True,
            )
        (out / "longctx.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


@dataclass(frozen=True)
class Pair:
    """Two sides (artifact, threads) whose steps are alternated; the ratio is side 0 ms / side 1 ms.
    `control`: two more sides alternated right after, their ratio reported beside it. Not in the
    same rotation: with a read process stepping between them, a 2-thread .pte step took 1.5x
    longer (its pool thread idle through three other steps) and gained 1.2x from its second
    thread where it gains 1.8x alone."""

    label: str
    sides: tuple[tuple[Config, int], ...]
    control: tuple[tuple[Config, int], ...] = ()


# A side that reads READ_MIB of memory (torch.sum) per step instead of decoding: the control of a
# 1 vs 2 threads pair, what a second core adds to the memory bandwidth at those moments.
READ, READ_MIB = Config("read", "-", "-", "-"), 256


def pairs(cfgs: list[Config], threads: list[int]) -> list[Pair]:
    """The pairs each goal is judged on, of those measured, by label (longctx_report reads them):
    "qkv/<format>/<family>/<kind>"   QKV vs Q-K=V: each family's PAIR_KIND .pte, Llama's
                                     ONNX_BUILTIN_PAIR and ONNX_CUSTOM_PAIR graphs, 1 thread;
    "threads/<family>"               the Q-K=V PAIR_KIND .pte on 1 vs 2 threads, READ on 1 vs 2
                                     threads as the control;
    "int8/<family>"                  the Q-K=V PAIR_KIND .pte vs its qkvx-int8 twin, 1 thread;
    "onnx/<family>/<graph>"          each Q-K=V ONNX graph vs the Q-K=V PAIR_KIND .pte, 1 thread."""
    have = {(c.format, c.family, c.variant, c.kind): c for c in cfgs}
    out = []
    onnx_graphs = [("onnx", "llama", g) for g in (ONNX_BUILTIN_PAIR, ONNX_CUSTOM_PAIR)]
    for fmt, fam, kind in [("pte", f, PAIR_KIND) for f in FAMILIES] + onnx_graphs:
        qkv, kv = have.get((fmt, fam, "QKV", kind)), have.get((fmt, fam, "Q-K=V", kind))
        if qkv and kv:
            out.append(Pair(f"qkv/{fmt}/{fam}/{kind}", ((qkv, 1), (kv, 1))))
    for fam in FAMILIES:
        pte = have.get(("pte", fam, "Q-K=V", PAIR_KIND))
        if pte and 2 in threads:
            out.append(Pair(f"threads/{fam}", ((pte, 1), (pte, 2)), ((READ, 1), (READ, 2))))
        int8 = have.get(("pte", fam, "Q-K=V", "qkvx-int8"))
        if pte and int8:
            out.append(Pair(f"int8/{fam}", ((pte, 1), (int8, 1))))
        for graph in ONNX_ATTENTION:
            onnx = have.get(("onnx", fam, "Q-K=V", graph))
            if pte and onnx:
                out.append(Pair(f"onnx/{fam}/{graph}", ((onnx, 1), (pte, 1))))
    return out


def alternate(pair: Pair, out: Path, contexts, steps: int) -> dict:
    """Each side loaded in its own fresh process (longctx_worker.serve), their single-token steps
    taken in turn, the order rotated every round (a b, b a for two sides) so all see the same
    moments of a noisy machine: per context the median of the `steps` ratios side 0 / side 1, and
    each side's median ms; with pair.control, that pair's ratios as "control"."""
    res = _alternate_sides(pair.label, pair.sides, out, contexts, steps)
    if pair.control:
        res["control"] = _alternate_sides(pair.label, pair.control, out, contexts, steps)["ratio"]
    return res


def _alternate_sides(label: str, sides, out: Path, contexts, steps: int) -> dict:
    args = [
        {
            "format": "serve",
            "serve": cfg.format,
            "path": "" if cfg == READ else str(cfg.path(out)),
            "threads": n,
            "read_mib": READ_MIB,
        }
        for cfg, n in sides
    ]
    return alternate_workers(label, args, contexts, steps)


def alternate_workers(
    label: str, args: list[dict], contexts, steps: int, envs: list[dict] | None = None
) -> dict:
    """One longctx_worker "serve" process per arg (with envs[i] added to its environment), their
    steps alternated as in alternate(): {"ratio": {context: side 0 / side 1}, "ms": {context: [...]}}."""
    procs = []
    for i, arg in enumerate(args):
        cmd = [sys.executable, "-m", "qkvx.bench.longctx_worker", json.dumps(arg)]
        env = {**os.environ, **envs[i]} if envs else None
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))

    def ask(p: subprocess.Popen, line: str) -> str:
        p.stdin.write(line + "\n")
        p.stdin.flush()
        answer = p.stdout.readline()
        if not answer:
            raise RuntimeError(f"{label}: worker ended (exit {p.wait()}) on {line!r}")
        return answer.strip()

    def ratio(times: list[list[float]], a: int, b: int) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{label}: worker failed to load (exit {p.wait()})")
        res: dict = {"ratio": {}, "ms": {}}
        k = len(procs)
        for c in contexts:
            for p in procs:
                ask(p, f"seek {c - steps - 2}")
                for _ in range(2):  # warm-up steps, not timed
                    ask(p, "step")
            times: list[list[float]] = [[] for _ in procs]
            for i in range(steps):
                order = [(j + i) % k for j in range(k)]
                for j in order if i % 2 == 0 else order[::-1]:
                    times[j].append(float(ask(procs[j], "step")))
            res["ratio"][str(c)] = ratio(times, 0, 1)
            res["ms"][str(c)] = [statistics.median(t) for t in times]
        return res
    finally:
        for p in procs:
            if p.poll() is None:
                p.stdin.close()
                p.wait()


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
