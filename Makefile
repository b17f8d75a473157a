# `make demo` and `make test` set everything up on a fresh machine (Python 3.11+ with venv: the
# development extras hold [calib], whose onnxruntime has no Python 3.10 wheels from 1.24 on; the
# runtime alone, `pip install llava-edge`, runs on 3.10).
# TORCH picks the torch wheel. This project's CI machines resolve the default to a local CPU
# wheel; from PyPI's default index torch==2.13.0 is the CUDA build (Linux x86), so there
# `make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"` keeps it CPU-only.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
# pyproject.toml's onnxruntime floor for the runtime, in .venv-floor beside .venv:
# tests/test_onnxruntime_floor.py runs a model dir on it (JetPack 6's onnxruntime-gpu is that old).
FLOOR_ONNXRUNTIME := onnxruntime==1.20.1
FLOOR := .venv-floor
DEMO := demo

.PHONY: setup demo test lint format clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "make: $(PYTHON) is older than Python 3.11, whose onnxruntime the development extras need: run make PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(FLOOR)/.installed: $(VENV)/.installed Makefile
	rm -rf $(FLOOR)
	$(BIN)/pip install -q --no-deps --target $(FLOOR) $(FLOOR_ONNXRUNTIME)
	touch $@

setup: $(VENV)/.installed $(FLOOR)/.installed

# The demo trains LLaVA the LLaVA-1.5 way (stage 1: projector on captions, 'plain' template;
# stage 2: projector + language model on questions, 'vicuna_v1'; vision tower frozen) on the
# synthetic pictures, from a random ~0.3M-parameter `demo` model. The CLI defaults are
# LLaVA-1.5's; the flags below are what a model that small, trained from scratch in a few CPU
# minutes, needs instead: small batches, a high learning rate, many epochs, no checkpointing.
DEMO_TRAIN := --images $(DEMO)/data/images --force --no-gradient-checkpointing \
	--save-steps 1000000 --logging-steps 25 --lr 1e-3
DEMO_QUESTION := What kind of shape is shown?\nAnswer the question using a single word or phrase.

demo: setup
	$(BIN)/llava-edge data synth $(DEMO)/data --train 1000 --test 200 --force
	$(BIN)/llava-edge init $(DEMO)/init --preset demo --force
	$(BIN)/llava-edge train --stage 1 --model $(DEMO)/init --data $(DEMO)/data/captions.json \
		--out $(DEMO)/stage1 $(DEMO_TRAIN) --batch-size 32
	$(BIN)/llava-edge train --stage 2 --model $(DEMO)/stage1 --data $(DEMO)/data/train.json \
		--out $(DEMO)/stage2 $(DEMO_TRAIN) --batch-size 16 --epochs 16
	$(BIN)/llava-edge export $(DEMO)/stage2 $(DEMO)/model --force
	$(BIN)/llava-edge eval $(DEMO)/model --data $(DEMO)/data/test.json --images $(DEMO)/data/images
	$(BIN)/llava-edge run $(DEMO)/model --image $(DEMO)/data/images/test_00001.png \
		--prompt "$$(printf '$(DEMO_QUESTION)')" --max-new-tokens 8

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
