# Two commands for a fresh machine:  make demo  and  make test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint up bench clean

install: $(STAMP)

# torch is installed first and pinned: a range admitting a newer release pulls GBs of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[worker,dev]'
	touch $(STAMP)

demo: install
	$(BIN)/tuneforge demo

up: install
	$(BIN)/tuneforge up

# The structure as contracts: style, types of app/, the import layering and no cycles.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python scripts/code_map.py > /dev/null || $(BIN)/python scripts/code_map.py

test: install lint
	bash scripts/system-deps.sh
	bash scripts/services.sh
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) .tuneforge .tuneforge-demo .pytest_cache
