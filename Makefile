# The two commands of the README: `make demo` (train the demo) and `make test` (the test suite).
# Both create .venv on first use. torch is installed first and pinned by constraints.txt, so pip takes
# the CPU wheel instead of pulling several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: setup
	$(BIN)/sparsegen demo

test: setup
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV) sparsegen-work
