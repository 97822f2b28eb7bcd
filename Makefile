# VoxVault — the two commands are `make run` and `make test`; everything else they need is installed here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000
DATA   ?= ./voxvault-data

.PHONY: install dev test-system-deps run test lint typecheck pytest bench clean

# `make install` is idempotent: the stamp is rebuilt only when pyproject.toml changes.
install: $(VENV)/.install.stamp
$(VENV)/.install.stamp: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

dev: $(VENV)/.dev.stamp
$(VENV)/.dev.stamp: $(VENV)/.install.stamp
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

run: install
	VOXVAULT_DATA_DIR=$(DATA) $(BIN)/voxvault serve --host $(HOST) --port $(PORT)

lint: dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: dev
	$(BIN)/mypy

# Tests speak their own test audio with espeak-ng and shape it with sox.
test-system-deps:
	scripts/ensure-system-packages.sh espeak-ng sox

pytest: dev test-system-deps
	$(BIN)/pytest -n auto --dist loadfile

test: lint typecheck pytest

bench: dev
	scripts/ensure-system-packages.sh nginx-light wrk curl espeak-ng sox
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
