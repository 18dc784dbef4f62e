"""The connection after the upgrade: aiohttp lets go, a bare Protocol serves.

These tests guard the detach in connection.detach() against aiohttp upgrades
(it relies on how RequestHandler.start() ends) and check the WebSocket layer
the gateway now owns, with a raw socket where the exact bytes matter.
"""

from __future__ import annotations

import asyncio
import gc
import struct

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.web_protocol import RequestHandler

from redis_ws_client.client import GatewayClient
from redis_ws_gateway.ws.connection import WsConnection
from tests.conftest import GatewayFactory
from tests.support.gateway import RunningGateway
from tests.support.rawws import frame

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def client_frame(payload: bytes, opcode: int = 0x1, fin: bool = True, mask: bool = True) -> bytes:
    return frame(opcode, payload, fin=fin, mask=mask)


class RawClient:
    """A WebSocket client that shows every byte the server sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, gw: RunningGateway) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.settings.port)
        writer.write(UPGRADE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frame(self) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload)."""
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), 5)
        assert not b1 & 0x80, "server frames are never masked"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        assert b0 & 0x80, "no fragmented server frames"
        return b0 & 0x0F, await asyncio.wait_for(self.reader.readexactly(n), 5)

    async def message(self) -> dict[str, object]:
        while True:
            opcode, payload = await self.frame()
            if opcode == 0x1:
                obj = orjson.loads(payload)
                assert isinstance(obj, dict)
                return obj
            assert opcode == 0x9, f"unexpected opcode {opcode}"  # server ping: skip

    async def close_frame(self) -> tuple[int, bytes]:
        while True:
            opcode, payload = await self.frame()
            if opcode == 0x8:
                (code,) = struct.unpack("!H", payload[:2])
                return code, payload[2:]

    async def eof(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 5) == b""

    def close(self) -> None:
        self.writer.close()


async def _handler_tasks() -> list[asyncio.Task[object]]:
    names = ("RequestHandler.start", "RequestHandler._handle_request")
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "") in names and not t.done()
    ]


async def test_aiohttp_lets_go_of_an_upgraded_connection(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    """If an aiohttp upgrade changes how its request handler ends (closing the
    transport, keeping the handler or its task), this fails."""
    async with GatewayClient(gateway.url) as c:
        await c.subscribe("detach:x")
        # The request handler's tasks end on their own: wait for them.
        tasks = await _handler_tasks()
        if tasks:
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        assert not await _handler_tasks()
        assert gateway.runner is not None and gateway.runner.server is not None
        assert gateway.runner.server.connections == []
        gc.collect()
        assert not [o for o in gc.get_objects() if isinstance(o, RequestHandler)]
        (session,) = gateway.server.sessions
        conn = gateway.server.sessions[session]
        assert session.transport.get_protocol() is conn
        assert isinstance(conn, WsConnection) and not session.transport.is_closing()
        # And the connection still works both ways.
        assert await redis_client.publish("detach:x", b'{"n":1}') == 1
        assert (await c.next_of_type("data"))["data"] == {"n": 1}
        await c.send_raw('{"action":"ping","requestId":7}')
        assert (await c.next_of_type("pong"))["requestId"] == 7


async def test_client_ping_gets_its_pong_and_a_client_close_is_answered_with_1000(
    gateway: RunningGateway,
) -> None:
    c = await RawClient.connect(gateway)
    try:
        await c.send(client_frame(b"abc", opcode=0x9))
        assert await c.frame() == (0xA, b"abc")
        await c.send(client_frame(struct.pack("!H", 4321) + b"bye", opcode=0x8))
        assert await c.close_frame() == (1000, b"")
        assert await c.eof()
    finally:
        c.close()


async def test_frames_split_anywhere_and_fragmented_messages_are_read(
    gateway: RunningGateway,
) -> None:
    c = await RawClient.connect(gateway)
    try:
        (session,) = gateway.server.sessions
        conn = gateway.server.sessions[session]
        frame = client_frame(b'{"action":"ping","requestId":"one"}')
        for i in range(len(frame)):  # one byte per read
            await c.send(frame[i : i + 1])
        assert (await c.message())["requestId"] == "one"
        body = b'{"action":"ping","requestId":"two"}'
        first = client_frame(body[:10], opcode=0x1, fin=False)
        ping = client_frame(b"", opcode=0x9)  # control frames may come between fragments
        last = client_frame(body[10:], opcode=0x0, fin=True)
        await c.send(first + ping + last[:3])
        assert await c.frame() == (0xA, b"")
        assert conn.parser is not None, "a partial message keeps the parser"
        await c.send(last[3:])
        assert (await c.message())["requestId"] == "two"
        # Nothing pending: the parser is dropped until the next bytes.
        assert conn.parser is None
    finally:
        c.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (client_frame(b'{"action":"ping"}', mask=False), 1002),  # unmasked client frame
        (client_frame(b"\xff\xfe", opcode=0x1), 1007),  # text that is not UTF-8
        (client_frame(b"x", opcode=0x3), 1002),  # reserved opcode
    ],
)
async def test_protocol_violations_close_with_their_code(
    gateway: RunningGateway, frame: bytes, code: int
) -> None:
    c = await RawClient.connect(gateway)
    try:
        await c.send(frame)
        assert (await c.close_frame())[0] == code
        assert await c.eof()
    finally:
        c.close()


async def test_message_size_limit_counts_all_fragments(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(ws_max_message_bytes=1024)
    c = await RawClient.connect(gw)
    try:
        await c.send(client_frame(b"x" * 600, opcode=0x1, fin=False))
        await c.send(client_frame(b"x" * 600, opcode=0x0, fin=True))
        assert (await c.close_frame())[0] == 1009
        assert await c.eof()
    finally:
        c.close()


async def test_server_pings_on_one_timer_keep_answering_clients(
    make_gateway: GatewayFactory,
) -> None:
    """Clients that answer the pings stay; the one that stops is dropped."""
    gw = await make_gateway(ws_ping_interval_seconds=0.1)
    quiet = await RawClient.connect(gw)
    live = await RawClient.connect(gw)
    try:
        for _ in range(4):
            assert await live.frame() == (0x9, b"")
            await live.send(client_frame(b"", opcode=0xA))
        # The quiet one got its ping, never answered, and was dropped
        # without a close frame (its client sees 1006).
        assert await quiet.frame() == (0x9, b"")
        assert await quiet.eof()
        assert len(gw.server.sessions) == 1
    finally:
        quiet.close()
        live.close()


async def test_server_close_frame_carries_code_and_reason_and_is_counted(
    gateway: RunningGateway,
) -> None:
    c = await RawClient.connect(gateway)
    try:
        (session,) = gateway.server.sessions
        session.close(4008, "slow consumer: outbound buffer full")
        assert await c.close_frame() == (4008, b"slow consumer: outbound buffer full")
        assert await c.eof()
    finally:
        c.close()
    async with aiohttp.ClientSession() as http, http.get(gateway.http + "/metrics") as resp:
        text = await resp.text()
    assert 'redis_ws_gateway_connections_closed_total{reason="slow_consumer"} 1.0' in text
