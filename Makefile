# Two commands for a fresh machine: `make test` and `make run` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every install comes from the lock in requirements/ (exact versions with sha256 hashes; see
# README "Dependencies"): dev.txt for this venv, serve.txt and train.txt for the Dockerfile.
LOCK := requirements/dev.txt
# torch is the one package outside the lock: CI stays on the CPU build of torch that this
# environment ships; on your own machine pick the build you want, e.g. `make test TORCH=torch`
# (pyproject.toml only asks for torch>=2.2). Its own dependencies are pinned in the lock.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv lint test run clean lock upgrade

# --clear: the venv holds exactly the lock, also when the lock changed under an old venv.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP) $(ORTOPS)

# The editable install also compiles the custom-op library (runtime/ortops, setup.py); this
# rebuilds it alone when its C sources change, without recreating the venv.
ORTOPS := $(VENV)/.ortops
$(ORTOPS): $(STAMP) setup.py $(wildcard runtime/ortops/src/*)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(ORTOPS)

venv: $(STAMP) $(ORTOPS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
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
		--epochs 2 --history-len 10 --batch-size 256
	$(BIN)/ctr evaluate --run $(RUN_DIR)/sarn --data $(RUN_DIR)/world/behavior/test.parquet
	$(BIN)/ctr export --run $(RUN_DIR)/sarn --repo $(MODEL_REPO) --name sarn

# Serves the repository on an embedded redis-server (no CTR_REDIS_URL); see README "Service".
run: venv $(MODEL_REPO)/sarn
	CTR_REPO=$(MODEL_REPO) $(BIN)/ctr serve

# Re-resolve the lock after changing dependencies in pyproject.toml: keeps every pin that still
# fits. `make upgrade` moves every package to its newest allowed release. Both rewrite
# requirements/*.txt; commit them with the change and run `make test`.
UV_COMPILE = $(BIN)/uv pip compile --quiet --universal --python-version 3.10 --generate-hashes \
	--index-url https://pypi.org/simple --custom-compile-command "make lock" $(UV_FLAGS)

lock: venv
	$(UV_COMPILE) pyproject.toml --extra train --extra serve --extra dev --extra loadtest \
		requirements/torch-deps.in requirements/tools.in --override requirements/no-torch.txt \
		--no-emit-package torch -o requirements/dev.txt
	$(UV_COMPILE) pyproject.toml --extra serve -c requirements/dev.txt -o requirements/serve.txt
	$(UV_COMPILE) pyproject.toml --extra train --extra serve requirements/torch.in \
		-c requirements/dev.txt -o requirements/train.txt

upgrade: UV_FLAGS = --upgrade
upgrade: lock

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
	@echo "kept $(MODEL_REPO)/ (exported models); remove it by hand to rebuild the demo model"
