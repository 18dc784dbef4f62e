"""Durable channels through the SDK, end to end: real gateway, real Redis
Streams written by the publisher helpers. Replay, snapshot, trimmed history,
and a gateway restart in the middle of a stream with nothing lost or repeated."""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import sys
from typing import Any

import pytest
import redis.asyncio as aioredis

from redis_ws_client.client import Gap, Message
from redis_ws_client.sdk import ResilientClient, State, Subscription
from redis_ws_gateway.publish import apublish_durable, stream_key
from tests.conftest import GatewayFactory
from tests.support.gateway import RunningGateway
from tests.support.wait import eventually


def _server_supports_durable() -> bool:
    return importlib.util.find_spec("redis_ws_gateway.upstream.durable") is not None


pytestmark = pytest.mark.skipif(
    not _server_supports_durable(),
    reason="the gateway has no durable channels yet (server side in progress)",
)

CHANNEL = "engine:decision:X"


async def _durable_gateway(make_gateway: GatewayFactory, **overrides: Any) -> RunningGateway:
    from redis_ws_gateway.config import DurableRule

    return await make_gateway(durable=(DurableRule("engine:decision:*"),), **overrides)


@pytest.fixture
async def durable_gateway(make_gateway: GatewayFactory) -> RunningGateway:
    return await _durable_gateway(make_gateway)


def fast_client(url: str, **kwargs: Any) -> ResilientClient:
    return ResilientClient(url, backoff_base=0.05, backoff_max=0.3, **kwargs)


async def _take(sub: Subscription, n: int, timeout: float = 10.0) -> list[Message]:
    return [await sub.get(timeout=timeout) for _ in range(n)]


async def _publish(r: aioredis.Redis, first: int, count: int) -> list[str]:
    return [await apublish_durable(r, CHANNEL, {"i": i}) for i in range(first, first + count)]


async def test_history_is_replayed_before_live_messages(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    offsets = await _publish(redis_client, 0, 5)
    gaps: list[Gap] = []
    async with fast_client(durable_gateway.url, on_gap=gaps.append) as client:
        async with client.subscribe_iter(CHANNEL, since="0") as sub:
            history = await _take(sub, 5)
            (state,) = client.subscriptions()
            assert state.durable and state.confirmed and state.offset == offsets[-1]
            live_offset = (await _publish(redis_client, 5, 1))[0]
            (live,) = await _take(sub, 1)
    assert [(m.data["i"], m.offset, m.replay, m.seq) for m in history] == [
        (i, offsets[i], True, None) for i in range(5)
    ]
    assert (live.data, live.offset, live.replay) == ({"i": 5}, live_offset, False)
    assert live.seq is not None
    assert gaps == [] and client.stats.replayed == 5


async def test_resume_after_an_offset_skips_what_was_seen(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    offsets = await _publish(redis_client, 0, 6)
    async with fast_client(durable_gateway.url) as client:
        async with client.subscribe_iter(CHANNEL, since=offsets[3]) as sub:
            got = await _take(sub, 2)
    assert [m.data["i"] for m in got] == [4, 5]


async def test_snapshot_sends_the_latest_entries_first(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    await _publish(redis_client, 0, 10)
    async with fast_client(durable_gateway.url) as client:
        async with client.subscribe_iter(CHANNEL, snapshot=3) as sub:
            latest = await _take(sub, 3)
            await _publish(redis_client, 10, 1)
            (live,) = await _take(sub, 1)
    assert [m.data["i"] for m in latest] == [7, 8, 9] and all(m.replay for m in latest)
    assert live.data == {"i": 10} and not live.replay


async def test_resuming_from_a_trimmed_offset_reports_the_gap(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    offsets = await _publish(redis_client, 0, 20)
    await redis_client.xtrim(stream_key(CHANNEL), maxlen=5, approximate=False)
    gaps: list[Gap] = []
    async with fast_client(durable_gateway.url, on_gap=gaps.append) as client:
        async with client.subscribe_iter(CHANNEL, since=offsets[2]) as sub:
            kept = await _take(sub, 5)
            await _publish(redis_client, 20, 1)
            (live,) = await _take(sub, 1)
    assert [m.data["i"] for m in kept] == [15, 16, 17, 18, 19]
    assert [(g.key, g.reason) for g in gaps] == [(CHANNEL, "trimmed")]
    assert live.gap is not None and live.gap.reason == "trimmed"


class StateLog:
    def __init__(self) -> None:
        self.states: list[State] = []

    def __call__(self, state: State) -> None:
        self.states.append(state)

    async def reach(self, state: State, timeout: float = 10.0) -> None:
        await eventually(lambda: state in self.states, timeout=timeout, what=f"state {state!r}")


async def test_gateway_restart_mid_stream_loses_and_repeats_nothing(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await _durable_gateway(make_gateway)
    port = gw.settings.port
    total = 400
    published = 0

    async def publisher() -> None:
        nonlocal published
        for i in range(total):
            await apublish_durable(redis_client, CHANNEL, {"i": i})
            published += 1
            # Paced so that the restart falls in the middle of the stream.
            await asyncio.sleep(0.002)

    states = StateLog()
    gaps: list[Gap] = []
    received: list[Message] = []
    async with fast_client(gw.url, on_state=states, on_gap=gaps.append) as client:
        async with client.subscribe_iter(CHANNEL) as sub:
            task = asyncio.create_task(publisher())
            try:
                received += await _take(sub, 50)
                # Bounded: a gateway that cannot stop must fail the test, not hang it.
                await asyncio.wait_for(gw.stop(), 15)
                await states.reach("reconnecting")
                # Make sure entries land while no gateway is there to see them.
                target = published + 20
                await eventually(
                    lambda: published >= target,
                    timeout=10,
                    what="20 entries published while no gateway runs",
                )
                await _durable_gateway(make_gateway, port=port)
                while len(received) < total:
                    received.append(await sub.get(timeout=10))
            finally:
                await task
    assert [m.data["i"] for m in received] == list(range(total))
    offsets = [m.offset for m in received]
    assert all(o is not None for o in offsets) and len(set(offsets)) == total
    entries: Any = await redis_client.xrange(stream_key(CHANNEL))
    assert offsets == [e[0].decode() for e in entries]
    assert any(m.replay for m in received[50:]), "the resume path was not exercised"
    assert gaps == [] and client.stats.duplicates == 0 and client.stats.reconnects == 1


async def test_tail_since_prints_replayed_history(
    durable_gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    offsets = await _publish(redis_client, 0, 2)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "redis_ws_client",
        "tail",
        durable_gateway.url,
        CHANNEL,
        "--since",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        lines = [await asyncio.wait_for(proc.stdout.readline(), 15) for _ in range(2)]
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 10)
    assert [line.decode().strip() for line in lines] == [
        f'{CHANNEL} replay @{offsets[0]} {{"i":0}}',
        f'{CHANNEL} replay @{offsets[1]} {{"i":1}}',
    ]
