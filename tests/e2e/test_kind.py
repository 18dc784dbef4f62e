"""What only the kind cluster has: a real ingress controller in front of the
Service, and the HPA fed by metrics-server. Run by ``make e2e``; the local
topology has neither, so these tests do not apply to it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest

from redis_ws_client.client import GatewayClient
from tests.support.wait import eventually

from .conftest import TARGET
from .topology import KindTopology, Topology

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(TARGET != "kind", reason="kind only: run by `make e2e`"),
]


def kind(topology: Topology) -> KindTopology:
    assert isinstance(topology, KindTopology)
    return topology


async def test_clients_reach_the_gateway_through_the_ingress_controller(
    topology: Topology,
) -> None:
    k = kind(topology)
    ingress = await k._json("get", "ingress", k.deployment)
    assert ingress["spec"]["ingressClassName"] == "traefik"
    marker = uuid.uuid4().hex
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{k.http_url}/healthz?e2e={marker}") as resp:
            assert resp.status == 200
    async with GatewayClient(k.ws_url) as c:
        await c.ping()
    # Traefik's access log names the request: it, not a port-forward or a
    # NodePort, served it.

    async def logged() -> bool:
        return marker in await k.kubectl("logs", "--namespace", "traefik", "deployment/traefik")

    await eventually(logged, timeout=30, interval=1, what="the request in Traefik's access log")


async def _hpa(k: KindTopology) -> dict[str, Any]:
    hpa: dict[str, Any] = await k._json("get", "hpa", k.deployment)
    return hpa


def _cpu(hpa: dict[str, Any]) -> int | None:
    for metric in hpa.get("status", {}).get("currentMetrics") or []:
        resource = metric.get("resource") or {}
        if resource.get("name") == "cpu":
            value = resource.get("current", {}).get("averageUtilization")
            return int(value) if value is not None else None
    return None


async def test_hpa_scales_the_deployment_out_under_load(topology: Topology) -> None:
    k = kind(topology)
    await k.helm_upgrade("autoscaling.enabled=true")
    stop = asyncio.Event()
    published = 0

    async def load(channel: str) -> None:
        nonlocal published
        async with aiohttp.ClientSession() as http:
            while not stop.is_set():
                async with http.post(
                    f"{k.http_url}/publish",
                    json={"channel": channel, "data": {"pad": "x" * 200}},
                    headers={"Authorization": f"Bearer {k.api_key}"},
                ) as resp:
                    assert resp.status == 200, await resp.text()
                published += 1

    clients: list[GatewayClient] = []
    loaders: list[asyncio.Task[None]] = []
    try:
        hpa = await _hpa(k)
        assert hpa["spec"]["scaleTargetRef"]["name"] == k.deployment
        assert hpa["spec"]["minReplicas"] == 2
        # metrics-server feeds the HPA: a CPU reading appears.

        async def with_cpu() -> dict[str, Any]:
            current = await _hpa(k)
            assert _cpu(current) is not None, f"no CPU metric: {current['status']}"
            return current

        hpa = await eventually(with_cpu, timeout=240, interval=5, what="the HPA's CPU metric")
        channel = f"e2e:load:{uuid.uuid4().hex[:8]}"
        clients = list(
            await asyncio.gather(*(GatewayClient(k.ws_url).connect() for _ in range(40)))
        )
        await asyncio.gather(*(c.subscribe(channel) for c in clients))
        loaders = [asyncio.create_task(load(channel)) for _ in range(6)]

        async def scaled_out() -> dict[str, Any]:
            current = await _hpa(k)
            assert current["status"].get("desiredReplicas", 0) > 2, (
                f"no scale-out after {published} publishes: {current['status']}"
            )
            return current

        hpa = await eventually(scaled_out, timeout=300, interval=5, what="the HPA to scale out")
        print(f"\nHPA: cpu {_cpu(hpa)}%, desired {hpa['status']['desiredReplicas']}")
    finally:
        stop.set()
        await asyncio.gather(*loaders, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in clients))
        await k.helm_upgrade("autoscaling.enabled=false")
        await k.scale(2)
