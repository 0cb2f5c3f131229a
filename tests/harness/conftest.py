"""Fixtures of the runner tests: the arm64 emulator, and the .pte artifacts (pte_cases.py), trained
and exported once per test run and shared by the pytest-xdist workers through a lock in the run's
common temp directory: the exports cost most of these tests' time."""

import json

import pytest

from pte_cases import TRAIN, once, shared_dir


@pytest.fixture(scope="session")
def arm64():
    """The emulator, set up if it is not (a no-op when it is); skipped only when it cannot be."""
    from qkvx.harness import emulator

    if not emulator.status().ready and (blockers := emulator.tool_problems(need_debootstrap=True)):
        pytest.skip(f"arm64 emulator not set up and this machine cannot set it up: {'; '.join(blockers)}")
    return emulator.setup()


@pytest.fixture(scope="session")
def pte_artifact(tmp_path_factory):
    """pte_artifact(family, variant, recipe) -> the export directory (manifest, model.pte, source)."""
    root = shared_dir(tmp_path_factory)

    def trained(family, variant):
        from qkvx.train import train

        def make(out):
            tmp = out.with_name(out.name + ".tmp")
            train(variant, family=family, seed=0, out=tmp, **TRAIN)
            tmp.rename(out)

        return once(root / f"{family}-{variant}", make)

    def get(family, variant, recipe):
        from qkvx.api import export

        src = trained(family, variant)
        return once(
            root / f"{family}-{variant}-{recipe}",
            lambda out: export(src, recipe, out, validate=False),
        )

    return get


@pytest.fixture(scope="session")
def fp32_dir(pte_artifact):
    """The pte-fp32 export of GPT Q-K=V: the artifact the runner's own checks use."""
    return pte_artifact("gpt", "Q-K=V", "pte-fp32")


@pytest.fixture(scope="session")
def llama_kernel_pte(fp32_dir, tmp_path_factory):
    """fp32_dir's model exported with ExecuTorch's llama attention ops instead of qkvx's: a .pte
    that needs a kernel library (libcustom_ops_aot_lib, libtorch-linked) qkvx-run does not link."""
    import qkvx
    from qkvx.export.executorch import export_pte

    def make(out):
        model = qkvx.load(json.loads((fp32_dir / "manifest.json").read_text())["source"]["path"])
        tmp = out.with_name(out.name + ".tmp")
        export_pte(model, tmp, 64, 16, kernels="llama")
        tmp.rename(out)

    return once(shared_dir(tmp_path_factory) / "llama-kernels.pte", make)
