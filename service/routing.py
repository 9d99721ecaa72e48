"""Traffic experiments: the routing file, stable user assignment and the experiment router.

The routing file (`CTR_ROUTING_FILE`, YAML or JSON by its suffix) lists experiments; each has
weighted variants, a variant is a model name with an optional pinned version and an optional
shadow. A request that names its `model` bypasses routing (variant `pinned`). Otherwise the
first experiment whose `match` (context fields that must all be equal) fits the request takes
it, and a user lands in a variant by a stable hash of (experiment salt, user id); a request that
no experiment takes goes to the default model (variant `default`).

```yaml
experiments:
  - name: ranker-v2            # logged; [a-z0-9_-]
    salt: ranker-v2-2024-06    # optional (default: the name); a new salt reshuffles the users
    match: {surface: home}     # optional; empty: every request
    variants:
      - {name: control, model: sarn, weight: 90}
      - name: treatment
        model: sarn
        version: 4             # optional; default: the model's current version
        weight: 10
        shadow: {model: fat, fraction: 0.25}   # optional; version optional, fraction default 1
```

Assignment is `blake2b(salt + NUL + user_id)` read as a 64-bit fraction of [0, 1) against the
cumulative weights: identical across processes, restarts and machines (Python's `hash()` is
salted per process by PYTHONHASHSEED and must never decide an arm). The NUL keeps
("ab", "c") and ("a", "bc") apart. A variant of weight 0 gets no users.

Variant names are metric labels: they are unique across the file, at most 16 experiments x 16
variants, and `default` / `pinned` are reserved. Shadows are sampled per request
(`fraction`), not per user: a shadow measures models, it does not change what a user sees.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from service.contracts import (
    DEFAULT_VARIANT,
    PINNED_VARIANT,
    ModelUnavailable,
    Route,
    ScoringRequest,
    ShadowSpec,
)

MAX_EXPERIMENTS = 16
MAX_VARIANTS = 16
_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"
_MODEL = r"^[a-z0-9][a-z0-9_-]{0,63}$"  # runtime.repository.NAME_PATTERN
_SCALE = float(1 << 64)

Name = Annotated[str, StringConstraints(pattern=_NAME)]
ModelName = Annotated[str, StringConstraints(pattern=_MODEL)]
Version = Annotated[int, Field(ge=1, strict=True)]
ContextKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class RoutingError(ValueError):
    """The routing file is missing, unreadable or invalid; `details` locate each problem."""

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []

    def __str__(self) -> str:
        """The message and every location, on one line: a refused start-up's log says why."""
        where = "; ".join(
            f"{'.'.join(map(str, detail['loc'])) or 'file'}: {detail['msg']}"
            for detail in self.details
        )
        return f"{self.message} ({where})" if where else self.message


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShadowConfig(_Strict):
    model: ModelName
    version: Version | None = None
    fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0


class VariantConfig(_Strict):
    name: Name
    model: ModelName
    version: Version | None = None
    weight: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    shadow: ShadowConfig | None = None


class ExperimentConfig(_Strict):
    name: Name
    salt: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    match: dict[ContextKey, str] = Field(default_factory=dict, max_length=16)
    variants: list[VariantConfig] = Field(min_length=1, max_length=MAX_VARIANTS)

    @model_validator(mode="after")
    def _weights(self) -> ExperimentConfig:
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("the variants' weights must not all be 0")
        return self


class RoutingConfig(_Strict):
    experiments: list[ExperimentConfig] = Field(default_factory=list, max_length=MAX_EXPERIMENTS)

    @model_validator(mode="after")
    def _unique_names(self) -> RoutingConfig:
        names = [e.name for e in self.experiments]
        variants = [v.name for e in self.experiments for v in e.variants]
        for kind, values in (("experiment", names), ("variant", variants)):
            if len(set(values)) != len(values):
                raise ValueError(f"{kind} names must be unique across the file")
        reserved = {DEFAULT_VARIANT, PINNED_VARIANT} & set(variants)
        if reserved:
            raise ValueError(f"variant names {sorted(reserved)} are reserved")
        return self

    def model_keys(self) -> set[tuple[str, int | None]]:
        """Every (model, pinned version or None) the file routes or shadows to."""
        keys: set[tuple[str, int | None]] = set()
        for variant in (v for e in self.experiments for v in e.variants):
            keys.add((variant.model, variant.version))
            if variant.shadow is not None:
                keys.add((variant.shadow.model, variant.shadow.version))
        return keys


@dataclass(frozen=True)
class LoadedRouting:
    """A parsed routing file and the fingerprint of its bytes (shown in /v1/models)."""

    config: RoutingConfig
    sha256: str
    file: str | None  # the file's name only: /v1/models shows no server paths


def parse_routing(text: str, suffix: str) -> RoutingConfig:
    """Parses YAML (`.yaml`, `.yml`) or JSON (`.json`) text; `RoutingError` when invalid."""
    try:
        raw = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RoutingError(f"the routing file does not parse: {_parse_problem(exc)}") from None
    if raw is None:
        raw = {}  # an empty file: no experiments
    try:
        return RoutingConfig.model_validate(raw)
    except ValidationError as exc:
        # Where and why only: the offending values stay out of responses and logs.
        details = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        raise RoutingError("the routing file is invalid", details) from None


def _parse_problem(exc: Exception) -> str:
    """One line: PyYAML's own message spans several and names "<unicode string>"."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def read_routing(path: Path | None) -> LoadedRouting:
    """Reads and validates `path`; no path is an empty configuration (default model only)."""
    if path is None:
        return LoadedRouting(RoutingConfig(), hashlib.sha256(b"").hexdigest(), None)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise RoutingError(f"routing file {path.name}: the suffix must be .yaml, .yml or .json")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RoutingError(f"routing file {path.name} cannot be read: {exc.strerror}") from None
    config = parse_routing(data.decode("utf-8", errors="replace"), suffix)
    return LoadedRouting(config, hashlib.sha256(data).hexdigest(), path.name)


def bucket(salt: str, user_id: str) -> float:
    """The user's stable position in [0, 1) for an experiment salted with `salt`."""
    digest = hashlib.blake2b(salt.encode() + b"\x00" + user_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def assign(variants: Sequence[VariantConfig], position: float) -> VariantConfig:
    """The variant whose cumulative-weight interval holds `position` (in [0, 1))."""
    total = sum(v.weight for v in variants)
    target = position * total
    cumulative = 0.0
    for variant in variants:
        cumulative += variant.weight
        if target < cumulative:
            return variant
    # Rounding can leave target == total at the very top: the last variant with weight owns it.
    return next(v for v in reversed(variants) if v.weight > 0)


def _matches(match: Mapping[str, str], context: Mapping[str, str]) -> bool:
    return all(context.get(key) == value for key, value in match.items())


class ExperimentRouter:
    """`Router` over a `RoutingConfig`; a pinned model wins, then the first matching experiment,
    then the default model."""

    def __init__(self, routing: LoadedRouting, default_model: str | None) -> None:
        self.routing = routing
        self.default_model = default_model
        self._shadows = {
            v.name: ShadowSpec(v.shadow.model, v.shadow.version, v.shadow.fraction)
            for e in routing.config.experiments
            for v in e.variants
            if v.shadow is not None
        }

    def route(self, request: ScoringRequest) -> Route:
        if request.model is not None:
            return Route(request.model, PINNED_VARIANT)
        for experiment in self.routing.config.experiments:
            if _matches(experiment.match, request.context):
                position = bucket(experiment.salt or experiment.name, request.user_id)
                variant = assign(experiment.variants, position)
                return Route(
                    variant.model,
                    variant.name,
                    variant.version,
                    experiment.name,
                    self._shadows.get(variant.name),
                )
        if self.default_model is None:
            raise ModelUnavailable("no default model")
        return Route(self.default_model, DEFAULT_VARIANT)

    def shadow_specs(self) -> list[ShadowSpec]:
        return list(self._shadows.values())

    def shadow_pairs(self) -> list[tuple[str, str, str]]:
        """(variant, primary model, shadow model) of every shadowed variant."""
        return [
            (v.name, v.model, v.shadow.model)
            for e in self.routing.config.experiments
            for v in e.variants
            if v.shadow is not None
        ]

    def describe(self) -> dict[str, Any]:
        """What /v1/models shows: the file's name and fingerprint and the experiments (salts
        are left out: with a salt anyone could compute every user's arm)."""
        experiments = [
            {
                "name": e.name,
                "match": dict(e.match),
                "variants": [v.model_dump(exclude_none=True) for v in e.variants],
            }
            for e in self.routing.config.experiments
        ]
        return {
            "file": self.routing.file,
            "sha256": self.routing.sha256,
            "default_model": self.default_model,
            "experiments": experiments,
        }


def check_references(routing: LoadedRouting, available: dict[str, list[int]]) -> None:
    """Every routed or shadowed model (and pinned version) exists in the repository."""
    missing = [
        f"{name}:{version}" if version is not None else name
        for name, version in sorted(routing.config.model_keys(), key=str)
        if name not in available or (version is not None and version not in available[name])
    ]
    if missing:
        details = [{"loc": ["model"], "msg": f"{m} is not in the repository"} for m in missing]
        raise RoutingError("the routing file names models the repository lacks", details)
