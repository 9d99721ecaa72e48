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
MODEL_REPO ?= model_repo

# A small model, only when the repository has none: a small world and a short SARN run (about
# a minute on 2 CPU cores; see `ctr train --help` for full-size settings). simulate prints the
# oracle (true-probability) AUC, train one line per epoch, evaluate one JSON line of test
# metrics; export checks ONNX-vs-PyTorch parity before the version appears.
$(MODEL_REPO)/sarn: | venv
	$(BIN)/ctr simulate --out $(RUN_DIR)/world --users 300 --items 200 --seed 0
	$(BIN)/ctr train --model sarn --train $(RUN_DIR)/world/behavior/train.parquet \
		--valid $(RUN_DIR)/world/behavior/test.parquet --out $(RUN_DIR)/sarn \
		--epochs 2 --max-len 10 --batch-size 256
	$(BIN)/ctr evaluate --run $(RUN_DIR)/sarn --data $(RUN_DIR)/world/behavior/test.parquet
	$(BIN)/ctr export --run $(RUN_DIR)/sarn --repo $(MODEL_REPO) --name sarn

# Serves the repository on an embedded redis-server (no CTR_REDIS_URL); see README "Service".
run: venv $(MODEL_REPO)/sarn
	CTR_REPO=$(MODEL_REPO) $(BIN)/ctr serve

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
	@echo "kept $(MODEL_REPO)/ (exported models); remove it by hand to rebuild the demo model"
