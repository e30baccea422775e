# var-jax: `make demo` (set up + train and sample on the embedded digits), `make test`, `make bench`.
SHELL := /bin/bash
VENV ?= .venv
# Newest JAX needs Python >= 3.12: use it where the machine has one (pyenv or PATH), else python3.
PYTHON ?= $(shell if PYENV_VERSION=3.12.1 python3 -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then \
	echo "env PYENV_VERSION=3.12.1 python3"; elif command -v python3.12 >/dev/null 2>&1 && python3.12 -V >/dev/null 2>&1; then \
	echo python3.12; else echo python3; fi)
PY := $(VENV)/bin/python
# The shared reference material (specs, golden fixtures) sits beside the repository.
export VARJAX_SHARED ?= $(abspath ../shared)

.PHONY: venv test lint demo bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check .

demo: venv
	$(PY) demo.py --workdir workdir/demo

bench: venv
	$(PY) -m benchmarks.run --out benchmarks/results.jsonl

clean:
	rm -rf $(VENV) workdir
