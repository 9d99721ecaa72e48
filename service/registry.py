"""Which models the service holds: opened from the repository, warmed up, provider read back.

Several models are loaded at once (`CTR_MODELS`, default every model in the repository at its
highest version that loads: a newer version that does not is refused, recorded in
`/v1/models` and `ctr_model_version_refused`, and the next one down serves; `CTR_STRICT_VERSIONS`
tries the highest only). A model that cannot be loaded at all is recorded as failed, not fatal:
the process stays live and reports not-ready (Triton's rule), and the failure's details go to
the log only.
Each model is warmed up with golden inputs (`warmup_requests`) and every output (pCTR, and a
multi-task model's pCVR and pCTCVR) checked to be finite probabilities of the right shape
before it counts as loaded; a hot reload (`service.reload`) goes through the same two steps.
The execution provider actually in use is read back from the session, logged once and exported
as `ctr_model_info{provider}`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.loader import CUDA, LoadedModel, ModelIntegrityError, ScoringRequest, open_model
from runtime.repository import latest_version, list_models, model_dir

log = logging.getLogger(__name__)


class WarmupError(ValueError):
    """A model version that loaded but did not answer the golden inputs with probabilities."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: int | None = None  # None: the highest complete version

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """`sarn` or `sarn:3`."""
        name, _, version = text.partition(":")
        return cls(name.strip(), int(version) if version else None)


@dataclass(frozen=True)
class RefusedVersion:
    """A version that did not serve: where it failed and the error's type (details: the log)."""

    version: int
    stage: str  # "load" (files, manifest, ONNX Runtime) or "warmup" (the golden inputs)
    error: str


class VersionsRefused(Exception):
    """Every version tried failed; `refused` says how, newest first."""

    def __init__(self, name: str, refused: list[RefusedVersion]) -> None:
        super().__init__(f"no version of {name} serves: {refused}")
        self.refused = refused


@dataclass
class ModelRegistry:
    """Loaded models by name, the failures, the versions refused at start-up (newest first) and
    the default model's name."""

    models: dict[str, LoadedModel] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    refused: dict[str, list[RefusedVersion]] = field(default_factory=dict)
    calibrations: dict[tuple[str, int], Calibration] = field(default_factory=dict)
    default: str | None = None

    @classmethod
    def load(
        cls,
        repo: Path,
        specs: Sequence[ModelSpec],
        default: str | None = None,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        strict_versions: bool = False,
    ) -> ModelRegistry:
        """Opens every spec (all models in `repo` when empty). Blocking: run it off the loop.

        A spec without a version serves its highest version that loads and warms up: a corrupt
        newest version must not keep a freshly started replica unready while the replicas that
        started earlier serve the version before it. Each refused version is recorded. With
        `strict_versions` only the highest version is tried (a failure leaves the model out).
        Sessions are created one after another: concurrent creation is not thread-safe in ORT.
        """
        if not specs:
            specs = [ModelSpec(name) for name in list_models(repo)]
        registry = cls()
        for spec in specs:
            versions = _candidates(repo, spec, strict_versions)
            try:
                model, refused, calibration = _first_that_serves(
                    repo, spec.name, versions, providers, intra_op_threads
                )
            except VersionsRefused as exc:
                registry.failures[spec.name] = exc.refused[0].error
                refused = exc.refused
            except Exception as exc:  # any failure leaves this model out, never the process
                log.error("model %s failed to load: %s", spec.name, exc)
                registry.failures[spec.name] = type(exc).__name__
                continue
            else:
                registry.models[spec.name] = model
                registry.calibrations[(model.name, model.version)] = calibration
            if refused:
                registry.refused[spec.name] = refused
        registry.default = default or (specs[0].name if specs else None)
        if not specs:
            log.error("no models found in repository %s", repo)
        return registry

    def provider(self, name: str) -> str:
        return self.models[name].providers[0]

    def gpu_missing(self) -> list[str]:
        """Loaded models that do not run on CUDA (matters when the GPU is required)."""
        return [name for name, m in self.models.items() if m.providers[0] != CUDA]


def _candidates(repo: Path, spec: ModelSpec, strict: bool) -> list[int]:
    """Versions to try, best first: the pinned one; else the highest, then (unless strict)
    every lower one."""
    if spec.version is not None:
        return [spec.version]
    versions = sorted(list_models(repo).get(spec.name, []), reverse=True)
    if not versions:
        raise LookupError(f"no complete version of {spec.name} in {repo}")
    return versions[:1] if strict else versions


def _first_that_serves(
    repo: Path,
    name: str,
    versions: Sequence[int],
    providers: Sequence[str] | None,
    threads: int | None,
) -> tuple[LoadedModel, list[RefusedVersion], Calibration]:
    """The first of `versions` that loads and warms up, the ones refused before it, and its
    measured cost."""
    refused: list[RefusedVersion] = []
    for version in versions:
        stage = "load"
        try:
            model = load_version(repo, ModelSpec(name, version), providers, threads)
            stage = "warmup"
            calibration = make_ready(model)
        except Exception as exc:
            log.error("model %s v%d refused at %s: %s", name, version, stage, exc)
            refused.append(RefusedVersion(version, stage, type(exc).__name__))
            continue
        _log_loaded(model, refused)
        return model, refused, calibration
    raise VersionsRefused(name, refused)


def _log_loaded(model: LoadedModel, refused: list[RefusedVersion]) -> None:
    log.info(
        "model %s v%d (%s) loaded; execution provider %s",
        model.name,
        model.version,
        model.kind,
        model.providers[0],
    )
    if refused:
        newer = ", ".join(f"v{r.version}" for r in refused)
        log.warning("model %s serves v%d: newer %s refused", model.name, model.version, newer)


def load_version(
    repo: Path, spec: ModelSpec, providers: Sequence[str] | None, threads: int | None
) -> LoadedModel:
    """The ORT session of `spec` (its highest complete version when none is pinned); only
    names and versions inside `repo` (`model_dir` refuses anything that would leave it)."""
    version = spec.version if spec.version is not None else latest_version(repo, spec.name)
    model = open_model(model_dir(repo, spec.name, version), providers or None, threads)
    if (model.name, model.version) != (spec.name, version):
        raise ModelIntegrityError(
            f"{spec.name}/{version} holds a manifest for {model.name} v{model.version}"
        )
    return model


def warmup_requests(model: LoadedModel) -> list[ScoringRequest]:
    """Golden inputs: a new user with one candidate, a full history of known ids with a slate
    of known candidates, and ids the model has never seen (the OOV path)."""
    items = model.vocabs["item"].tokens[:8] if "item" in model.vocabs else []
    categories = model.vocabs["category"].tokens[:8] if "category" in model.vocabs else []
    unknown = ("warmup-unknown", "warmup-unknown")
    known = [
        (item, categories[k % len(categories)] if categories else unknown[1])
        for k, item in enumerate(items)
    ] or [unknown]
    history = (known * model.history_len)[: model.history_len]
    return [
        ScoringRequest("warmup-1", [], [known[0]]),
        ScoringRequest("warmup-2", history, known),
        ScoringRequest("warmup-3", [unknown] * 3, [unknown] * 2),
    ]


def warm_up(model: LoadedModel) -> None:
    """Runs the golden inputs as one batch; every output must be K finite probabilities (a
    [K, O] block, one column per output name)."""
    requests = warmup_requests(model)
    width = len(model.output_names)
    for request, scores in zip(requests, model.score(requests), strict=True):
        k = len(request.candidates)
        if scores.shape != (k, width):
            raise WarmupError(f"warm-up produced shape {scores.shape}, not {(k, width)}")
        for j, name in enumerate(model.output_names):
            column = scores[:, j]
            finite = bool(np.all(np.isfinite(column)))
            if not finite or not np.all((column >= 0) & (column <= 1)):
                raise WarmupError(f"warm-up produced {name} {column!r}, not {k} probabilities")


@dataclass(frozen=True)
class Calibration:
    """What one batch of `c` candidates costs this model version here: `a + b·c` seconds."""

    a: float  # fixed per batch (encode set-up, the ORT call, split)
    b: float  # per candidate


def make_ready(model: LoadedModel) -> Calibration:
    """The golden inputs checked (`warm_up`), then the cost measured (`calibrate`): what every
    version goes through before it serves, at start-up and on a reload."""
    warm_up(model)
    return calibrate(model)


def calibrate(model: LoadedModel, repeats: int = 5, large: int = 256) -> Calibration:
    """Times one request (full history, known ids) of 1 and of `large` candidates; the fastest
    of `repeats` runs each, so a busy host at start-up inflates it as little as possible (the
    batcher refines `b` from the batches it runs, never below this). Blocking: off the loop."""
    _, full, _ = warmup_requests(model)
    one = ScoringRequest("calibrate", full.history, full.candidates[:1])
    many = ScoringRequest("calibrate", full.history, (list(full.candidates) * large)[:large])
    t_one, t_many = (_fastest(model, request, repeats) for request in (one, many))
    b = max(t_many - t_one, 0.0) / (large - 1)
    return Calibration(a=max(t_one - b, 0.0), b=b)


def _fastest(model: LoadedModel, request: ScoringRequest, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.score([request])
        times.append(time.perf_counter() - start)
    return min(times)
