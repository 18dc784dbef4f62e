"""One client connection: its subscriptions and its bounded outbound buffer.

While the transport holds nothing for the client, the session is *direct*:
frames go to the socket itself, past uvloop's transport (writer.py). The
first write the kernel does not take whole hands its rest to the transport,
and from then on every write goes through the transport, in order, until a
write finds the transport's buffer empty again. Frames routed in one
upstream read are joined into one write.

Once the transport's own buffer passes the high-water mark (the transport
calls the connection's pause_writing()), the session is *lagging*: new frames
go to a backlog bounded in bytes where each channel's policy applies
(conflate, drop-oldest, disconnect), and the backlog is written out when the
transport has room again (resume_writing(), with the hub's drain loop as the
fallback).

The writes past the transport, and the guard that keeps them off a
descriptor the transport may have closed, are writer.py's; this module
decides when a client is direct. Each topic the session is subscribed to is
kept as its ``Recipients`` (writer.py): the side of the topic that says
which of its subscribers are written directly.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis_ws_gateway.config import Policy
from redis_ws_gateway.fanout.writer import Recipients, write_one
from redis_ws_gateway.ws.protocol import text_frame
from redis_ws_wire import Close

if TYPE_CHECKING:
    from redis_ws_gateway.security.auth import Principal

# The most of a backlog written at once when a lagging client has room again.
DRAIN_CHUNK_BYTES = 65_536

_unique = itertools.count()


class Session:
    __slots__ = (
        "_close_cb",
        "_limit",
        "_on_dirty",
        "_on_lagging",
        "_principal",
        "backlog",
        "backlog_bytes",
        "batch",
        "bytes_sent",
        "closing",
        "conflated",
        "deflate",
        "direct",
        "dropped",
        "fd",
        "frames_sent",
        "held",
        "high_water",
        "id",
        "lag_since",
        "lagging",
        "opened_at",
        "remote",
        "subscriptions",
        "transport",
        "wildcards",
        "writable",
    )

    def __init__(
        self,
        session_id: str,
        transport: asyncio.Transport,
        principal: Principal,
        remote: str,
        *,
        buffer_limit: int,
        high_water: int,
        on_dirty: Callable[[Session], None],
        on_lagging: Callable[[Session], None],
        close: Callable[[Session, int, str], None],
        fd: int = -1,
        deflate: bool = False,
    ) -> None:
        self.id = session_id
        # permessage-deflate was negotiated: data frames from the hub may be
        # compressed ones (RSV1); control frames and replies never are.
        self.deflate = deflate
        self.transport = transport
        # The socket's descriptor for direct writes; -1: always the transport.
        self.fd = fd
        self.direct = False
        self._principal = principal
        self.remote = remote
        self.subscriptions: dict[tuple[str, str], Recipients[Session]] = {}
        self.wildcards = 0
        self.batch: list[bytes] = []
        self.backlog: OrderedDict[Any, tuple[bytes, bool]] = OrderedDict()
        self.backlog_bytes = 0
        self.lagging = False
        self.lag_since = 0.0
        self.closing = False
        self.dropped = 0
        self.conflated = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.held = False
        self.opened_at = time.time()
        self.writable: asyncio.Event | None = None
        self._limit = buffer_limit
        self.high_water = high_water
        self._on_dirty = on_dirty
        self._on_lagging = on_lagging
        self._close_cb = close

    @property
    def principal(self) -> Principal:
        return self._principal

    @principal.setter
    def principal(self, new: Principal) -> None:
        # A refreshed token (the auth action) may narrow or widen what the
        # client may read: the pattern topics it is on keep read decisions
        # per principal's rights (Hub._readers) and must hear of it before
        # the next message is routed.
        old = self._principal
        self._principal = new
        for topic in self.subscriptions.values():
            topic.rights_changed(self, old)

    # --- hot path -----------------------------------------------------------

    def deliver(self, frame: bytes, conflate_key: Any, policy: Policy) -> None:
        """Queue one data frame. No await, no JSON: a check and an append."""
        if self.lagging:
            self._overflow(frame, conflate_key, policy)
            return
        if not self.batch:
            self._on_dirty(self)
        self.batch.append(frame)

    def flush(self) -> None:
        batch = self.batch
        if not batch:
            return
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        self.frames_sent += len(batch)
        batch.clear()
        self.write(data)

    def write(self, data: bytes) -> None:
        """Bytes for the client, in order: directly or through the transport."""
        if self.closing:
            return
        if self.direct:
            done = write_one(self.fd, self.transport, data)
            if done != len(data):
                self.direct_failed(data, done)
            if done >= 0:
                self.bytes_sent += len(data)
            return
        if self.transport.is_closing():
            return
        self.bytes_sent += len(data)
        # Over the high-water mark the transport calls pause_writing() inside
        # write(), and the connection makes the session lag (connection.py).
        self._transport_write(data)
        self.check_direct()

    def _transport_write(self, data: bytes) -> None:
        try:
            self.transport.write(data)
        except RuntimeError:
            # uvloop raises once it has closed the socket's handle, which it
            # may do before is_closing() says so to a caller that checked
            # earlier in the same callback: this client is gone, the others
            # (and the Redis read that is being routed) are not.
            self.stop_writing()

    def direct_failed(self, data: bytes, done: int) -> None:
        """A direct write the kernel took only ``done`` bytes of (-1: the
        socket failed). The hub's inlined loops call this too."""
        self._set_direct(False)
        if done < 0:
            # The peer is gone: the transport sees it on its next read and
            # closes; a later write through it reports the same error.
            return
        self._transport_write(data[done:] if done else data)
        self.check_direct()

    def check_direct(self) -> None:
        """Direct again once the transport holds nothing for this client."""
        self._set_direct(
            self.fd >= 0
            and not (self.lagging or self.closing or self.held)
            and not self.transport.is_closing()
            and self.transport.get_write_buffer_size() == 0
        )

    def _set_direct(self, on: bool) -> None:
        if on is self.direct:
            return
        self.direct = on
        for topic in self.subscriptions.values():
            topic.set_direct(self, on)

    def sent(self) -> tuple[int, int]:
        """Frames and bytes written to this client so far."""
        frames, size = self.frames_sent, self.bytes_sent
        if self.direct:
            for topic in self.subscriptions.values():
                f, b = topic.unsettled(self)
                frames += f
                size += b
        return frames, size

    def start_lagging(self) -> None:
        self._set_direct(False)
        if not self.lagging:
            self.lagging = True
            self.lag_since = time.monotonic()
            self._on_lagging(self)

    # --- control frames (replies, notices): never dropped, kept in order ------

    def queue_control(self, body: bytes) -> None:
        """A notice in line with data frames routed in the same upstream read."""
        frame = text_frame(body)
        if self.lagging:
            self._append(next(_unique), frame, droppable=False)
            return
        if not self.batch:
            self._on_dirty(self)
        self.batch.append(frame)

    def send_control(self, body: bytes) -> None:
        frame = text_frame(body)
        if self.lagging:
            self._append(next(_unique), frame, droppable=False)
            return
        self.flush()
        self.frames_sent += 1
        self.write(frame)

    def send_replay(self, frame: bytes) -> None:
        """A history frame: never dropped (the client asked for exactly these)."""
        if self.lagging:
            self._append(next(_unique), frame, droppable=False)
            if self.backlog_bytes > self._limit:
                self.close(Close.SLOW_CONSUMER, "slow consumer: outbound buffer full")
            return
        self.frames_sent += 1
        self.write(frame)

    def send_replays(self, frames: list[bytes]) -> None:
        """History frames in order: one write for the lot while the client
        keeps up (a replay batch is ~100 frames; a write each is 100 syscalls)."""
        if self.lagging or len(frames) < 2:
            for frame in frames:
                self.send_replay(frame)
            return
        self.frames_sent += len(frames)
        self.write(b"".join(frames))

    async def wait_writable(self) -> None:
        """Until this client has caught up (or is gone)."""
        while self.lagging and not self.closing and not self.transport.is_closing():
            if self.writable is None:
                self.writable = asyncio.Event()
            await self.writable.wait()

    # --- holding: live frames wait while a snapshot is read -------------------

    def hold(self) -> None:
        """Queue everything from now on (under each channel's policy) until
        release(): a snapshot read from Redis must reach the client before the
        live messages that arrived while it was read."""
        self.flush()
        self.held = True
        self.lagging = True
        self._set_direct(False)

    def release(self, first: list[bytes]) -> None:
        for body in reversed(first):
            key = next(_unique)
            frame = text_frame(body)
            self.backlog[key] = (frame, False)
            self.backlog.move_to_end(key, last=False)
            self.backlog_bytes += len(frame)
        self.held = False
        if not self.drain(time.monotonic(), 0):
            self._on_lagging(self)

    # --- slow consumer --------------------------------------------------------

    def _append(self, key: Any, frame: bytes, droppable: bool) -> None:
        self.backlog[key] = (frame, droppable)
        self.backlog_bytes += len(frame)

    def _overflow(self, frame: bytes, conflate_key: Any, policy: Policy) -> None:
        if policy == "conflate":
            old = self.backlog.get(conflate_key)
            if old is not None:
                # Replaced in place: the newer frame takes the older one's
                # position, so it never jumps past a reply or notice queued
                # after that one (an unsubscribe, a new epoch).
                self.backlog_bytes -= len(old[0])
                self.conflated += 1
            self._append(conflate_key, frame, droppable=True)
        else:
            self._append(next(_unique), frame, droppable=policy != "disconnect")
        if self.backlog_bytes <= self._limit:
            return
        if policy == "disconnect":
            self.close(Close.SLOW_CONSUMER, "slow consumer: outbound buffer full")
            return
        self._drop_oldest()

    def _drop_oldest(self) -> None:
        excess = self.backlog_bytes - self._limit
        victims = []
        for key, (frame, droppable) in self.backlog.items():
            if excess <= 0:
                break
            if droppable:
                victims.append(key)
                excess -= len(frame)
        for key in victims:
            frame, _ = self.backlog.pop(key)
            self.backlog_bytes -= len(frame)
            self.dropped += 1
        if self.backlog_bytes > self._limit:
            # Only undroppable frames are left and they still do not fit: the
            # client cannot be served without losing something it must see.
            self.close(Close.SLOW_CONSUMER, "slow consumer: outbound buffer full")

    def drain(self, now: float, grace: float) -> bool:
        """Called by the hub's drain loop. Returns True once caught up."""
        transport = self.transport
        if self.closing or transport.is_closing():
            self._set_writable()
            return True
        if self.held:
            return False
        if transport.get_write_buffer_size() > self.high_water // 2:
            if grace and now - self.lag_since > grace and self._holds_undroppable():
                self.close(Close.SLOW_CONSUMER, "slow consumer: lagging too long")
                return True
            return False
        budget = max(self.high_water, DRAIN_CHUNK_BYTES)
        chunk: list[bytes] = []
        while self.backlog and budget > 0:
            _, (frame, _) = self.backlog.popitem(last=False)
            self.backlog_bytes -= len(frame)
            budget -= len(frame)
            chunk.append(frame)
        if chunk:
            self.frames_sent += len(chunk)
            data = b"".join(chunk)
            self._transport_write(data)
            self.bytes_sent += len(data)
            if self.closing:
                self._set_writable()
                return True
        if self.backlog or transport.get_write_buffer_size() > self.high_water:
            return False
        self.lagging = False
        self.check_direct()
        self._set_writable()
        return True

    def _set_writable(self) -> None:
        if self.writable is not None:
            self.writable.set()
            self.writable = None

    def _holds_undroppable(self) -> bool:
        return any(not droppable for _, droppable in self.backlog.values())

    def buffered_bytes(self) -> int:
        size = self.backlog_bytes
        if not self.transport.is_closing():
            size += self.transport.get_write_buffer_size()
        return size

    def stop_writing(self) -> None:
        """The connection is closing or gone: nothing more is written, and
        never to the descriptor, which the transport may close any moment."""
        self.closing = True
        self._set_direct(False)

    def close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.stop_writing()
        self._set_writable()
        self.batch.clear()
        self.backlog.clear()
        self.backlog_bytes = 0
        self._close_cb(self, code, reason)
