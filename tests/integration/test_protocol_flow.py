"""The seed's protocol end to end: real gateway, real Redis, real sockets."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from redis_ws_client.client import GatewayClient, ServerError
from tests.conftest import GatewayFactory
from tests.support.gateway import RunningGateway


async def test_subscribe_reply_echoes_request_id_with_epoch_and_seq(
    gateway: RunningGateway,
) -> None:
    async with GatewayClient(gateway.url) as c:
        await c.send_raw(
            '{"action":"subscribe","channels":["market:tick:BANKNIFTY","engine:signal:*"],'
            '"requestId":"req-1"}'
        )
        reply = await c.next_message()
    assert reply["type"] == "subscribed"
    assert reply["requestId"] == "req-1"
    assert reply["channels"] == ["market:tick:BANKNIFTY", "engine:signal:*"]
    exact, pattern = reply["subscriptions"]
    assert exact["channel"] == "market:tick:BANKNIFTY" and "pattern" not in exact
    assert pattern["pattern"] == "engine:signal:*"
    for sub in (exact, pattern):
        assert sub["seq"] == 0 and sub["live"] is True and sub["epoch"]
    assert exact["epoch"] != pattern["epoch"]


async def test_payload_encodings(gateway: RunningGateway, redis_client: aioredis.Redis) -> None:
    async with GatewayClient(gateway.url) as c:
        await c.subscribe("ch")
        await redis_client.publish("ch", b'{"ltp": 51200.5}')
        await redis_client.publish("ch", b"plain text")
        await redis_client.publish("ch", b"\xff\xfe\x00raw")
        await redis_client.publish("ch", b"")
        frames = [await c.next_of_type("data") for _ in range(4)]
    assert frames[0]["data"] == {"ltp": 51200.5}
    assert frames[1]["data"] == "plain text"
    assert frames[2]["encoding"] == "base64"
    assert base64.b64decode(frames[2]["data"]) == b"\xff\xfe\x00raw"
    assert frames[3]["data"] == ""
    assert [f["seq"] for f in frames] == [1, 2, 3, 4]
    assert all(f["channel"] == "ch" and "pattern" not in f for f in frames)


async def test_valid_json_payload_is_forwarded_byte_for_byte(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    payload = b'{ "a" : [1, 2.50, "x\\u00e9", 123456789012345678901234567890] }'
    async with aiohttp.ClientSession() as http, http.ws_connect(gateway.url) as ws:
        await ws.send_str('{"action":"subscribe","channels":["raw"]}')
        await ws.receive()
        await redis_client.publish("raw", payload)
        msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.data.encode().endswith(b'"data":' + payload + b"}")


async def test_unvalidated_payloads_keep_json_byte_for_byte_and_encode_the_rest(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await make_gateway(payload_validation="off")
    payload = b'{"bids":[[22450.05, 10],[22450.00,7]], "n": 123456789012345678901234567890}'
    async with aiohttp.ClientSession() as http, http.ws_connect(gw.url) as ws:
        await ws.send_str('{"action":"subscribe","channels":["raw"]}')
        await ws.receive()
        # The last: JSON-shaped, not JSON (a Python publisher's str(dict)),
        # embedded unparsed all the same: what "off" trusts publishers with.
        for raw in (payload, b"plain text", b"\xff\xfe", b"{'a': 1}"):
            await redis_client.publish("raw", raw)
        texts = [(await asyncio.wait_for(ws.receive(), 5)).data for _ in range(4)]
    assert texts[0].encode().endswith(b',"data":' + payload + b"}")
    assert orjson.loads(texts[1])["data"] == "plain text"
    binary = orjson.loads(texts[2])
    assert binary["encoding"] == "base64" and base64.b64decode(binary["data"]) == b"\xff\xfe"
    assert texts[3].endswith(""","data":{'a': 1}}""")


async def test_pattern_and_exact_subscriptions_each_get_a_frame(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    async with GatewayClient(gateway.url) as c:
        await c.subscribe("engine:signal:NIFTY", "engine:signal:*")
        await redis_client.publish("engine:signal:NIFTY", b'{"side":"BUY"}')
        a = await c.next_of_type("data")
        b = await c.next_of_type("data")
    by_kind = {("pattern" in f): f for f in (a, b)}
    assert by_kind[False]["channel"] == "engine:signal:NIFTY"
    assert by_kind[True]["pattern"] == "engine:signal:*"
    assert by_kind[True]["channel"] == "engine:signal:NIFTY"
    assert by_kind[False]["seq"] == by_kind[True]["seq"] == 1


@pytest.mark.parametrize(
    ("pattern", "hit", "miss"),
    [
        ("md:?x", "md:ax", "md:abx"),
        ("md:[a-c]*", "md:bz", "md:dz"),
        ("md:[^a]", "md:b", "md:a"),
        ("md:\\*", "md:*", "md:x"),
    ],
)
async def test_glob_patterns_follow_redis_semantics(
    gateway: RunningGateway, redis_client: aioredis.Redis, pattern: str, hit: str, miss: str
) -> None:
    async with GatewayClient(gateway.url) as c:
        reply = await c.subscribe(pattern)
        assert "pattern" in reply["subscriptions"][0] or pattern == "md:\\*"
        await redis_client.publish(miss, b"1")
        await redis_client.publish(hit, b"2")
        frame = await c.next_of_type("data")
    assert frame["channel"] == hit and frame["data"] == 2


async def test_seq_is_consecutive_and_frames_identical_for_all_recipients(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    n = 300
    clients = [await GatewayClient(gateway.url).connect() for _ in range(3)]
    raw: list[list[str]] = [[] for _ in clients]
    try:
        for c in clients:
            await c.subscribe("market:tick:NIFTY")
        async with redis_client.pipeline(transaction=False) as pipe:
            for i in range(n):
                pipe.publish("market:tick:NIFTY", orjson.dumps({"i": i}))
            await pipe.execute()
        for idx, c in enumerate(clients):
            for _ in range(n):
                frame = await c.next_of_type("data")
                raw[idx].append(orjson.dumps(frame).decode())
    finally:
        for c in clients:
            await c.close()
    seqs = [orjson.loads(x)["seq"] for x in raw[0]]
    assert seqs == list(range(1, n + 1))
    assert [orjson.loads(x)["data"]["i"] for x in raw[0]] == list(range(n))
    assert raw[0] == raw[1] == raw[2]


async def test_subscribing_twice_is_idempotent(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    async with GatewayClient(gateway.url) as c:
        first = await c.subscribe("dup")
        await redis_client.publish("dup", b"1")
        await c.next_of_type("data")
        second = await c.subscribe("dup", "dup")
        assert second["subscriptions"][0]["epoch"] == first["subscriptions"][0]["epoch"]
        assert second["subscriptions"][0]["seq"] == 1
        await redis_client.publish("dup", b"2")
        frame = await c.next_of_type("data")
        assert frame["seq"] == 2
        await c.ping()
        assert c.messages.empty(), "a second subscribe must not double deliveries"


async def test_unsubscribe_flow_and_not_subscribed_error(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    async with GatewayClient(gateway.url) as c:
        await c.subscribe("a", "b:*")
        reply = await c.unsubscribe("a")
        assert reply["type"] == "unsubscribed" and reply["channels"] == ["a"]
        with pytest.raises(ServerError) as err:
            await c.unsubscribe("a")
        assert err.value.code == "not_subscribed"
        assert err.value.frame["requestId"]
        await redis_client.publish("a", b"gone")
        await redis_client.publish("b:1", b"kept")
        frame = await c.next_of_type("data")
        assert frame["channel"] == "b:1"
        all_reply = await c.request("unsubscribe")
        assert all_reply["channels"] == ["b:*"]


async def test_ping_pong_echoes_request_id(gateway: RunningGateway) -> None:
    async with GatewayClient(gateway.url) as c:
        reply = await c.ping()
        assert reply["type"] == "pong" and isinstance(reply["time"], int)
        await c.send_raw('{"action":"ping","requestId":7}')
        pong = await c.next_message()
        assert pong == {"type": "pong", "time": pong["time"], "requestId": 7}


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ("[1,2]", "bad_json"),
        ('{"action":"dance","requestId":"x"}', "unknown_action"),
        ('{"action":5,"requestId":"x"}', "bad_request"),
        ('{"action":"subscribe","channels":"market:tick","requestId":"x"}', "bad_request"),
        ('{"action":"subscribe","channels":[],"requestId":"x"}', "bad_request"),
        ('{"action":"subscribe","channels":[1],"requestId":"x"}', "bad_request"),
        ('{"action":"subscribe","channels":[""],"requestId":"x"}', "bad_channel"),
        ('{"action":"subscribe","channels":["a\\u0000b"],"requestId":"x"}', "bad_channel"),
        ('{"action":"ping","requestId":true}', "bad_request"),
        ('{"action":"ping","requestId":{"a":1}}', "bad_request"),
    ],
)
async def test_bad_frames_get_error_and_connection_stays_usable(
    gateway: RunningGateway, frame: str, code: str
) -> None:
    async with GatewayClient(gateway.url) as c:
        await c.send_raw(frame)
        err = await c.next_message()
        assert err["type"] == "error" and err["code"] == code and err["message"]
        if '"requestId":"x"' in frame:
            assert err["requestId"] == "x"
        assert (await c.ping())["type"] == "pong"


async def test_binary_frame_is_answered_with_error(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(gateway.url) as ws:
        await ws.send_bytes(b"\x00\x01")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert orjson.loads(msg.data)["code"] == "bad_request"


async def test_garbage_from_one_client_does_not_disturb_another(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    async with GatewayClient(gateway.url) as good, GatewayClient(gateway.url) as bad:
        await good.subscribe("market:tick:BANKNIFTY")
        for junk in ("{", "null", '{"action":[]}', "x" * 1000):
            await bad.send_raw(junk)
        await redis_client.publish("market:tick:BANKNIFTY", b'{"ltp":1}')
        frame = await good.next_of_type("data")
        assert frame["data"] == {"ltp": 1}
        assert good.messages.empty()
        for _ in range(4):
            assert (await bad.next_message())["type"] == "error"


async def test_frame_over_size_limit_closes_with_1009(make_gateway: object) -> None:
    gw = await make_gateway(ws_max_message_bytes=1024)  # type: ignore[operator]
    async with GatewayClient(gw.url) as c:
        await c.send_raw('{"action":"ping","pad":"' + "x" * 2048 + '"}')
        await asyncio.wait_for(c.closed.wait(), 5)
        assert c.close_code == 1009


async def test_limits_on_channels_and_wildcards(make_gateway: object) -> None:
    gw = await make_gateway(max_channels_per_client=3, max_wildcard_subscriptions=1)  # type: ignore[operator]
    async with GatewayClient(gw.url) as c:
        await c.subscribe("a", "b*")
        with pytest.raises(ServerError) as err:
            await c.subscribe("c*")
        assert err.value.code == "too_many_wildcards"
        with pytest.raises(ServerError) as err:
            await c.subscribe("c", "d")
        assert err.value.code == "too_many_channels"
        # All-or-nothing: the refused request subscribed nothing.
        reply = await c.subscribe("c")
        assert [s["channel"] for s in reply["subscriptions"]] == ["c"]


async def test_unresponsive_client_is_closed_by_server_pings(make_gateway: object) -> None:
    gw = await make_gateway(ws_ping_interval_seconds=0.2)  # type: ignore[operator]
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(gw.url, autoping=False)
        # Never answer the server's pings: read until the server gives up.
        msg = await asyncio.wait_for(_until_closed(ws), 5)
        assert msg in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        await ws.close()
    assert not gw.server.sessions


async def _until_closed(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMsgType:
    while True:
        msg = await ws.receive()
        if msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.CLOSING,
        ):
            return msg.type
