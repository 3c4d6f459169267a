# The two set-up commands and the test command that README.md shows (and .ci/run calls).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install test test-fast lint

install:
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: on a machine without a local CPU wheel this is the CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,deepspeed]"
	# DeepSpeed's CPU ops, compiled once now rather than by the first run that needs them (~1.5 min)
	$(BIN)/python -m launch.deepspeed_ops || echo "warning: DeepSpeed's CPU ops did not compile; runs will try again"

test:
	$(BIN)/python -m pytest --durations=25

test-fast:
	$(BIN)/python -m pytest -m "not slow"

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
