"""permessage-deflate (RFC 7692) against a real gateway and a real Redis:
each data message is compressed once per topic and the same bytes go to
every client that negotiated it; short messages, control frames and clients
that did not offer it get plain frames; what a client sends compressed is
inflated within the per-message limit."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import GatewayFactory
from tests.support.gateway import RunningGateway, spawn_gateway
from tests.support.rawws import (
    Frame,
    RawClient,
    abort_all,
    compressed_text,
    frame,
    inflate,
    rss_bytes,
    text,
    upgrade,
)
from tests.support.redis_server import RedisServer, free_port

MIB = 1 << 20
OFFER = "permessage-deflate; client_max_window_bits"
ANSWER = b"permessage-deflate; server_no_context_takeover; client_no_context_takeover"


@pytest.fixture(autouse=True)
async def _reset_raw_clients(make_gateway: GatewayFactory) -> AsyncIterator[None]:
    yield
    abort_all()


def tick(size: int) -> bytes:
    """A market tick of about ``size`` bytes of JSON (compressible as real
    ones are: repeated keys, similar numbers)."""
    fields = {"symbol": "ACME", "venue": "XNAS", "ts": 1733550000123}
    i = 0
    while len(orjson.dumps(fields)) < size:
        fields[f"level{i}"] = {"bid": 187.23 + i / 100, "ask": 187.25 + i / 100, "qty": 100 + i}
        i += 1
    return orjson.dumps(fields)


async def client(gw: RunningGateway, deflate: bool) -> RawClient:
    c = await upgrade(
        gw.settings.port, headers={"Sec-WebSocket-Extensions": OFFER} if deflate else {}
    )
    assert c.status == 101
    negotiated = b"sec-websocket-extensions: " + ANSWER in c.head.lower()
    assert negotiated == (deflate and gw.settings.ws_compression), c.head
    return c


async def subscribe(c: RawClient, *channels: str, compress: bool = False) -> None:
    body = orjson.dumps({"action": "subscribe", "channels": list(channels)})
    c.writer.write(compressed_text(body) if compress else text(body))
    while True:
        f = await c.read_frame()
        assert f.opcode == 0x1, f
        assert not f.rsv1  # replies are never compressed
        if orjson.loads(f.payload).get("type") == "subscribed":
            return


async def data_frame(c: RawClient) -> Frame:
    while True:
        f = await c.read_frame()
        if f.opcode == 0x1:
            return f
        assert f.opcode != 0x8, f"closed with {f.close_code}"


def decoded(f: Frame) -> dict[str, Any]:
    msg: dict[str, Any] = orjson.loads(inflate(f.payload) if f.rsv1 else f.payload)
    return msg


async def test_one_compressed_frame_is_shared_by_every_deflate_client(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await make_gateway()
    a, b, plain = await client(gw, True), await client(gw, True), await client(gw, False)
    for c in (a, b, plain):
        await subscribe(c, "dfl:1")
    payload = tick(2000)
    await redis_client.publish("dfl:1", payload)
    fa, fb, fp = await data_frame(a), await data_frame(b), await data_frame(plain)
    assert fa.rsv1 and fb.rsv1 and not fp.rsv1
    assert fa.payload == fb.payload  # the same bytes, compressed once
    assert len(fa.payload) < len(fp.payload) // 2
    assert inflate(fa.payload) == fp.payload
    msg = decoded(fa)
    assert msg["type"] == "data" and msg["channel"] == "dfl:1"
    assert orjson.dumps(msg["data"]) == payload
    assert gw.server.hub.compressed == 1


async def test_pattern_and_channel_subscribers_each_get_their_own_frame(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await make_gateway()
    by_channel, by_pattern, plain_pattern = (
        await client(gw, True),
        await client(gw, True),
        await client(gw, False),
    )
    await subscribe(by_channel, "dfl:2")
    await subscribe(by_pattern, "dfl:*")
    await subscribe(plain_pattern, "dfl:*")
    payload = tick(1500)
    await redis_client.publish("dfl:2", payload)
    fc, fp, fplain = (
        await data_frame(by_channel),
        await data_frame(by_pattern),
        await data_frame(plain_pattern),
    )
    assert fc.rsv1 and fp.rsv1 and not fplain.rsv1
    mc, mp = decoded(fc), decoded(fp)
    assert "pattern" not in mc and mp["pattern"] == "dfl:*"
    assert mc["channel"] == mp["channel"] == "dfl:2"
    assert orjson.dumps(mc["data"]) == orjson.dumps(mp["data"]) == payload
    assert inflate(fp.payload) == fplain.payload
    assert gw.server.hub.compressed == 2  # once per topic


async def test_messages_below_the_threshold_go_uncompressed(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await make_gateway(ws_compression_min_bytes=1024)
    c = await client(gw, True)
    await subscribe(c, "dfl:3")
    await redis_client.publish("dfl:3", tick(200))
    await redis_client.publish("dfl:3", tick(3000))
    small, large = await data_frame(c), await data_frame(c)
    assert not small.rsv1 and orjson.loads(small.payload)["seq"] == 1
    assert large.rsv1 and decoded(large)["seq"] == 2
    assert gw.server.hub.compressed == 1


async def test_compression_off_negotiates_nothing(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await make_gateway(ws_compression=False)
    c = await client(gw, True)  # offers; the answer has no extension
    assert b"sec-websocket-extensions" not in c.head.lower()
    await subscribe(c, "dfl:4")
    await redis_client.publish("dfl:4", tick(3000))
    f = await data_frame(c)
    assert not f.rsv1 and orjson.loads(f.payload)["seq"] == 1
    assert gw.server.hub.compressed == 0


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; server_max_window_bits=10",
        "permessage-deflate; unknown_param",
        "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        "x-webkit-deflate-frame",
    ],
)
async def test_offers_the_gateway_cannot_honour_are_declined(
    gateway: RunningGateway, offer: str
) -> None:
    c = await upgrade(gateway.settings.port, headers={"Sec-WebSocket-Extensions": offer})
    assert c.status == 101
    assert b"sec-websocket-extensions" not in c.head.lower()


async def test_a_later_acceptable_offer_is_taken(gateway: RunningGateway) -> None:
    offers = "permessage-deflate; server_max_window_bits=10, permessage-deflate"
    c = await upgrade(gateway.settings.port, headers={"Sec-WebSocket-Extensions": offers})
    assert b"sec-websocket-extensions: " + ANSWER in c.head.lower()


async def test_aiohttp_client_with_compression_decodes_every_frame(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await make_gateway(ws_compression_min_bytes=256)
    payloads = [tick(100), tick(300), tick(5000), tick(70_000)]
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(gw.url, compress=15) as ws,
    ):
        assert ws.compress == 15
        # aiohttp compresses what it sends too: the subscribe is inflated.
        await ws.send_json({"action": "subscribe", "channels": ["dfl:5"], "requestId": 7})
        reply = await ws.receive_json(timeout=5)
        assert reply["type"] == "subscribed" and reply["requestId"] == 7
        for p in payloads:
            await redis_client.publish("dfl:5", p)
        for seq, p in enumerate(payloads, 1):
            msg = await ws.receive_json(timeout=5)
            assert msg["seq"] == seq
            assert orjson.dumps(msg["data"]) == p
        await ws.send_json({"action": "ping", "requestId": 8})
        pong = await ws.receive_json(timeout=5)
        assert pong["type"] == "pong" and pong["requestId"] == 8
    assert gw.server.hub.compressed == 3


async def test_compressed_client_frames_are_accepted(gateway: RunningGateway) -> None:
    c = await client(gateway, True)
    await subscribe(c, "dfl:6", compress=True)
    # A compressed message in two fragments with a ping between them.
    body = deflated_pieces(orjson.dumps({"action": "ping", "requestId": "p"}))
    first = frame(0x1, body[0], fin=False)
    c.writer.write(bytes([first[0] | 0x40]) + first[1:])
    c.writer.write(frame(0x9, b"hi"))
    c.writer.write(frame(0x0, body[1]))
    pong_seen = False
    while True:
        f = await c.read_frame()
        if f.opcode == 0xA:
            pong_seen = True
            continue
        assert f.opcode == 0x1, f
        msg = orjson.loads(f.payload)
        assert msg["type"] == "pong" and msg["requestId"] == "p"
        break
    assert pong_seen


def deflated_pieces(data: bytes) -> tuple[bytes, bytes]:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    out = (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
    half = len(out) // 2
    return out[:half], out[half:]


@pytest.fixture
async def spawned(redis_server: RedisServer) -> AsyncIterator[Any]:
    procs: list[Any] = []
    with contextlib.ExitStack() as files:

        async def start(**env: str) -> tuple[Any, int]:
            port = free_port()
            log = files.enter_context(tempfile.TemporaryFile())
            proc = await spawn_gateway(redis_server.url, port, stderr=log, **env)
            procs.append(proc)
            return proc, port

        yield start
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_an_inflate_bomb_closes_1009_without_memory_growth(spawned: Any) -> None:
    proc, port = await spawned(
        WS_MAX_MESSAGE_BYTES=str(MIB),
        WS_MAX_BYTES_PER_SECOND=str(1 << 30),
        WS_MAX_FRAMES_PER_SECOND="1000000",
        WS_FRAME_BURST="1000000",
    )
    # 512 MiB of one byte: well under the 1 MiB limit while compressed.
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"a" * MIB
    bomb = b"".join(c.compress(chunk) for _ in range(512)) + c.flush(zlib.Z_SYNC_FLUSH)
    bomb = bomb[:-4]
    assert len(bomb) < MIB
    ws = await upgrade(port, headers={"Sec-WebSocket-Extensions": OFFER})
    assert b"sec-websocket-extensions: " + ANSWER in ws.head.lower()
    before = rss_bytes(proc.pid)
    ws.writer.write(compressed_text(b"", compressed=bomb))
    closing = await ws.read_until_close(timeout=10)
    assert closing is not None and closing.close_code == 1009
    await asyncio.sleep(0.2)
    assert rss_bytes(proc.pid) - before < 20 * MIB
    # The gateway still serves a well-behaved client.
    again = await upgrade(port, headers={"Sec-WebSocket-Extensions": OFFER})
    again.writer.write(compressed_text(b'{"action":"ping","requestId":1}'))
    f = await again.read_frame()
    assert f.opcode == 0x1 and orjson.loads(f.payload)["type"] == "pong"
