# Quick start: `make train` and `make test`. Each creates .venv from requirements*.txt on first use
# and installs the project into it (editable: ray_train and models import from any folder).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: train test bench gpu-check clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

train: $(VENV)/.installed
	$(PY) -m ray_train --config configs/default.yaml $(ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q --durations=15 tests $(ARGS)

bench: $(VENV)/.installed-dev
	$(PY) scripts/benchmark.py $(ARGS)

# Every GPU test and the GPU figures of docs/gpu.md, as one table (says so and exits 0 without CUDA).
gpu-check: $(VENV)/.installed-dev
	$(PY) scripts/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
