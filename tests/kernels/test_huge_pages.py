"""The cache write asks Linux for transparent huge pages on the cache (csrc/src/huge_pages.cpp):
pages already touched are collapsed, untouched ones fault in huge and stay uncommitted until then,
contents never change, and QKVX_HUGE_PAGES=0 turns it off. Read back from /proc/self/smaps in a
fresh process (the environment switch is read once per process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

pytestmark = pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages on this kernel"
)

PRELUDE = r"""
import json, re, sys, torch
import qkvx.kernels

def kib(t, key):
    # sum of `key` over the smaps mappings overlapping the tensor's bytes
    lo = t.data_ptr(); hi = lo + t.numel() * t.element_size(); total = 0; inside = False
    for line in open("/proc/self/smaps"):
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) < hi and int(m.group(2), 16) > lo
        elif inside and line.startswith(key + ":"):
            total += int(line.split()[1])
    return total
"""

CHILD = r"""
G, S, D = 2, 65536, 64  # 32 MiB of fp32 cache
value = torch.arange(G * D, dtype=torch.float32).reshape(1, 1, G, D)
touched = torch.randn(1, G, S, D, generator=torch.Generator().manual_seed(0))  # every page written
want = touched.clone()
want[0, :, 5] = value[0, 0]
torch.ops.qkvx.update_cache(value, touched, 5)
untouched = torch.empty(1, G, S, D)  # fresh pages, never written before the kernel's first write
torch.ops.qkvx.update_cache(value, untouched, 0)
print(json.dumps({
    "same": bool(torch.equal(touched, want)),
    "row": bool(torch.equal(untouched[0, :, 0], value[0, 0])),
    "touched_huge": kib(touched, "AnonHugePages"),
    "untouched_huge": kib(untouched, "AnonHugePages"),
    "untouched_rss": kib(untouched, "Rss"),
}))
"""


def run_child(code: str = CHILD, **env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_write_moves_the_cache_to_huge_pages(kernels):
    r = run_child()
    assert r["same"] and r["row"]  # advice only: contents as torch wrote them, plus the new row
    # 32 MiB cache: at least its 15 whole 2 MiB-aligned regions collapse (30 MiB).
    assert r["touched_huge"] >= 30 * 1024, r
    # Untouched: the write faulted in the second head's first row (16 MiB in, inside the aligned
    # interior) as a whole huge page; the rest of the 32 MiB stays uncommitted (advice reserves
    # nothing). The first head's row lies before the first 2 MiB boundary, in 4 KiB pages.
    assert r["untouched_huge"] >= 2048, r
    assert r["untouched_rss"] <= 8 * 1024, r


# A program loaded again: its cache mapped at the addresses of a freed one, and first written
# mid-sequence (its earlier rows came with the program, as a .pte's initial cache state does).
# Not caught: a first write exactly where the freed cache's next one would have gone.
# 64 MiB: above glibc's largest mmap threshold, so both caches are mappings of their own.
REMAPPED = r"""
G, S, D = 2, 131072, 64
value = torch.ones(1, 1, G, D)
first = torch.randn(1, G, S, D)
for pos in (5, 6, 7):  # a sequence: advised on the first write
    torch.ops.qkvx.update_cache(value, first, pos)
addr = first.data_ptr()
del first
second = torch.randn(1, G, S, D)  # 4 KiB pages, every one written
torch.ops.qkvx.update_cache(value, second, 100)  # a seek: not where the freed cache's next write went
print(json.dumps({"same_addresses": second.data_ptr() == addr, "huge": kib(second, "AnonHugePages")}))
"""


def test_a_cache_mapped_where_a_freed_one_was_is_advised_again(kernels):
    r = run_child(REMAPPED)
    assert r["same_addresses"], r  # the case itself: Linux maps the new cache into the hole
    assert r["huge"] >= 60 * 1024, r  # its 31 whole 2 MiB-aligned regions (62 MiB) collapsed


def test_huge_pages_off_by_environment(kernels):
    r = run_child(QKVX_HUGE_PAGES="0")
    assert r["same"] and r["row"]
    assert r["touched_huge"] == 0 and r["untouched_huge"] == 0, r
