"""Waiting for a condition in tests, bounded, without sleeping blind.

    await eventually(lambda: session.closing, what="the session to close")
    reply = await eventually(fetch_status, what="/readyz to answer", ignoring=(OSError,))
    wait_until(lambda: "cluster_state:ok" in node.info(), timeout=30, what="the cluster")

``check`` is polled every ``interval`` seconds until it returns a truthy
value, which is returned. It may be a plain callable or (for ``eventually``)
one returning an awaitable. An exception of a type in ``ignoring`` counts as
"not yet"; any other propagates at once, so a check can also fail fast
(a process that exited, say). On timeout an ``AssertionError`` names what
was awaited and the last value or exception seen.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
DEFAULT_INTERVAL = 0.02


class _Nothing:
    def __repr__(self) -> str:
        return "nothing (never checked)"


_NOTHING: Any = _Nothing()


def _timed_out(what: str, timeout: float, last: Any, error: str | None) -> AssertionError:
    seen = f"last error: {error}" if error is not None else f"last value: {last!r}"
    return AssertionError(f"timed out after {timeout:g} s waiting for {what}; {seen}")


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = DEFAULT_INTERVAL,
    what: str = "the condition",
    ignoring: tuple[type[BaseException], ...] = (AssertionError,),
) -> T:
    """The first truthy result of ``check`` (sync or async), polled every
    ``interval`` s for at most ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = _NOTHING
    # Only the text: an exception would keep its frames (sockets and all) alive.
    error: str | None = None
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
        except ignoring as exc:
            error = repr(exc)
        else:
            if value:
                return value  # type: ignore[return-value]
            last, error = value, None
        left = deadline - loop.time()
        if left <= 0:
            raise _timed_out(what, timeout, last, error)
        await asyncio.sleep(min(interval, left))


def wait_until(
    check: Callable[[], T],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = DEFAULT_INTERVAL,
    what: str = "the condition",
    ignoring: tuple[type[BaseException], ...] = (AssertionError,),
) -> T:
    """``eventually`` for code without an event loop (fixtures, threads)."""
    deadline = time.monotonic() + timeout
    last: Any = _NOTHING
    # Only the text: an exception would keep its frames (sockets and all) alive.
    error: str | None = None
    while True:
        try:
            value = check()
        except ignoring as exc:
            error = repr(exc)
        else:
            if value:
                return value
            last, error = value, None
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timed_out(what, timeout, last, error)
        time.sleep(min(interval, left))
