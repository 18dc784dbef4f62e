"""End to end: several gateways behind a load balancer, with Redis.

The same tests run against a local HAProxy topology (default) and against
the chart in kind (E2E_TARGET=kind); see tests/e2e/topology.py. Durable
channels are checked for exactly-once delivery across every topology change:
each follower must end with every stream entry once, in stream order.
"""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest

from redis_ws_client.client import GatewayClient
from tests.support.wait import eventually

from .clients import (
    DurableFollower,
    Publisher,
    offset_key,
    replay_all,
    wait_all,
)
from .topology import Connections, LocalTopology, Topology

pytestmark = pytest.mark.e2e

CLOSE_SERVICE_RESTART = 1012


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def start_followers(topology: Topology, channel: str, n: int) -> list[DurableFollower]:
    followers = [DurableFollower(topology.ws_url, channel, f"c{i}").start() for i in range(n)]
    await wait_all([f.connected for f in followers], 30)
    return followers


async def settled_connections(
    topology: Topology, expected: int, timeout: float = 15
) -> dict[str, Connections]:
    """Per-replica connections once they add up to ``expected``: the gateway
    side learns of a close a moment after the client."""

    async def settled() -> dict[str, Connections]:
        conns = await topology.connections()
        assert sum(c.current for c in conns.values()) == expected, f"found {conns}"
        return conns

    return await eventually(
        settled, timeout=timeout, interval=0.1, what=f"{expected} connections in all"
    )


async def finish_and_check(
    topology: Topology, channel: str, publisher: Publisher, followers: list[DurableFollower]
) -> list[str]:
    """Stops publishing, waits until every follower has the last entry, and
    checks each received exactly the stream: nothing lost, nothing twice."""
    await publisher.stop()
    truth = await replay_all(topology.ws_url, channel)
    direct = await topology.stream_entries(channel)
    if direct is not None:
        assert truth == direct, "a replay through the load balancer differs from XRANGE"
    assert publisher.acked, "nothing was published"
    assert set(publisher.acked) <= set(truth), "an acknowledged publish is not in the stream"
    assert truth == sorted(truth, key=offset_key)
    await asyncio.gather(*(f.wait_for(truth[-1], 30) for f in followers))
    await asyncio.gather(*(f.stop() for f in followers))
    for f in followers:
        assert f.offsets == truth, f.describe_mismatch(truth)
        assert f.incomplete == 0, f"{f.name}: a resume reported complete=false"
        assert f.errors == [], f"{f.name}: {f.errors}"
    return truth


async def test_data_flows_through_the_load_balancer(topology: Topology) -> None:
    plain = unique("e2e:plain:")
    durable = unique("engine:decision:e2e-")
    async with GatewayClient(topology.ws_url) as c:
        reply = await c.subscribe(plain, durable)
        subs = {s["channel"]: s for s in reply["subscriptions"]}
        assert subs[plain]["live"] is True
        assert subs[durable].get("durable") is True, "engine:decision:* is not durable here"

        published = await topology.publish(plain, {"n": 1})
        assert published["receivers"] >= 1
        frame = await c.next_of_type("data", 10)
        assert (frame["channel"], frame["data"]) == (plain, {"n": 1})
        assert "offset" not in frame

        published = await topology.publish(durable, {"n": 2})
        frame = await c.next_of_type("data", 10)
        assert (frame["channel"], frame["data"]) == (durable, {"n": 2})
        assert frame["offset"] == published["offset"]

    # The load balancer passes the credential check through to the gateway.
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{topology.http_url}/publish",
            json={"channel": plain, "data": 1},
            headers={"Authorization": "Bearer not-the-key"},
        ) as resp:
            assert resp.status == 401


async def test_unready_gateway_receives_no_clients(topology: Topology) -> None:
    name = await topology.make_unready()
    clients: list[GatewayClient] = []
    try:
        assert name not in await topology.ready_replicas()
        if isinstance(topology, LocalTopology):
            # The premise: the gateway itself would serve a client; only the
            # load balancer's readiness check keeps them away.
            async with GatewayClient(topology.direct_ws_url(name)) as direct:
                await direct.ping()
        before = await topology.connections()
        clients = list(
            await asyncio.gather(*(GatewayClient(topology.ws_url).connect() for _ in range(20)))
        )
        await asyncio.gather(*(c.ping() for c in clients))
        after = await topology.connections()
    finally:
        await asyncio.gather(*(c.close() for c in clients))
        await topology.remove_unready(name)
    # Totals, not just current counts: not even a short-lived visit.
    assert after[name].total == before[name].total, after
    assert after[name].current == 0, after
    served = sum(after[n].total - before[n].total for n in after if n != name and n in before)
    assert served == 20, after


async def test_rolling_restart_loses_and_repeats_no_durable_message(topology: Topology) -> None:
    await topology.scale(2)
    channel = unique("engine:decision:roll-")
    followers = await start_followers(topology, channel, 20)
    publisher = Publisher(topology, channel).start()
    try:
        await publisher.wait_acked(20)
        await topology.rolling_restart()
        assert len(await topology.ready_replicas()) == 2
        # Publishing went on through the rollout and goes on after it.
        await publisher.wait_acked(len(publisher.acked) + 20)
        await finish_and_check(topology, channel, publisher, followers)
    finally:
        await publisher.stop()
        await asyncio.gather(*(f.stop() for f in followers))
    for f in followers:
        # Every client sat on a gateway that restarted, and was told so.
        assert f.close_codes, f"{f.name} was never moved"
        assert set(f.close_codes) == {CLOSE_SERVICE_RESTART}, f"{f.name}: {f.close_codes}"
    if isinstance(topology, LocalTopology):
        assert all(code == 0 for _, code in topology.exit_codes), topology.exit_codes


async def test_deleted_replica_moves_its_clients_and_loses_nothing(topology: Topology) -> None:
    """A pod deleted under traffic (kubectl delete pod): its clients get 1012,
    reconnect to another replica, and their durable channel resumes."""
    await topology.scale(2)
    channel = unique("engine:decision:del-")
    n = 20
    followers = await start_followers(topology, channel, n)
    publisher = Publisher(topology, channel).start()
    try:
        await publisher.wait_acked(10)
        before = await settled_connections(topology, n)
        victim = max(before, key=lambda name: before[name].current)
        moved = before[victim].current
        assert moved > 0, before
        await topology.delete_replica(victim)
        await wait_all([f.connected for f in followers], 30)
        await publisher.wait_acked(len(publisher.acked) + 10)
        await finish_and_check(topology, channel, publisher, followers)
    finally:
        await publisher.stop()
        await asyncio.gather(*(f.stop() for f in followers))
    reconnected = [f for f in followers if f.close_codes]
    assert len(reconnected) == moved, [f.close_codes for f in followers]
    assert all(f.close_codes == [CLOSE_SERVICE_RESTART] for f in reconnected)
    # Each moved client resumed from the last offset it had, not from zero.
    assert all(len(f.resumes) == 2 and f.resumes[1][0] != "0" for f in reconnected)


async def test_upgrade_rolls_with_clients_connected_and_loses_nothing(
    topology: Topology,
) -> None:
    """``helm upgrade`` to a new image tag on kind: the rollout surges, never
    has fewer ready replicas than it started with nor overdraws the
    PodDisruptionBudget, and every durable follower ends with the whole
    stream exactly once."""
    await topology.scale(2)
    channel = unique("engine:decision:upg-")
    followers = await start_followers(topology, channel, 20)
    publisher = Publisher(topology, channel).start()
    ready_counts: list[int] = []
    budgets: list[tuple[int, int]] = []

    async def sample_ready() -> None:
        while True:
            ready_counts.append(len(await topology.ready_replicas()))
            budget = await topology.disruption_budget()
            if budget is not None:
                budgets.append(budget)
            await asyncio.sleep(0.5)  # samples twice a second for the whole upgrade

    sampler = asyncio.create_task(sample_ready())
    try:
        await publisher.wait_acked(10)
        await topology.upgrade()
        sampler.cancel()
        await publisher.wait_acked(len(publisher.acked) + 10)
        await finish_and_check(topology, channel, publisher, followers)
    finally:
        sampler.cancel()
        await publisher.stop()
        await asyncio.gather(*(f.stop() for f in followers))
    assert ready_counts and min(ready_counts) >= topology.min_ready_during_upgrade, ready_counts
    # The PodDisruptionBudget was never overdrawn while the rollout ran.
    assert all(current >= desired for current, desired in budgets), budgets
    for f in followers:
        assert f.close_codes, f"{f.name} was never moved"
        assert set(f.close_codes) == {CLOSE_SERVICE_RESTART}, f"{f.name}: {f.close_codes}"


async def test_scale_in_moves_clients_and_loses_nothing(topology: Topology) -> None:
    await topology.scale(3)
    channel = unique("engine:decision:in-")
    n = 21
    followers = await start_followers(topology, channel, n)
    publisher = Publisher(topology, channel).start()
    try:
        await publisher.wait_acked(10)
        before = await settled_connections(topology, n)
        _, removed = await topology.scale(2)
        assert len(removed) == 1
        victim = removed[0]
        moved = before[victim].current
        assert moved > 0, f"no client was on {victim}: {before}"
        await wait_all([f.connected for f in followers], 30)
        after = await settled_connections(topology, n)
        assert after.get(victim, Connections(0, 0)).current == 0
        assert victim not in await topology.ready_replicas()
        await publisher.wait_acked(len(publisher.acked) + 10)
        await finish_and_check(topology, channel, publisher, followers)
    finally:
        await publisher.stop()
        await asyncio.gather(*(f.stop() for f in followers))
    # Exactly the clients of the removed replica were moved, each with 1012.
    reconnected = [f for f in followers if f.close_codes]
    assert len(reconnected) == moved, [f.close_codes for f in followers]
    assert all(f.close_codes == [CLOSE_SERVICE_RESTART] for f in reconnected)


async def test_scale_out_rebalances_with_max_connection_age(topology: Topology) -> None:
    await topology.scale(2)
    n = 30
    share = 0.15
    async with topology.max_connection_age(3):
        channel = unique("engine:decision:out-")
        followers = await start_followers(topology, channel, n)
        publisher = Publisher(topology, channel).start()
        try:
            await publisher.wait_acked(10)
            before = await settled_connections(topology, n)
            added, _ = await topology.scale(3)
            assert len(added) == 1
            new = added[0]
            assert new not in before

            async def share_reached() -> bool:
                conns = await topology.connections()
                assert conns[new].current >= share * n, f"{new} has less than {share:.0%}: {conns}"
                return True

            await eventually(share_reached, timeout=30, interval=0.2, what=f"{new}'s share")
            await finish_and_check(topology, channel, publisher, followers)
        finally:
            await publisher.stop()
            await asyncio.gather(*(f.stop() for f in followers))
    for f in followers:
        assert set(f.close_codes) <= {CLOSE_SERVICE_RESTART}, f"{f.name}: {f.close_codes}"
    assert sum(len(f.close_codes) for f in followers) >= n * share
