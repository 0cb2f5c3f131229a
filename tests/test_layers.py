"""The package import graph: layers point one way (docs/architecture.md). Every `import qkvx...` in
qkvx/, at module level or inside a function, goes to the same layer or a lower one, and no two
packages import each other through any chain."""

import ast
from pathlib import Path

import qkvx

ROOT = Path(qkvx.__file__).parent
# Bottom (plain data, no model) to top (the face users call). A unit is a top-level module or a
# subpackage of qkvx.
LAYERS = [
    {
        "errors",
        "version",
        "util",
        "config",
        "spec",
        "recipes",
        "devices",
        "artifact",
        "corpus",
        "tokenizer",
        "textdata",
        "native_build",
    },
    {"models"},
    {"loaders", "quant", "decode", "kernels"},
    {"export", "harness"},
    {
        "pipeline",
        "validate",
        "budget",
        "budget_measure",
        "budget_report",
        "soak",
        "train",
        "bench",
        "convert",
        "distill",
    },
    {"api", "console", "cli", "cli_convert", "demo", "__main__", "__init__"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """qkvx.export.onnx -> export; qkvx.spec -> spec; qkvx -> __init__ (the package's face)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def edges() -> set[tuple[str, str, str]]:
    """(importing unit, imported unit, where) for every import of a qkvx module under qkvx/."""
    out = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        src = unit_of(module) if path.parent != ROOT or path.stem != "__init__" else "__init__"
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] if node.module != "qkvx" else [f"qkvx.{a.name}" for a in node.names]
            for name in names:
                if name == "qkvx" or name.startswith("qkvx."):
                    dst = unit_of(name)
                    if dst != src:
                        out.add((src, dst, f"{rel}:{node.lineno}"))
    return out


def test_every_unit_has_a_layer():
    units = {unit_of(".".join(p.relative_to(ROOT.parent).with_suffix("").parts)) for p in ROOT.rglob("*.py")}
    assert units - {"__init__"} <= set(LAYER), sorted(units - set(LAYER))


def test_layers_point_one_way():
    upward = sorted(
        f"{where}: {src} (layer {LAYER[src]}) imports {dst} (layer {LAYER[dst]})"
        for src, dst, where in edges()
        if LAYER[dst] > LAYER[src]
    )
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in edges():
        graph.setdefault(src, set()).add(dst)

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            n = todo.pop()
            if n == b:
                return True
            if n not in seen:
                seen.add(n)
                todo.extend(graph.get(n, ()))
        return False

    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert not cycles, cycles


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The graph test can fail: a lower module importing the orchestrator is reported."""
    fake = tmp_path / "qkvx"
    (fake / "export").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "export" / "onnx.py").write_text("def f():\n    from qkvx.pipeline import export_model\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    assert ("export", "pipeline", "qkvx/export/onnx:2") in edges()
