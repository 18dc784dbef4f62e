"""What the TypeScript client added to /client.js's behaviour, against a
server played by the test: the close codes after which reconnecting cannot
help, transient refusals asked again, listeners besides the constructor's
callbacks, and the transport list a later SSE fallback plugs into."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.async_api import Page, WebSocketRoute

from tests.browser.test_console import _load_client, _scripted_server
from tests.support.gateway import RunningGateway


def _scripted(gateway: RunningGateway) -> str:
    return gateway.http.replace("http://", "ws://") + "/scripted"


@pytest.mark.browser
async def test_a_fatal_close_stops_reconnecting(gateway: RunningGateway, page: Page) -> None:
    connections: list[tuple[WebSocketRoute, list[dict[str, Any]]]] = []
    await page.route_web_socket(lambda url: "/scripted" in url, _scripted_server(connections))
    await _load_client(page, gateway.http)
    await page.evaluate(
        """async (url) => {
            window.states = [];
            window.errors = [];
            window.client = new window.gw.GatewayClient(url, {
                reconnect: { minDelayMs: 10, maxDelayMs: 20 },
                onError: (e) => window.errors.push(e.code),
            });
            window.client.on("state", (state, info) => window.states.push([state, info]));
            await window.client.connect();
        }""",
        _scripted(gateway),
    )
    ws, _ = connections[0]
    await ws.close(code=1008, reason="too many connections for this user")
    await page.wait_for_function("() => window.client.state === 'closed'")
    await page.wait_for_timeout(200)
    assert len(connections) == 1, "no reconnect after 1008"
    state, info = (await page.evaluate("() => window.states"))[-1]
    assert state == "closed" and info["code"] == 1008 and info["fatal"] is True
    assert await page.evaluate("() => window.errors") == ["closed"]
    assert await page.evaluate("() => [...window.gw.FATAL_CLOSE_CODES]") == [1008, 1009]


@pytest.mark.browser
async def test_upstream_unavailable_is_asked_again(gateway: RunningGateway, page: Page) -> None:
    connections: list[tuple[WebSocketRoute, list[dict[str, Any]]]] = []
    refusals = {"orders": ["upstream_unavailable"]}
    await page.route_web_socket(
        lambda url: "/scripted" in url, _scripted_server(connections, refusals)
    )
    await _load_client(page, gateway.http)
    state = await page.evaluate(
        """async (url) => {
            const c = new window.gw.GatewayClient(url, { reconnect: { minDelayMs: 10 } });
            window.client = c;
            await c.connect();
            return await c.subscribe("orders", () => {}).ready;
        }""",
        _scripted(gateway),
    )
    assert state["status"] == "live"
    _, frames = connections[0]
    assert [f["channels"] for f in frames] == [["orders"], ["orders"]]
    await page.evaluate("() => window.client.close()")


@pytest.mark.browser
async def test_the_next_transport_is_tried_when_one_never_opens(
    gateway: RunningGateway, page: Page
) -> None:
    """A transport that closes before opening (a refused upgrade) hands over
    to the next one in `transports`; the client then stays with it."""
    await _load_client(page, gateway.http)
    outcome = await page.evaluate(
        """async (url) => {
            const tried = [];
            const refused = (context, handlers) => {
                tried.push(["refused", context.channels]);
                setTimeout(() => handlers.close({ code: 1006, reason: "", opened: false }), 0);
                return { name: "refused", isOpen: false, send() { throw new Error("no"); },
                         close() {} };
            };
            const ws = window.gw.webSocketTransport();
            const c = new window.gw.GatewayClient(url, {
                reconnect: { minDelayMs: 10, maxDelayMs: 20 },
                transports: [refused, (context, handlers) => {
                    tried.push(["websocket", context.channels]);
                    return ws(context, handlers);
                }],
            });
            c.subscribe("orders:X", () => {});
            await c.connect();
            const ready = await c.subscribe("orders:X", () => {}).ready;
            const result = { tried, transport: c.transport, status: ready.status };
            c.close();
            return result;
        }""",
        gateway.url,
    )
    assert outcome == {
        "tried": [["refused", ["orders:X"]], ["websocket", ["orders:X"]]],
        "transport": "websocket",
        "status": "live",
    }
