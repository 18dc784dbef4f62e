"""The npm client (as /client.js) in Chromium behind a proxy that refuses
WebSocket upgrades, as some corporate proxies do: it falls back to
Server-Sent Events on its own, says so, and receives data."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from playwright.async_api import Page

from tests.browser.test_console import _load_client
from tests.support.gateway import RunningGateway
from tests.support.redis_server import free_port

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "content-length"}


@pytest.fixture
async def no_upgrades_proxy(gateway: RunningGateway) -> AsyncIterator[str]:
    """A reverse proxy to the gateway that answers 403 to every Upgrade
    request and passes the rest through, streaming responses unbuffered."""
    http = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.StreamResponse:
        if "upgrade" in request.headers.get("Connection", "").lower():
            return web.Response(status=403, text="WebSocket upgrades are not allowed here\n")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers.pop("Host", None)
        async with http.request(
            request.method, gateway.http + request.path_qs, headers=headers
        ) as upstream:
            resp = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP},
            )
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await http.close()
    await runner.cleanup()


@pytest.mark.browser
async def test_the_client_falls_back_to_sse_when_upgrades_are_refused(
    no_upgrades_proxy: str, gateway: RunningGateway, redis_client: aioredis.Redis, page: Page
) -> None:
    warnings: list[str] = []
    page.on("console", lambda msg: warnings.append(msg.text) if msg.type == "warning" else None)
    await _load_client(page, no_upgrades_proxy)
    ws_url = no_upgrades_proxy.replace("http://", "ws://") + "/ws"
    await page.evaluate(
        """async (url) => {
            window.got = [];
            window.fallbacks = [];
            window.states = [];
            const c = new window.gw.GatewayClient(url, {
                reconnect: { minDelayMs: 10, maxDelayMs: 50 },
                onFallback: (e) => window.fallbacks.push(e),
            });
            c.on("state", (state, info) => window.states.push([state, info.transport ?? null]));
            window.client = c;
            const keep = (data, msg) => window.got.push([msg.channel, msg.seq, data]);
            c.subscribe("market:tick:X", keep);
            await c.connect();
            window.ready = await c.subscribe("market:tick:X", () => {}).ready;
        }""",
        ws_url,
    )
    assert await page.evaluate("() => window.client.transport") == "sse"
    assert await page.evaluate("() => window.fallbacks") == [{"from": "websocket", "to": "sse"}]
    assert ["open", "sse"] in await page.evaluate("() => window.states")
    assert any("falling back to sse" in w for w in warnings), warnings
    assert (await page.evaluate("() => window.ready"))["status"] == "live"

    for i in range(3):
        await redis_client.publish("market:tick:X", f'{{"i": {i}}}')
    await page.wait_for_function("() => window.got.length === 3")
    assert await page.evaluate("() => window.got") == [
        ["market:tick:X", i + 1, {"i": i}] for i in range(3)
    ]

    # A new channel: the stream reconnects with the new set, still over SSE.
    info = await page.evaluate(
        """async () => {
            const off = window.client.subscribe("market:depth:Y", (data, msg) =>
                window.got.push([msg.channel, msg.seq, data]));
            return await off.ready;
        }"""
    )
    assert info["status"] == "live"
    assert await page.evaluate("() => window.client.transport") == "sse"
    await redis_client.publish("market:depth:Y", '"d"')
    await redis_client.publish("market:tick:X", '{"i": 3}')
    await page.wait_for_function("() => window.got.length === 5")
    later = sorted((c, repr(d)) for c, _, d in (await page.evaluate("() => window.got"))[3:])
    assert later == [("market:depth:Y", "'d'"), ("market:tick:X", "{'i': 3}")]
    # The reconnect shows no gap: the new stream's reply set the seq baseline.
    assert await page.evaluate("() => window.client.stats.gaps") == 0
    await page.evaluate("() => window.client.close()")
