"""Run a gateway inside the test's event loop on a free port."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider

from redis_ws_gateway.config import Settings
from redis_ws_gateway.server import Server

from .redis_server import free_port
from .wait import eventually


class RunningGateway:
    def __init__(self, settings: Settings, tracer_provider: TracerProvider | None = None) -> None:
        self.settings = settings
        self.server = Server(settings, tracer_provider)
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.settings.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    async def start(self) -> RunningGateway:
        await self.server.start()
        self.runner = self.server.runner()
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.settings.port)
        await site.start()
        return self

    async def stop(self) -> None:
        self.server.drain_started.set()
        for session in list(self.server.sessions):
            self.server.ws.disconnect(session, 1000, "")
        await self.server.stop()
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


async def wait_ready(http_base: str, timeout: float = 15.0) -> None:
    """Until GET /readyz answers 200."""
    import aiohttp

    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            async with http.get(http_base + "/readyz") as resp:
                return resp.status == 200

        await eventually(
            ready,
            timeout=timeout,
            interval=0.05,
            what=f"gateway at {http_base} to be ready",
            ignoring=(aiohttp.ClientConnectionError,),
        )


async def spawn_gateway(
    redis_url: str,
    port: int,
    *,
    stderr: Any = None,
    ready: bool = True,
    nofile: int | None = None,
    **env: str,
) -> Any:
    """A gateway as its own process (`python -m redis_ws_gateway serve`), for
    what only a process shows: signals, kills, logs, memory. Extra settings
    as env; ``nofile``: its open-file limit (soft and hard)."""
    import asyncio
    import os
    import resource
    import sys

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    full_env = dict(
        os.environ,
        REDIS_URL=redis_url,
        REDIS_WS_GATEWAY_HOST="127.0.0.1",
        REDIS_WS_GATEWAY_PORT=str(port),
        LOG_FORMAT="json",
        **env,
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "redis_ws_gateway", "serve", env=full_env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL if stderr is None else stderr,
        preexec_fn=limit_files if nofile is not None else None,
    )  # fmt: skip
    if ready:
        try:
            await wait_ready(f"http://127.0.0.1:{port}")
        except BaseException:  # not ready in time, or the test was cancelled
            proc.kill()
            await proc.wait()
            raise
    return proc
