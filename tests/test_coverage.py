"""Every paper variant and every model family has an export test on every format: a variant or a
family added to qkvx without one fails here."""

import importlib
import sys
from pathlib import Path

from qkvx.spec import FAMILIES, PAPER_NAMES

from tiny import EXPORT_CASES

sys.path.insert(0, str(Path(__file__).parent / "export"))

# format -> (test module, test function) that exports and checks parity for each case
PARITY_TESTS = {
    "pte": ("test_executorch", "test_pte_parity_prefill_then_decode"),
    "onnx": ("test_onnx", "test_onnx_parity_and_graph_contract"),
}


def cases_of(module: str, test: str) -> set[tuple[str, str]]:
    fn = getattr(importlib.import_module(module), test)
    (mark,) = [m for m in fn.pytestmark if m.name == "parametrize"]
    return set(mark.args[1])


def test_every_variant_and_family_is_exported_on_every_format():
    for fmt, (module, test) in PARITY_TESTS.items():
        cases = cases_of(module, test)
        assert cases == set(EXPORT_CASES), fmt
        want = {n.replace("-g", "-2") for n in PAPER_NAMES}  # GQA-g and Q-GQA-g with 2 groups
        assert {v for _, v in cases} == want, f"{fmt}: a variant without an export test"
        assert {f for f, _ in cases} == set(FAMILIES), f"{fmt}: a family without an export test"
