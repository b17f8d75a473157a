# `make demo` and `make test` set everything up on a fresh machine (Python 3.10+ with venv).
# TORCH picks the torch wheel: the default is the CPU build that CI uses; on a machine with
# PyPI's default index, `make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"`
# keeps it CPU-only.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo

.PHONY: setup demo test lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/llava-edge data synth $(DEMO)/data --train 8 --test 4
	$(BIN)/llava-edge init $(DEMO)/checkpoint --preset tiny --force
	$(BIN)/llava-edge export $(DEMO)/checkpoint $(DEMO)/model --force
	$(BIN)/llava-edge run $(DEMO)/model --image $(DEMO)/data/images/test_00000.png \
		--prompt "What color are the shapes?" --max-new-tokens 16

test: setup
	$(BIN)/pytest -q -n 2

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
