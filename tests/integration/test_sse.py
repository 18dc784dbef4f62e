"""GET /sse, the Server-Sent Events fallback: the protocol tests of /ws that
apply to a stream whose channels are fixed at connect, read with a plain
aiohttp client against a real gateway and redis-server."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
import redis.asyncio as aioredis

from redis_ws_gateway.config import DurableRule, RoleConfig
from redis_ws_gateway.fanout.session import DRAIN_CHUNK_BYTES
from redis_ws_gateway.web import sse
from redis_ws_gateway.ws import connection
from tests.conftest import GatewayFactory
from tests.support.gateway import RunningGateway
from tests.support.wait import eventually

SECRET = "hs-secret-for-tests-" + "0123456789abcdef" * 3
ROLES = {
    "admin": RoleConfig(allow=("*",)),
    "user": RoleConfig(allow=("market:*", "indicators:*"), deny=("engine:decision:*",)),
}
PAD = "x" * 1000


def token(**claims: Any) -> str:
    body = {"sub": "alice", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


class Stream:
    """One event stream as EventSource reads it: events with data and the
    last event id."""

    def __init__(self, http: aiohttp.ClientSession, resp: aiohttp.ClientResponse) -> None:
        self.http = http
        self.resp = resp
        self.last_id: str | None = None
        self.comments: list[str] = []
        self.retry: int | None = None

    async def event(self, timeout: float = 10) -> dict[str, Any] | None:
        """The next event's JSON (None when the stream ended)."""
        data: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.resp.content.readline()
                if not raw:
                    return None
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if data:
                        obj: dict[str, Any] = orjson.loads("\n".join(data))
                        return obj
                    continue
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "":
                    self.comments.append(value)
                elif field == "data":
                    data.append(value)
                elif field == "id":
                    self.last_id = value
                elif field == "retry":
                    self.retry = int(value)

    async def of_type(self, kind: str, timeout: float = 10) -> dict[str, Any]:
        while True:
            event = await self.event(timeout)
            assert event is not None, f"the stream ended before a {kind} event"
            if event["type"] == kind:
                return event

    async def close(self) -> None:
        self.resp.close()
        await self.http.close()


async def open_stream(
    gw: RunningGateway, query: str, headers: dict[str, str] | None = None
) -> Stream:
    http = aiohttp.ClientSession()
    resp = await http.get(f"{gw.http}/sse?{query}", headers=headers or {})
    if resp.status != 200:
        body = await resp.text()
        resp.close()
        await http.close()
        raise Refused(resp.status, body, resp.headers.get("X-Refusal-Reason"))
    return Stream(http, resp)


class Refused(Exception):
    def __init__(self, status: int, body: str, reason: str | None) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = orjson.loads(body) if body.startswith("{") else body
        self.reason = reason


async def refusal(gw: RunningGateway, query: str, **headers: str) -> Refused:
    with pytest.raises(Refused) as err:
        stream = await open_stream(gw, query, headers)
        await stream.close()
    return err.value


@pytest.fixture
async def stream_of() -> AsyncIterator[Any]:
    opened: list[Stream] = []

    async def factory(gw: RunningGateway, query: str, **headers: str) -> Stream:
        stream = await open_stream(gw, query, headers)
        opened.append(stream)
        return stream

    yield factory
    for stream in opened:
        await stream.close()


# --- subscribe, frames, seq ---------------------------------------------------------


async def test_subscribe_and_data_with_consecutive_seq(
    gateway: RunningGateway, redis_client: aioredis.Redis, stream_of: Any
) -> None:
    stream = await stream_of(gateway, "channels=market:tick:X,market:depth:*")
    assert stream.resp.headers["Content-Type"].startswith("text/event-stream")
    assert stream.resp.headers["Cache-Control"] == "no-cache"
    assert stream.resp.headers["X-Accel-Buffering"] == "no"
    reply = await stream.of_type("subscribed")
    assert reply["channels"] == ["market:tick:X", "market:depth:*"]
    states = {s.get("channel") or s.get("pattern"): s for s in reply["subscriptions"]}
    assert states["market:tick:X"]["live"] is True
    epoch = states["market:tick:X"]["epoch"]
    for i in range(5):
        await redis_client.publish("market:tick:X", orjson.dumps({"i": i}))
    await redis_client.publish("market:depth:Y", b'{"pretty":\n  true}')
    got = [await stream.of_type("data") for _ in range(6)]
    ticks = [f for f in got if f["channel"] == "market:tick:X"]
    assert [f["seq"] for f in ticks] == [1, 2, 3, 4, 5]  # consecutive: a gap is detectable
    assert [f["data"]["i"] for f in ticks] == list(range(5))
    depth = next(f for f in got if f["channel"] == "market:depth:Y")
    # A publisher's multi-line JSON arrives as the same value.
    assert depth["pattern"] == "market:depth:*" and depth["data"] == {"pretty": True}
    assert epoch and stream.retry == sse.RETRY_MS
    # Same frame as a WebSocket subscriber's: the WS frame's JSON, byte for byte.
    assert set(ticks[0]) == {"type", "channel", "seq", "data"}


async def test_frames_equal_websocket_frames(
    gateway: RunningGateway, redis_client: aioredis.Redis, stream_of: Any
) -> None:
    stream = await stream_of(gateway, "channels=misc:same")
    await stream.of_type("subscribed")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(gateway.url)
        await ws.send_str('{"action":"subscribe","channels":["misc:same"]}')
        assert orjson.loads((await ws.receive()).data)["type"] == "subscribed"
        await redis_client.publish("misc:same", b"\xff\x00binary")
        await redis_client.publish("misc:same", b"plain text")
        over_ws = [orjson.loads((await ws.receive()).data) for _ in range(2)]
        await ws.close()
    over_sse = [await stream.of_type("data") for _ in range(2)]
    assert over_sse == over_ws


async def test_head_opens_no_stream(gateway: RunningGateway) -> None:
    # A HEAD response has no body: a stream behind it would be bytes the
    # client never asked for, and a connection slot held.
    http_url = gateway.url.replace("ws://", "http://", 1).rsplit("/ws", 1)[0]
    async with (
        aiohttp.ClientSession() as http,
        http.head(http_url + "/sse?channels=misc:head") as resp,
    ):
        assert resp.status == 405
    assert not gateway.server.sessions


async def test_heartbeat_comments_keep_an_idle_stream_alive(
    make_gateway: GatewayFactory, stream_of: Any
) -> None:
    gw = await make_gateway(ws_ping_interval_seconds=0.2)
    stream = await stream_of(gw, "channels=market:quiet")
    await stream.of_type("subscribed")
    with pytest.raises(TimeoutError):
        await stream.event(0.7)
    assert stream.comments.count("") >= 2


async def test_a_closed_stream_is_forgotten(gateway: RunningGateway, stream_of: Any) -> None:
    stream = await stream_of(gateway, "channels=market:gone")
    await stream.of_type("subscribed")
    assert len(gateway.server.sessions) == 1
    await stream.close()
    await eventually(lambda: not gateway.server.sessions, timeout=5, what="the session to go")
    await eventually(
        lambda: not gateway.server.hub.channels, timeout=5, what="the upstream release"
    )


# --- auth, ACL, origin, limits ---------------------------------------------------------


@pytest.fixture
async def auth_gateway(make_gateway: GatewayFactory) -> RunningGateway:
    return await make_gateway(
        require_auth=True,
        api_key="admin-key-0123",
        jwt_secret=SECRET,
        jwt_algorithms=("HS256",),
        roles=ROLES,
    )


async def test_auth_refused_with_401(auth_gateway: RunningGateway) -> None:
    err = await refusal(auth_gateway, "channels=market:tick:X")
    assert err.status == 401
    assert err.body == {"error": "unauthorized", "message": "credential required"}
    err = await refusal(auth_gateway, "channels=market:tick:X&token=nope")
    assert (err.status, err.body["message"], err.reason) == (
        401,
        "invalid credential",
        "invalid credential",
    )
    err = await refusal(auth_gateway, "channels=x", Authorization="Bearer " + token(role="nobody"))
    assert err.status == 403 and err.body["error"] == "forbidden"


async def test_token_in_query_or_header(auth_gateway: RunningGateway, stream_of: Any) -> None:
    stream = await stream_of(auth_gateway, f"channels=market:a&token={token(role='user')}")
    assert (await stream.of_type("subscribed"))["channels"] == ["market:a"]
    stream = await stream_of(
        auth_gateway, "channels=market:b", Authorization="Bearer " + token(role="user")
    )
    assert (await stream.of_type("subscribed"))["channels"] == ["market:b"]


async def test_acl_refusal_is_an_error_event_and_others_continue(
    auth_gateway: RunningGateway, redis_client: aioredis.Redis, stream_of: Any
) -> None:
    stream = await stream_of(
        auth_gateway,
        f"channels=engine:decision:X,market:tick:X&token={token(role='user')}",
    )
    err = await stream.of_type("error")
    assert err == {
        "type": "error",
        "code": "forbidden",
        "message": "role may not read engine:decision:X",
        "channel": "engine:decision:X",
    }
    reply = await stream.of_type("subscribed")
    assert reply["channels"] == ["market:tick:X"]
    await redis_client.publish("engine:decision:X", b"1")
    await redis_client.publish("market:tick:X", b"2")
    data = await stream.of_type("data")
    assert (data["channel"], data["data"]) == ("market:tick:X", 2)


async def test_origin_refused_with_403(make_gateway: GatewayFactory, stream_of: Any) -> None:
    gw = await make_gateway(allowed_origins=("https://ui.example.com",))
    err = await refusal(gw, "channels=a", Origin="https://evil.example.com")
    assert err.status == 403
    assert err.body == {"error": "forbidden", "message": "origin not allowed"}
    stream = await stream_of(gw, "channels=a", Origin="https://ui.example.com")
    assert stream.resp.headers["Access-Control-Allow-Origin"] == "https://ui.example.com"
    await stream.of_type("subscribed")


async def test_request_errors(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(
        max_channels_per_client=2, max_wildcard_subscriptions=1, max_pattern_metachars=3
    )
    cases = {
        "": ("bad_request", "channels must name at least one channel: /sse?channels=a,b"),
        "channels=a,b,c": ("too_many_channels", "at most 2 subscriptions per connection"),
        "channels=a:*,b:*": (
            "too_many_wildcards",
            "at most 1 wildcard subscriptions per connection",
        ),
        "channels=a*b*c*d*": ("bad_channel", "pattern has more than 3 wildcards"),
        "channels=a&since=yesterday": (
            "bad_request",
            "since must be an offset like 1732610000000-0",
        ),
        "channels=a&since=0": ("bad_request", "since needs a durable channel in channels"),
    }
    for query, (code, message) in cases.items():
        err = await refusal(gw, query)
        assert (err.status, err.body) == (400, {"error": code, "message": message}), query
    err = await refusal(gw, "channels=a", **{"Last-Event-ID": "garbage"})
    assert err.body["message"] == "Last-Event-ID is not an event id this gateway issued"


async def test_connection_limits(make_gateway: GatewayFactory, stream_of: Any) -> None:
    # The address and gateway caps may refuse the socket at accept, before
    # its request is read: the same status and reason header as /ws gets.
    gw = await make_gateway(max_connections_per_ip=1)
    await stream_of(gw, "channels=a")
    err = await refusal(gw, "channels=a")
    assert (err.status, err.reason) == (429, "too many connections from this address")
    gw = await make_gateway(max_connections=1)
    await stream_of(gw, "channels=a")
    err = await refusal(gw, "channels=a")
    assert (err.status, err.reason) == (503, "too many connections on this gateway")
    gw = await make_gateway(max_connections_per_user=1, api_key="k-0123")
    await stream_of(gw, "channels=a&token=k-0123")
    err = await refusal(gw, "channels=a&token=k-0123")
    assert err.status == 429
    assert err.body == {"error": "rate_limited", "message": "too many connections for this user"}
    await stream_of(gw, "channels=a")  # anonymous is not one user
    # Streams count as connections: a WebSocket is refused the same way.
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as ws_err:
            await http.ws_connect(gw.url + "?token=k-0123")
        assert ws_err.value.status == 429


async def test_draining_refuses_and_closes(gateway: RunningGateway, stream_of: Any) -> None:
    stream = await stream_of(gateway, "channels=a")
    await stream.of_type("subscribed")
    session = next(iter(gateway.server.sessions))
    gateway.server.ws.disconnect(session, 1012, "service restart")
    assert await stream.event() is None
    assert "close 1012 service restart" in stream.comments
    gateway.server.drain_started.set()
    assert (await refusal(gateway, "channels=a")).status == 503


# --- durable resume ------------------------------------------------------------------


@pytest.fixture
async def durable_gateway(make_gateway: GatewayFactory) -> RunningGateway:
    return await make_gateway(durable=(DurableRule("engine:decision:*"),))


async def xadd(r: aioredis.Redis, channel: str, data: Any) -> str:
    entry: bytes = await r.xadd(f"stream:{channel}", {"data": orjson.dumps(data)})
    return entry.decode()


async def test_durable_resume_with_last_event_id(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis, stream_of: Any
) -> None:
    gw = durable_gateway
    stream = await stream_of(gw, "channels=engine:decision:A,engine:decision:B,market:x")
    reply = await stream.of_type("subscribed")
    assert all(s.get("durable") for s in reply["subscriptions"][:2])
    first = [await xadd(redis_client, "engine:decision:A", {"i": i}) for i in range(3)]
    got = [await stream.of_type("data") for _ in range(3)]
    assert [f["offset"] for f in got] == first and [f["seq"] for f in got] == [1, 2, 3]
    last_id = stream.last_id
    assert last_id is not None and last_id.startswith("d1.")
    await stream.close()
    # Published while the client is away, on both durable channels.
    missed_a = [await xadd(redis_client, "engine:decision:A", {"i": i}) for i in range(3, 6)]
    missed_b = [await xadd(redis_client, "engine:decision:B", {"j": 0})]
    again = await stream_of(
        gw,
        "channels=engine:decision:A,engine:decision:B,market:x",
        **{"Last-Event-ID": last_id},
    )
    replayed = []
    while True:
        event = await again.event()
        assert event is not None
        if event["type"] == "subscribed":
            break
        replayed.append(event)
    assert [(f["channel"], f["offset"], f["replay"]) for f in replayed] == [
        ("engine:decision:A", o, True) for o in missed_a
    ] + [("engine:decision:B", o, True) for o in missed_b]
    assert [f["data"] for f in replayed[:3]] == [{"i": 3}, {"i": 4}, {"i": 5}]
    # Live again, and the id keeps moving.
    live = await xadd(redis_client, "engine:decision:A", {"i": 6})
    frame = await again.of_type("data")
    assert frame["offset"] == live and "replay" not in frame
    assert again.last_id != last_id
    assert sse.decode_id(again.last_id or "") == {
        "engine:decision:A": live,
        "engine:decision:B": missed_b[-1],
    }


async def test_since_on_first_connect(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis, stream_of: Any
) -> None:
    ids = [await xadd(redis_client, "engine:decision:S", {"i": i}) for i in range(4)]
    stream = await stream_of(durable_gateway, f"channels=engine:decision:S&since={ids[1]}")
    got = [await stream.of_type("data") for _ in range(2)]
    assert [f["offset"] for f in got] == ids[2:]
    reply = await stream.of_type("subscribed")
    assert reply["subscriptions"][0]["replayed"] == 2
    # One channel's offset: CHANNEL@OFFSET (a channel that is not durable
    # has nothing to resume and is subscribed live).
    again = await stream_of(
        durable_gateway,
        f"channels=engine:decision:S,market:y&since=engine:decision:S@{ids[2]}&since=market:y@0",
    )
    assert [(await again.of_type("data"))["offset"]] == ids[3:]
    assert (await again.of_type("subscribed"))["channels"] == ["engine:decision:S", "market:y"]


# --- slow consumers ---------------------------------------------------------------------

LIMIT = 64 * 1024
HIGH_WATER = 8 * 1024


async def _stalled_sse_client(gw: RunningGateway, channel: str) -> socket.socket:
    """A client whose kernel takes only a few KB and that stops reading once
    its stream is subscribed."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", gw.settings.port))
    request = f"GET /sse?channels={channel} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    seen = b""
    async with asyncio.timeout(10):
        while b'"subscribed"' not in seen:
            seen += await loop.sock_recv(sock, 65536)
    assert seen.startswith(b"HTTP/1.1 200")
    return sock


def _session_of(gw: RunningGateway, channel: str) -> Any:
    return [s for s in gw.server.sessions if ("channel", channel) in s.subscriptions][-1]


async def _slow_gateway(make_gateway: GatewayFactory) -> RunningGateway:
    return await make_gateway(
        outbound_buffer_bytes=LIMIT,
        outbound_high_water_bytes=HIGH_WATER,
        socket_send_buffer_bytes=4096,
        slow_consumer_grace_seconds=0,
    )


@pytest.mark.parametrize("channel", ["market:tick:S", "misc:feed"], ids=["conflate", "drop-oldest"])
async def test_slow_consumer_policy_keeps_memory_bounded(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis, channel: str
) -> None:
    gw = await _slow_gateway(make_gateway)
    sock = await _stalled_sse_client(gw, channel)
    try:
        session = _session_of(gw, channel)
        peak = n = 0
        while n < 3000:
            n += 1
            await redis_client.publish(channel, orjson.dumps({"n": n, "pad": PAD}))
            peak = max(peak, session.buffered_bytes())
        assert session.lagging
        assert session.conflated + session.dropped > 0
        # The backlog stays within its bound, and the transport holds at
        # most the high-water mark and one drained chunk on top.
        assert session.backlog_bytes <= LIMIT
        assert peak <= LIMIT + HIGH_WATER + DRAIN_CHUNK_BYTES + 8192
        assert not session.closing
        # Reading again: the stream resumes with the newest message, seq
        # gaps showing what was left out.
        loop = asyncio.get_running_loop()
        tail = b""
        async with asyncio.timeout(20):
            while f'"n":{n},'.encode() not in tail:
                tail = (tail + await loop.sock_recv(sock, 65536))[-8192:]
    finally:
        sock.close()


async def test_disconnect_policy_closes_a_stalled_stream(
    make_gateway: GatewayFactory,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    stream_of: Any,
) -> None:
    monkeypatch.setattr(sse, "CLOSE_TIMEOUT_SECONDS", 0.3)
    assert connection.CLOSE_TIMEOUT_SECONDS  # the WebSocket's own timeout is untouched
    gw = await _slow_gateway(make_gateway)
    fast = await stream_of(gw, "channels=engine:signal:X")
    await fast.of_type("subscribed")
    sock = await _stalled_sse_client(gw, "engine:signal:X")
    try:
        session = _session_of(gw, "engine:signal:X")
        server_socket = session.transport.get_extra_info("socket")
        n = 0
        while not session.closing:
            n += 1
            await redis_client.publish("engine:signal:X", orjson.dumps({"n": n, "pad": PAD}))
            assert n < 100_000
        await eventually(
            lambda: server_socket.fileno() == -1, timeout=5, what="the socket to be released"
        )
        await eventually(lambda: session not in gw.server.sessions, timeout=5, what="forgotten")
    finally:
        sock.close()
    got = [(await fast.of_type("data"))["seq"] for _ in range(n)]
    assert got == list(range(1, n + 1))  # the reader that keeps up lost nothing
