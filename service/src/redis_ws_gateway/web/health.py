"""Probes and the scrape: /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from redis_ws_gateway.upstream.pubsub import Upstream
from redis_ws_gateway.upstream.sharded import ShardedUpstream


class Health:
    def __init__(
        self,
        upstream: Upstream,
        sharded: ShardedUpstream | None,
        draining: asyncio.Event,
        registry: CollectorRegistry,
    ) -> None:
        self._upstream = upstream
        self._sharded = sharded
        self._draining = draining
        self._registry = registry

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, _: web.Request) -> web.Response:
        if self._draining.is_set():
            return web.json_response({"ready": False, "reason": "draining"}, status=503)
        if not self._upstream.is_up:
            return web.json_response({"ready": False, "reason": "redis unreachable"}, status=503)
        if self._sharded is not None and not self._sharded.ready:
            return web.json_response(
                {"ready": False, "reason": "cluster slot map not read yet"}, status=503
            )
        return web.json_response({"ready": True})

    async def metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
