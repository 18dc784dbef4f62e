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


# Reading resumes once this many frames (or the whole burst, if smaller)
# may be read again: a resume per frame would cost a timer per frame.
RESUME_FRAMES = 10


class WireBudget:
    """What one client may send: ``rate_frames`` frames and ``rate_bytes``
    bytes per second, in one budget: a frame costs 1/``rate_frames`` seconds
    of it and a byte 1/``rate_bytes``, and at most ``burst_frames`` frames'
    worth of time (no less than two ``max_message`` bytes' worth) may be
    spent ahead.

    One object holds the limits for every connection. A connection keeps a
    single number, the theoretical arrival time of GCRA (the generic cell
    rate algorithm: a token bucket as one timestamp): when what it has sent
    would be paid off at the allowed rates. It is within its budget while
    that lies less than the burst ahead of now. One float instead of a bucket
    object keeps an idle connection small (docs/BENCHMARKS.md, W3)."""

    __slots__ = ("byte_cost", "frame_cost", "resume_slack", "slack")

    def __init__(
        self, rate_frames: float, burst_frames: int, rate_bytes: float, max_message: int = 0
    ) -> None:
        self.frame_cost = 1.0 / rate_frames
        self.byte_cost = 1.0 / rate_bytes
        self.slack = max(burst_frames * self.frame_cost, 2 * max_message * self.byte_cost)
        self.resume_slack = self.slack - min(burst_frames, RESUME_FRAMES) * self.frame_cost

    def spend(self, tat: float, now: float, frames: int, size: int = 0) -> float:
        """The arrival time after ``frames`` frames and ``size`` bytes."""
        return (tat if tat > now else now) + frames * self.frame_cost + size * self.byte_cost

    def spent(self, tat: float, now: float) -> bool:
        """No room for one more frame."""
        return tat + self.frame_cost - now > self.slack

    def resume_at(self, tat: float) -> float:
        """When a few frames may be read again."""
        return tat - self.resume_slack


class ConnectionCounter:
    """Open sockets in total, per client address and per user.

    A socket counts from the moment it is accepted: a handshake in progress
    holds a descriptor as much as an open WebSocket does, so it counts toward
    the same caps (a slowloris client cannot open sockets past them). Sockets
    not yet upgraded are also *pending*, with caps of their own.

    Anonymous connections are not counted per user: they all share one name.
    An address of None: the socket's peer is a trusted proxy, so the client's
    address is known only from the request (then it is counted at upgrade).
    """

    def __init__(
        self,
        max_total: int,
        max_per_ip: int,
        max_per_user: int,
        max_pending: int = 0,
        max_pending_per_ip: int = 0,
    ) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.max_per_user = max_per_user
        self.max_pending = max_pending
        self.max_pending_per_ip = max_pending_per_ip
        self.total = 0
        self.pending = 0
        self._ips: Counter[str] = Counter()
        self._pending_ips: Counter[str] = Counter()
        self._users: Counter[str] = Counter()

    def admit(self, ip: str | None) -> str | None:
        """A socket was accepted: why it is refused, or None (then it is
        counted as pending until ``upgraded`` or ``closed``)."""
        if self.max_pending and self.pending >= self.max_pending:
            return "too many handshakes in progress"
        # Past MAX_CONNECTIONS only health checks and other plain requests
        # get in (their upgrade is refused): the pending cap bounds them.
        if self.total >= self.max_total + self.max_pending:
            return "too many connections on this gateway"
        if ip is not None:
            if self.max_per_ip and self._ips[ip] >= self.max_per_ip:
                return "too many connections from this address"
            if self.max_pending_per_ip and self._pending_ips[ip] >= self.max_pending_per_ip:
                return "too many handshakes from this address"
            self._ips[ip] += 1
            self._pending_ips[ip] += 1
        self.total += 1
        self.pending += 1
        return None

    def upgrade_refusal(self, sock_ip: str | None, ip: str, user: str | None) -> str | None:
        """Why a counted pending socket from ``sock_ip`` may not become a
        WebSocket of client ``ip`` and ``user``, or None."""
        if self.total - 1 >= self.max_total:
            return "too many connections on this gateway"
        if self.max_per_ip and self._ips[ip] - (ip == sock_ip) >= self.max_per_ip:
            return "too many connections from this address"
        return self.user_refusal(user)

    def user_refusal(self, user: str | None) -> str | None:
        if user is not None and self.max_per_user and self._users[user] >= self.max_per_user:
            return "too many connections for this user"
        return None

    def upgraded(self, sock_ip: str | None, ip: str, user: str | None) -> None:
        self._unpend(sock_ip)
        self._move(self._ips, sock_ip, ip)
        self._move(self._users, None, user)

    def closed(self, ip: str | None, user: str | None, *, pending: bool = False) -> None:
        if pending:
            self._unpend(ip)
        self.total -= 1
        self._move(self._ips, ip, None)
        self._move(self._users, user, None)

    def move_user(self, old: str | None, new: str | None) -> None:
        self._move(self._users, old, new)

    def _unpend(self, ip: str | None) -> None:
        self.pending -= 1
        self._move(self._pending_ips, ip, None)

    @staticmethod
    def _move(counter: Counter[str], old: str | None, new: str | None) -> None:
        if old == new:
            return
        if old is not None:
            counter[old] -= 1
            if counter[old] <= 0:
                del counter[old]
        if new is not None:
            counter[new] += 1


def pattern_metachars(pattern: str) -> int:
    return sum(pattern.count(c) for c in "*?[")
