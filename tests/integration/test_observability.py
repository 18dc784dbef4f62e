"""/metrics, OpenTelemetry spans (in-memory exporter) and the admin API."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from redis_ws_client.client import GatewayClient
from redis_ws_gateway.config import DurableRule
from tests.conftest import GatewayFactory
from tests.support.gateway import RunningGateway, gateway_settings
from tests.support.redis_server import RedisServer
from tests.support.wait import eventually

KEY = "admin-key-0123"


async def scrape(gw: RunningGateway) -> str:
    async with aiohttp.ClientSession() as http, http.get(gw.http + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


def value(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name + (("{" + labels + "}") if labels else "")) + r" ([0-9.e+-]+)$"
    m = re.search(pattern, text, re.MULTILINE)
    assert m is not None, f"{name}{{{labels}}} not in /metrics"
    return float(m.group(1))


async def test_metrics_follow_traffic_without_channel_or_user_labels(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await make_gateway(api_key=KEY)
    async with GatewayClient(gw.url) as a, GatewayClient(gw.url + f"?token={KEY}") as b:
        await a.subscribe("market:tick:SECRETSYMBOL")
        await b.subscribe("market:tick:SECRETSYMBOL", "engine:*")
        for i in range(5):
            await redis_client.publish("market:tick:SECRETSYMBOL", orjson.dumps({"i": i}))
        for c in (a, b):
            for _ in range(5):
                await c.next_of_type("data")
        await a.send_raw("{garbage")
        await a.next_of_type("error")
        text = await scrape(gw)
    assert value(text, "redis_ws_gateway_connections") == 2
    assert value(text, "redis_ws_gateway_client_subscriptions") == 3
    assert value(text, "redis_ws_gateway_upstream_subscriptions", 'kind="channel"') == 1
    assert value(text, "redis_ws_gateway_upstream_subscriptions", 'kind="pattern"') == 1
    assert value(text, "redis_ws_gateway_upstream_messages_total") >= 5
    assert value(text, "redis_ws_gateway_frames_sent_total") >= 10
    assert value(text, "redis_ws_gateway_bytes_sent_total") > 100
    assert value(text, "redis_ws_gateway_client_errors_total", 'code="bad_json"') == 1
    assert value(text, "redis_ws_gateway_processing_seconds_count") >= 1
    assert value(text, "redis_ws_gateway_upstream_up") == 1
    assert value(text, "redis_ws_gateway_connections_opened_total") == 2
    assert "SECRETSYMBOL" not in text and KEY not in text


async def test_rejections_and_closes_are_counted_by_reason(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(api_key=KEY, allowed_origins=("https://ui.example.com",))
    async with aiohttp.ClientSession() as http:
        for headers, url in (
            ({}, gw.url + "?token=wrong"),
            ({"Origin": "https://evil.example.com"}, gw.url),
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await http.ws_connect(url, headers=headers)
    async with GatewayClient(gw.url):
        pass
    text = await scrape(gw)
    assert value(text, "redis_ws_gateway_connections_rejected_total", 'reason="unauthorized"') == 1
    assert value(text, "redis_ws_gateway_connections_rejected_total", 'reason="origin"') == 1
    assert value(text, "redis_ws_gateway_auth_failures_total", 'reason="invalid_credential"') == 1

    async def closed_counted() -> bool:
        t = await scrape(gw)
        return 'redis_ws_gateway_connections_closed_total{reason="normal"} 1.0' in t

    await eventually(closed_counted, timeout=5, what="the normal close to be counted")


@pytest.fixture
async def traced(
    redis_server: RedisServer,
) -> AsyncIterator[tuple[RunningGateway, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gw = RunningGateway(
        gateway_settings(
            redis_server.url,
            api_key=KEY,
            trace_delivery_sample_rate=1.0,
            durable=(DurableRule("engine:decision:*"),),
        ),
        provider,
    )
    await gw.start()
    await gw.server.upstream.connected.wait()
    yield gw, exporter
    await gw.stop()
    provider.shutdown()


async def test_spans_for_connect_subscribe_publish_upstream_and_linked_delivery(
    traced: tuple[RunningGateway, InMemorySpanExporter], redis_client: aioredis.Redis
) -> None:
    gw, exporter = traced
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    async with GatewayClient(gw.url) as c:
        await c.subscribe("engine:signal:X")
        await redis_client.publish(
            "engine:signal:X", orjson.dumps({"traceparent": traceparent, "side": "BUY"})
        )
        await c.next_of_type("data")
        async with aiohttp.ClientSession() as http:
            async with http.post(
                gw.http + "/publish",
                json={"channel": "engine:signal:X", "data": 1},
                headers={"Authorization": f"Bearer {KEY}"},
            ) as resp:
                assert resp.status == 200
    spans = exporter.get_finished_spans()
    names = {s.name for s in spans}
    assert {
        "upstream.connect",
        "ws.connect",
        "ws.subscribe",
        "HTTP POST /publish",
        "deliver",
    } <= names
    [deliver] = [s for s in spans if s.name == "deliver"]
    assert [format(link.context.trace_id, "032x") for link in deliver.links] == [trace_id]
    assert deliver.attributes is not None
    assert deliver.attributes["messaging.destination.name"] == "engine:signal:X"
    for span in spans:
        assert KEY not in str(span.attributes)


async def test_a_traceparent_header_on_publish_continues_the_callers_trace(
    traced: tuple[RunningGateway, InMemorySpanExporter],
) -> None:
    gw, exporter = traced
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gw.http + "/publish",
            json={"channel": "engine:signal:X", "data": 1},
            headers={"Authorization": f"Bearer {KEY}", "traceparent": f"00-{trace_id}-{parent}-01"},
        ) as resp:
            assert resp.status == 200
    [span] = [s for s in exporter.get_finished_spans() if s.name == "HTTP POST /publish"]
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.parent is not None and format(span.parent.span_id, "016x") == parent


async def test_process_metrics_are_exported(gateway: RunningGateway) -> None:
    text = await scrape(gateway)
    assert value(text, "process_resident_memory_bytes") > 1_000_000
    assert value(text, "process_open_fds") >= 3
    assert value(text, "process_max_fds") >= value(text, "process_open_fds")
    assert value(text, "process_cpu_seconds_total") > 0


async def test_tracing_is_off_without_otel_settings() -> None:
    from redis_ws_gateway.observability.tracing import provider_from_env

    assert provider_from_env({}) is None
    assert (
        provider_from_env({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
        is None
    )
    provider = provider_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert provider is not None
    provider.shutdown()


async def test_admin_api(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(api_key=KEY, max_connections_per_user=10)
    auth = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.http + "/admin/connections") as resp:
            assert resp.status == 401
        async with GatewayClient(gw.url) as anon, GatewayClient(gw.url + f"?token={KEY}") as admin1:
            async with GatewayClient(gw.url + f"?token={KEY}") as admin2:
                await anon.subscribe("market:tick:X", "engine:*")
                async with http.get(gw.http + "/admin/connections", headers=auth) as resp:
                    listed = (await resp.json())["connections"]
                assert len(listed) == 3
                [a] = [x for x in listed if x["user"] == "anonymous"]
                assert a["subscriptions"] == [{"channel": "market:tick:X"}, {"pattern": "engine:*"}]
                assert a["remote"] == "127.0.0.1" and a["bufferedBytes"] == 0
                async with http.delete(
                    gw.http + f"/admin/connections/{a['id']}", headers=auth
                ) as resp:
                    assert resp.status == 200
                await asyncio.wait_for(anon.closed.wait(), 5)
                assert anon.close_code == 4000
                async with http.delete(
                    gw.http + "/admin/users/api-key/connections", headers=auth
                ) as resp:
                    assert len((await resp.json())["closed"]) == 2
                await asyncio.wait_for(admin1.closed.wait(), 5)
                await asyncio.wait_for(admin2.closed.wait(), 5)
        async with http.delete(gw.http + "/admin/connections/nope", headers=auth) as resp:
            assert resp.status == 404
        async with http.get(gw.http + "/admin/stats", headers=auth) as resp:
            stats = await resp.json()
        assert stats["upstream"]["up"] is True and stats["draining"] is False
        assert set(stats) >= {"connections", "clientSubscriptions", "uptimeSeconds", "durable"}


def test_openapi_describes_exactly_the_http_routes(tmp_path: object) -> None:
    from pathlib import Path

    import yaml

    from redis_ws_gateway.config import Settings
    from redis_ws_gateway.server import Server

    spec = yaml.safe_load((Path(__file__).parents[2] / "docs" / "openapi.yaml").read_text())
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}

    async def routes() -> set[tuple[str, str]]:
        app = Server(Settings()).build_app()
        out = set()
        for route in app.router.routes():
            info = route.resource.get_info() if route.resource else {}
            path = info.get("path") or info.get("formatter")
            if route.method in ("GET", "POST", "DELETE") and path not in (
                "/ws",
                "/",
                "/client.js",
                "/console.js",
                "/console.css",
            ):
                out.add((route.method, path))
        return out

    served = asyncio.run(routes())
    assert served == documented
