"""Device profiles (devices/*.toml): shipped profiles are complete and sourced; bad files are rejected
with the file and the key named; the host profile is measured."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from qkvx.devices import (
    DEVICE_DIR,
    DeviceProfile,
    device_names,
    list_devices,
    load_device,
    measure_bandwidth,
    measure_host,
    numeric_fields,
)
from qkvx.errors import QkvxError

GIB = 2**30


@pytest.fixture(scope="module")
def profiles() -> list[DeviceProfile]:
    return list_devices()


@pytest.fixture(scope="module")
def real(profiles) -> list[DeviceProfile]:
    return [p for p in profiles if p.kind != "host"]


def test_all_shipped_profiles_load(profiles):
    assert [p.name for p in profiles] == device_names()
    assert "host" in device_names()
    for p in profiles:
        if p.kind != "host":  # the host's MemAvailable moves between loads
            assert p == load_device(DEVICE_DIR / f"{p.name}.toml")


def test_at_least_eight_real_devices_spanning_the_market(real):
    assert len(real) >= 8
    kinds = {p.kind for p in real}
    assert {"phone", "sbc"} <= kinds and kinds & {"laptop", "desktop"}
    by = {p.name: p for p in real}
    low_end = [p for p in real if p.kind == "phone" and p.ram_bytes <= 4 * GIB]
    assert low_end and all("Cortex-A55" in p.cpu_core_types for p in low_end)
    assert any("Snapdragon 8 Gen 3" in p.soc for p in real)
    assert any("Tensor" in p.soc for p in real)
    assert any("A17 Pro" in p.soc for p in real)
    assert by["raspberry-pi-5"].ram_bytes == 8 * GIB and by["raspberry-pi-5"].cpu_cores == 4
    assert by["jetson-orin-nano"].ram_bytes == 8 * GIB and "A78AE" in by["jetson-orin-nano"].cpu_core_types


def test_every_number_has_a_source(profiles):
    assert set(numeric_fields()) == {
        "cpu_cores",
        "ram_bytes",
        "app_budget_bytes",
        "mem_bandwidth_bytes_per_s",
    }
    for p in profiles:
        for key in numeric_fields():
            line = p.sources.get(key, "")
            assert line.strip(), f"{p.name}: {key} has no source"
            # a public reference, an explicit estimate, or (host) the measurement method
            assert re.search(r"https?://|estimate|measured", line), f"{p.name}: {key}: {line!r}"
        for key in ("soc", "cpu_core_types", "isa_features", "qemu_cpu", "backends"):
            if getattr(p, key) is not None:
                assert p.sources.get(key, "").strip(), f"{p.name}: {key} has no source"


def test_budgets_and_bandwidths_are_plausible(real):
    for p in real:
        assert p.app_budget_bytes < p.ram_bytes, p.name
        assert 0.25 <= p.app_budget_bytes / p.ram_bytes <= 0.9, p.name  # never "all of the RAM"
        assert 5e9 <= p.mem_bandwidth_bytes_per_s <= 1e12, p.name
        assert p.mem_bandwidth_kind == "theoretical"
        assert p.qemu_cpu, p.name  # every real target here is arm64


def test_qemu_cpu_models_exist_in_this_machines_qemu(real):
    exe = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if exe is None:
        pytest.skip("qemu-aarch64 is not installed")
    out = subprocess.run([exe, "-cpu", "help"], capture_output=True, text=True, timeout=30).stdout
    models = {line.split()[0] for line in out.splitlines()[1:] if line.strip()}
    for p in real:
        assert p.qemu_cpu.split(",")[0] in models, (
            f"{p.name}: qemu_cpu {p.qemu_cpu!r} not in {sorted(models)}"
        )


def test_to_dict_is_plain_json_data(real):
    import json

    d = real[0].to_dict()
    assert json.loads(json.dumps(d))["ram_bytes"] == real[0].ram_bytes


# ---------------------------------------------------------------- bad profiles

GOOD = """\
device = "Test board"
kind = "sbc"
soc = "Test SoC"
cpu_cores = 4
cpu_core_types = "4x Cortex-A76"
isa_features = ["armv8.2-a", "neon"]
ram_bytes = 8_589_934_592
app_budget_bytes = 6_000_000_000
mem_bandwidth_bytes_per_s = 17_068_000_000
mem_bandwidth_kind = "theoretical"
backends = ["xnnpack"]
qemu_cpu = "cortex-a76"

[sources]
cpu_cores = "https://example.org/spec: 4 cores"
ram_bytes = "https://example.org/spec: 8 GB"
app_budget_bytes = "estimate: RAM minus OS"
mem_bandwidth_bytes_per_s = "https://example.org/spec: 32-bit LPDDR4X-4267"
"""


def write(tmp_path, text: str, name: str = "board"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_a_good_profile_loads_by_path(tmp_path):
    p = load_device(write(tmp_path, GOOD))
    assert p.name == "board" and p.isa_features == ("armv8.2-a", "neon") and p.measured == ()
    assert isinstance(p.mem_bandwidth_bytes_per_s, float)


@pytest.mark.parametrize(
    "edit, key",
    [
        (
            lambda t: t.replace('qemu_cpu = "cortex-a76"', 'qemu_cpu = "cortex-a76"\nflash_bytes = 1'),
            "flash_bytes",
        ),  # unknown key
        (lambda t: t.replace("ram_bytes = 8_589_934_592\n", ""), "ram_bytes"),  # missing key
        (lambda t: t.replace('ram_bytes = "https://example.org/spec: 8 GB"\n', ""), "ram_bytes"),  # no source
        (lambda t: t.replace("ram_bytes = 8_589_934_592", 'ram_bytes = "8 GB"'), "ram_bytes"),  # wrong type
        (lambda t: t.replace("cpu_cores = 4", "cpu_cores = 4.5"), "cpu_cores"),  # wrong type
        (lambda t: t.replace("cpu_cores = 4", "cpu_cores = true"), "cpu_cores"),  # bool is no int
        (lambda t: t.replace('backends = ["xnnpack"]', 'backends = "xnnpack"'), "backends"),  # not a list
        (
            lambda t: t.replace('isa_features = ["armv8.2-a", "neon"]', 'isa_features = ["neon", 3]'),
            "isa_features",
        ),
        (lambda t: t + 'flash_bytes = "https://example.org"\n', "flash_bytes"),  # source for no field
        (
            lambda t: t.replace('app_budget_bytes = "estimate: RAM minus OS"', 'app_budget_bytes = ""'),
            "app_budget_bytes",
        ),  # empty source line
        (
            lambda t: t.replace("ram_bytes = 8_589_934_592", 'ram_bytes = "measure"'),
            "ram_bytes",
        ),  # not a host
        (
            lambda t: t.replace("app_budget_bytes = 6_000_000_000", "app_budget_bytes = 9_000_000_000"),
            "app_budget_bytes",
        ),  # budget >= RAM
        (lambda t: t.replace('kind = "sbc"', 'kind = "tablet"'), "kind"),
        (lambda t: t.replace('backends = ["xnnpack"]', 'backends = ["xnnpak"]'), "backend"),
        (lambda t: t.replace('kind = "sbc"', 'kind = "sbc"\nmeasured = ["ram_bytes"]'), "measured"),
    ],
)
def test_bad_profiles_name_the_file_and_the_key(tmp_path, edit, key):
    path = write(tmp_path, edit(GOOD))
    assert edit(GOOD) != GOOD
    with pytest.raises(QkvxError) as exc:
        load_device(path)
    msg = str(exc.value)
    assert str(path) in msg and key in msg, msg
    assert "\n" not in msg


def test_invalid_toml_and_unknown_names(tmp_path):
    with pytest.raises(QkvxError, match=r"board\.toml: not valid TOML"):
        load_device(write(tmp_path, "ram_bytes = = 3"))
    with pytest.raises(QkvxError, match="unknown device 'nokia-3310'; known: .*raspberry-pi-5"):
        load_device("nokia-3310")
    with pytest.raises(QkvxError, match="no such device profile"):
        load_device(tmp_path / "missing.toml")


# ---------------------------------------------------------------- host


def test_host_is_measured_and_plausible():
    t0 = time.perf_counter()
    m = measure_host()
    assert time.perf_counter() - t0 < 5.0  # 256 MiB copy benchmark, once per process
    assert m["ram_bytes"] > GIB
    assert 0 < m["app_budget_bytes"] < m["ram_bytes"]
    assert m["mem_bandwidth_bytes_per_s"] > 1e9
    assert m["cpu_cores"] >= 1
    assert m["isa_features"] and m["soc"]
    t0 = time.perf_counter()
    assert measure_bandwidth() == m["mem_bandwidth_bytes_per_s"]  # cached for the process
    assert time.perf_counter() - t0 < 0.01

    host = load_device("host")
    assert host.kind == "host" and host.mem_bandwidth_kind == "measured"
    assert set(host.measured) == {
        "soc",
        "cpu_cores",
        "cpu_core_types",
        "isa_features",
        "ram_bytes",
        "app_budget_bytes",
        "mem_bandwidth_bytes_per_s",
    }
    assert host.ram_bytes == m["ram_bytes"] and host.cpu_cores == m["cpu_cores"]


def test_host_may_not_measure_what_cannot_be_measured(tmp_path):
    text = (
        (DEVICE_DIR / "host.toml")
        .read_text()
        .replace('mem_bandwidth_kind = "measured"', 'mem_bandwidth_kind = "measure"')
    )
    path = write(tmp_path, text, "myhost")
    with pytest.raises(QkvxError, match=r"myhost\.toml: key 'mem_bandwidth_kind' cannot be measured"):
        load_device(path)
