"""Direct writes: frames to a client's socket past its transport.

uvloop's ``transport.write`` costs as much again as the gateway's own Python
per delivery (W1), so while a client's transport holds nothing for it, its
frames go to the socket's descriptor itself. This module is the one that
does that; when a client may be written directly is its session's decision
(session.py), which knows what its transport holds.

Every direct write passes one guard: a descriptor whose transport is closing
is never written. uvloop closes the descriptor only after marking the
transport closing, and may do so on its own (a failed read) a loop
iteration before the protocol hears of it; by then the number may belong to
a newer connection. ``write_each`` is that guard and write; ``write_one``
is the same for a single client. The loop is Python: a C twin cost less
than the run-to-run spread of ten alternating rounds of W1, W2 and W4
(docs/BENCHMARKS.md, "The C fan-out loop"), so it went (the bench's floor
keeps it, as the least a forwarder can do).

``Recipients`` is a topic's subscribers split by how they are written: the
direct ones get a frame from one ``write_each`` call with no Python per
recipient, and what those calls write is counted once per frame and settled
into each client when it leaves.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

from redis_ws_gateway.config import Policy


class WriteEach(Protocol):
    def __call__(
        self, frame: bytes, fds: list[int], transports: list[Any] | None = None, /
    ) -> list[tuple[int, int]] | None: ...


def write_each(
    frame: bytes, fds: list[int], transports: list[Any] | None = None
) -> list[tuple[int, int]] | None:
    """``frame`` to each of ``fds``: None when every write took the whole
    frame, else (index, written) per other descriptor, with 0 for a full
    socket and -1 for an error or (given ``transports``, one per descriptor)
    a transport that is closing, whose descriptor is not written."""
    if transports is not None and len(transports) != len(fds):
        raise TypeError("as many transports as fds")
    failed: list[tuple[int, int]] | None = None
    size = len(frame)
    write = os.write
    for i, fd in enumerate(fds):
        if transports is not None and transports[i].is_closing():
            done = -1
        else:
            try:
                done = write(fd, frame)
            except (BlockingIOError, InterruptedError):
                done = 0
            except OSError:
                done = -1
        if done != size:
            if failed is None:
                failed = []
            failed.append((i, done))
    return failed


def write_one(fd: int, transport: asyncio.Transport, data: bytes) -> int:
    """``data`` to one client's descriptor: the bytes the kernel took (0: the
    socket is full; -1: it failed, or the transport is closing)."""
    failed = write_each(data, [fd], [transport])
    return len(data) if failed is None else failed[0][1]


def socket_fd(transport: asyncio.BaseTransport) -> int:
    """The descriptor a client's frames may be written to past its
    transport, or -1. Only a plain socket: TLS bytes must go through the
    transport that encrypts them."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("sslcontext") is not None:
        return -1
    return int(sock.fileno())


class Client(Protocol):
    """What direct writes need of a client (session.Session)."""

    fd: int
    direct: bool
    frames_sent: int
    bytes_sent: int

    @property
    def transport(self) -> asyncio.Transport: ...

    def direct_failed(self, data: bytes, done: int) -> None:
        """A direct write the kernel took only ``done`` bytes of (-1: none,
        and none will be taken): the client goes through its transport."""

    def deliver(self, frame: bytes, conflate_key: Any, policy: Policy) -> None:
        """One frame for a client that is not written directly."""


C = TypeVar("C", bound=Client)


class Recipients(Generic[C]):
    """One topic's subscribers, split by ``Client.direct``."""

    __slots__ = (
        "_base",
        "direct",
        "fds",
        "indirect",
        "members",
        "sent_bytes",
        "sent_frames",
        "transports",
    )

    def __init__(self) -> None:
        # Each direct client with (sent_frames, sent_bytes) when it became
        # direct here: the difference is what write() sent it since.
        self.direct: dict[C, tuple[int, int]] = {}
        self.indirect: dict[C, None] = {}
        self.sent_frames = 0
        self.sent_bytes = 0
        # The counters as of the last join, one tuple for every client that
        # joins before the next write: a tuple per client was 64 B of each
        # idle connection (W3).
        self._base = (0, 0)
        # Built from ``direct`` when first needed after it changed.
        self.fds: list[int] | None = None
        self.members: list[C] = []
        self.transports: list[asyncio.Transport] = []

    def add(self, client: C) -> None:
        if client.direct:
            if client not in self.direct:
                self.direct[client] = self._counters()
                self._stale()
        else:
            self.indirect[client] = None

    def remove(self, client: C) -> None:
        self._settle(client, self.direct.pop(client, None))
        self.indirect.pop(client, None)

    def set_direct(self, client: C, on: bool) -> None:
        """``client.direct`` changed: move it to the other side."""
        if on:
            if client in self.indirect:
                del self.indirect[client]
                self.direct[client] = self._counters()
                self._stale()
        elif client in self.direct:
            self._settle(client, self.direct.pop(client))
            self.indirect[client] = None

    def _counters(self) -> tuple[int, int]:
        base = self._base
        if base[0] != self.sent_frames or base[1] != self.sent_bytes:
            base = self._base = (self.sent_frames, self.sent_bytes)
        return base

    def _settle(self, client: C, base: tuple[int, int] | None) -> None:
        if base is not None:
            client.frames_sent += self.sent_frames - base[0]
            client.bytes_sent += self.sent_bytes - base[1]
            self._stale()

    def _stale(self) -> None:
        # The lists go too: they must not keep closed clients and their
        # transports alive until the next write.
        self.fds = None
        self.members = []
        self.transports = []

    def rights_changed(self, client: C, old: Any) -> None:
        """``client``'s principal was replaced (it was ``old``): a topic that
        keeps read decisions must not go on with ``old``'s."""

    def unsettled(self, client: C) -> tuple[int, int]:
        """Frames and bytes write() sent ``client`` and not yet in its own
        counters."""
        base = self.direct.get(client)
        if base is None:
            return 0, 0
        return self.sent_frames - base[0], self.sent_bytes - base[1]

    def targets(self) -> list[int]:
        """The direct clients' descriptors (``members`` and their
        ``transports`` in the same order)."""
        fds = self.fds
        if fds is None:
            self.members = members = list(self.direct)
            self.transports = [c.transport for c in members]
            self.fds = fds = [c.fd for c in members]
        return fds

    def write(
        self,
        write_each: WriteEach,
        data: bytes,
        frames: Sequence[bytes],
        conflate_key: Any,
        policy: Policy,
    ) -> None:
        """``data`` (``frames`` joined) to every direct client in one
        write_each call; then each frame to the others through deliver(),
        after the writes, so that a lagging client's backlog work
        (conflation, limits) never delays those that keep up."""
        fds = self.targets()
        # Taken before the writes: a client whose write fails moves to
        # ``indirect`` with its frames already handled.
        others = list(self.indirect) if self.indirect else None
        self.sent_frames += len(frames)
        self.sent_bytes += len(data)
        if fds:
            failed = write_each(data, fds, self.transports)
            if failed is not None:
                members = self.members
                for i, done in failed:
                    members[i].direct_failed(data, done)
        if others is not None:
            for client in others:
                for frame in frames:
                    client.deliver(frame, conflate_key, policy)
