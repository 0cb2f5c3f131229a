"""qkvx.native_build: a missing tool is one line naming the Debian package to install."""

import pytest

from qkvx import native_build as kbuild


@pytest.mark.parametrize(
    "missing, package, kwargs",
    [
        ("cmake", "cmake", {}),
        ("g++", "g++", {}),
        ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu", {"aarch64": True}),
    ],
)
def test_missing_tool_names_the_debian_package(monkeypatch, tmp_path, missing, package, kwargs):
    real = kbuild.shutil.which
    monkeypatch.setattr(kbuild.shutil, "which", lambda tool: None if tool == missing else real(tool))
    with pytest.raises(kbuild.KernelsBuildError) as e:
        kbuild.build(out=tmp_path, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and f"apt-get install {package}" in msg and missing in msg


def test_not_an_executorch_prefix_is_one_line(tmp_path):
    with pytest.raises(kbuild.KernelsBuildError, match="not an ExecuTorch prefix"):
        kbuild.build(executorch_prefix_dir=tmp_path, out=tmp_path / "b")


def test_build_dir_follows_the_sources(monkeypatch, tmp_path):
    a = kbuild.build_dir()
    assert a == kbuild.build_dir() and a.name.startswith(kbuild.platform.machine())
    assert kbuild.build_dir(aarch64=True) != a
