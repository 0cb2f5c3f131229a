# The README's two commands: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
QKVX   := $(VENV)/bin/qkvx
STAMP  := $(VENV)/.installed
DEMO   := demo_out
JOBS   ?= 2

.PHONY: install lint test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m qkvx.kernels --runner  # qkvx's C++ kernels (csrc/) and qkvx-run for this machine: cmake + g++
	$(PY) -m qkvx.export.ortops  # qkvx's onnxruntime op (its API headers from Debian if not here)
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install
	$(PY) -m pytest -q -n $(JOBS) tests

demo: install
	$(PY) -m qkvx.demo --out $(DEMO)

# Every variant x backend (bench_out/bench.md), the 4096-token decode soak (bench_out/soak/soak.md),
# the memory estimator vs measured peak RSS on the ~100M exports, and long-context decode at the
# paper's width (bench_out/longctx/longctx.md). Times: README.
bench: export PYTHONUNBUFFERED = 1  # progress lines reach a log as they happen
bench: install
	$(QKVX) bench --out bench_out
	$(QKVX) soak --out bench_out/soak
	$(QKVX) budget bench_out/models/100M/q_kv/pte-fp32 --measure -c 1024 --markdown > bench_out/budget-measure.md
	$(QKVX) budget bench_out/models/100M/q_kv/onnx-fp32 --measure -c 1024 --markdown >> bench_out/budget-measure.md
	cat bench_out/budget-measure.md
	$(PY) -m qkvx.bench.longctx --out bench_out/longctx

clean:
	rm -rf $(VENV) $(DEMO) bench_out .pytest_cache
