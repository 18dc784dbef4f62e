"""WireBudget: GCRA, one timestamp per connection, against the token bucket
it stands for (the burst at once, then the rate), frames and bytes in one
budget."""

from __future__ import annotations

import pytest

from redis_ws_gateway.security.limits import RESUME_FRAMES, WireBudget


def _frames_until_spent(budget: WireBudget, tat: float, now: float) -> tuple[int, float]:
    n = 0
    while True:
        tat = budget.spend(tat, now, 1)
        n += 1
        if budget.spent(tat, now):
            return n, tat


def test_the_burst_goes_at_once_and_no_more() -> None:
    budget = WireBudget(100, 200, 1 << 20)
    n, _ = _frames_until_spent(budget, 0.0, now=1000.0)
    assert n == 200


def test_after_a_pause_the_rate_refills_it() -> None:
    budget = WireBudget(100, 200, 1 << 20)
    _, tat = _frames_until_spent(budget, 0.0, now=1000.0)
    # One second at 100 frames per second: 100 more.
    n, _ = _frames_until_spent(budget, tat, now=1001.0)
    assert n == 100
    # Idle for long: the whole burst again, never more.
    n, _ = _frames_until_spent(budget, tat, now=2000.0)
    assert n == 200


def test_reading_resumes_when_a_few_frames_are_free() -> None:
    budget = WireBudget(100, 200, 1 << 20)
    _, tat = _frames_until_spent(budget, 0.0, now=1000.0)
    at = budget.resume_at(tat)
    assert at == pytest.approx(1000.0 + RESUME_FRAMES / 100)
    n, _ = _frames_until_spent(budget, tat, now=at)
    assert n == RESUME_FRAMES


def test_bytes_spend_the_same_budget() -> None:
    # 2 s of burst: 200 frames, or 2048 bytes at 1024 per second.
    budget = WireBudget(100, 200, 1024)
    now = 1000.0
    tat = budget.spend(0.0, now, 0, 1024)  # one second's worth of bytes
    n, tat = _frames_until_spent(budget, tat, now)
    assert n == 100
    tat = budget.spend(0.0, now, 0, 4096)  # past the burst: owed, paid back at the rate
    assert budget.spent(tat, now)
    assert budget.resume_at(tat) == pytest.approx(now + 4 - budget.resume_slack)


def test_the_burst_holds_two_messages_of_the_largest_size() -> None:
    budget = WireBudget(100, 10, 1024, max_message=65536)
    tat = budget.spend(0.0, 1000.0, 1, 65536)
    assert not budget.spent(tat, 1000.0)
