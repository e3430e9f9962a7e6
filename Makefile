# Quick start: `make demo`, then `make test`. Both create the virtualenv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 is installed first so that no dependency range pulls CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
export RAY_AUTH_MODE ?= disabled

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/vreason-batch demo-manifest runs/demo/manifest.jsonl
	$(VENV)/bin/vreason-batch run configs/demo.yaml --overwrite
	$(VENV)/bin/vreason-batch report runs/demo/output --out runs/demo/report

test: setup
	$(PY) -m pytest -q -ra

bench: setup
	$(VENV)/bin/vreason-batch bench

clean:
	rm -rf runs .pytest_cache
