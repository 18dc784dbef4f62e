"""Run a gateway inside the test's event loop on a free port."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider

from redis_ws_gateway.app import Gateway
from redis_ws_gateway.config import Settings

from .redis_server import free_port


class RunningGateway:
    def __init__(self, settings: Settings, tracer_provider: TracerProvider | None = None) -> None:
        self.settings = settings
        self.gateway = Gateway(settings, tracer_provider)
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.settings.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    async def start(self) -> RunningGateway:
        await self.gateway.start()
        self.runner = web.AppRunner(self.gateway.build_app(), handle_signals=False, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.settings.port)
        await site.start()
        return self

    async def stop(self) -> None:
        self.gateway.draining = True
        for ws in list(self.gateway.sessions.values()):
            await ws.close()
        await self.gateway.stop()
        if self.runner is not None:
            await self.runner.cleanup()


def gateway_settings(redis_url: str, **overrides: Any) -> Settings:
    base = Settings(
        host="127.0.0.1",
        port=free_port(),
        redis_url=redis_url,
        unsubscribe_linger_seconds=0.2,
        redis_health_check_interval_seconds=0.2,
        redis_health_check_timeout_seconds=0.6,
        redis_reconnect_min_seconds=0.05,
        redis_reconnect_max_seconds=0.5,
        redis_connect_timeout_seconds=1.0,
        log_format="console",
    )
    return dataclasses.replace(base, **overrides)
