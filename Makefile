# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test venv dev lint bench kernels-cpu clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# A CPU torch first: a bare `torch` requirement in an empty venv pulls a multi-GB CUDA build.
	$(BIN)/pip install -q "$(TORCH)"

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

demo: venv
	$(BIN)/twotower generate "ROMEO." --max-new-tokens 96

test: dev
	$(BIN)/python -m pytest -q -m "not gpu"

lint: dev
	$(BIN)/ruff check src tests benchmarks examples scripts

bench: venv
	$(BIN)/python benchmarks/ssd.py

# mamba-ssm's Triton kernels vs the torch ops on this CPU, under Triton's interpreter (~1 GB of downloads, ~10 min)
kernels-cpu: dev
	ls .gpu-kit/mamba_ssm-*.whl >/dev/null 2>&1 || $(BIN)/python scripts/gpu_kit.py prepare
	$(BIN)/python scripts/gpu_kit.py interpret

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .triton-cpu
