"""OpenTelemetry tracing, configured by the standard OTEL_* variables.

Off unless an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) or OTEL_TRACES_EXPORTER names an
exporter; then spans go out through a batch processor, off the hot path.
A value the gateway cannot honour (an unknown exporter, a protocol whose
exporter is not installed) stops the start with a ConfigError: silently
sending nothing, or sending HTTP to a gRPC collector, looks like working.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from redis_ws_gateway.config import ConfigError

_PROPAGATOR = TraceContextTextMapPropagator()


EXPORTERS = ("otlp", "console", "none")
# OTLP protocol -> module of its span exporter; http/json has no Python exporter.
_PROTOCOL_MODULES = {
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
}


def check_env(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The exporter and OTLP protocol the OTEL_* variables ask for, or
    ConfigError for a value this gateway cannot honour."""
    env = os.environ if env is None else env
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    if exporter not in EXPORTERS:
        raise ConfigError(
            "OTEL_TRACES_EXPORTER", exporter, f"expected one of {', '.join(EXPORTERS)}"
        )
    name = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    raw = env.get(name)
    if not raw:
        name = "OTEL_EXPORTER_OTLP_PROTOCOL"
        raw = env.get(name)
    protocol = (raw or "http/protobuf").strip().lower()
    if exporter == "otlp":
        module = _PROTOCOL_MODULES.get(protocol)
        if protocol == "http/json":
            raise ConfigError(
                name, protocol, "the Python OTLP exporter has no http/json; use http/protobuf"
            )
        if module is None:
            raise ConfigError(name, protocol, "expected http/protobuf or grpc")
        if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None:
            raise ConfigError(
                name,
                protocol,
                "needs the opentelemetry-exporter-otlp-proto-grpc package "
                "(pip install 'redis-ws-gateway[otlp-grpc]'); or use http/protobuf",
            )
    return exporter, protocol


def provider_from_env(env: Mapping[str, str] | None = None) -> TracerProvider | None:
    env = os.environ if env is None else env
    exporter_name, protocol = check_env(env)
    explicit = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if exporter_name == "none" or (not endpoint and explicit not in ("otlp", "console")):
        return None
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        # Both read the OTEL_EXPORTER_OTLP_* variables (endpoint, headers,
        # timeout) themselves.
        module = importlib.import_module(_PROTOCOL_MODULES[protocol])
        exporter = module.OTLPSpanExporter()
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "redis-ws-gateway")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def tracer_for(provider: TracerProvider | None) -> Tracer:
    if provider is None:
        return trace.NoOpTracer()
    return provider.get_tracer("redis_ws_gateway")


class AttributeSpan(Protocol):
    def set_attribute(self, key: str, value: Any) -> None: ...


class _NoSpan:
    """What span() gives with tracing off: even OpenTelemetry's no-op
    tracer copies the context twice per span, an eighth of a WebSocket
    connection's CPU (docs/ARCHITECTURE.md, "What a connection costs")."""

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        return None


_NO_SPAN = _NoSpan()


def span(tracer: Tracer, tracing: bool, name: str) -> AbstractContextManager[AttributeSpan]:
    """A span named ``name`` made current, or nothing at all when tracing
    is off."""
    if not tracing:
        return _NO_SPAN
    return tracer.start_as_current_span(name)


def context_from_headers(headers: Mapping[str, str]) -> Context | None:
    """The caller's trace context from a W3C ``traceparent`` header, if any."""
    value = headers.get("traceparent")
    if not value or len(value) > 128:
        return None
    ctx = _PROPAGATOR.extract({"traceparent": value})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def link_from_traceparent(value: object) -> Link | None:
    """A span link to the publisher's span, from a W3C traceparent string."""
    if not isinstance(value, str) or len(value) > 128:
        return None
    ctx = _PROPAGATOR.extract({"traceparent": value})
    span_context = trace.get_current_span(ctx).get_span_context()
    if not span_context.is_valid:
        return None
    return Link(span_context)
