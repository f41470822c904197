# One-command set-up: a virtual environment in .venv with the CPU build of torch (constraints/cpu.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.afd-installed

.PHONY: demo test lint setup proto

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e ".[dev]"
	$(BIN)/python -c "from afd.kernels.native import main; main()"  # build the native CPU kernels once
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/afd up --demo --port 0

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy afd router orchestration

# Regenerate afd/wire/generated from proto/*.proto (tests/unit/test_codegen.py fails when they are stale).
proto: $(STAMP)
	$(BIN)/python -m afd.wire.codegen
