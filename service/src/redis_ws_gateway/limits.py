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
# are in the bucket again.
RESUME_FRAMES = 10


class WireBudget:
    """What one client may send: ``frames`` frames and ``rate_bytes`` bytes
    per second, with a burst of ``burst_frames`` and ``burst_bytes``.

    Spending may run into debt (a read's bytes are known only once read);
    the connection pauses reading until the debt is paid back."""

    __slots__ = (
        "_burst_bytes",
        "_burst_frames",
        "_bytes",
        "_frames",
        "_last",
        "_rate",
        "_rate_bytes",
    )

    def __init__(
        self,
        rate_frames: float,
        burst_frames: int,
        rate_bytes: float,
        burst_bytes: int,
        now: float | None = None,
    ) -> None:
        self._rate = rate_frames
        self._burst_frames = float(burst_frames)
        self._rate_bytes = rate_bytes
        self._burst_bytes = float(burst_bytes)
        self._frames = float(burst_frames)
        self._bytes = float(burst_bytes)
        self._last = time.monotonic() if now is None else now

    def _refill(self, now: float | None) -> None:
        now = time.monotonic() if now is None else now
        elapsed = now - self._last
        if elapsed > 0:
            self._last = now
            self._frames = min(self._burst_frames, self._frames + elapsed * self._rate)
            self._bytes = min(self._burst_bytes, self._bytes + elapsed * self._rate_bytes)

    def take_frame(self, now: float | None = None) -> bool:
        """Spend one frame; False when nothing is left for the next one."""
        self._refill(now)
        self._frames -= 1.0
        return self._frames >= 1.0

    def spend_bytes(self, n: int, now: float | None = None) -> None:
        self._refill(now)
        self._bytes -= n

    def in_debt(self, now: float | None = None) -> bool:
        self._refill(now)
        return self._frames < 1.0 or self._bytes < 0.0

    def wait_seconds(self) -> float:
        """How long until a few frames can be read and no bytes are owed:
        a resume per frame would cost a timer per frame."""
        want = min(self._burst_frames, RESUME_FRAMES)
        frames = max(0.0, want - self._frames) / self._rate
        size = max(0.0, -self._bytes) / self._rate_bytes
        return max(0.005, frames, size)


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
