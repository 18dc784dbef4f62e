from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvloop

from tests.support.gateway import RunningGateway, gateway_settings
from tests.support.redis_server import RedisServer


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    # The gateway runs on uvloop in production; its transports differ from
    # asyncio's in small ways, so the tests run on it too.
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def make_gateway(redis_server: RedisServer) -> AsyncIterator[GatewayFactory]:
    started: list[RunningGateway] = []

    async def factory(**overrides: Any) -> RunningGateway:
        gw = RunningGateway(gateway_settings(redis_server.url, **overrides))
        await gw.start()
        started.append(gw)
        await gw.server.upstream.connected.wait()
        return gw

    yield factory
    for gw in started:
        await gw.stop()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> RunningGateway:
    return await make_gateway()
