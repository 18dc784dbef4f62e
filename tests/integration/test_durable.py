"""Durable channels on Redis Streams: live, resume, replay/live switch,
trimming, snapshots, publish endpoint, failover to another gateway."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from redis_ws_client.client import GatewayClient, ServerError
from redis_ws_gateway.config import DurableRule, ExposedStream, SnapshotRule
from redis_ws_gateway.upstream.durable import RENEW_READER_AFTER
from tests.support.gateway import RunningGateway, gateway_settings, spawn_gateway
from tests.support.redis_server import RedisServer, free_port
from tests.support.wait import eventually

DURABLE = (DurableRule("engine:decision:*", maxlen=100_000), DurableRule("engine:signal:*"))
STREAMS = (
    ExposedStream("orders:fills", "fills", "data"),
    ExposedStream("orders:raw", "rawfills", None),
)
SNAPSHOTS = (
    SnapshotRule("market:tick:*", "market:last:{suffix}"),
    SnapshotRule("indicators:*", "ind:{suffix}", "hash"),
)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    # Durable data must survive a Redis restart: AOF, fsync on every write.
    with RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as server:
        yield server


@pytest.fixture
async def durable_gateway(redis_server: RedisServer) -> AsyncIterator[RunningGateway]:
    gw = RunningGateway(
        gateway_settings(
            redis_server.url,
            durable=DURABLE,
            streams=STREAMS,
            snapshots=SNAPSHOTS,
            replay_batch=100,
            api_key="pub-key-0123",
        )
    )
    await gw.start()
    await gw.server.upstream.connected.wait()
    yield gw
    await gw.stop()


async def xadd(r: aioredis.Redis, channel: str, data: Any) -> str:
    entry: bytes = await r.xadd(f"stream:{channel}", {"data": orjson.dumps(data)})
    return entry.decode()


async def collect_data(c: GatewayClient, n: int, timeout: float = 20) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        out.append(await c.next_of_type("data", timeout))
    return out


async def test_live_durable_frames_carry_offsets(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    async with GatewayClient(durable_gateway.url) as c:
        reply = await c.subscribe("engine:decision:NIFTY")
        sub = reply["subscriptions"][0]
        assert sub["durable"] is True and sub["replayed"] == 0 and sub["complete"] is True
        ids = [await xadd(redis_client, "engine:decision:NIFTY", {"i": i}) for i in range(3)]
        frames = await collect_data(c, 3)
    assert [f["offset"] for f in frames] == ids
    assert [f["seq"] for f in frames] == [1, 2, 3]
    assert [f["data"]["i"] for f in frames] == [0, 1, 2]
    assert all("replay" not in f for f in frames)


async def test_resume_since_replays_then_goes_live(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    ids = [await xadd(redis_client, "engine:decision:X", {"i": i}) for i in range(50)]
    async with GatewayClient(durable_gateway.url) as c:
        reply = await c.request(
            "subscribe", channels=[{"channel": "engine:decision:X", "since": ids[19]}]
        )
        sub = reply["subscriptions"][0]
        assert sub["replayed"] == 30 and sub["complete"] is True and sub["offset"] == ids[-1]
        replay = [c.messages.get_nowait() for _ in range(30)]
        assert [f["offset"] for f in replay] == ids[20:]
        assert all(f["replay"] is True and "seq" not in f for f in replay)
        new = await xadd(redis_client, "engine:decision:X", {"i": 50})
        live = await c.next_of_type("data")
        assert live["offset"] == new and "replay" not in live


async def test_switch_from_replay_to_live_under_full_rate_publishing(
    durable_gateway: RunningGateway, redis_server: RedisServer
) -> None:
    channel = "engine:signal:BANKNIFTY"
    publisher = aioredis.from_url(redis_server.url)
    published: list[str] = []
    stop = asyncio.Event()

    async def publish() -> None:
        i = 0
        while not stop.is_set():
            async with publisher.pipeline(transaction=False) as pipe:
                for _ in range(20):
                    pipe.xadd(f"stream:{channel}", {"data": orjson.dumps({"i": i})})
                    i += 1
                published.extend(e.decode() for e in await pipe.execute())
            await asyncio.sleep(0)  # full rate, but lets the gateway run between batches

    task = asyncio.create_task(publish())
    try:
        await eventually(lambda: len(published) >= 500, timeout=30, what="500 entries published")
        since = published[100]
        async with GatewayClient(durable_gateway.url) as c:
            await c.request("subscribe", channels=[{"channel": channel, "since": since}])
            await eventually(
                lambda: len(published) >= 3000, timeout=30, what="3000 entries published"
            )
            stop.set()
            await task
            expected = published[101:]
            got: list[str] = []
            while len(got) < len(expected):
                frame = await c.next_of_type("data", 20)
                got.append(frame["offset"])
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await publisher.aclose()
    assert got == expected  # every entry once, in order: no gap, no duplicate


async def test_trimmed_offset_is_reported_incomplete(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    ids = [await xadd(redis_client, "engine:decision:T", {"i": i}) for i in range(100)]
    await redis_client.xtrim("stream:engine:decision:T", maxlen=10, approximate=False)
    async with GatewayClient(durable_gateway.url) as c:
        reply = await c.request(
            "subscribe", channels=[{"channel": "engine:decision:T", "since": ids[4]}]
        )
    sub = reply["subscriptions"][0]
    assert sub["complete"] is False and sub["replayed"] == 10


@pytest.mark.parametrize(("since", "complete"), [("0", True), ("99999999999999-0", False)])
async def test_since_edges(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis, since: str, complete: bool
) -> None:
    for i in range(5):
        await xadd(redis_client, "engine:decision:E", {"i": i})
    async with GatewayClient(durable_gateway.url) as c:
        reply = await c.request(
            "subscribe", channels=[{"channel": "engine:decision:E", "since": since}]
        )
    assert reply["subscriptions"][0]["complete"] is complete


async def test_deleted_entry_after_offset_is_reported_incomplete(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    ids = [await xadd(redis_client, "engine:decision:D", {"i": i}) for i in range(10)]
    await redis_client.xdel("stream:engine:decision:D", ids[6])
    async with GatewayClient(durable_gateway.url) as c:
        reply = await c.request(
            "subscribe", channels=[{"channel": "engine:decision:D", "since": ids[3]}]
        )
    assert reply["subscriptions"][0]["complete"] is False


async def test_durable_snapshot_sends_latest_entries_first(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    ids = [await xadd(redis_client, "engine:decision:S", {"i": i}) for i in range(20)]
    async with GatewayClient(durable_gateway.url) as c:
        reply = await c.request(
            "subscribe", channels=[{"channel": "engine:decision:S", "snapshot": 5}]
        )
        assert reply["subscriptions"][0]["replayed"] == 5
        replay = [c.messages.get_nowait() for _ in range(5)]
    assert [f["offset"] for f in replay] == ids[-5:]


async def test_key_snapshot_comes_first_and_no_update_is_lost(
    durable_gateway: RunningGateway, redis_server: RedisServer
) -> None:
    publisher = aioredis.from_url(redis_server.url)
    stop = asyncio.Event()
    counter = 0

    async def publish() -> None:
        nonlocal counter
        while not stop.is_set():
            counter += 1
            body = orjson.dumps({"n": counter})
            # The publisher keeps the key current, then publishes.
            async with publisher.pipeline(transaction=True) as pipe:
                pipe.set("market:last:BANKNIFTY", body)
                pipe.publish("market:tick:BANKNIFTY", body)
                await pipe.execute()
            await asyncio.sleep(0.001)  # paces the publisher

    task = asyncio.create_task(publish())
    try:
        await eventually(lambda: counter >= 50, timeout=30, what="50 ticks published")
        async with GatewayClient(durable_gateway.url) as c:
            reply = await c.request(
                "subscribe", channels=[{"channel": "market:tick:BANKNIFTY", "snapshot": 1}]
            )
            assert reply["subscriptions"][0]["snapshot"] is True
            snap = c.messages.get_nowait()
            assert snap["type"] == "snapshot" and snap["channel"] == "market:tick:BANKNIFTY"
            first_live = await c.next_of_type("data")
    finally:
        stop.set()
        await task
        await publisher.aclose()
    # Live continues from the snapshot: the next value at the latest, possibly
    # one the snapshot already had (at-least-once), never a skipped one.
    assert first_live["data"]["n"] <= snap["data"]["n"] + 1


async def test_hash_snapshot(durable_gateway: RunningGateway, redis_client: aioredis.Redis) -> None:
    await redis_client.hset("ind:NIFTY", mapping={"rsi": "61.2", "macd": '{"v":1}', "note": "up"})
    async with GatewayClient(durable_gateway.url) as c:
        await c.request("subscribe", channels=[{"channel": "indicators:NIFTY", "snapshot": 1}])
        snap = c.messages.get_nowait()
    assert snap["data"] == {"rsi": 61.2, "macd": {"v": 1}, "note": "up"}


async def test_exposed_existing_stream(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    async with GatewayClient(durable_gateway.url) as c:
        await c.subscribe("orders:fills", "orders:raw")
        a = await redis_client.xadd("fills", {"data": b'{"qty":5}', "other": b"x"})
        b = await redis_client.xadd("rawfills", {"qty": b"7", "side": b"BUY"})
        frames = await collect_data(c, 2)
    by_channel = {f["channel"]: f for f in frames}
    assert by_channel["orders:fills"]["data"] == {"qty": 5}
    assert by_channel["orders:fills"]["offset"] == a.decode()
    assert by_channel["orders:raw"]["data"] == {"qty": "7", "side": "BUY"}
    assert by_channel["orders:raw"]["offset"] == b.decode()


async def test_options_on_wrong_channels_are_refused(durable_gateway: RunningGateway) -> None:
    async with GatewayClient(durable_gateway.url) as c:
        for item in (
            {"channel": "plain:x", "since": "1-0"},
            {"channel": "plain:x", "snapshot": 1},
            {"channel": "engine:decision:X", "since": "yesterday"},
            {"channel": "engine:decision:X", "snapshot": 0},
            {"channel": "engine:decision:X", "since": "1-0", "snapshot": 2},
            {"channel": "engine:decision:X", "bogus": 1},
        ):
            with pytest.raises(ServerError) as err:
                await c.request("subscribe", channels=[item])
            assert err.value.code == "bad_request", item


async def test_publish_endpoint(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    url = durable_gateway.http + "/publish"
    auth = {"Authorization": "Bearer pub-key-0123"}
    async with GatewayClient(durable_gateway.url) as c, aiohttp.ClientSession() as http:
        await c.subscribe("engine:decision:P", "plain:p")
        async with http.post(
            url, json={"channel": "engine:decision:P", "data": {"a": 1}}, headers=auth
        ) as r:
            assert r.status == 200
            offset = (await r.json())["offset"]
        async with http.post(url, json={"channel": "plain:p", "data": [1, 2]}, headers=auth) as r:
            assert r.status == 200 and (await r.json())["receivers"] == 1
        frames = await collect_data(c, 2)
        by_channel = {f["channel"]: f for f in frames}
        assert by_channel["engine:decision:P"]["offset"] == offset
        assert by_channel["plain:p"]["data"] == [1, 2]
        entries = await redis_client.xrange("stream:engine:decision:P")
        assert [(e[0].decode(), e[1]) for e in entries] == [(offset, {b"data": b'{"a":1}'})]
        async with http.post(url, json={"channel": "x", "data": 1}) as r:
            assert r.status == 401
        async with http.post(url, data=b"{", headers=auth) as r:
            assert r.status == 400 and (await r.json())["error"] == "bad_json"
        async with http.post(url, json={"channel": "x*", "data": 1}, headers=auth) as r:
            assert r.status == 400 and (await r.json())["error"] == "bad_channel"
        async with http.post(url, json={"data": 1}, headers=auth) as r:
            assert r.status == 400


async def test_redis_restart_during_replay_loses_nothing(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    gw = RunningGateway(gateway_settings(redis_server.url, durable=DURABLE, replay_batch=50))
    await gw.start()
    try:
        async with redis_client.pipeline(transaction=False) as pipe:
            for i in range(3000):
                pipe.xadd("stream:engine:decision:R", {"data": orjson.dumps({"i": i})})
            ids = [e.decode() for e in await pipe.execute()]
        async with GatewayClient(gw.url, timeout=60) as c:
            sub = asyncio.create_task(
                c.request("subscribe", channels=[{"channel": "engine:decision:R", "since": "0"}])
            )
            got = [(await c.next_of_type("data", 20))["offset"] for _ in range(200)]
            redis_server.restart()
            reply = await sub
            while not c.messages.empty():
                frame = c.messages.get_nowait()
                if frame.get("type") == "data":
                    got.append(frame["offset"])
        assert reply["subscriptions"][0]["replayed"] == 3000
        assert got == ids
    finally:
        await gw.stop()


async def _spawn_gateway(redis_url: str, config: Path, port: int) -> asyncio.subprocess.Process:
    proc: asyncio.subprocess.Process = await spawn_gateway(
        redis_url, port, REDIS_WS_GATEWAY_CONFIG=str(config)
    )
    return proc


async def test_resume_on_another_gateway_after_a_kill(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("durable:\n  - {pattern: 'engine:decision:*'}\n")
    port_a, port_b = free_port(), free_port()
    a = await _spawn_gateway(redis_server.url, config, port_a)
    b = await _spawn_gateway(redis_server.url, config, port_b)
    publisher = aioredis.from_url(redis_server.url)
    channel = "engine:decision:BANKNIFTY"
    published: list[str] = []
    stop = asyncio.Event()

    async def publish() -> None:
        i = 0
        while not stop.is_set():
            entry = await publisher.xadd(f"stream:{channel}", {"data": orjson.dumps({"i": i})})
            published.append(entry.decode())
            i += 1
            await asyncio.sleep(0.002)  # paces the publisher

    task = asyncio.create_task(publish())
    seen: list[str] = []
    try:
        async with GatewayClient(f"ws://127.0.0.1:{port_a}/ws") as c:
            # From the very beginning: the publisher started before we subscribed.
            await c.request("subscribe", channels=[{"channel": channel, "since": "0"}])
            while len(seen) < 100:
                seen.append((await c.next_of_type("data"))["offset"])
            a.send_signal(signal.SIGKILL)
            await a.wait()
            await asyncio.wait_for(c.closed.wait(), 10)
            while not c.messages.empty():
                frame = c.messages.get_nowait()
                if frame.get("type") == "data":
                    seen.append(frame["offset"])
        async with GatewayClient(f"ws://127.0.0.1:{port_b}/ws") as c:
            await c.request("subscribe", channels=[{"channel": channel, "since": seen[-1]}])
            await eventually(
                lambda: len(published) >= len(seen) + 200,
                timeout=30,
                what="200 entries published while the client was away",
            )
            stop.set()
            await task
            while len(seen) < len(published):
                seen.append((await c.next_of_type("data", 20))["offset"])
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await publisher.aclose()
        for proc in (a, b):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert seen == published  # exactly once, in order, across the kill


async def test_resume_ahead_of_this_pods_reader_is_not_delivered_twice(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    """A client resumes on a pod whose reader has not yet read as far as the
    client's offset (the client came from another pod)."""
    channel = "engine:decision:AHEAD"
    durable = durable_gateway.server.durable
    async with GatewayClient(durable_gateway.url) as first:
        await first.subscribe(channel)  # the topic exists; its cursor is the stream's end
        # Freeze this pod's reader, then let the stream move on without it.
        (reader,) = [g.task for g in durable._groups.values()]
        assert reader is not None
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        ids = [await xadd(redis_client, channel, {"i": i}) for i in range(10)]
        async with GatewayClient(durable_gateway.url) as late:
            request = asyncio.create_task(
                late.request("subscribe", channels=[{"channel": channel, "since": ids[5]}])
            )
            # The request goes out first; either order must deliver each entry once.
            await asyncio.sleep(0)
            durable.start()  # the reader resumes from its old cursor
            reply = await request
            assert reply["subscriptions"][0]["complete"] is True
            await xadd(redis_client, channel, {"i": 10})
            got = []
            while len(got) < 5:
                got.append((await late.next_of_type("data"))["data"]["i"])
            await late.ping()
            while not late.messages.empty():
                frame = late.messages.get_nowait()
                if frame.get("type") == "data":
                    got.append(frame["data"]["i"])
    assert got == [6, 7, 8, 9, 10]


async def _resume_all(url: str, channel: str, since: str, clients: int) -> list[list[str]]:
    async def one() -> list[str]:
        async with GatewayClient(url) as c:
            reply = await c.request("subscribe", channels=[{"channel": channel, "since": since}])
            n = reply["subscriptions"][0]["replayed"]
            return [c.messages.get_nowait()["offset"] for _ in range(n)]

    return list(await asyncio.gather(*(one() for _ in range(clients))))


async def test_many_clients_resuming_the_same_range_share_the_cached_frames(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    channel = "engine:decision:CACHE"
    durable = durable_gateway.server.durable
    async with GatewayClient(durable_gateway.url) as live:
        await live.subscribe(channel)  # the topic lives; its reader fills the cache
        ids = [await xadd(redis_client, channel, {"i": i}) for i in range(50)]
        for _ in range(50):
            await live.next_of_type("data")
        results = await _resume_all(durable_gateway.url, channel, ids[9], 20)
    assert all(r == ids[10:] for r in results)
    assert durable.replayed_from_cache == 20 * 40


async def test_resume_on_a_fresh_topic_backfills_the_cache_once(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    channel = "engine:decision:BACKFILL"
    ids = [await xadd(redis_client, channel, {"i": i}) for i in range(30)]
    results = await _resume_all(durable_gateway.url, channel, ids[4], 10)
    assert all(r == ids[5:] for r in results)
    assert durable_gateway.server.durable.replayed_from_cache == 10 * 25


async def test_replay_beyond_a_small_cache_mixes_redis_and_memory_exactly_once(
    make_gateway: object, redis_client: aioredis.Redis
) -> None:
    gw = await make_gateway(  # type: ignore[operator]
        durable=DURABLE, replay_cache_entries=5, replay_batch=3
    )
    channel = "engine:decision:SMALL"
    async with GatewayClient(gw.url) as live:
        await live.subscribe(channel)
        ids = [await xadd(redis_client, channel, {"i": i}) for i in range(40)]
        for _ in range(40):
            await live.next_of_type("data")
        [got] = await _resume_all(gw.url, channel, ids[2], 1)
    assert got == ids[3:]
    assert 0 < gw.server.durable.replayed_from_cache <= 5


class _StuckReader:
    """A readers' client whose every XREAD fails, as the cluster client of a
    fresh-clone test run did for 30 s after a master was killed."""

    connection_pool = None

    def __init__(self) -> None:
        self.calls = 0
        self.closed = False

    async def xread(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise RedisConnectionError("stuck")

    async def aclose(self, *args: Any, **kwargs: Any) -> None:
        self.closed = True


async def test_a_readers_client_that_keeps_failing_is_replaced(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    gw = RunningGateway(
        gateway_settings(
            redis_server.url,
            durable=DURABLE,
            redis_reconnect_min_seconds=0.01,
            redis_reconnect_max_seconds=0.05,
        )
    )
    await gw.start()
    try:
        stuck = _StuckReader()
        gw.server.durable._reader = stuck  # type: ignore[assignment]
        async with GatewayClient(gw.url) as c:
            await c.subscribe("engine:decision:RENEW")
            entry = await xadd(redis_client, "engine:decision:RENEW", {"i": 1})
            # Delivered only once the reader gave up on the stuck client.
            [frame] = await collect_data(c, 1, timeout=15)
        assert frame["offset"] == entry
        assert stuck.calls >= RENEW_READER_AFTER and stuck.closed
        assert gw.server.durable._reader is not stuck
    finally:
        await gw.stop()
