"""`python -m qkvx.bench.peak OUT_FILE (-m MODULE | -c CODE) [ARGS...]`: run a Python program in this
process, then write its peak RSS (VmHWM, bytes) to OUT_FILE at exit.

Why not the parent's os.wait4 ru_maxrss: Python starts children with vfork, and Linux folds the
RSS of the pre-exec image (the PARENT's memory) into the child's ru_maxrss, so a small child of a
large bench process would report the bench's size. VmHWM belongs to the new image only.
"""

from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path


def proc_status(*keys: str) -> dict[str, int]:
    """Memory fields of /proc/self/status (kB there), in bytes; a key the kernel lacks is 0."""
    out = dict.fromkeys(keys, 0)
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in out:
            out[key] = int(value.split()[0]) * 1024
    return out


def vm_hwm() -> int:
    """This process's peak resident set since exec, in bytes (Linux /proc)."""
    return proc_status("VmHWM")["VmHWM"]


def main() -> None:
    out, mode, target, *args = sys.argv[1:]
    atexit.register(lambda: Path(out).write_text(str(vm_hwm())))
    if mode == "-m":
        sys.argv = [target, *args]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif mode == "-c":
        sys.argv = ["-c", *args]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit(
            f"usage: python -m qkvx.bench.peak OUT_FILE (-m MODULE | -c CODE) [ARGS...], got {mode!r}"
        )


if __name__ == "__main__":
    main()
