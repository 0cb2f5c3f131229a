# The README's two commands: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
QKVX   := $(VENV)/bin/qkvx
STAMP  := $(VENV)/.installed
DEMO   := demo_out
JOBS   ?= 2

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

test: install
	$(PY) -m pytest -q -n $(JOBS) tests

demo: install
	$(PY) -m qkvx.demo --out $(DEMO)

bench: install
	$(QKVX) bench --out bench_out

clean:
	rm -rf $(VENV) $(DEMO) bench_out .pytest_cache
