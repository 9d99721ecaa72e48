"""Service configuration: one pydantic-settings class, every field an env var with prefix CTR_.

Validated at start-up so a bad configuration fails before the service reports ready. List
settings accept either JSON (`'["a","b"]'`) or a comma-separated string (`a,b`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.scoring.cpus import usable_cores

# Hard ceilings that the request schemas enforce statically (and show in OpenAPI); the settings
# below may only lower them, so a configured limit is always enforceable.
HARD_MAX_CANDIDATES = 10_000
HARD_MAX_HISTORY = 1_000
HARD_MAX_EVENTS = 10_000
# X-Request-Timeout-Ms bounds: below 5 ms no request can be scored (one Redis read and one
# ORT call), so such a deadline is a client error (422), not a guaranteed 504.
MIN_REQUEST_TIMEOUT_MS = 5
MAX_REQUEST_TIMEOUT_MS = 600_000


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class Settings(BaseSettings):
    """Every knob of `ctr serve`; see the README's Service section for the table."""

    model_config = SettingsConfigDict(env_prefix="CTR_", extra="ignore")

    # --- models ---
    repo: Path = Path("model_repo")  # model repository directory
    # models to load, `name` (highest version) or `name:version`; empty = all in the repo
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    default_model: str | None = None  # used when a request pins none; unset = first model
    # ONNX Runtime providers in order; empty = CUDA when available, else CPU
    providers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    require_gpu: bool = False  # not ready unless every model runs on CUDA
    # false: a model whose newest version does not load serves its highest version that does
    # (the refused one shows in /v1/models); true: it fails and the replica stays not ready
    strict_versions: bool = False
    # Batches of one model version run at once, on that many threads over its one ORT session
    # (thread-safe); unset: the cores this process may use minus one (one for the event loop).
    infer_workers: Annotated[int | None, Field(ge=1, le=256)] = None
    # ORT intra-op threads per session; unset: the cores left per worker (at least 1)
    intra_op_threads: Annotated[int | None, Field(ge=1)] = None

    # --- routing, shadow, hot reload (docs/service.md "Experiments, shadow and hot reload") ---
    routing_file: Path | None = None  # YAML/JSON experiments file; unset = default model only
    # 0 = off; else every N s: re-read the routing file and load newer versions from the repo
    reload_poll_s: Annotated[float, Field(ge=0)] = 0.0
    shadow_queue_max_requests: Annotated[int, Field(ge=1)] = 64  # per shadow model version
    shadow_timeout_ms: Annotated[float, Field(gt=0)] = 1000.0  # older shadow jobs are dropped
    shadow_stream: bool = False  # also XADD the score pairs to Redis `<prefix>:shadow:pairs`
    shadow_stream_maxlen: Annotated[int, Field(ge=1)] = 100_000  # approximate cap (MAXLEN ~)

    # --- behaviour store ---
    redis_url: str | None = None  # unset = start an embedded redis-server
    redis_cluster: bool = False  # redis_url points at a Redis Cluster node
    redis_key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,16}$")] = "v1"
    redis_read_timeout_ms: Annotated[float, Field(gt=0)] = 30.0  # scoring-path budget
    redis_write_timeout_ms: Annotated[float, Field(gt=0)] = 500.0  # ingest/admin budget
    redis_max_connections: Annotated[int, Field(ge=1)] = 64
    breaker_failures: Annotated[int, Field(ge=1)] = 5  # consecutive failures that open it
    breaker_reset_s: Annotated[float, Field(gt=0)] = 5.0  # how long it stays open
    history_cap: Annotated[int, Field(ge=1, le=HARD_MAX_HISTORY)] = 200  # events kept per user
    history_ttl_s: Annotated[int, Field(ge=1)] = 30 * 86400  # per-user TTL, refreshed on write
    dedup_cap: Annotated[int, Field(ge=1)] = 1000  # recent event ids remembered per user
    event_max_future_s: Annotated[float, Field(ge=0)] = 300.0  # allowed clock skew of ts

    # --- request limits ---
    max_candidates: Annotated[int, Field(ge=1, le=HARD_MAX_CANDIDATES)] = 500
    # inline history items a request may send (what the model reads is its own history_len)
    max_inline_history: Annotated[int, Field(ge=0, le=HARD_MAX_HISTORY)] = 200
    max_events: Annotated[int, Field(ge=1, le=HARD_MAX_EVENTS)] = 1000  # per POST
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1 << 20

    # --- batching, deadlines, overload ---
    batch_max_candidates: Annotated[int, Field(ge=1)] = 4096  # candidate budget of a batch
    queue_max_requests: Annotated[int, Field(ge=1)] = 256  # queued requests before shedding
    # default per-request deadline, from arrival
    request_timeout_ms: Annotated[float, Field(ge=MIN_REQUEST_TIMEOUT_MS)] = 100.0
    max_request_timeout_ms: Annotated[float, Field(gt=0)] = 10_000.0  # X-Request-Timeout-Ms cap
    shed_status: Annotated[Literal[429, 503], BeforeValidator(int)] = 429  # queue-full status
    retry_after_s: Annotated[int, Field(ge=0)] = 1
    # benchmark baseline only (service.scoring.naive): no batching, history repeated per candidate
    naive: bool = False

    # --- security ---
    ingest_api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    # --- tracing (service.tracing) ---
    # OTLP/HTTP collector, e.g. http://otel-collector:4318; unset: OTEL_EXPORTER_OTLP_ENDPOINT,
    # and with neither no tracing at all (nothing of OpenTelemetry is imported)
    otel_endpoint: str | None = None

    # --- process ---
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    log_level: Annotated[
        Literal["critical", "error", "warning", "info", "debug"], BeforeValidator(_lower)
    ] = "info"
    drain_delay_s: Annotated[float, Field(ge=0)] = 0.0  # readiness 503 before the listener closes
    graceful_timeout_s: Annotated[float, Field(gt=0)] = 8.0  # in-flight grace on shutdown

    @field_validator("models", "providers", "ingest_api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _lists_from_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("ingest_api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _some_key_if_set(cls, value: Any, info: ValidationInfo) -> Any:
        # An operator who set the variable meant to close the scope: blank entries alone
        # (" , ") would leave it open without a word. Empty or unset is the documented "open".
        if isinstance(value, str) and value != "" and not _split_csv(value):
            name = f"CTR_{str(info.field_name).upper()}"
            raise ValueError(f"{name} is set but holds no key; unset it for open access")
        return value

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        # Silently ignoring the old name would drop a limit an operator set on purpose.
        if "CTR_MAX_HISTORY" in os.environ:
            raise ValueError("CTR_MAX_HISTORY was renamed CTR_MAX_INLINE_HISTORY")
        return values

    def timeout_s(self, requested_ms: float | None) -> float:
        """A request's time budget: the client's X-Request-Timeout-Ms (capped) or the default."""
        return min(requested_ms or self.request_timeout_ms, self.max_request_timeout_ms) / 1000

    def inference_workers(self, on_device: bool = False) -> int:
        """CTR_INFER_WORKERS, else: on the CPU one per usable core but the event loop's; on a
        device, whose runs serialise on the session's one stream, 2 (one batch is encoded and
        split on the CPU while another runs)."""
        if self.infer_workers:
            return self.infer_workers
        return 2 if on_device else max(1, usable_cores() - 1)

    def session_threads(self) -> int:
        """Intra-op threads per ORT session: what is set, else the cores each worker gets."""
        return self.intra_op_threads or max(1, (usable_cores() - 1) // self.inference_workers())

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.batch_max_candidates < self.max_candidates:
            raise ValueError("batch_max_candidates must be >= max_candidates")
        if self.request_timeout_ms > self.max_request_timeout_ms:
            raise ValueError("request_timeout_ms must be <= max_request_timeout_ms")
        return self


def one_line(error: ValidationError) -> str:
    """A settings error as one log line: each problem as `field: message`, joined by `; `."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "settings"
        message = str(item["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "; ".join(problems)
