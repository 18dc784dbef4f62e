"""Slow consumers: each policy, the memory bound, and that nobody else notices."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from redis_ws_client.client import GatewayClient
from redis_ws_gateway.ws import connection
from tests.conftest import GatewayFactory
from tests.support.gateway import RunningGateway
from tests.support.wait import eventually

LIMIT = 64 * 1024
HIGH_WATER = 8 * 1024
PAD = "x" * 1000


async def _slow_client(gw: RunningGateway, channel: str) -> tuple[aiohttp.ClientSession, Any]:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(gw.url)
    await ws.send_str(orjson.dumps({"action": "subscribe", "channels": [channel]}).decode())
    reply = orjson.loads((await ws.receive()).data)
    assert reply["type"] == "subscribed"
    # Stop reading: the kernel's buffers fill, then the gateway's.
    ws._conn.transport.pause_reading()
    return http, ws


def _session_of(gw: RunningGateway, channel: str) -> Any:
    """The newest session on the channel: the slow client, opened last."""
    return [s for s in gw.server.sessions if ("channel", channel) in s.subscriptions][-1]


async def _publish_until_lagging(
    r: aioredis.Redis, gw: RunningGateway, channel: str, session: Any, extra: int
) -> int:
    """Publish until the session lags, then ``extra`` more; returns the count."""
    n = 0
    peak = 0
    while not session.lagging or extra > 0:
        if session.lagging:
            extra -= 1
        n += 1
        await r.publish(channel, orjson.dumps({"n": n, "pad": PAD}))
        peak = max(peak, session.backlog_bytes)
        assert n < 100_000, "the slow client never lagged"
    # The gateway's own buffer never exceeds its bound, whatever we publish.
    assert peak <= LIMIT + 2048
    return n


async def _drain(ws: Any, until_seq: int) -> list[dict[str, Any]]:
    ws._conn.transport.resume_reading()
    frames = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), 20)
        if msg.type != aiohttp.WSMsgType.TEXT:
            return frames
        frame = orjson.loads(msg.data)
        frames.append(frame)
        if frame.get("seq") == until_seq:
            return frames


async def _gateway(make_gateway: GatewayFactory, high_water: int = HIGH_WATER) -> RunningGateway:
    return await make_gateway(
        outbound_buffer_bytes=LIMIT,
        outbound_high_water_bytes=high_water,
        socket_send_buffer_bytes=4096,
        slow_consumer_grace_seconds=0,
    )


@pytest.mark.parametrize("high_water", [HIGH_WATER, 0], ids=["high-water-8k", "default-0"])
async def test_conflate_keeps_the_latest_per_channel_and_shows_gaps(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis, high_water: int
) -> None:
    gw = await _gateway(make_gateway, high_water)
    http, ws = await _slow_client(gw, "market:tick:X")
    try:
        session = _session_of(gw, "market:tick:X")
        total = await _publish_until_lagging(redis_client, gw, "market:tick:X", session, 2000)
        assert session.conflated > 0
        frames = await _drain(ws, total)
    finally:
        await ws.close()
        await http.close()
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(seqs) and seqs[-1] == total
    assert len(seqs) < total  # conflated: gaps instead of a backlog
    assert frames[-1]["data"]["n"] == total


async def test_drop_oldest_drops_from_the_front(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await _gateway(make_gateway)
    http, ws = await _slow_client(gw, "misc:feed")
    try:
        session = _session_of(gw, "misc:feed")
        total = await _publish_until_lagging(redis_client, gw, "misc:feed", session, 2000)
        assert session.dropped > 0
        frames = await _drain(ws, total)
    finally:
        await ws.close()
        await http.close()
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(seqs) and seqs[-1] == total and len(seqs) < total
    # The newest messages survive: the tail is unbroken.
    tail = seqs[-20:]
    assert tail == list(range(total - 19, total + 1))


@pytest.mark.parametrize("high_water", [HIGH_WATER, 0], ids=["high-water-8k", "default-0"])
async def test_a_stalled_client_that_catches_up_gets_every_frame_in_order(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis, high_water: int
) -> None:
    # One message per Redis read: the gateway writes each straight to the
    # socket until the kernel refuses bytes, then through the transport and
    # the backlog. No frame may be lost, torn or overtaken on the way back.
    gw = await _gateway(make_gateway, high_water)
    http, ws = await _slow_client(gw, "engine:signal:X")
    try:
        session = _session_of(gw, "engine:signal:X")
        assert session.direct
        n = 0
        extra = 20
        while session.direct or extra > 0:
            if not session.direct:
                extra -= 1
            n += 1
            await redis_client.publish("engine:signal:X", orjson.dumps({"n": n, "pad": PAD}))
            assert n < 100_000, "the kernel never refused a write"
        assert not session.closing

        async def more() -> None:
            # While the client catches up the socket has room again before
            # the transport has written what it holds: the moment a direct
            # write could overtake it.
            for k in range(n + 1, total + 1):
                await redis_client.publish("engine:signal:X", orjson.dumps({"n": k, "pad": PAD}))

        total = n + 300
        publisher = asyncio.create_task(more())
        frames = await _drain(ws, total)
        await publisher
    finally:
        await ws.close()
        await http.close()
    assert [f["seq"] for f in frames] == list(range(1, total + 1))
    assert [f["data"]["n"] for f in frames] == list(range(1, total + 1))


async def test_disconnect_policy_closes_the_slow_consumer_only(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await _gateway(make_gateway)
    async with GatewayClient(gw.url) as fast:
        await fast.subscribe("engine:signal:X")
        http, ws = await _slow_client(gw, "engine:signal:X")
        try:
            session = _session_of(gw, "engine:signal:X")
            n = 0
            while not session.closing:
                n += 1
                await redis_client.publish("engine:signal:X", orjson.dumps({"n": n, "pad": PAD}))
                assert n < 100_000
            ws._conn.transport.resume_reading()
            msg = await asyncio.wait_for(_until_close(ws), 20)
            assert msg == 4008
        finally:
            await ws.close()
            await http.close()
        got = [(await fast.next_of_type("data"))["seq"] for _ in range(n)]
        assert got == list(range(1, n + 1))  # the fast client lost nothing


async def _stalled_raw_client(gw: RunningGateway, channel: str) -> socket.socket:
    """A client whose kernel takes only a few KB: once it stops reading, bytes
    pile up on the gateway's side (aiohttp's client cannot shrink SO_RCVBUF)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", gw.settings.port))
    ws = WSConnection(ConnectionType.CLIENT)
    await loop.sock_sendall(sock, ws.send(Request(host="127.0.0.1", target="/ws")))

    async def until(wanted: Callable[[Any], bool]) -> None:
        while True:
            ws.receive_data(await asyncio.wait_for(loop.sock_recv(sock, 65536), 10))
            if any(wanted(event) for event in ws.events()):
                return

    await until(lambda e: isinstance(e, AcceptConnection))
    subscribe = orjson.dumps({"action": "subscribe", "channels": [channel]}).decode()
    await loop.sock_sendall(sock, ws.send(TextMessage(data=subscribe)))
    await until(lambda e: isinstance(e, TextMessage) and '"subscribed"' in e.data)
    return sock  # from here on, nothing is read


async def test_a_closed_slow_consumer_that_never_reads_is_reset(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 4008 close frame sits behind everything the client did not read; a
    plain close would keep the socket open until the client reads it all."""
    monkeypatch.setattr(connection, "CLOSE_TIMEOUT_SECONDS", 0.3)
    gw = await _gateway(make_gateway)
    sock = await _stalled_raw_client(gw, "engine:signal:Y")
    try:
        session = _session_of(gw, "engine:signal:Y")
        transport = session.transport
        server_socket = transport.get_extra_info("socket")
        n = 0
        while not session.closing:
            n += 1
            await redis_client.publish("engine:signal:Y", orjson.dumps({"n": n, "pad": PAD}))
            assert n < 100_000
        assert transport.get_write_buffer_size() > 0  # close() alone would wait for it
        await eventually(
            lambda: server_socket.fileno() == -1, timeout=5, what="the socket to be released"
        )
        assert session not in gw.server.sessions
    finally:
        sock.close()


async def _until_close(ws: Any) -> int | None:
    while True:
        msg = await ws.receive()
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return ws.close_code  # type: ignore[no-any-return]


async def test_fast_clients_are_untouched_by_a_stalled_one(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await _gateway(make_gateway)
    async with GatewayClient(gw.url) as fast:
        await fast.subscribe("market:tick:Y")
        http, ws = await _slow_client(gw, "market:tick:Y")
        try:
            session = _session_of(gw, "market:tick:Y")
            total = await _publish_until_lagging(redis_client, gw, "market:tick:Y", session, 500)
            got = [(await fast.next_of_type("data"))["seq"] for _ in range(total)]
        finally:
            await ws.close()
            await http.close()
    assert got == list(range(1, total + 1))
