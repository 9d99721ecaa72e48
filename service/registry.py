"""Which models the service holds: opened from the repository, warmed up, provider read back.

Several models are loaded at once (`CTR_MODELS`, default every model in the repository at its
highest version). A model that cannot be loaded is recorded as failed, not fatal: the process
stays live and reports not-ready (Triton's rule), and the failure's details go to the log only.
Each model is warmed up with one tiny request and its output checked to be probabilities before
it counts as loaded. The execution provider actually in use is read back from the session,
logged once and exported as `ctr_model_info{provider}`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from exporters.loader import LoadedModel, ScoringRequest, open_model
from exporters.repository import latest_version, list_models, model_dir

log = logging.getLogger(__name__)
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: int | None = None  # None: the highest complete version

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """`sarn` or `sarn:3`."""
        name, _, version = text.partition(":")
        return cls(name.strip(), int(version) if version else None)


@dataclass
class ModelRegistry:
    """Loaded models by name, the failures, and the default model's name."""

    models: dict[str, LoadedModel] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    default: str | None = None

    @classmethod
    def load(
        cls,
        repo: Path,
        specs: Sequence[ModelSpec],
        default: str | None = None,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
    ) -> ModelRegistry:
        """Opens every spec (all models in `repo` when empty). Blocking: run it off the loop.

        Sessions are created one after another: concurrent creation is not thread-safe in ORT.
        """
        if not specs:
            specs = [ModelSpec(name) for name in list_models(repo)]
        registry = cls()
        for spec in specs:
            try:
                registry.models[spec.name] = _open(repo, spec, providers, intra_op_threads)
            except Exception as exc:  # any failure leaves this model out, never the process
                log.error("model %s failed to load: %s", spec.name, exc)
                registry.failures[spec.name] = type(exc).__name__
        registry.default = default or (specs[0].name if specs else None)
        if not specs:
            log.error("no models found in repository %s", repo)
        return registry

    def provider(self, name: str) -> str:
        return self.models[name].providers[0]

    def gpu_missing(self) -> list[str]:
        """Loaded models that do not run on CUDA (matters when the GPU is required)."""
        return [name for name, m in self.models.items() if m.providers[0] != CUDA]


def _open(
    repo: Path, spec: ModelSpec, providers: Sequence[str] | None, threads: int | None
) -> LoadedModel:
    version = spec.version if spec.version is not None else latest_version(repo, spec.name)
    model = open_model(model_dir(repo, spec.name, version), providers or None, threads)
    _warm_up(model)
    log.info(
        "model %s v%d (%s) loaded; execution provider %s",
        model.name, model.version, model.kind, model.providers[0],
    )  # fmt: skip
    return model


def _warm_up(model: LoadedModel) -> None:
    """One tiny request through the whole path; the output must be probabilities."""
    probe = ScoringRequest("warmup", [("warmup", "warmup")], [("warmup", "warmup")] * 2)
    (scores,) = model.score([probe])
    # NaN fails the range check too.
    if scores.shape != (2,) or not all(0.0 <= float(s) <= 1.0 for s in scores):
        raise ValueError(f"warm-up produced {scores!r}, not two probabilities")
