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
    bytes per second, with bursts of ``burst_frames`` and ``burst_bytes``.

    One object holds the limits for every connection. A connection keeps
    just two numbers, the theoretical arrival times of GCRA (the generic
    cell rate algorithm: a token bucket as one timestamp): the time at which
    its frames, and its bytes, would be paid off at the allowed rate. A
    client is within its budget while those lie less than the burst's worth
    of time ahead of now. Two floats rather than a bucket object keep an
    idle connection small (docs/BENCHMARKS.md, W3)."""

    __slots__ = ("byte_cost", "byte_slack", "frame_cost", "frame_slack", "resume_slack")

    def __init__(
        self, rate_frames: float, burst_frames: int, rate_bytes: float, burst_bytes: int
    ) -> None:
        self.frame_cost = 1.0 / rate_frames
        self.frame_slack = burst_frames / rate_frames
        self.byte_cost = 1.0 / rate_bytes
        self.byte_slack = burst_bytes / rate_bytes
        self.resume_slack = self.frame_slack - min(burst_frames, RESUME_FRAMES) * self.frame_cost

    def after_frame(self, tat: float, now: float) -> float:
        return (tat if tat > now else now) + self.frame_cost

    def after_bytes(self, tat: float, now: float, n: int) -> float:
        return (tat if tat > now else now) + n * self.byte_cost

    def spent(self, frames_tat: float, bytes_tat: float, now: float) -> bool:
        """No room for one more frame, or bytes owed."""
        return (
            frames_tat + self.frame_cost - now > self.frame_slack
            or bytes_tat - now > self.byte_slack
        )

    def resume_at(self, frames_tat: float, bytes_tat: float) -> float:
        """When a few frames may be read again and no bytes are owed."""
        return max(frames_tat - self.resume_slack, bytes_tat - self.byte_slack)


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
