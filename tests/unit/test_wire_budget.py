"""WireBudget: GCRA, one timestamp per connection, against the token bucket
it stands for (burst at once, then the rate)."""

from __future__ import annotations

import pytest

from redis_ws_gateway.limits import RESUME_FRAMES, WireBudget


def _frames_until_spent(budget: WireBudget, tat: float, now: float) -> tuple[int, float]:
    n = 0
    while True:
        tat = budget.after_frame(tat, now)
        n += 1
        if budget.spent(tat, 0.0, now):
            return n, tat


def test_the_burst_goes_at_once_and_no_more() -> None:
    budget = WireBudget(100, 200, 1 << 20, 1 << 20)
    n, _ = _frames_until_spent(budget, 0.0, now=1000.0)
    assert n == 200


def test_after_a_pause_the_rate_refills_it() -> None:
    budget = WireBudget(100, 200, 1 << 20, 1 << 20)
    _, tat = _frames_until_spent(budget, 0.0, now=1000.0)
    # One second at 100 frames per second: 100 more.
    n, _ = _frames_until_spent(budget, tat, now=1001.0)
    assert n == 100
    # Idle for long: the whole burst again, never more.
    n, _ = _frames_until_spent(budget, tat, now=2000.0)
    assert n == 200


def test_reading_resumes_when_a_few_frames_are_free() -> None:
    budget = WireBudget(100, 200, 1 << 20, 1 << 20)
    _, tat = _frames_until_spent(budget, 0.0, now=1000.0)
    at = budget.resume_at(tat, 0.0)
    assert at == pytest.approx(1000.0 + RESUME_FRAMES / 100)
    n, _ = _frames_until_spent(budget, tat, now=at)
    assert n == RESUME_FRAMES


@pytest.mark.parametrize(("size", "owed"), [(1000, False), (2048, False), (2049, True)])
def test_bytes_past_the_burst_are_owed(size: int, owed: bool) -> None:
    budget = WireBudget(100, 200, 1024, 2048)
    tat = budget.after_bytes(0.0, 1000.0, size)
    assert budget.spent(0.0, tat, 1000.0) is owed
    if owed:
        # Paid back at 1024 bytes per second.
        assert budget.resume_at(0.0, tat) == pytest.approx(1000.0 + (size - 2048) / 1024)
