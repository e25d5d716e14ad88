# Two commands for a fresh machine:  make demo  and  make test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test up bench clean

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

test: install
	bash scripts/system-deps.sh
	bash scripts/services.sh
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) .tuneforge .tuneforge-demo .pytest_cache
