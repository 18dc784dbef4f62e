"""Writes to a real uvloop transport whose handle uvloop has closed while
the session has not heard yet (a failed read closes it a callback before
connection_lost()): such a write raises, and it must never escape into the
Redis reader that is routing a message (docs/SECURITY.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from redis_ws_gateway.fanout.hub import Hub
from redis_ws_gateway.fanout.session import Session


class _Principal:
    def may_read(self, name: str) -> bool:
        return True


class _Watch(asyncio.Protocol):
    def __init__(self) -> None:
        self.gone = asyncio.Event()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone.set()


@pytest.fixture
async def closed_transport() -> AsyncIterator[asyncio.Transport]:
    """A connected uvloop transport, aborted and fully closed by the loop,
    as the session's own protocol would not yet know."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, watch = await loop.create_connection(_Watch, "127.0.0.1", port)
    transport.abort()
    async with asyncio.timeout(5):
        await watch.gone.wait()
    yield transport
    server.close()
    await server.wait_closed()


def _session(hub: Hub, transport: Any, closed: list[int]) -> Session:
    return Session(
        "s-1",
        transport,
        _Principal(),  # type: ignore[arg-type]
        "127.0.0.1",
        buffer_limit=1 << 20,
        high_water=0,
        on_dirty=hub.mark_dirty,
        on_lagging=hub.mark_lagging,
        close=lambda session, code, reason: closed.append(code),
    )


async def test_the_premise_a_write_to_the_closed_handle_raises(
    closed_transport: asyncio.Transport,
) -> None:
    with pytest.raises(RuntimeError, match="closed"):
        closed_transport.write(b"x")


async def test_a_batch_for_a_closed_transport_is_dropped_without_raising(
    closed_transport: asyncio.Transport,
) -> None:
    hub = Hub(linger_seconds=1, policies=(), default_policy="drop-oldest", slow_consumer_grace=1)
    session = _session(hub, closed_transport, [])
    hub.on_batch_start()
    session.queue_control(b'{"type": "notice"}')
    session.deliver(b"frame", ("t", b"c"), "drop-oldest")
    hub.on_batch_end()
    assert not session.batch
    session.send_control(b'{"type": "pong"}')
    session.send_replays([b"a", b"b"])


async def test_a_write_that_raises_stops_the_session_writing() -> None:
    class Raising:
        def write(self, data: bytes) -> None:
            raise RuntimeError("unable to perform operation; the handler is closed")

        def is_closing(self) -> bool:
            return False  # the window: closed, and not yet saying so

        def get_write_buffer_size(self) -> int:
            return 0

    hub = Hub(linger_seconds=1, policies=(), default_policy="drop-oldest", slow_consumer_grace=1)
    session = _session(hub, Raising(), [])
    session.send_control(b"{}")
    assert session.closing
