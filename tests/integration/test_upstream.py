"""One shared upstream subscription, linger, and self-healing when Redis fails."""

from __future__ import annotations

import asyncio

import aiohttp
import redis.asyncio as aioredis

from redis_ws_client.client import GatewayClient
from tests.support.gateway import RunningGateway
from tests.support.redis_server import RedisServer
from tests.support.wait import eventually


async def _numsub(r: aioredis.Redis, channel: str) -> int:
    [(_, count)] = await r.pubsub_numsub(channel)
    return int(count)


async def test_hundred_clients_make_one_upstream_subscription(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    clients = await asyncio.gather(*(GatewayClient(gateway.url).connect() for _ in range(100)))
    try:
        await asyncio.gather(*(c.subscribe("market:tick:BANKNIFTY", "engine:*") for c in clients))
        assert await _numsub(redis_client, "market:tick:BANKNIFTY") == 1
        assert await redis_client.pubsub_numpat() == 1
        await redis_client.publish("market:tick:BANKNIFTY", b"1")
        frames = await asyncio.gather(*(c.next_of_type("data") for c in clients))
        assert {f["seq"] for f in frames} == {1}
    finally:
        await asyncio.gather(*(c.close() for c in clients))

    async def released() -> bool:
        return (
            await _numsub(redis_client, "market:tick:BANKNIFTY") == 0
            and await redis_client.pubsub_numpat() == 0
        )

    await eventually(released, timeout=5, what="the upstream subscriptions to be released")
    assert not gateway.server.hub.channels and not gateway.server.hub.patterns


async def test_resubscribe_within_linger_keeps_upstream_and_epoch(
    make_gateway: object, redis_client: aioredis.Redis
) -> None:
    gw = await make_gateway(unsubscribe_linger_seconds=30)  # type: ignore[operator]
    async with GatewayClient(gw.url) as c:
        first = await c.subscribe("x")
        await c.unsubscribe("x")
        assert await _numsub(redis_client, "x") == 1, "released before the linger ran out"
        again = await c.subscribe("x")
    assert again["subscriptions"][0]["epoch"] == first["subscriptions"][0]["epoch"]


async def test_redis_killed_and_restarted_mid_stream(
    gateway: RunningGateway, redis_server: RedisServer
) -> None:
    async with GatewayClient(gateway.url) as c:
        before = (await c.subscribe("market:tick:NIFTY", "engine:*"))["subscriptions"]
        redis_server.kill()
        lost = await c.next_of_type("upstream_lost")
        assert {
            ("channel" in s and s["channel"]) or s["pattern"] for s in lost["subscriptions"]
        } == {
            "market:tick:NIFTY",
            "engine:*",
        }
        async with aiohttp.ClientSession() as http:
            async with http.get(gateway.http + "/readyz") as resp:
                assert resp.status == 503
        redis_server.start()
        subs = {}
        while len(subs) < 2:
            notice = await c.next_of_type("resubscribed", timeout=10)
            subs.update({s.get("channel") or s.get("pattern"): s for s in notice["subscriptions"]})
        assert set(subs) == {"market:tick:NIFTY", "engine:*"}
        assert all(s["live"] and s["seq"] == 0 for s in subs.values())
        assert subs["market:tick:NIFTY"]["epoch"] != before[0]["epoch"]
        r = aioredis.from_url(redis_server.url)
        try:
            await r.publish("market:tick:NIFTY", b'{"after":"restart"}')
            frame = await c.next_of_type("data")
        finally:
            await r.aclose()
        assert frame["data"] == {"after": "restart"} and frame["seq"] == 1
        assert not c.closed.is_set()


async def test_client_kill_pubsub_is_healed(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    async with GatewayClient(gateway.url) as c:
        await c.subscribe("s1")
        killed = await redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert int(killed) >= 1
        await c.next_of_type("upstream_lost")
        await c.next_of_type("resubscribed", timeout=10)
        await redis_client.publish("s1", b"back")
        assert (await c.next_of_type("data"))["data"] == "back"
    assert gateway.server.upstream.reconnects >= 1


async def test_hung_redis_is_detected_by_health_check(
    gateway: RunningGateway, redis_server: RedisServer
) -> None:
    async with GatewayClient(gateway.url) as c:
        await c.subscribe("h")
        redis_server.pause()
        try:
            # health timeout in tests is 0.6 s: detection well inside 5 s.
            await c.next_of_type("upstream_lost", timeout=5)
            assert not gateway.server.upstream.is_up
        finally:
            redis_server.resume()
        await c.next_of_type("resubscribed", timeout=10)
        r = aioredis.from_url(redis_server.url)
        try:
            await r.publish("h", b"1")
        finally:
            await r.aclose()
        assert (await c.next_of_type("data"))["data"] == 1


async def test_subscribe_while_redis_down_goes_live_later(
    gateway: RunningGateway, redis_server: RedisServer
) -> None:
    redis_server.kill()
    await eventually(
        lambda: not gateway.server.upstream.connected.is_set(),
        timeout=5,
        what="the gateway to see Redis gone",
    )
    async with GatewayClient(gateway.url) as c:
        reply = await c.subscribe("later")
        assert reply["subscriptions"][0]["live"] is False
        redis_server.start()
        notice = await c.next_of_type("resubscribed", timeout=10)
        assert notice["subscriptions"][0]["channel"] == "later"
        r = aioredis.from_url(redis_server.url)
        try:
            await r.publish("later", b"1")
        finally:
            await r.aclose()
        assert (await c.next_of_type("data"))["seq"] == 1


async def test_health_endpoints(gateway: RunningGateway, redis_server: RedisServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.http + "/healthz") as resp:
            assert resp.status == 200
        async with http.get(gateway.http + "/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["ready"] is True
        redis_server.kill()

        async def not_ready() -> bool:
            async with http.get(gateway.http + "/readyz") as resp:
                return resp.status == 503

        await eventually(not_ready, timeout=5, what="/readyz to answer 503")
        async with http.get(gateway.http + "/healthz") as resp:
            assert resp.status == 200


async def test_resubscribed_notice_precedes_the_new_epochs_first_frames(
    gateway: RunningGateway, redis_server: RedisServer
) -> None:
    async with GatewayClient(gateway.url) as c:
        await c.subscribe("burst")
        redis_server.kill()
        await c.next_of_type("upstream_lost")
        redis_server.start()
        r = aioredis.from_url(redis_server.url)
        try:
            # Publish as fast as possible while the gateway resubscribes, so
            # messages follow the confirmation in the same read.
            async def flood() -> None:
                while not gateway.server.hub.channels[b"burst"].live:
                    await r.publish("burst", b"x")
                for _ in range(50):
                    await r.publish("burst", b"x")

            await asyncio.wait_for(flood(), 15)
        finally:
            await r.aclose()
        kinds = []
        while len([k for k in kinds if k == "data"]) < 50:
            frame = await c.next_message()
            kinds.append(frame["type"])
            if frame["type"] == "data":
                assert "resubscribed" in kinds, "data of the new epoch before its notice"
                if frame["seq"] == 1:
                    assert kinds[-2] == "resubscribed"
