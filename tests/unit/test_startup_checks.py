"""Start-time checks a new user meets first: settings that cannot work are
refused with one line, settings that do nothing are warned about, and the
OTEL_* variables are honoured or refused (issue 20)."""

from __future__ import annotations

import pytest
from opentelemetry import trace

from redis_ws_gateway.config import (
    ENV_SETTINGS,
    ConfigError,
    load_settings,
    settings_help,
    unknown_setting_warnings,
)
from redis_ws_gateway.observability.tracing import (
    check_env,
    context_from_headers,
    provider_from_env,
)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:99999", "redis://127.0.0.1:0", "redis://h:x"])
def test_a_redis_url_with_an_impossible_port_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"REDIS_URL": url})
    assert "REDIS_URL" in str(err.value) and "port" in str(err.value)


def test_typos_and_unknown_names_in_the_namespace_are_warned() -> None:
    warnings = unknown_setting_warnings(
        {
            "REDIS_URI": "redis://x:1",
            "MAX_CONECTIONS": "10",
            "REDIS_WS_GATEWAY_PROT": "1",
            "REDIS_WS_GATEWAY_SOMETHING": "1",
            "REDIS_URL": "redis://x:1",
            "PATH": "/usr/bin",
            "HOME": "/root",
            "OTEL_SERVICE_NAME": "x",
        }
    )
    text = "\n".join(warnings)
    assert "REDIS_URI" in text and "did you mean REDIS_URL" in text
    assert "MAX_CONECTIONS" in text and "did you mean MAX_CONNECTIONS" in text
    assert "did you mean REDIS_WS_GATEWAY_PORT" in text
    assert "REDIS_WS_GATEWAY_SOMETHING is not a setting" in text
    assert len(warnings) == 4, warnings


def test_an_ordinary_environment_gives_no_warnings() -> None:
    env = {name: "1" for name in ENV_SETTINGS} | {"PATH": "/bin", "LANG": "C.UTF-8", "TERM": "x"}
    # Kubernetes service links for a Service named redis.
    env |= {"REDIS_PORT": "tcp://10.0.0.7:6379", "REDIS_PORT_6379_TCP": "tcp://10.0.0.7:6379"}
    assert unknown_setting_warnings(env) == []


def test_settings_help_lists_every_setting_with_its_default() -> None:
    text = settings_help()
    for name in ENV_SETTINGS:
        assert f"  {name}=" in text
    assert "REDIS_URL=redis://127.0.0.1:6379" in text and "REQUIRE_AUTH=false" in text


def test_the_internal_port_must_differ_from_the_public_one() -> None:
    with pytest.raises(ConfigError):
        load_settings({"REDIS_WS_GATEWAY_PORT": "9000", "REDIS_WS_GATEWAY_INTERNAL_PORT": "9000"})
    assert load_settings({"REDIS_WS_GATEWAY_INTERNAL_PORT": "9090"}).internal_port == 9090


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"OTEL_TRACES_EXPORTER": "bogus"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "x",
            },
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
    ],
)
def test_otel_values_the_gateway_cannot_honour_are_refused(
    env: dict[str, str], setting: str
) -> None:
    with pytest.raises(ConfigError) as err:
        check_env(env)
    assert setting in str(err.value)
    with pytest.raises(ConfigError):
        provider_from_env({**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})


def test_grpc_is_honoured_or_refused_never_sent_as_http() -> None:
    import importlib.util

    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is None:
        with pytest.raises(ConfigError) as err:
            provider_from_env(env)
        assert "grpc" in str(err.value)
    else:
        provider = provider_from_env(env)
        assert provider is not None
        provider.shutdown()


def test_http_protobuf_is_the_default_and_works() -> None:
    assert check_env({}) == ("otlp", "http/protobuf")
    assert provider_from_env({}) is None
    provider = provider_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
    assert provider is not None
    provider.shutdown()


def test_a_traceparent_header_gives_the_callers_context() -> None:
    header = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ctx = context_from_headers({"traceparent": header})
    assert ctx is not None
    span_ctx = trace.get_current_span(ctx).get_span_context()
    assert format(span_ctx.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert context_from_headers({"traceparent": "garbage"}) is None
    assert context_from_headers({}) is None
