"""The upstream task must stop when cancelled, even when the cancel lands
just as a connect attempt completes (issue 20: a gateway that could not bind
its port sat silent, because Python 3.11's asyncio.wait_for returns the
finished connect instead of raising CancelledError, and the runner then
waited forever for the upstream task it had cancelled)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from redis_ws_gateway.upstream.pubsub import Upstream


class _Listener:
    def __getattr__(self, _: str) -> Any:
        return lambda *a, **k: None


class _Conn:
    """Stands in for a connection; the loop must never get to use it."""

    def abort(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the cancelled upstream went on to use the connection ({name})")


async def test_a_cancel_that_meets_a_finished_connect_still_stops_the_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream = Upstream(
        "redis://127.0.0.1:1",
        _Listener(),  # type: ignore[arg-type]
        connect_timeout=5.0,
        health_interval=1.0,
        health_timeout=1.0,
        backoff_min=0.1,
        backoff_max=1.0,
    )
    connecting = asyncio.get_running_loop().create_future()
    entered = asyncio.Event()

    async def connect(self: Upstream) -> Any:
        entered.set()
        return await connecting

    monkeypatch.setattr(Upstream, "_connect", connect)
    upstream.start()
    task = upstream._task
    assert task is not None
    await asyncio.wait_for(entered.wait(), 5)
    # In one loop iteration: the connect finishes and the task is cancelled.
    connecting.set_result(_Conn())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert task.cancelled()
    assert not upstream.connected.is_set()
