"""Per-connection rate limits and per-pod connection caps. Pure logic."""

from __future__ import annotations

import time
from collections import Counter


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens", "rejected")

    def __init__(self, rate: float, burst: int, now: float | None = None) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic() if now is None else now
        self.rejected = 0

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.rejected += 1
        return False


class ConnectionCounter:
    """Open connections in total, per client address and per user.

    Anonymous connections are not counted per user: they all share one name.
    """

    def __init__(self, max_total: int, max_per_ip: int, max_per_user: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.max_per_user = max_per_user
        self.total = 0
        self._ips: Counter[str] = Counter()
        self._users: Counter[str] = Counter()

    def refusal(self, ip: str | None, user: str | None) -> str | None:
        """Why one more connection from ``ip``/``user`` is refused, or None.
        ``ip`` None: the connection is already counted, only the user is new."""
        if ip is not None and self.total >= self.max_total:
            return "too many connections on this gateway"
        if ip is not None and self.max_per_ip and self._ips[ip] >= self.max_per_ip:
            return "too many connections from this address"
        if user is not None and self.max_per_user and self._users[user] >= self.max_per_user:
            return "too many connections for this user"
        return None

    def add(self, ip: str, user: str | None) -> None:
        self.total += 1
        self._ips[ip] += 1
        if user is not None:
            self._users[user] += 1

    def move_user(self, old: str | None, new: str | None) -> None:
        if old is not None:
            self._users[old] -= 1
            if self._users[old] <= 0:
                del self._users[old]
        if new is not None:
            self._users[new] += 1

    def remove(self, ip: str, user: str | None) -> None:
        self.total -= 1
        self._ips[ip] -= 1
        if self._ips[ip] <= 0:
            del self._ips[ip]
        if user is not None:
            self._users[user] -= 1
            if self._users[user] <= 0:
                del self._users[user]


def pattern_metachars(pattern: str) -> int:
    return sum(pattern.count(c) for c in "*?[")
