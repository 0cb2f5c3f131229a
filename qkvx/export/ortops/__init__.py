"""qkvx's onnxruntime custom-op library: qkvx.CachedAttention (csrc/ortops/cached_attention.cpp,
over the attention kernels of the .pte, csrc/src).

The library is built from source on first use (CMake, csrc's target qkvx_ortops) into a cache
directory keyed by the sources and the headers (qkvx.native_build.build_ortops), and loaded into a
session with SessionOptions.register_custom_ops_library. It needs onnxruntime's C/C++ API headers
(onnxruntime_c_api.h, onnxruntime_cxx_api.h), which the onnxruntime wheel does not ship. Looked
for, in order: $QKVX_ORT_INCLUDE, /usr/include/onnxruntime (Debian's libonnxruntime-dev), the
cache; else fetched: Debian's libonnxruntime-dev (trixie, 1.21) is downloaded with apt-get into a
private apt state under the cache and unpacked there (nothing is installed on the system). The
custom op uses the C API of version 21; onnxruntime keeps older API versions, so newer runtimes
(1.32 here) load it.

    python -m qkvx.export.ortops        # fetch the headers if needed, build, print the path
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from qkvx.errors import QkvxError

DOMAIN, OP = "qkvx", "CachedAttention"
HEADER = "onnxruntime_cxx_api.h"
DEBIAN_SUITE, DEBIAN_PACKAGE = "trixie", "libonnxruntime-dev"


def cache_dir() -> Path:
    root = os.environ.get("QKVX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "qkvx"
    )
    return Path(root) / "ortops"


def _has_header(d: Path) -> bool:
    return (d / HEADER).is_file() and (d / "onnxruntime_c_api.h").is_file()


def include_dir(fetch: bool = True) -> Path:
    """The directory holding onnxruntime's API headers; fetched from Debian when nowhere here."""
    candidates = [
        os.environ.get("QKVX_ORT_INCLUDE"),
        "/usr/include/onnxruntime",
        cache_dir() / "headers/usr/include/onnxruntime",
    ]
    for c in candidates:
        if c and _has_header(Path(c)):
            return Path(c)
    if not fetch:
        raise QkvxError(
            "onnxruntime's C/C++ API headers not found (set QKVX_ORT_INCLUDE, or run "
            "`python -m qkvx.export.ortops` to fetch Debian's libonnxruntime-dev)"
        )
    return fetch_headers()


def fetch_headers() -> Path:
    """Download Debian's libonnxruntime-dev with apt-get (a private sources list and state, so the
    system's apt configuration is untouched) and unpack its headers under the cache."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise QkvxError(
            "onnxruntime's API headers are not here and there is no apt-get to fetch Debian's "
            f"{DEBIAN_PACKAGE}: set QKVX_ORT_INCLUDE to a directory holding {HEADER}"
        )
    apt = cache_dir() / "apt"
    (apt / "lists/partial").mkdir(parents=True, exist_ok=True)
    (apt / "archives/partial").mkdir(parents=True, exist_ok=True)
    sources = apt / "sources.list"
    sources.write_text(
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        f"http://deb.debian.org/debian {DEBIAN_SUITE} main\n"
    )
    opts = [
        "-o",
        f"Dir::Etc::SourceList={sources}",
        "-o",
        "Dir::Etc::SourceParts=/dev/null",
        "-o",
        f"Dir::State::Lists={apt / 'lists'}",
        "-o",
        f"Dir::Cache::Archives={apt / 'archives'}",
        "-o",
        "APT::Sandbox::User=root",
        "-q",
    ]

    def run(*cmd, cwd=None):
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if r.returncode:
            raise QkvxError(
                f"fetching onnxruntime's headers: `{' '.join(map(str, cmd[:2]))}` failed: "
                f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}"
            )

    run("apt-get", *opts, "update")
    run("apt-get", *opts, "download", DEBIAN_PACKAGE, cwd=apt)
    debs = sorted(apt.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if not debs:
        raise QkvxError(f"apt-get download {DEBIAN_PACKAGE} left no .deb")
    out = cache_dir() / "headers"
    run("dpkg-deb", "-x", str(debs[-1]), str(out))
    inc = out / "usr/include/onnxruntime"
    if not _has_header(inc):
        raise QkvxError(f"{debs[-1].name} holds no {HEADER}")
    return inc


def library_path(fetch: bool = True) -> Path:
    """The built custom-op library (built now if this source tree and these headers have not been)."""
    from qkvx.native_build import build_ortops

    return build_ortops(include_dir(fetch))


def uses_custom_ops(model_path: str | Path) -> bool:
    """Whether an ONNX file imports qkvx's op domain (read without its external data)."""
    import onnx

    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # not an ONNX file: the session reports it
        return False
    return any(o.domain == DOMAIN for o in proto.opset_import)
