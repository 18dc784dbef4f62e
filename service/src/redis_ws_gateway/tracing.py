"""OpenTelemetry tracing, configured by the standard OTEL_* variables.

Off unless an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) or OTEL_TRACES_EXPORTER names an
exporter; then spans go out through a batch processor, off the hot path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def provider_from_env(env: Mapping[str, str] | None = None) -> TracerProvider | None:
    env = os.environ if env is None else env
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if exporter_name == "none" or (not endpoint and exporter_name not in ("otlp", "console")):
        return None
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # reads the OTEL_EXPORTER_OTLP_* variables itself
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "redis-ws-gateway")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def tracer_for(provider: TracerProvider | None) -> Tracer:
    if provider is None:
        return trace.NoOpTracer()
    return provider.get_tracer("redis_ws_gateway")


def link_from_traceparent(value: object) -> Link | None:
    """A span link to the publisher's span, from a W3C traceparent string."""
    if not isinstance(value, str) or len(value) > 128:
        return None
    ctx = _PROPAGATOR.extract({"traceparent": value})
    span_context = trace.get_current_span(ctx).get_span_context()
    if not span_context.is_valid:
        return None
    return Link(span_context)
