"""The built image as Kubernetes runs it: read-only root filesystem, non-root,
every capability dropped, against a real redis-server. Data reaches
WebSocket subscribers, and SIGTERM drains every client with 1012 and exits 0
within the pod's grace period as the chart computes it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from redis_ws_client.client import GatewayClient
from tests.support.redis_server import RedisServer, free_port
from tests.support.wait import eventually

from .conftest import REPO, Docker

pytestmark = pytest.mark.timeout(1800)

CLIENTS = 5


@dataclass(frozen=True)
class Shutdown:
    """What the chart renders for a pod's shutdown (k8s/values-kind.yaml's
    short timeline): the gateway's env and the pod's grace period."""

    drain_window: str
    shutdown_timeout: str
    grace_period: int
    prestop_sleep: int

    @property
    def budget(self) -> int:
        # SIGTERM arrives after the preStop hook; the kubelet's SIGKILL comes
        # terminationGracePeriodSeconds after the hook started.
        return self.grace_period - self.prestop_sleep


def _chart_shutdown() -> Shutdown:
    from tests.chart.test_chart import _find_helm

    helm = _find_helm()
    if helm is None:
        pytest.fail("helm not found: run scripts/setup.sh (builds .tools/bin/helm)")
    out = subprocess.run(
        [helm, "template", "gw", str(REPO / "chart"), "-f", str(REPO / "k8s/values-kind.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    config = next(
        d for d in docs if d["kind"] == "ConfigMap" and "DRAIN_WINDOW_SECONDS" in d.get("data", {})
    )
    deployment = next(
        d
        for d in docs
        if d["kind"] == "Deployment"
        and d["metadata"]["labels"].get("app.kubernetes.io/component") == "gateway"
    )
    pod = deployment["spec"]["template"]["spec"]
    gateway = next(c for c in pod["containers"] if c["name"] == "gateway")
    prestop = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep", prestop
    return Shutdown(
        drain_window=config["data"]["DRAIN_WINDOW_SECONDS"],
        shutdown_timeout=config["data"]["SHUTDOWN_TIMEOUT_SECONDS"],
        grace_period=int(pod["terminationGracePeriodSeconds"]),
        prestop_sleep=int(prestop[1]),
    )


@dataclass
class Container:
    docker: Docker
    name: str
    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inspect(self) -> dict[str, Any]:
        info: list[dict[str, Any]] = json.loads(self.docker.run("inspect", self.name))
        return info[0]

    def logs(self) -> str:
        proc = self.docker.result("logs", self.name, timeout=30)
        return proc.stdout + proc.stderr


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def shutdown() -> Shutdown:
    return _chart_shutdown()


@pytest.fixture
def container(
    docker: Docker, gateway_image: str, redis_server: RedisServer, shutdown: Shutdown
) -> Iterator[Container]:
    port = free_port()
    name = f"rwg-smoke-{uuid.uuid4().hex[:8]}"
    docker.run(
        "run",
        "--detach",
        "--name",
        name,
        # As the chart's securityContext and volumes have it.
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        # The test's redis-server listens on the host's loopback.
        "--network",
        "host",
        "--env",
        f"REDIS_URL={redis_server.url}",
        "--env",
        "REDIS_WS_GATEWAY_HOST=127.0.0.1",
        "--env",
        f"REDIS_WS_GATEWAY_PORT={port}",
        "--env",
        f"DRAIN_WINDOW_SECONDS={shutdown.drain_window}",
        "--env",
        f"SHUTDOWN_TIMEOUT_SECONDS={shutdown.shutdown_timeout}",
        "--env",
        "LOG_FORMAT=json",
        gateway_image,
    )
    c = Container(docker, name, port)
    try:
        yield c
    finally:
        print(f"\n--- {name} logs ---\n{c.logs()[-4000:]}")
        docker.run("rm", "--force", name, check=False)


async def _ready(c: Container) -> None:
    """Until /readyz answers 200; a container that exits fails at once."""

    async def ready() -> bool:
        state = (await asyncio.to_thread(c.inspect))["State"]
        if not state["Running"]:
            raise ContainerExited(f"container exited: {state}")
        async with aiohttp.ClientSession() as http, http.get(c.http + "/readyz") as resp:
            return resp.status == 200

    try:
        await eventually(
            ready,
            timeout=60,
            interval=0.25,
            what=f"{c.http}/readyz to answer 200",
            ignoring=(aiohttp.ClientConnectionError,),
        )
    except (AssertionError, ContainerExited) as exc:
        logs = await asyncio.to_thread(c.logs)
        raise AssertionError(f"container not ready: {exc}\n{logs[-3000:]}") from None


class ContainerExited(Exception):
    pass


async def test_image_runs_locked_down_and_drains_on_sigterm(
    container: Container, redis_server: RedisServer, shutdown: Shutdown
) -> None:
    await _ready(container)

    config = (await asyncio.to_thread(container.inspect))["HostConfig"]
    assert config["ReadonlyRootfs"] is True
    assert config["CapDrop"] == ["ALL"]
    # Every process in the container (tini and the gateway) runs as the
    # image's numeric user with no effective capabilities.
    status = await asyncio.to_thread(
        container.docker.run,
        "exec",
        container.name,
        "sh",
        "-c",
        "grep -H -E '^(Uid|CapEff):' /proc/[0-9]*/status",
    )
    uids = {line.split()[1] for line in status.splitlines() if ":Uid:" in line}
    caps = {line.split()[1] for line in status.splitlines() if ":CapEff:" in line}
    assert uids == {"10001"}, status
    assert caps == {"0000000000000000"}, status
    denied = await asyncio.to_thread(
        container.docker.result, "exec", container.name, "touch", "/opt/venv/written"
    )
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr

    url = f"ws://127.0.0.1:{container.port}/ws"
    clients = list(await asyncio.gather(*(GatewayClient(url).connect() for _ in range(CLIENTS))))
    try:
        await asyncio.gather(*(c.subscribe("market:tick:SMOKE") for c in clients))
        redis = aioredis.from_url(redis_server.url)
        try:
            receivers = await redis.publish("market:tick:SMOKE", json.dumps({"ltp": 23450.5}))
        finally:
            await redis.aclose()
        assert receivers == 1  # one upstream subscription shared by all clients
        for c in clients:
            frame = await c.next_of_type("data", timeout=10)
            assert frame["channel"] == "market:tick:SMOKE"
            assert frame["data"] == {"ltp": 23450.5}

        sent = time.monotonic()
        await asyncio.to_thread(container.docker.run, "kill", "--signal", "TERM", container.name)
        await asyncio.wait_for(asyncio.gather(*(c.closed.wait() for c in clients)), shutdown.budget)
        left = shutdown.budget - (time.monotonic() - sent)
        exit_code = await asyncio.to_thread(
            container.docker.run, "wait", container.name, timeout=max(left, 0.1)
        )
        exited = time.monotonic() - sent
    finally:
        for c in clients:
            await c.close()

    assert [c.close_code for c in clients] == [1012] * CLIENTS
    assert int(exit_code) == 0, f"exit code {exit_code.strip()}"
    assert exited < shutdown.budget, f"exited {exited:.1f}s after SIGTERM"
    events = [json.loads(line) for line in container.logs().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "listening" for e in events), "no JSON 'listening' log line"
