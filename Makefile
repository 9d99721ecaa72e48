# Two commands for a fresh machine: `make test` and `make run` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CI stays on the CPU build of torch that this environment ships; on your own machine pick the
# build you want, e.g. `make test TORCH=torch` (pyproject.toml only asks for torch>=2.2).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv lint test run clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[train,serve,dev]"
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

RUN_DIR ?= runs/demo
run: venv
	$(BIN)/ctr simulate --out $(RUN_DIR)/world --users 2000 --items 1000 --seed 0
	$(BIN)/ctr train --model sarn --train $(RUN_DIR)/world/behavior/train.parquet \
		--valid $(RUN_DIR)/world/behavior/test.parquet --out $(RUN_DIR)/sarn --epochs 2
	$(BIN)/ctr evaluate --run $(RUN_DIR)/sarn --data $(RUN_DIR)/world/behavior/test.parquet

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
