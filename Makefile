# autoglm-train — `make help` lists the targets.
PY ?= .venv/bin/python

.PHONY: help setup demo demo-all test test-all test-gguf lint format bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup:  ## venv with CPU torch (unless a GPU is present) + the package and its extras
	bash scripts/setup.sh

demo: setup  ## distill SmolLM2-135M into an 8-layer GLM assistant: its answers to the built-in chat prompts + worked steps (hybrid thinking)
	$(PY) train.py experiment=assistant_cpu

demo-all: setup  ## teacher → student → int8 → plugins → bundle → served + evaluated → outputs/demo/report/ (ARGS=--quick)
	$(PY) -m autoglm_train.pipeline $(ARGS)

test: setup  ## fast test selection (what CI runs)
	$(PY) -m pytest -q

test-all: setup  ## every test, slow end-to-end ones included
	$(PY) -m pytest -q -m "slow or not slow"

test-gguf: setup  ## install llama-cpp-python (compiles ~6 min) and run the export tests with the llama.cpp checks
	$(PY) -m pip install "llama-cpp-python>=0.3.9"
	$(PY) -m pytest -q -m "slow or not slow" tests/test_export.py

lint: setup  ## ruff lint + format check + the import layers (import-linter contract in pyproject.toml) + file/function sizes
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(dir $(PY))lint-imports && $(PY) scripts/size_check.py

format:  ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

bench: setup  ## benchmarks → benchmarks/RESULTS.md
	$(PY) benchmarks/run_all.py

clean:  ## remove runs and caches (keeps the venv)
	rm -rf outputs .cache .pytest_cache
