"""The tests' own wait helper: what it returns, what it reports on timeout."""

from __future__ import annotations

import itertools

import pytest

from tests.support.wait import eventually, wait_until


async def test_eventually_returns_the_first_truthy_value_of_a_sync_or_async_check() -> None:
    counter = itertools.count()
    assert await eventually(lambda: next(counter) >= 3 and "done", interval=0) == "done"

    calls = itertools.count()

    async def ready() -> int:
        n = next(calls)
        return n if n >= 2 else 0

    assert await eventually(ready, interval=0) == 2


async def test_eventually_names_what_it_awaited_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"waiting for the queue to fill; last value: 0"):
        await eventually(lambda: 0, timeout=0.05, what="the queue to fill")


async def test_ignored_errors_are_retried_and_reported_others_propagate() -> None:
    attempts = itertools.count()

    def flaky() -> bool:
        if next(attempts) < 2:
            raise ConnectionRefusedError("not yet")
        return True

    assert await eventually(flaky, ignoring=(OSError,), interval=0)

    def refused() -> bool:
        raise ConnectionRefusedError("never")

    with pytest.raises(AssertionError, match=r"last error: ConnectionRefusedError\('never'\)"):
        await eventually(refused, timeout=0.05, ignoring=(OSError,))
    with pytest.raises(ConnectionRefusedError):
        await eventually(refused, timeout=5)


def test_wait_until_is_the_same_without_a_loop() -> None:
    counter = itertools.count()
    assert wait_until(lambda: next(counter) == 2, interval=0) is True

    def failing() -> None:
        assert 1 + 1 == 3, "arithmetic"

    with pytest.raises(AssertionError, match=r"waiting for sums; last error: AssertionError"):
        wait_until(failing, timeout=0.05, what="sums")
