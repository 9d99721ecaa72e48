# syntax=docker/dockerfile:1
#
# SlateCTR images (docs/deploy.md):
#   docker build --target serve -t slatectr:serve .      scoring service, no torch (default target)
#   docker build --target train -t slatectr:train .      simulate / train / evaluate / export
# Bake a model repository into the serving image instead of mounting one at /models:
#   docker build --target serve --build-arg MODEL_REPO=model_repo -t slatectr:serve-models .
#
# The serving base must match what the onnxruntime-gpu wheel was built against: 1.31 on PyPI is
# built with CUDA 13.0 (capi/build_and_package_info.py: cuda_version = '13.0'; it links
# libcudart.so.13 and libcublas.so.13) and cuDNN 9. CUDA 13 needs an NVIDIA driver >= 580 on the
# host. Change CUDA_IMAGE and ORT_VERSION together (tests/test_deploy.py checks the pair).
# For reproducible builds pin CUDA_IMAGE by digest (nvidia/cuda:...@sha256:...).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG TRAIN_IMAGE=python:3.12-slim-bookworm
ARG ORT_VERSION=1.31.1
ARG APP_UID=10001

# ---------------------------------------------------------------------------------------------
# serve-builder: a virtual environment with the serving dependencies, built on the same base as
# the runtime stage so that the venv's interpreter (/usr/bin/python3.12) exists there too.
# gcc compiles the ONNX Runtime custom-op library (runtime/ortops, the cpu-fused graphs); only
# this stage has a compiler: the serve stage copies the venv, library included.
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS serve-builder
ARG ORT_VERSION
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from the lock (requirements/serve.txt: the base + `serve` and `tracing`, exact
# versions with sha256 hashes, see README "Dependencies"): this layer is reused until the lock
# changes, not on every source edit. No torch: that is the `train` extra. The lock's
# onnxruntime-gpu must be the ORT_VERSION that the CUDA base above was chosen for.
COPY requirements/serve.txt /tmp/requirements.txt
RUN pip install --require-hashes --no-deps -r /tmp/requirements.txt \
    && pip check \
    && python -c "import importlib.metadata as m, sys; v = m.version('onnxruntime-gpu'); sys.exit(0 if v == '${ORT_VERSION}' else f'the lock has onnxruntime-gpu {v}, ORT_VERSION is ${ORT_VERSION}')"
# The project itself (what .dockerignore lets through), without its dependencies again.
COPY . .
RUN pip install --no-deps --no-build-isolation . \
    && python -c "import service.http.api, sys; assert 'torch' not in sys.modules, 'serving imports torch'" \
    && python -c "from runtime.ortops import library_path as p; assert p(), 'custom-op library not built'"

# ---------------------------------------------------------------------------------------------
# serve: the scoring service. Non-root, read-only friendly (writes nothing outside /tmp).
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS serve
ARG APP_UID
# A directory of the build context copied to /models; the default holds no model, so a model
# repository is mounted read-only at /models at run time (compose, k8s volume) unless baked in.
ARG MODEL_REPO=deploy/models-empty
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid ${APP_UID} ctr \
    && useradd --system --uid ${APP_UID} --gid ${APP_UID} --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin ctr
COPY --from=serve-builder /opt/venv /opt/venv
# Owned by root and not writable by the service user: the models are data, never state.
COPY ${MODEL_REPO}/ /models/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CTR_HOST=0.0.0.0 \
    CTR_PORT=8000 \
    CTR_REPO=/models
WORKDIR /tmp
USER ${APP_UID}:${APP_UID}
EXPOSE 8000
# Liveness only (the process answers); readiness is /readyz and is the orchestrator's business.
# No curl in this image: the standard library does the request.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CTR_PORT', '8000'), timeout=2)"]
# Exec form: `ctr` is PID 1 (or the child of compose's `init`), so SIGTERM reaches uvicorn and
# the service drains (service/server.py) instead of being killed after the grace period.
CMD ["ctr", "serve"]

# ---------------------------------------------------------------------------------------------
# train: the offline pipeline: simulate, train, evaluate, and export (which checks ONNX parity
# with ONNX Runtime, hence the `serve` extra too). torch from PyPI brings its own CUDA libraries
# and needs only the host driver. Usage (docs/deploy.md):
#   docker run --rm --gpus all -v "$PWD/work:/work" slatectr:train train --model sarn ...
# ---------------------------------------------------------------------------------------------
FROM ${TRAIN_IMAGE} AS train
ARG APP_UID
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
# gcc: pip install compiles the custom-op library, whose graphs `ctr export` checks and writes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid ${APP_UID} ctr \
    && useradd --system --uid ${APP_UID} --gid ${APP_UID} --create-home --home-dir /home/ctr ctr
WORKDIR /src
# From the lock (requirements/train.txt: the base + the `train` and `serve` extras and torch
# with its CUDA libraries, exact versions with sha256 hashes).
COPY requirements/train.txt /tmp/requirements.txt
RUN pip install --require-hashes --no-deps -r /tmp/requirements.txt && pip check
# The project itself (what .dockerignore lets through), without its dependencies again.
COPY . .
RUN pip install --no-deps --no-build-isolation .
WORKDIR /work
USER ${APP_UID}:${APP_UID}
ENTRYPOINT ["ctr"]
CMD ["--help"]

# The default target (last stage wins otherwise): the serving image.
FROM serve
