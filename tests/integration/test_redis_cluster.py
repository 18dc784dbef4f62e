"""Classic pub/sub on a real Redis Cluster (3 masters, 3 replicas): delivery
from any node, a killed node, a manual failover."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from redis_ws_client.client import GatewayClient
from redis_ws_gateway.config import ConfigError, DurableRule, load_settings
from redis_ws_gateway.publish import apublish
from tests.support.cli import run_cli
from tests.support.gateway import RunningGateway, gateway_settings, wait_ready
from tests.support.redis_server import RedisServer
from tests.support.wait import eventually, wait_until

ARTIFACTS = Path(__file__).parents[2] / "artifacts"


CLUSTER_ARGS = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
CLUSTER_ARGS += ["--cluster-node-timeout", "1000"]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def _cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free too, both
    below the kernel's ephemeral range: a port in that range can be taken at
    any moment by an outgoing connection (the nodes' own links to each
    other's buses, for one), which made a node fail to start now and then."""
    high = _ephemeral_low() - 10001
    for _ in range(500):
        port = random.randint(15000, high)
        if {port, port + 10000} & taken:
            continue
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class Cluster:
    def __init__(self) -> None:
        self.nodes: list[RedisServer] = []
        for _ in range(6):
            self.nodes.append(self._node())

    def _node(self) -> RedisServer:
        taken = {p for n in self.nodes for p in (n.port, n.port + 10000)}
        return RedisServer(port=_cluster_port(taken), extra_args=CLUSTER_ARGS)

    def start(self) -> None:
        for i in range(len(self.nodes)):
            for attempt in range(3):
                try:
                    self.nodes[i].start()
                    break
                except RuntimeError:
                    # Lost a port race after all: try another pair.
                    self.nodes[i].stop()
                    if attempt == 2:
                        raise
                    self.nodes[i] = self._node()
        cli = shutil.which("redis-cli")
        assert cli is not None
        subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        wait_until(
            lambda: all("cluster_state:ok" in n.command("cluster", "info") for n in self.nodes),
            timeout=30,
            interval=0.1,
            what="the cluster to converge (cluster_state:ok on every node)",
        )

    def by_port(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()  # also when start failed half-way: no node may outlive the test


@pytest.fixture
async def cluster_gateway(cluster: Cluster) -> AsyncIterator[RunningGateway]:
    gw = RunningGateway(
        gateway_settings(
            "redis://127.0.0.1:1",  # ignored: the cluster nodes are the seeds
            redis_cluster_nodes=tuple(("127.0.0.1", n.port) for n in cluster.nodes),
            api_key="k-cluster-1",
        )
    )
    await gw.start()
    await asyncio.wait_for(gw.server.upstream.connected.wait(), 15)
    yield gw
    await gw.stop()


async def _publish(port: int, channel: str, body: bytes) -> None:
    r = aioredis.from_url(f"redis://127.0.0.1:{port}")
    try:
        await r.publish(channel, body)
    finally:
        await r.aclose()


async def test_classic_pubsub_from_any_node_and_publish_endpoint(
    cluster: Cluster, cluster_gateway: RunningGateway
) -> None:
    gw = cluster_gateway
    connected = gw.server.upstream._connected_to
    assert connected is not None
    others = [n.port for n in cluster.nodes if n.port != connected[1]]
    async with GatewayClient(gw.url) as c:
        await c.subscribe("market:tick:X", "engine:*")
        await _publish(others[0], "market:tick:X", b'{"n":1}')
        await _publish(others[-1], "engine:signal:X", b'{"n":2}')
        frames = [await c.next_of_type("data") for _ in range(2)]
        assert {(f["channel"], f["data"]["n"]) for f in frames} == {
            ("market:tick:X", 1),
            ("engine:signal:X", 2),
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                gw.http + "/publish",
                json={"channel": "market:tick:X", "data": {"n": 3}},
                headers={"Authorization": "Bearer k-cluster-1"},
            ) as resp,
        ):
            assert resp.status == 200
        assert (await c.next_of_type("data"))["data"] == {"n": 3}


async def test_killed_node_moves_the_connection_and_resumes_delivery(
    cluster: Cluster, cluster_gateway: RunningGateway
) -> None:
    gw = cluster_gateway
    connected = gw.server.upstream._connected_to
    assert connected is not None
    async with GatewayClient(gw.url) as c:
        await c.subscribe("market:tick:Y")
        fault = time.monotonic()
        cluster.by_port(connected[1]).kill()
        await c.next_of_type("upstream_lost", timeout=10)
        await c.next_of_type("resubscribed", timeout=20)
        now = gw.server.upstream._connected_to
        assert now is not None and now != connected
        survivor = next(n.port for n in cluster.nodes if n.proc is not None and n.port != now[1])
        await _publish(survivor, "market:tick:Y", b'{"after":"kill"}')
        frame = await c.next_of_type("data", 10)
        recovered = time.monotonic() - fault
        assert frame["data"] == {"after": "kill"} and not c.closed.is_set()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "failover-cluster-node-kill.json").write_text(
        json.dumps(
            {"fault": "cluster node SIGKILL", "seconds_to_first_delivery": round(recovered, 3)}
        )
    )


async def test_manual_cluster_failover_keeps_delivering(
    cluster: Cluster, cluster_gateway: RunningGateway
) -> None:
    gw = cluster_gateway
    async with GatewayClient(gw.url) as c:
        await c.subscribe("market:tick:Z")
        replica = next(n for n in cluster.nodes if "role:slave" in n.command("info", "replication"))
        replica.command("cluster", "failover")
        await eventually(
            lambda: "role:master" in replica.command("info", "replication"),
            timeout=15,
            interval=0.05,
            what="the failover (the replica reporting role:master)",
        )
        await _publish(replica.port, "market:tick:Z", b'{"after":"failover"}')
        frame = await c.next_of_type("data", 10)
        assert frame["data"] == {"after": "failover"}


def test_sharded_channels_need_cluster_nodes() -> None:
    with pytest.raises(ConfigError, match="needs REDIS_CLUSTER_NODES"):
        load_settings({"REDIS_SHARDED_CHANNELS": "market:*"})
    s = load_settings(
        {"REDIS_CLUSTER_NODES": "127.0.0.1:7000", "REDIS_SHARDED_CHANNELS": "market:*, ui:*"}
    )
    assert s.redis_sharded_channels == ("market:*", "ui:*")


# --- sharded pub/sub and durable channels on the cluster ------------------------

SHARDED = "market:shard:*"
DURABLE = "engine:decision:*"


async def _admin(port: int) -> aioredis.Redis:
    return aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True)


async def _slot_owners(port: int) -> dict[int, int]:
    """slot -> port of the master serving it, as node ``port`` sees it."""
    r = await _admin(port)
    try:
        reply = await r.cluster("SLOTS")
    finally:
        await r.aclose()
    owners: dict[int, int] = {}
    for item in reply:
        for slot in range(int(item[0]), int(item[1]) + 1):
            owners[slot] = int(item[2][1])
    return owners


async def _layout(cluster: Cluster) -> tuple[int, dict[int, int], list[int]]:
    """The seed node's port, slot -> master port as it sees it, the masters."""
    seed = cluster.nodes[0].port
    owners = await _slot_owners(seed)
    return seed, owners, sorted(set(owners.values()))


def _name_on(owners: dict[int, int], master: int, template: str, key_prefix: str = "") -> str:
    """The first name from ``template`` whose key (prefix + name) lives on ``master``."""
    for i in range(10_000):
        name = template.format(i)
        if owners[key_slot((key_prefix + name).encode())] == master:
            return name
    raise AssertionError(f"no name for master {master}")


@pytest.fixture
async def sharded_gateway(cluster: Cluster) -> AsyncIterator[RunningGateway]:
    gw = RunningGateway(
        gateway_settings(
            "redis://127.0.0.1:1",
            redis_cluster_nodes=tuple(("127.0.0.1", n.port) for n in cluster.nodes),
            redis_sharded_channels=(SHARDED,),
            durable=(DurableRule(DURABLE),),
            api_key="k-cluster-1",
        )
    )
    await gw.start()
    await wait_ready(gw.http)
    yield gw
    await gw.stop()


async def test_sharded_channels_are_read_from_each_slots_master(
    cluster: Cluster, sharded_gateway: RunningGateway
) -> None:
    gw = sharded_gateway
    seed, owners, masters = await _layout(cluster)
    assert len(masters) == 3
    channels = [_name_on(owners, m, "market:shard:{}") for m in masters]
    rc = aioredis.RedisCluster(host="127.0.0.1", port=seed)
    try:
        async with GatewayClient(gw.url) as c:
            reply = await c.subscribe(*channels)
            assert all(sub["live"] for sub in reply["subscriptions"])
            sharded = gw.server.sharded
            assert sharded is not None
            assert sharded.stats()["nodes"] == [f"127.0.0.1:{m}" for m in masters]
            async with aiohttp.ClientSession() as http, http.get(gw.http + "/metrics") as resp:
                assert "redis_ws_gateway_sharded_connections 3.0" in await resp.text()
            for i, ch in enumerate(channels):
                # SPUBLISH stays on the slot's shard: only its subscribers see it.
                assert await apublish(rc, ch, {"i": i}, sharded=True) == 1
            got = set()
            for _ in channels:
                f = await c.next_of_type("data")
                got.add((f["channel"], f["data"]["i"]))
            assert got == {(ch, i) for i, ch in enumerate(channels)}
            # A classic PUBLISH to a sharded channel does not reach SSUBSCRIBE.
            await rc.publish(channels[0], b'{"classic":1}')
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    gw.http + "/publish",
                    json={"channel": channels[1], "data": {"via": "endpoint"}},
                    headers={"Authorization": "Bearer k-cluster-1"},
                ) as resp,
            ):
                assert resp.status == 200 and (await resp.json())["receivers"] == 1
            frame = await c.next_of_type("data")
            assert (frame["channel"], frame["data"]) == (channels[1], {"via": "endpoint"})
            await c.unsubscribe(*channels)
        await eventually(
            lambda: not sharded.stats()["nodes"],
            timeout=5,
            what="the links to idle masters to close",
        )
    finally:
        await rc.aclose()


async def test_sharded_start_with_a_dead_seed_and_late_subscribers(cluster: Cluster) -> None:
    """One seed is down and only one live node is named: the map comes from
    the node that answers (and the nodes it lists), and a channel on a master
    nobody named is read from that master."""
    dead = _cluster_port(set())
    gw = RunningGateway(
        gateway_settings(
            "redis://127.0.0.1:1",
            redis_cluster_nodes=(("127.0.0.1", dead), ("127.0.0.1", cluster.nodes[0].port)),
            redis_sharded_channels=(SHARDED,),
            api_key="k-cluster-1",
        )
    )
    await gw.start()
    try:
        await wait_ready(gw.http)
        owners = await _slot_owners(cluster.nodes[0].port)
        elsewhere = next(m for m in sorted(set(owners.values())) if m != cluster.nodes[0].port)
        channel = _name_on(owners, elsewhere, "market:shard:D{}")
        async with GatewayClient(gw.url) as c:
            reply = await c.subscribe(channel)
            assert reply["subscriptions"][0]["live"] is True
            rc = aioredis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
            try:
                assert await apublish(rc, channel, {"late": True}, sharded=True) == 1
            finally:
                await rc.aclose()
            assert (await c.next_of_type("data"))["data"] == {"late": True}
    finally:
        await gw.stop()


async def test_cli_publishes_sharded_and_durable_on_the_cluster(
    cluster: Cluster, sharded_gateway: RunningGateway
) -> None:
    seed = f"redis://127.0.0.1:{cluster.nodes[0].port}"
    owners = await _slot_owners(cluster.nodes[0].port)
    other = next(m for m in sorted(set(owners.values())) if m != cluster.nodes[0].port)
    shard = _name_on(owners, other, "market:shard:C{}")
    durable = _name_on(owners, other, "engine:decision:C{}", "stream:")
    async with GatewayClient(sharded_gateway.url) as c:
        await c.subscribe(shard, durable)
        code, out, err = await run_cli(
            "publish", "--redis-url", seed, "--cluster", "--sharded", shard, '{"via":"cli"}'
        )
        assert code == 0, err
        assert out.strip() == f"published to {shard}: 1 Redis subscriber received it"
        frame = await c.next_of_type("data")
        assert (frame["channel"], frame["data"]) == (shard, {"via": "cli"})
        code, out, err = await run_cli(
            "publish", "--redis-url", seed, "--cluster", "--durable", durable, '{"d":1}'
        )
        assert code == 0, err
        frame = await c.next_of_type("data")
        assert (frame["channel"], frame["offset"]) == (durable, out.strip())
    code, _, err = await run_cli("publish", "--sharded", "--durable", durable, "{}")
    assert code == 2 and "--sharded is for pub/sub channels" in err


async def test_durable_channels_on_cluster_replay_and_tail_per_slot(
    cluster: Cluster, sharded_gateway: RunningGateway
) -> None:
    """Streams on different masters: one reader per slot, replay, live."""
    gw = sharded_gateway
    seed, owners, masters = await _layout(cluster)
    channels = [_name_on(owners, m, "engine:decision:{}", "stream:") for m in masters]
    rc = aioredis.RedisCluster(host="127.0.0.1", port=seed)
    try:
        first = {ch: await rc.xadd("stream:" + ch, {"data": b'{"n":0}'}) for ch in channels}
        async with GatewayClient(gw.url) as c:
            reply = await c.request(
                "subscribe", channels=[{"channel": ch, "since": "0"} for ch in channels]
            )
            assert [s["replayed"] for s in reply["subscriptions"]] == [1, 1, 1]
            replayed = {
                f["channel"]: f["offset"] for f in [c.messages.get_nowait() for _ in channels]
            }
            assert replayed == {ch: first[ch].decode() for ch in channels}
            later = {ch: await rc.xadd("stream:" + ch, {"data": b'{"n":1}'}) for ch in channels}
            live = [await c.next_of_type("data") for _ in channels]
            assert {f["channel"]: f["offset"] for f in live} == {
                ch: later[ch].decode() for ch in channels
            }
            assert len(gw.server.durable._groups) == 3  # one XREAD per slot
    finally:
        await rc.aclose()


class _Recorder:
    """Every frame one client receives, with its arrival time."""

    def __init__(self) -> None:
        self.frames: list[tuple[float, dict[str, Any]]] = []

    async def __call__(self, frame: dict[str, Any]) -> bool:
        self.frames.append((time.time(), frame))
        return True

    async def until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        # Polling does not skew the timings: each frame is stamped on arrival.
        await eventually(check, timeout=timeout, what=what)

    def data(self, channel: str) -> list[tuple[float, dict[str, Any]]]:
        return [
            (t, f) for t, f in self.frames if f.get("type") == "data" and f["channel"] == channel
        ]

    def notices(self, kind: str, channel: str) -> list[float]:
        return [
            t
            for t, f in self.frames
            if f.get("type") == kind
            and any(s.get("channel") == channel for s in f.get("subscriptions", []))
        ]


async def _migrate_slot(slot: int, src: int, dst: int, masters: list[int]) -> None:
    """Move ``slot`` and its keys from master ``src`` to master ``dst``, the
    way ``redis-cli --cluster reshard`` does."""
    s, d = await _admin(src), await _admin(dst)
    try:
        src_id, dst_id = await s.cluster("MYID"), await d.cluster("MYID")
        await d.cluster("SETSLOT", slot, "IMPORTING", src_id)
        await s.cluster("SETSLOT", slot, "MIGRATING", dst_id)
        while keys := await s.cluster("GETKEYSINSLOT", slot, 100):
            await s.execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", *keys)
        for port in [dst, src, *(m for m in masters if m not in (src, dst))]:
            r = await _admin(port)
            try:
                await r.cluster("SETSLOT", slot, "NODE", dst_id)
            finally:
                await r.aclose()
    finally:
        await s.aclose()
        await d.aclose()


async def _wait_for_promotion(cluster: Cluster, old_master: int, slot: int, timeout: float) -> int:
    async def new_owner() -> int | None:
        for node in cluster.nodes:
            if node.proc is None:
                continue
            with contextlib.suppress(Exception):
                owner = (await _slot_owners(node.port))[slot]
                if owner != old_master:
                    return owner
        return None

    return await eventually(
        new_owner, timeout=timeout, interval=0.05, what=f"a replica to take over slot {slot}"
    )


@pytest.mark.parametrize("fault", ["cluster-failover", "master-kill", "slot-migration"])
async def test_cluster_fault_keeps_sockets_notifies_and_loses_no_durable_entry(
    cluster: Cluster, sharded_gateway: RunningGateway, fault: str
) -> None:
    """A sharded channel, a durable channel and a classic channel whose data
    live on one master; that master fails over, dies, or gives its slots away
    while publishers keep publishing."""
    gw = sharded_gateway
    seed, owners, masters = await _layout(cluster)
    victim = masters[0]
    shard = _name_on(owners, victim, "market:shard:F{}")
    durable = _name_on(owners, victim, "engine:decision:F{}", "stream:")
    classic = "market:tick:F"
    stream = "stream:" + durable
    rc = aioredis.RedisCluster(host="127.0.0.1", port=seed)
    rec = _Recorder()
    acked: list[str] = []  # durable entries Redis confirmed (with a replica's ack)
    stop = asyncio.Event()

    async def publish_forever(kind: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            body = json.dumps({"n": n, "t": time.time()})
            try:
                if kind == "shard":
                    await asyncio.wait_for(rc.spublish(shard, body), 3)
                elif kind == "classic":
                    await asyncio.wait_for(rc.publish(classic, body), 3)
                else:
                    entry = (await asyncio.wait_for(rc.xadd(stream, {"data": body}), 3)).decode()
                    node = rc.get_node_from_key(stream)
                    if (
                        await asyncio.wait_for(
                            rc.execute_command("WAIT", 1, 1000, target_nodes=node), 3
                        )
                        >= 1
                    ):
                        acked.append(entry)
            except Exception:  # mid-failover: the next attempt goes to the new owner
                pass
            await asyncio.sleep(0.02)  # paces the publisher: one message per 20 ms

    client = GatewayClient(gw.url, on_frame=rec)
    await client.connect()
    publishers: list[asyncio.Task[None]] = []
    try:
        await client.subscribe(shard, classic, durable)
        publishers = [
            asyncio.create_task(publish_forever(k)) for k in ("shard", "classic", "durable")
        ]
        await rec.until(
            lambda: all(rec.data(ch) for ch in (shard, classic, durable)) and len(acked) > 3,
            10,
            "traffic before the fault",
        )
        classic_on = gw.server.upstream._connected_to
        fault_at = time.time()
        if fault == "cluster-failover":
            replica = next(
                n
                for n in cluster.nodes
                if f"master_port:{victim}" in n.command("info", "replication")
            )
            r = await _admin(replica.port)
            try:
                await r.cluster("FAILOVER")
            finally:
                await r.aclose()
            await _wait_for_promotion(cluster, victim, key_slot(shard.encode()), 20)
        elif fault == "master-kill":
            cluster.by_port(victim).kill()
            await _wait_for_promotion(cluster, victim, key_slot(shard.encode()), 20)
        else:
            target = masters[1]
            for slot in {key_slot(shard.encode()), key_slot(stream.encode())}:
                await _migrate_slot(slot, victim, target, masters)
        fault_done = time.time()
        # The sharded subscription was lost and came back, and its client was told.
        await rec.until(lambda: rec.notices("resubscribed", shard), 30, "resubscribed")
        lost, back = rec.notices("upstream_lost", shard), rec.notices("resubscribed", shard)
        assert lost and lost[0] <= back[0], (lost, back)

        def recovered(ch: str) -> bool:
            return any(f["data"]["t"] > max(fault_done, back[0]) for _, f in rec.data(ch))

        await rec.until(
            lambda: all(recovered(ch) for ch in (shard, classic, durable)),
            30,
            "delivery after the fault",
        )
        after = [f for t, f in rec.data(shard) if t > back[0]]
        assert after and after[0]["seq"] == 1  # a new epoch starts at 1
        # The classic channel is affected only when its connection's node died.
        classic_hit = fault == "master-kill" and classic_on == ("127.0.0.1", victim)
        if classic_hit:
            await rec.until(lambda: rec.notices("resubscribed", classic), 30, "classic notice")
        assert bool(rec.notices("upstream_lost", classic)) == classic_hit
        # More durable entries written and delivered after recovery before the
        # publishers stop (acknowledgements may have stopped: a promoted
        # replica has no replica of its own to WAIT for).
        delivered = len(rec.data(durable))
        await rec.until(
            lambda: len(rec.data(durable)) >= delivered + 10,
            15,
            "ten more durable entries delivered after recovery",
        )
        stop.set()
        await asyncio.gather(*publishers)
        last_acked = acked[-1]
        await rec.until(
            lambda: any(f.get("offset") == last_acked for _, f in rec.data(durable)),
            15,
            "the last acknowledged durable entry",
        )
        assert not client.closed.is_set(), "the client socket was closed"
    finally:
        stop.set()
        await asyncio.gather(*publishers, return_exceptions=True)
        await client.close()
        await rc.aclose()

    offsets = [f["offset"] for _, f in rec.data(durable)]
    keys = [tuple(int(x) for x in o.split("-")) for o in offsets]
    assert keys == sorted(set(keys)), "durable entries duplicated or out of order"
    assert set(acked) <= set(offsets), "an acknowledged durable entry was never delivered"
    assert not rec.notices("upstream_lost", durable)  # nothing to tell: nothing missed
    survivor = next(n.port for n in cluster.nodes if n.proc is not None)

    async def stream_entries() -> tuple[list[str]]:
        # Right after a failover a node's slot map may still miss the slots
        # that moved: a client built from it refuses to start until gossip
        # has caught up.
        check = aioredis.RedisCluster(host="127.0.0.1", port=survivor)
        try:
            return ([e[0].decode() for e in await check.xrange(stream, min=offsets[0])],)
        finally:
            await check.aclose()

    (in_stream,) = await eventually(
        stream_entries,
        timeout=30,
        what="a cluster client whose slot map covers every slot",
        ignoring=(RedisClusterException,),
    )
    # No gap: every entry the stream holds from the first delivered one on
    # was delivered (a kill may also have delivered writes the replica lacked).
    assert set(in_stream) <= set(offsets)

    def longest_gap(ch: str) -> float:
        """The longest pause in delivery from the fault on (publishers send
        every 20 ms): how long the channel was dark."""
        times = [t for t, _ in rec.data(ch)]
        before = [t for t in times if t <= fault_at]
        window = ([before[-1]] if before else [fault_at]) + [t for t in times if t > fault_at]
        return max(b - a for a, b in itertools.pairwise(window))

    def resumed_after(ch: str) -> float:
        """From the fault to the first delivery that ended the longest pause."""
        times = [t for t, _ in rec.data(ch)]
        before = [t for t in times if t <= fault_at]
        window = ([before[-1]] if before else [fault_at]) + [t for t in times if t > fault_at]
        gap_end = max(itertools.pairwise(window), key=lambda p: p[1] - p[0])[1]
        return gap_end - fault_at

    report = {
        "fault": fault,
        "fault_seconds": round(fault_done - fault_at, 3),
        "sharded_notice_after_seconds": {
            "upstream_lost": round(lost[0] - fault_at, 3),
            "resubscribed": round(back[0] - fault_at, 3),
        },
        "first_delivery_after_outage_seconds": {
            "sharded": round(resumed_after(shard), 3),
            "durable": round(resumed_after(durable), 3),
            "classic": round(resumed_after(classic), 3),
        },
        "classic_connection_on_failed_master": classic_hit,
        "longest_delivery_gap_seconds": {
            "sharded": round(longest_gap(shard), 3),
            "durable": round(longest_gap(durable), 3),
            "classic": round(longest_gap(classic), 3),
        },
        "durable_entries_delivered": len(offsets),
        "durable_entries_acknowledged": len(acked),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"failover-cluster-{fault}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
