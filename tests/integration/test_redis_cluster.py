"""Classic pub/sub on a real Redis Cluster (3 masters, 3 replicas): delivery
from any node, a killed node, a manual failover."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from redis_ws_gateway.client import GatewayClient
from redis_ws_gateway.config import ConfigError, DurableRule, load_settings
from tests.support.gateway import RunningGateway, gateway_settings
from tests.support.redis_server import RedisServer, free_port

ARTIFACTS = Path(__file__).parents[2] / "artifacts"


CLUSTER_ARGS = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
CLUSTER_ARGS += ["--cluster-node-timeout", "1000"]


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class Cluster:
    def __init__(self) -> None:
        self.nodes = [RedisServer(port=_cluster_port(), extra_args=CLUSTER_ARGS) for _ in range(6)]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        assert cli is not None
        subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in n.command("cluster", "info") for n in self.nodes):
                return
            time.sleep(0.1)
        raise TimeoutError("cluster did not converge")

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
    await asyncio.wait_for(gw.gateway.upstream.connected.wait(), 15)
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
    connected = gw.gateway.upstream._connected_to
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
    connected = gw.gateway.upstream._connected_to
    assert connected is not None
    async with GatewayClient(gw.url) as c:
        await c.subscribe("market:tick:Y")
        fault = time.monotonic()
        cluster.by_port(connected[1]).kill()
        await c.next_of_type("upstream_lost", timeout=10)
        await c.next_of_type("resubscribed", timeout=20)
        now = gw.gateway.upstream._connected_to
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
        deadline = time.monotonic() + 15
        while "role:master" not in replica.command("info", "replication"):
            assert time.monotonic() < deadline, "failover did not happen"
            await asyncio.sleep(0.05)
        await _publish(replica.port, "market:tick:Z", b'{"after":"failover"}')
        frame = await c.next_of_type("data", 10)
        assert frame["data"] == {"after": "failover"}


def test_durable_channels_on_cluster_are_refused_clearly(tmp_path: Path) -> None:
    f = tmp_path / "gw.yaml"
    f.write_text("durable:\n  - {pattern: 'engine:decision:*'}\n")
    with pytest.raises(ConfigError, match="not supported on Redis Cluster"):
        load_settings({"REDIS_CLUSTER_NODES": "127.0.0.1:7000", "REDIS_WS_GATEWAY_CONFIG": str(f)})
    assert DurableRule("x").pattern == "x"
