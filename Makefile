# Two commands for a fresh machine: `make test` and `make run` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every install comes from the lock in requirements/ (exact versions with sha256 hashes; see
# README "Dependencies"): dev.txt for this venv, serve.txt and train.txt for the Dockerfile,
# gpu-check.txt for the offline bundle of `ctr bench gpu --bundle` (docs/gpu.md).
LOCK := requirements/dev.txt
# torch is the one package outside the lock: CI stays on the CPU build of torch that this
# environment ships; on your own machine pick the build you want, e.g. `make test TORCH=torch`
# (pyproject.toml only asks for torch>=2.2). Its own dependencies are pinned in the lock.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv venv-peers tools lint test run clean lock upgrade k8s-rules

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

# The DeepCTR-Torch peer's own venv (models/bench/peer_deepctr.py, docs/models.md): run by path,
# never imported by the project, so its pins cannot clash with the lock.
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP): requirements/peers-deepctr.txt
	$(PYTHON) -m venv --clear $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(PEERS_VENV)/bin/python -m pip install -q --require-hashes -r requirements/peers-deepctr.txt
	$(PEERS_VENV)/bin/python -m pip check
	touch $(PEERS_STAMP)

venv-peers: $(PEERS_STAMP)

# promtool checks and unit-tests the Prometheus rules (tests/test_alerts.py). It comes from
# Debian's `prometheus` package, unpacked here without installing it: `apt-get download` needs
# no root, only apt's package lists; a fresh machine without them gets `apt-get update` first
# when run as root. Nothing is fetched once .tools/promtool exists (delete it to refresh).
TOOLS := .tools
PROMTOOL := $(TOOLS)/promtool
APT_GET ?= apt-get

$(PROMTOOL):
	rm -rf $(TOOLS)/deb && mkdir -p $(TOOLS)/deb
	cd $(TOOLS)/deb && { $(APT_GET) download prometheus 2>/dev/null || \
		{ [ "$$(id -u)" = 0 ] && $(APT_GET) update -qq && $(APT_GET) download prometheus; } || \
		{ echo "no promtool: Debian's prometheus package could not be fetched (not root and" \
			"no apt lists?); put a promtool binary at $(PROMTOOL)" >&2; exit 1; }; }
	dpkg-deb --fsys-tarfile $(TOOLS)/deb/prometheus_*.deb | tar -xO ./usr/bin/promtool > $@.part
	chmod +x $@.part && mv $@.part $@ && rm -rf $(TOOLS)/deb
	$@ --version | head -1

tools: $(PROMTOOL)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint tools
	PROMTOOL=$(PROMTOOL) $(BIN)/pytest -q

# deploy/k8s/prometheusrule.yaml carries deploy/prometheus/rules and deploy/prometheus/kubernetes
# for the Prometheus Operator; regenerate it after editing them (tests/test_alerts.py checks).
k8s-rules: venv
	$(BIN)/python tests/deploy_support.py > deploy/k8s/prometheusrule.yaml

RUN_DIR ?= runs/demo
MODEL_REPO ?= model_repo

# A small model, only when the repository has none: a small world and one SARN epoch (a second
# scored lower on validation); see `ctr train --help` for full-size settings. One torch thread:
# with two, on a box where another process held a core, an epoch took 160 s instead of ~8 s
# (OpenMP threads waiting for each other). simulate prints the oracle (true-probability) AUC,
# train one line per epoch, evaluate one JSON line of test metrics; export checks
# ONNX-vs-PyTorch parity before the version appears.
$(MODEL_REPO)/sarn: | venv
	$(BIN)/ctr simulate --out $(RUN_DIR)/world --users 300 --items 200 --seed 0
	OMP_NUM_THREADS=1 $(BIN)/ctr train --model sarn --train $(RUN_DIR)/world/behavior/train.parquet \
		--valid $(RUN_DIR)/world/behavior/test.parquet --out $(RUN_DIR)/sarn \
		--epochs 1 --history-len 10 --batch-size 256
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

LOCKS := requirements/dev.txt requirements/serve.txt requirements/train.txt \
	requirements/gpu-check.txt requirements/peers-deepctr.txt
# The peer venv's pins (pandas 3, numpy 2.4) need Python 3.11, the project's lock 3.10.
UV_COMPILE_PEERS = $(subst --python-version 3.10,--python-version 3.11,$(UV_COMPILE))

# A lock that comes out the same keeps its timestamp, so the venv is not rebuilt for nothing.
lock: venv
	rm -rf .lock-before && mkdir .lock-before && cp -p $(LOCKS) .lock-before/
	$(UV_COMPILE) pyproject.toml --extra train --extra serve --extra tracing --extra dev \
		--extra loadtest \
		requirements/torch-deps.in requirements/tools.in --override requirements/no-torch.txt \
		--no-emit-package torch -o requirements/dev.txt
	$(UV_COMPILE) pyproject.toml --extra serve --extra tracing -c requirements/dev.txt \
		-o requirements/serve.txt
	$(UV_COMPILE) pyproject.toml --extra train --extra serve requirements/torch.in \
		-c requirements/dev.txt -o requirements/train.txt
	$(UV_COMPILE) pyproject.toml --extra serve --extra loadtest -c requirements/dev.txt \
		-o requirements/gpu-check.txt
	$(UV_COMPILE_PEERS) requirements/peers-deepctr.in --override requirements/no-torch.txt \
		--no-emit-package torch -o requirements/peers-deepctr.txt
	for f in $(LOCKS); do \
		cmp -s .lock-before/$$(basename $$f) $$f && touch -r .lock-before/$$(basename $$f) $$f; \
	done; rm -rf .lock-before

upgrade: UV_FLAGS = --upgrade
upgrade: lock

clean:
	rm -rf $(VENV) $(TOOLS) runs .pytest_cache .mypy_cache .ruff_cache
	@echo "kept $(MODEL_REPO)/ (exported models); remove it by hand to rebuild the demo model"
