"""OpenTelemetry traces of the service, only when an endpoint is configured.

With `CTR_OTEL_ENDPOINT` (or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`) set, the FastAPI app
is instrumented: a caller's W3C `traceparent` continues into the request's server span, and
spans go in batches to that OTLP/HTTP endpoint (`service.name` from `OTEL_SERVICE_NAME`, else
`slatectr`). A scoring request gets child spans for its stages, built from the timing its
batch carries back (`service.scoring.batch.BatchTiming`): `queue` (admission to its batch's
start), `history` (the batch's Redis read), `inference` (encode, ONNX Runtime and split of the
batch, with its size), and `shadow copy` when a shadow scorer is handed a copy. The trace id
goes into the JSON log lines, the access line included.

Unset, this module imports nothing of OpenTelemetry and instruments nothing: the `tracing`
extra may be absent and scoring pays nothing for it (`setup_tracing` returns None and the
engine skips every call).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from service.logs import set_trace_id_source
from service.scoring.batch import BatchTiming

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider

    from service.settings import Settings

log = logging.getLogger(__name__)
SERVICE_NAME = "slatectr"


def otel_endpoint(settings: Settings) -> str | None:
    return settings.otel_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


class StageTracer:
    """Child spans of the current request span, from stage windows measured elsewhere (the
    batch ran in another task and thread, so its spans are written afterwards, with their
    measured start and end)."""

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer("service")
        # monotonic -> the epoch nanoseconds spans carry; fixed once (drift is irrelevant here)
        self._offset_ns = time.time_ns() - time.monotonic_ns()

    def record_batch(self, timing: BatchTiming, submitted: float, model: str, version: int) -> None:
        first = timing.read.start if timing.read is not None else timing.encode.start
        self._span("queue", submitted, first, {})
        if timing.read is not None:
            self._span("history", timing.read.start, timing.read.end, {})
        attributes = {
            "ctr.model": model,
            "ctr.model_version": version,
            "ctr.batch.requests": timing.requests,
            "ctr.batch.candidates": timing.candidates,
        }
        self._span("inference", timing.encode.start, timing.infer.end, attributes)

    def shadow_copy(self, shadow: str, start: float) -> None:
        self._span("shadow copy", start, time.monotonic(), {"ctr.shadow": shadow})

    def _span(self, name: str, start: float, end: float, attributes: dict[str, Any]) -> None:
        span = self._tracer.start_span(
            name, start_time=self._ns(start), attributes=attributes
        )  # a child of the current (request) span
        span.end(end_time=self._ns(end))

    def _ns(self, monotonic_s: float) -> int:
        return self._offset_ns + int(monotonic_s * 1e9)


def setup_tracing(
    app: FastAPI, settings: Settings, provider: TracerProvider | None = None
) -> StageTracer | None:
    """Instruments `app` when an endpoint is configured (or a provider is given: tests pass
    one with an in-memory exporter). -> the engine's stage tracer, or None (no tracing)."""
    endpoint = otel_endpoint(settings)
    if provider is None and endpoint is None:
        return None
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    if provider is None:
        provider = _otlp_provider(str(endpoint))
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=provider, excluded_urls="healthz,readyz,metrics"
    )
    set_trace_id_source(_current_trace_id)
    log.info("tracing to %s", endpoint or "the given provider")
    return StageTracer(provider)


def _otlp_provider(endpoint: str) -> TracerProvider:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME)
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    # The standard variable names the collector; the exporter appends /v1/traces to it.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=_traces(endpoint))))
    return provider


def _traces(endpoint: str) -> str:
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1/traces") else f"{base}/v1/traces"


def _current_trace_id() -> str | None:
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
