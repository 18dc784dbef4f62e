"""The live console and client.js in a real browser (Debian's chromium driven by
Playwright), against a real gateway and Redis.

Playwright never downloads a browser here: the system chromium is launched by
path, and the tests skip only when it is not installed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from playwright.async_api import (
    Page,
    WebSocketRoute,
    expect,
)

from tests.browser.conftest import ARTIFACTS, STATIC, WAIT_MS
from tests.support.gateway import RunningGateway, gateway_settings
from tests.support.redis_server import RedisServer
from tests.support.wait import eventually


async def _load_client(page: Page, http: str) -> None:
    """Give the page the gateway's origin so that it may import /client.js."""
    await page.goto(http + "/client.js")
    await page.evaluate(
        "async () => { window.gw = await import('/client.js'); }",
    )


@pytest.mark.browser
async def test_console_shows_a_published_message_in_table_and_log(
    gateway: RunningGateway, redis_client: aioredis.Redis, page: Page
) -> None:
    await page.goto(gateway.http + "/")
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")

    await page.fill("#sub-input", "market:tick:*")
    await page.click("#sub-btn")
    # The subscription is live once the server confirmed it: anything published
    # from then on reaches the page, so one PUBLISH is enough.
    sub = page.locator('#subs li[data-key="market:tick:*"]')
    await expect(sub).to_have_attribute("data-status", "live")

    assert await redis_client.publish("market:tick:BANKNIFTY", '{"ltp": 51200.5}') == 1

    row = page.locator('#live tbody tr[data-channel="market:tick:BANKNIFTY"]')
    await expect(row.locator(".value")).to_have_text('{"ltp":51200.5}')
    await expect(row.locator(".count-cell")).to_have_text("1")
    await expect(row.locator(".seq-cell")).to_have_text("1")
    await expect(row).to_contain_text("via market:tick:*")
    first_log = page.locator("#log .log-row.msg").first
    await expect(first_log).to_contain_text("market:tick:BANKNIFTY")
    await expect(first_log).to_contain_text('{"ltp":51200.5}')
    await expect(page.locator("#stat-total")).to_have_text("1")

    # A fuller picture for the screenshot: an exact channel next to the
    # pattern, several instruments, a few hundred messages.
    await page.fill("#sub-input", "engine:signal:NIFTY, market:depth:?IFTY")
    await page.click("#sub-btn")
    await expect(page.locator('#subs li[data-key="engine:signal:NIFTY"]')).to_have_attribute(
        "data-status", "live"
    )
    await expect(page.locator('#subs li[data-key="market:depth:?IFTY"]')).to_have_attribute(
        "data-status", "live"
    )
    instruments = {"NIFTY": 24310.05, "BANKNIFTY": 51200.5, "FINNIFTY": 23120.4, "SENSEX": 80110.0}
    async with redis_client.pipeline(transaction=False) as pipe:
        for i in range(60):
            for name, base in instruments.items():
                tick = {"ltp": round(base + (i % 7) * 0.35, 2), "vol": 1000 + i * 13}
                pipe.publish(f"market:tick:{name}", json.dumps(tick))
            if i % 10 == 0:
                pipe.publish("engine:signal:NIFTY", json.dumps({"side": "BUY", "qty": 50 + i}))
                pipe.publish("market:depth:NIFTY", json.dumps({"bid": 24310.0, "ask": 24310.5}))
        await pipe.execute()
    await expect(row.locator(".count-cell")).to_have_text("61")
    await expect(
        page.locator('#live tbody tr[data-channel="engine:signal:NIFTY"] .count-cell')
    ).to_have_text("6")
    await expect(page.locator("#stat-total")).to_have_text(str(1 + 60 * 4 + 12))
    await expect(page.locator("#stat-gaps")).to_have_text("0")

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "console.png"))

    # Unsubscribing through the UI reaches the server.
    await sub.locator("button").click()
    await expect(sub).to_have_count(0)
    session = next(iter(gateway.server.sessions))
    await eventually(
        lambda: ("pattern", "market:tick:*") not in session.subscriptions,
        timeout=WAIT_MS / 1000,
        what="the pattern to be unsubscribed at the gateway",
    )


@pytest.mark.browser
async def test_console_keeps_up_with_a_burst_and_bounds_the_log(
    gateway: RunningGateway, redis_client: aioredis.Redis, page: Page
) -> None:
    await page.goto(gateway.http + "/")
    await page.fill("#sub-input", "burst:*")
    await page.click("#sub-btn")
    await expect(page.locator('#subs li[data-key="burst:*"]')).to_have_attribute(
        "data-status", "live"
    )
    count = 3000
    async with redis_client.pipeline(transaction=False) as pipe:
        for i in range(count):
            pipe.publish(f"burst:{i % 20}", json.dumps({"i": i}))
        await pipe.execute()
    await expect(page.locator("#stat-total")).to_have_text(f"{count:,}")
    await expect(page.locator("#live tbody tr")).to_have_count(20)
    assert await page.locator("#log .log-row.msg").count() == 500
    await expect(page.locator("#log .log-row.msg").first).to_contain_text(f'{{"i":{count - 1}}}')
    await expect(page.locator("#stat-gaps")).to_have_text("0")
    # The page is still responsive: a click is handled right away.
    await page.click("#pause-btn")
    await expect(page.locator("#pause-btn")).to_have_text("Resume")


@pytest.mark.browser
async def test_client_reconnects_and_resubscribes_after_gateway_restart(
    redis_server: RedisServer, redis_client: aioredis.Redis, page: Page
) -> None:
    first = await RunningGateway(gateway_settings(redis_server.url)).start()
    await first.server.upstream.connected.wait()
    port = first.settings.port
    running = [first]
    try:
        await _load_client(page, first.http)
        before = await page.evaluate(
            """async (url) => {
                window.seen = [];
                window.states = [];
                window.client = new window.gw.GatewayClient(url, {
                    reconnect: { minDelayMs: 50, maxDelayMs: 400 },
                    onState: (state, info) => window.states.push([state, info.code ?? null]),
                });
                const off = window.client.subscribe("orders:NIFTY", (data, msg) => {
                    window.seen.push({ data, seq: msg.seq, epoch: msg.epoch });
                });
                await window.client.connect();
                return await off.ready;
            }""",
            first.url,
        )
        assert before["status"] == "live" and before["epoch"]

        await first.stop()
        running.remove(first)
        await page.wait_for_function("() => window.client.state === 'reconnecting'")

        second = await RunningGateway(gateway_settings(redis_server.url, port=port)).start()
        running.append(second)
        await second.server.upstream.connected.wait()
        await page.wait_for_function(
            """() => window.client.state === 'open'
                && window.client.subscriptions()[0].status === 'live'"""
        )
        assert b"orders:NIFTY" in second.server.hub.channels

        assert await redis_client.publish("orders:NIFTY", '{"n": 2}') == 1
        await page.wait_for_function("() => window.seen.some((m) => m.data.n === 2)")
        after = await page.evaluate(
            """() => ({
                seen: window.seen,
                states: window.states,
                stats: window.client.stats,
                sub: window.client.subscriptions()[0],
            })"""
        )
    finally:
        for gw in running:
            await gw.stop()
        await page.evaluate("() => window.client && window.client.close()")

    assert after["seen"] == [{"data": {"n": 2}, "seq": 1, "epoch": after["sub"]["epoch"]}]
    assert after["sub"]["epoch"] != before["epoch"], "a new gateway starts a new epoch"
    assert after["stats"] == {"messages": 1, "gaps": 0, "reconnects": 1}
    states = [s for s, _ in after["states"]]
    assert states[:2] == ["connecting", "open"]
    assert states[-1] == "open" and "reconnecting" in states
    # The old gateway closed the socket normally (1000): still not the
    # application's wish, so the client came back.
    assert ["reconnecting", 1000] in after["states"]


@pytest.mark.browser
async def test_subscribe_unsubscribe_subscribe_in_one_breath_ends_subscribed(
    gateway: RunningGateway, redis_client: aioredis.Redis, page: Page
) -> None:
    """What React's StrictMode does to an effect: mount, clean up, mount."""
    await _load_client(page, gateway.http)
    state = await page.evaluate(
        """async (url) => {
            window.seen = [];
            window.client = new window.gw.GatewayClient(url);
            await window.client.connect();
            const first = window.client.subscribe("orders:X", () => {});
            first();
            const second = window.client.subscribe("orders:X", (data) => window.seen.push(data));
            return await second.ready;
        }""",
        gateway.url,
    )
    assert state["status"] == "live"
    session = next(iter(gateway.server.sessions))
    assert ("channel", "orders:X") in session.subscriptions
    assert await redis_client.publish("orders:X", "hello") == 1
    await page.wait_for_function("() => window.seen.length === 1")
    assert await page.evaluate("() => window.seen") == ["hello"]
    await page.evaluate("() => window.client.close()")


@pytest.mark.browser
async def test_gap_detection_per_subscription_key_and_epoch(
    gateway: RunningGateway, page: Page
) -> None:
    await _load_client(page, gateway.http)
    result = await page.evaluate(
        """() => {
            const gaps = [];
            const got = [];
            // Never connected: frames are fed straight into the client.
            const c = new window.gw.GatewayClient("ws://127.0.0.1:9/unused", {
                onGap: (g) => gaps.push(g),
            });
            const record = (data, m) => got.push([m.key, m.seq, m.gap ? m.gap.got : null]);
            c.subscribe("a", record);
            c.subscribe("p:*", record);
            const feed = (frame) => c._onFrame(frame);
            feed({ type: "subscribed", channels: ["a", "p:*"], subscriptions: [
                { channel: "a", epoch: "e1", seq: 10, live: true },
                { pattern: "p:*", epoch: "e2", seq: 0, live: true }] });
            feed({ type: "data", channel: "a", seq: 11, data: 1 });
            feed({ type: "data", channel: "a", seq: 12, data: 2 });
            feed({ type: "data", channel: "a", seq: 15, data: 3 });          // gap: 13, 14 lost
            // A pattern counts across all the channels it matches.
            feed({ type: "data", channel: "p:x", pattern: "p:*", seq: 1, data: 1 });
            feed({ type: "data", channel: "p:y", pattern: "p:*", seq: 2, data: 1 });
            feed({ type: "data", channel: "p:x", pattern: "p:*", seq: 4, data: 1 });  // gap
            // A new epoch restarts the count: no gap.
            feed({ type: "resubscribed", subscriptions: [
                { channel: "a", epoch: "e3", seq: 0, live: true }] });
            feed({ type: "data", channel: "a", seq: 1, data: 4 });
            // Frames of the next epoch that arrive ahead of its notice count
            // towards it instead of looking like a gap.
            feed({ type: "upstream_lost", subscriptions: [{ channel: "a" }] });
            feed({ type: "data", channel: "a", seq: 1, data: 5 });
            feed({ type: "data", channel: "a", seq: 2, data: 6 });
            feed({ type: "resubscribed", subscriptions: [
                { channel: "a", epoch: "e4", seq: 0, live: true }] });
            feed({ type: "data", channel: "a", seq: 3, data: 7 });
            feed({ type: "data", channel: "a", seq: 5, data: 8 });           // gap: 4 lost
            // Not subscribed: ignored, no handler, no gap.
            feed({ type: "data", channel: "b", seq: 99, data: 0 });
            return { gaps, got, stats: c.stats, subs: c.subscriptions() };
        }"""
    )
    assert result["gaps"] == [
        {"key": "a", "channel": "a", "expected": 13, "got": 15, "missed": 2, "epoch": "e1"},
        {"key": "p:*", "channel": "p:x", "expected": 3, "got": 4, "missed": 1, "epoch": "e2"},
        {"key": "a", "channel": "a", "expected": 4, "got": 5, "missed": 1, "epoch": "e4"},
    ]
    assert [g for g in result["got"] if g[2] is not None] == [
        ["a", 15, 15],
        ["p:*", 4, 4],
        ["a", 5, 5],
    ]
    assert len(result["got"]) == 11
    assert result["stats"] == {"messages": 11, "gaps": 3, "reconnects": 0}
    by_key = {s["key"]: s for s in result["subs"]}
    assert by_key["a"]["epoch"] == "e4" and by_key["a"]["lastSeq"] == 5
    assert by_key["p:*"]["kind"] == "pattern" and by_key["p:*"]["lastSeq"] == 4


@pytest.mark.browser
async def test_client_against_a_scripted_server(gateway: RunningGateway, page: Page) -> None:
    """Request matching, error codes, timeouts, 1012 and durable resume, with a
    server played by the test (the real one sends no offsets yet)."""
    connections: list[tuple[WebSocketRoute, list[dict[str, Any]]]] = []
    # Answers per name, one per request; pings are never answered.
    refusals = {"secret": ["forbidden"] * 10, "busy:1": ["rate_limited"]}
    serve = _scripted_server(connections, refusals)
    await page.route_web_socket(lambda url: "/scripted" in url, serve)
    await _load_client(page, gateway.http)
    outcome = await page.evaluate(
        """async (url) => {
            window.errors = [];
            window.offsets = [];
            window.states = [];
            const c = new window.gw.GatewayClient(url, {
                token: "t0k&en",
                requestTimeoutMs: 300,
                reconnect: { minDelayMs: 30, maxDelayMs: 60000 },
                onError: (e, ctx) => window.errors.push([e.code, ctx.key ?? null]),
                onState: (state, info) => window.states.push({ state, ...info }),
            });
            window.client = c;
            const orders = c.subscribe("orders", (data, msg) => window.offsets.push(msg.offset));
            c.subscribe("ticks:*", () => {});
            await c.connect();
            const state = await orders.ready;
            const secret = c.subscribe("secret", () => {});
            let refused = null;
            try {
                await secret.ready;
            } catch (e) {
                refused = { code: e.code, message: e.message };
            }
            let ping = null;
            try { await c.ping(); } catch (e) { ping = e.code; }
            const busy = await c.subscribe("busy:1", () => {}).ready;
            return { state, refused, ping, busy, keys: c.subscriptions().map((s) => s.key) };
        }""",
        gateway.http.replace("http://", "ws://") + "/scripted",
    )
    assert outcome["state"]["status"] == "live" and outcome["state"]["epoch"] == "e1"
    assert outcome["refused"] == {"code": "forbidden", "message": "forbidden: secret"}
    assert outcome["ping"] == "timeout"
    assert outcome["busy"]["status"] == "live", "rate_limited is asked again, not a refusal"
    assert outcome["keys"] == ["orders", "ticks:*", "busy:1"], "a refused name is forgotten"

    ws1, frames1 = connections[0]
    assert "token=t0k%26en" in ws1.url
    assert frames1[0]["action"] == "subscribe"
    assert frames1[0]["channels"] == ["orders", "ticks:*"], "one request for what was waiting"
    assert frames1[1]["channels"] == ["secret"]
    assert frames1[2]["action"] == "ping"
    assert [f["channels"] for f in frames1[3:]] == [["busy:1"], ["busy:1"]]
    assert len({f["requestId"] for f in frames1}) == len(frames1)

    for seq, offset in ((1, "1700000000000-0"), (2, "1700000000000-1")):
        ws1.send(
            json.dumps(
                {"type": "data", "channel": "orders", "seq": seq, "offset": offset, "data": {}}
            )
        )
    await page.wait_for_function("() => window.offsets.length === 2")

    # Draining: the client comes back within minDelayMs (jittered) and
    # resumes the durable channel from the last offset it saw.
    await ws1.close(code=1012, reason="service restart")
    await page.wait_for_function(
        "() => window.client.state === 'open' && window.client.subscriptions()"
        ".every((s) => s.status === 'live' && s.epoch === 'e2')"
    )
    assert len(connections) == 2
    _, frames2 = connections[1]
    assert frames2[0]["action"] == "subscribe"
    assert frames2[0]["channels"] == [
        {"channel": "orders", "since": "1700000000000-1"},
        "ticks:*",
        "busy:1",
    ]
    # A refused subscription is reported; a failed ping only rejects its promise.
    assert await page.evaluate("() => window.errors") == [["forbidden", "secret"]]

    # The server drops a subscription by itself (a refreshed token allows less).
    ws2, _ = connections[1]
    dropped = {"type": "unsubscribed", "channels": ["ticks:*"], "reason": "forbidden"}
    ws2.send(json.dumps(dropped))
    await page.wait_for_function("() => window.client.subscriptions().length === 2")
    assert await page.evaluate("() => window.errors") == [
        ["forbidden", "secret"],
        ["forbidden", "ticks:*"],
    ]
    restart = await page.evaluate("() => window.states.find((s) => s.code === 1012)")
    assert restart["state"] == "reconnecting" and 0 <= restart["delayMs"] < 30
    ceilings = await page.evaluate(
        "() => [0, 1, 2, 3, 4, 5, 6, 30, 5000]"
        ".map((n) => window.gw.backoffDelay(n, 250, 10000, () => 0.9999))"
    )
    assert ceilings == [249, 499, 999, 1999, 3999, 7999, 9999, 9999, 9999]
    await page.evaluate("() => window.client.close()")
    await page.wait_for_function("() => window.client.state === 'closed'")


def _scripted_server(
    connections: list[tuple[WebSocketRoute, list[dict[str, Any]]]],
    refusals: dict[str, list[str]] | None = None,
) -> Callable[[WebSocketRoute], None]:
    """A stand-in gateway. It confirms subscriptions (epoch e<n> on the n-th
    connection) unless ``refusals`` holds an error code for a name (one code
    used up per request), and leaves everything else to the test."""
    refusals = refusals if refusals is not None else {}

    def serve(ws: WebSocketRoute) -> None:
        frames: list[dict[str, Any]] = []
        connections.append((ws, frames))
        epoch = f"e{len(connections)}"

        def on_message(message: str | bytes) -> None:
            frame = json.loads(message)
            frames.append(frame)
            rid = frame.get("requestId")
            if frame["action"] != "subscribe":
                return
            names = [c if isinstance(c, str) else c["channel"] for c in frame["channels"]]
            for name in names:
                if refusals.get(name):
                    code = refusals[name].pop(0)
                    error = {"type": "error", "requestId": rid, "code": code, "channel": name}
                    ws.send(json.dumps({**error, "message": f"{code}: {name}"}))
                    return
            subs = [
                {"pattern" if "*" in n else "channel": n, "epoch": epoch, "seq": 0, "live": True}
                for n in names
            ]
            reply = {
                "type": "subscribed",
                "requestId": rid,
                "channels": names,
                "subscriptions": subs,
            }
            ws.send(json.dumps(reply))

        ws.on_message(on_message)

    return serve


@pytest.mark.browser
async def test_console_highlights_gaps_and_shows_upstream_lost(
    gateway: RunningGateway, page: Page
) -> None:
    """The console's reaction to frames a real gateway sends under load or when
    Redis goes away, played by a scripted server."""
    connections: list[tuple[WebSocketRoute, list[dict[str, Any]]]] = []
    await page.route_web_socket(lambda url: url.endswith("/ws"), _scripted_server(connections))
    await page.goto(gateway.http + "/")
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")
    await page.fill("#sub-input", "market:tick:*")
    await page.press("#sub-input", "Enter")
    await expect(page.locator('#subs li[data-key="market:tick:*"]')).to_have_attribute(
        "data-status", "live"
    )
    ws, _ = connections[0]
    for seq in (1, 2, 5, 6):
        frame = {
            "type": "data",
            "channel": "market:tick:NIFTY",
            "pattern": "market:tick:*",
            "seq": seq,
            "data": {"ltp": 24310 + seq},
        }
        ws.send(json.dumps(frame))
    await expect(page.locator("#stat-total")).to_have_text("4")
    gap_rows = page.locator("#log .log-row.gap")
    await expect(gap_rows).to_have_count(1)
    await expect(gap_rows).to_contain_text("#5")
    await expect(gap_rows).to_contain_text("expected #3 (2 missed)")
    await expect(page.locator("#stat-gaps")).to_have_text("1")

    banner = page.locator("#upstream-banner")
    await expect(banner).to_be_hidden()
    ws.send(json.dumps({"type": "upstream_lost", "subscriptions": [{"pattern": "market:tick:*"}]}))
    await expect(banner).to_be_visible()
    await expect(banner).to_contain_text("market:tick:*")
    await expect(page.locator('#subs li[data-key="market:tick:*"]')).to_have_attribute(
        "data-status", "waiting"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "console-upstream-lost.png"))
    resubscribed = {"pattern": "market:tick:*", "epoch": "e1b", "seq": 0, "live": True}
    ws.send(json.dumps({"type": "resubscribed", "subscriptions": [resubscribed]}))
    await expect(banner).to_be_hidden()
    await expect(page.locator('#subs li[data-key="market:tick:*"]')).to_have_attribute(
        "data-status", "live"
    )
    # After a new epoch, seq 1 again is continuity, not a gap.
    frame = {"type": "data", "channel": "market:tick:NIFTY", "pattern": "market:tick:*"}
    ws.send(json.dumps({**frame, "seq": 1, "data": {"ltp": 1}}))
    await expect(page.locator("#stat-total")).to_have_text("5")
    await expect(page.locator("#stat-gaps")).to_have_text("1")


_COMMENTS_HTML = re.compile(r"<!--.*?-->", re.S)
_COMMENTS_C = re.compile(r"/\*.*?\*/", re.S)
_IMPORT = re.compile(r"""\bimport\b[^"'`;]*?["']([^"']+)["']|\bimport\(\s*["']([^"']+)["']""")


@pytest.mark.browser
async def test_static_files_types_and_no_external_urls(gateway: RunningGateway, page: Page) -> None:
    expected = {
        "/": "text/html",
        "/client.js": "javascript",
        "/console.js": "javascript",
        "/console.css": "text/css",
    }
    async with aiohttp.ClientSession() as http:
        for path, kind in expected.items():
            async with http.get(gateway.http + path) as resp:
                assert resp.status == 200, path
                content_type = resp.content_type
                if kind == "javascript":
                    # Module scripts are refused by browsers under any other type.
                    assert content_type in ("text/javascript", "application/javascript"), path
                else:
                    assert content_type == kind, path
                assert resp.headers.get("Cache-Control") == "no-cache"

    html = _COMMENTS_HTML.sub("", (STATIC / "console.html").read_text())
    assert not re.search(r"https?://", html), "console.html must not load anything from elsewhere"
    css = _COMMENTS_C.sub("", (STATIC / "console.css").read_text())
    assert not re.search(r"https?://|@import", css)
    for name in ("client.js", "console.js"):
        source = (STATIC / name).read_text()
        specifiers = [a or b for a, b in _IMPORT.findall(_COMMENTS_C.sub("", source))]
        assert all(s.startswith(("./", "/")) for s in specifiers), (name, specifiers)

    # What the browser really fetches: only the gateway's own origin.
    requested: list[str] = []
    page.on("request", lambda req: requested.append(req.url))
    page.on("websocket", lambda ws: requested.append(ws.url))
    await page.goto(gateway.http + "/")
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")
    origins = {re.sub(r"^(\w+://[^/]+).*$", r"\1", url) for url in requested}
    assert origins == {gateway.http, gateway.http.replace("http://", "ws://")}, requested
