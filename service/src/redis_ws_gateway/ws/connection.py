"""A WebSocket connection after its upgrade: a bare asyncio Protocol.

aiohttp answers the HTTP request and the upgrade handshake (routing, auth,
origin, subprotocol, the 101 response). Then ``detach()`` gives the socket's
transport to a ``WsConnection`` and lets aiohttp's request handler finish, so
an open connection costs no task, no coroutine frames, no retained request
and no HTTP parser (docs/ARCHITECTURE.md, "After the upgrade").

What a connection still needs lives here:

- Client frames are parsed by wsproto, created when bytes arrive and dropped
  again once the parser holds nothing, so an idle connection has no parser.
- Server pings, dead-peer detection: one shared ``Wheel`` timer for all
  connections instead of a timer per connection.
- Flow control: ``pause_writing``/``resume_writing`` from the transport mark
  the session lagging and drain it, instead of a buffer check per write.
- A budget on what the client sends (docs/SECURITY.md): every frame, control
  and continuation frames included, and every byte costs from one budget
  (WireBudget), before and after authentication. A spent budget pauses
  reading until it is paid back, so one read handles a bounded number of frames
  and a flood is slowed to the budget's rate instead of holding the loop. A
  Ping that arrives while the client is not reading its own socket stops
  reading from it until it does: pongs never queue without bound.

Outgoing data frames never pass through here: the hub and the session
write pre-encoded frames to the socket (fanout/writer.py) or its transport.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

from redis_ws_gateway.security.limits import TokenBucket, WireBudget
from redis_ws_wire import Close

if TYPE_CHECKING:
    from redis_ws_gateway.fanout.session import Session

# After the close frame is written, a client gets this long to read what is
# still queued for it. Then the socket is reset: a transport's close() waits
# for its buffer to drain, so a client that stopped reading (the usual reason
# for a 4008) would otherwise hold its socket open for as long as it lives.
CLOSE_TIMEOUT_SECONDS = 5.0

# Reads stop while this many bytes of client messages wait to be handled
# (aiohttp's WebSocket queue used the same limit).
INBOX_LIMIT = 65536

# Why reading from a client is paused; it resumes when no reason is left.
PAUSE_INBOX = 1  # client messages wait to be handled (INBOX_LIMIT)
PAUSE_BUDGET = 2  # the budget is spent until enough of it is paid back
PAUSE_WRITES = 4  # a Ping came while the client does not read what it gets

# Outgoing control frames are serialised by wsproto. FrameProtocol.ping/pong/
# close keep no state, so one serialiser serves every connection.
_FRAMES = FrameProtocol(client=False, extensions=[])
PING_FRAME = bytes(_FRAMES.ping(b""))


def close_frame(code: int, reason: str = "") -> bytes:
    return bytes(_FRAMES.close(code, reason))


def pong_frame(payload: bytes) -> bytes:
    return bytes(_FRAMES.pong(payload))


def parser_idle(parser: Connection) -> bool:
    """True when the parser holds no partial frame and no partial message,
    so it can be dropped and a fresh one made for the next bytes.

    wsproto has no public way to ask; this reads its frame and message
    decoders (pinned wsproto version; tests/unit/test_connection.py fails if
    the attributes move).
    """
    proto = parser._proto
    decoder = proto._frame_decoder
    return (
        not len(decoder.buffer) and decoder.header is None and proto._message_decoder.opcode is None
    )


def _announced(parser: Connection) -> int:
    """Payload bytes the frame being received still announces (its header's
    length less what was handed over), 0 between frames (wsproto internals,
    as parser_idle)."""
    decoder = parser._proto._frame_decoder
    header = decoder.header
    return 0 if header is None else int(header.payload_len) - int(decoder.payload_consumed)


class Inflate(PerMessageDeflate):
    """permessage-deflate for what a client sends, as the upgrade negotiated
    it (protocol.DEFLATE_RESPONSE): no context takeover, so each message is
    inflated by a decompressor of its own, dropped at the message's end, and
    an idle connection keeps no window.

    wsproto's own inflates a frame's payload whole, however large it grows;
    this one never produces more than ``limit`` bytes for one message (the
    per-message limit, applied to the inflated size): past it the frame is
    refused with 1009 before the rest is inflated.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(client_no_context_takeover=True, server_no_context_takeover=True)
        self._enabled = True
        self.limit = limit  # 0: none
        self.inflated = 0

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        decompressor = self._decompressor
        assert decompressor is not None
        limit = self.limit
        try:
            if limit:
                out = decompressor.decompress(data, limit - self.inflated + 1)
            else:
                out = decompressor.decompress(data)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self.inflated += len(out)
        if limit and (self.inflated > limit or decompressor.unconsumed_tail):
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        if opcode.iscontrol():
            # wsproto's own records a control frame's RSV1 (False) as the
            # state of the next message when none is in progress; the next
            # message's RSV1 would then go unread and its deflate bytes be
            # taken for text. A control frame must not touch that state.
            if rsv.rsv1:
                return CloseReason.PROTOCOL_ERROR
            self._inbound_is_compressible = False
            return RsvBits(True, False, False)
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        return self._inflate(data)

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if not fin or not self._inbound_is_compressible:
            # A control frame between fragments leaves the message's state be.
            return None
        if not self._inbound_compressed:
            self._inbound_compressed = None
            return None
        out = self._inflate(b"\x00\x00\xff\xff")
        self._decompressor = None
        self._inbound_compressed = None
        self.inflated = 0
        return out


class Limits:
    """What every connection of a gateway may receive: one object shared by
    all of them, so none carries the settings itself."""

    __slots__ = ("budget", "high_water", "max_fragments", "max_size")

    def __init__(
        self, budget: WireBudget, *, max_size: int, max_fragments: int, high_water: int
    ) -> None:
        self.budget = budget
        self.max_size = max_size  # bytes per message, all fragments (0: none)
        self.max_fragments = max_fragments  # frames per message (0: no limit)
        # The transport's high-water mark: past it the client is not reading.
        self.high_water = high_water


class OpenConnection(Protocol):
    """What the handler's table of open connections needs of each one: a
    WsConnection, or an SSE stream (web/sse.py)."""

    ip: str
    counted_user: str | None
    closing: bool
    lost: bool
    close_code: int | None

    @property
    def session(self) -> Session: ...

    def close(self, code: int, reason: str) -> None: ...


class Owner(Protocol):
    """What a connection asks of the WebSocket handler (ws/handler.py)."""

    def frames_waiting(self, conn: WsConnection) -> None: ...

    def connection_gone(self, conn: WsConnection) -> None: ...

    def writable(self, session: Session) -> None: ...


class Detached(web.StreamResponse):
    """What the /ws handler returns once the connection is handed over:
    aiohttp's request handler finishes without writing anything more."""

    def __init__(self) -> None:
        super().__init__(status=101)

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def detach(request: web.BaseRequest) -> None:
    """Make aiohttp forget a connection whose transport now has another protocol.

    Call after ``transport.set_protocol(...)`` and after the 101 response has
    been written. aiohttp's ``RequestHandler`` closes ``self.transport`` when
    its ``start()`` loop ends; with ``transport`` set to None first, its own
    teardown for a vanished peer (``connection_lost``) runs without touching
    the socket: it frees the HTTP parser and the request, cancels its
    keep-alive timer, and once the handler task ends the server forgets the
    handler. tests/integration/test_detach.py guards this against aiohttp
    upgrades.
    """
    handler = request.protocol
    handler.transport = None
    handler.connection_lost(None)


class Wheel:
    """One timer for the keepalive of every connection.

    Each connection sits in one slot (a list) at the time of its next check;
    the timer runs every ``resolution`` seconds while any slot is filled and
    calls ``on_timer`` of the connections in the slots that are due. Activity
    only moves a connection's ``last_seen``: the check finds out and puts it in
    a later slot, so a client frame never touches the wheel.
    """

    __slots__ = ("_handle", "_next", "_slots", "interval", "resolution")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        # aiohttp rounded heartbeats over 5 s up to whole seconds; the same here.
        self.resolution = min(1.0, interval / 8)
        self._slots: dict[int, list[WsConnection]] = {}
        self._next = 0
        self._handle: asyncio.TimerHandle | None = None

    def add(self, conn: WsConnection, when: float) -> None:
        slot = math.ceil(when / self.resolution)
        if self._handle is None:
            loop = asyncio.get_running_loop()
            self._next = int(loop.time() / self.resolution)
            self._handle = loop.call_at((self._next + 1) * self.resolution, self._tick)
        slot = max(slot, self._next)
        bucket = self._slots.get(slot)
        if bucket is None:
            self._slots[slot] = [conn]
        else:
            bucket.append(conn)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        upto = int(now / self.resolution)
        slots = self._slots
        for slot in range(self._next, upto + 1):
            bucket = slots.pop(slot, None)
            if bucket is not None:
                for conn in bucket:
                    conn.on_timer(now)
        self._next = upto + 1
        if slots:
            self._handle = loop.call_at((upto + 1) * self.resolution, self._tick)
        else:
            self._handle = None

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._slots.clear()


class WsConnection(asyncio.Protocol):
    """One client's WebSocket after the handshake. Holds only what an open
    connection needs; the request-handling logic is the gateway's."""

    __slots__ = (
        "age_timer",
        "auth_timer",
        "bucket",
        "budget_tat",
        "close_code",
        "closing",
        "counted_user",
        "early",
        "expiry_timer",
        "finished",
        "inbox",
        "inbox_bytes",
        "ip",
        "last_seen",
        "limits",
        "lost",
        "msg_frames",
        "msg_parts",
        "msg_size",
        "owner",
        "parser",
        "paused",
        "pending_pong",
        "ping_at",
        "resume_timer",
        "session",
        "started",
        "task",
        "transport",
        "wheel",
    )

    def __init__(
        self,
        owner: Owner,
        transport: asyncio.Transport,
        session: Session,
        wheel: Wheel,
        *,
        ip: str,
        counted_user: str | None,
        bucket: TokenBucket,
        limits: Limits,
    ) -> None:
        self.owner = owner
        self.transport = transport
        self.session = session
        self.wheel = wheel
        self.ip = ip
        self.counted_user = counted_user
        self.bucket = bucket
        self.limits = limits
        # Where this client stands against its budget (WireBudget).
        self.budget_tat = 0.0
        self.parser: Connection | None = None
        self.msg_parts: list[Any] | None = None
        self.msg_size = 0
        self.msg_frames = 0
        self.inbox: deque[str | bytes] | None = None
        self.inbox_bytes = 0
        self.paused = 0
        self.resume_timer: asyncio.TimerHandle | None = None
        self.pending_pong: bytes | None = None
        self.task: asyncio.Task[None] | None = None
        self.auth_timer: asyncio.TimerHandle | None = None
        self.expiry_timer: asyncio.TimerHandle | None = None
        self.age_timer: asyncio.TimerHandle | None = None
        self.last_seen = 0.0
        self.ping_at = 0.0
        self.close_code: int | None = None
        self.closing = False
        self.lost = False
        self.finished = False
        self.started = False
        self.early = b""

    def start(self) -> None:
        """The 101 is out and aiohttp has let go: serve the connection."""
        loop = asyncio.get_running_loop()
        self.started = True
        self.last_seen = loop.time()
        self.wheel.add(self, self.last_seen + self.wheel.interval)
        early, self.early = self.early, b""
        if early:
            self.data_received(early)

    # --- transport callbacks -------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self.started:
            # Bytes sent right after the 101, before start(): kept for it.
            self.early += data
            return
        if self.closing:
            return
        self.last_seen = now = asyncio.get_running_loop().time()
        parser = self.parser
        if parser is None:
            if self.session.deflate:
                parser = Connection(ConnectionType.SERVER, [Inflate(self.limits.max_size)])
            else:
                parser = Connection(ConnectionType.SERVER)
            self.parser = parser
        parser.receive_data(data)
        self.budget_tat = self.limits.budget.spend(self.budget_tat, now, 0, len(data))
        self._parse()

    def _parse(self) -> None:
        """Handle the frames the parser holds, while the budget lasts.

        Stopping early is safe: wsproto keeps the unparsed bytes and the next
        ``events()`` call goes on from there."""
        parser = self.parser
        if parser is None or self.paused & (PAUSE_BUDGET | PAUSE_WRITES):
            return
        limits = self.limits
        budget = limits.budget
        now = asyncio.get_running_loop().time()
        for event in parser.events():
            if isinstance(event, TextMessage | BytesMessage):
                if not self._message_part(event.data, event.frame_finished, event.message_finished):
                    return
                if not event.frame_finished:
                    continue  # part of a frame that arrived in pieces: its bytes are counted
            elif isinstance(event, Ping):
                if self.transport.get_write_buffer_size() > limits.high_water:
                    # The client does not read what it gets (the transport
                    # has called pause_writing): its pong waits, and so does
                    # everything else it sends, until it reads.
                    self.budget_tat = budget.spend(self.budget_tat, now, 1)
                    self.pending_pong = bytes(event.payload)
                    self._pause(PAUSE_WRITES)
                    return
                self.session.write(pong_frame(bytes(event.payload)))
            elif isinstance(event, CloseConnection):
                if parser.state in (ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED):
                    # The client's close: answered with 1000, as aiohttp did.
                    self.close_code = int(event.code)
                    self._close(Close.NORMAL, "")
                else:
                    # wsproto reports a protocol violation (bad frame, bad
                    # UTF-8: 1002, 1007) as a close it wants sent.
                    self._close(int(event.code), "")
                return
            # Pong: only last_seen matters.
            self.budget_tat = tat = budget.spend(self.budget_tat, now, 1)
            if budget.spent(tat, now):
                # No room for one more frame: the rest waits.
                self._wait_for_budget()
                return
        max_size = limits.max_size
        if max_size and self.msg_size + _announced(parser) > max_size:
            # Refused on its header: waiting for a payload that may never
            # come (a header can declare 2**63 bytes) would hold the socket.
            self._close(Close.TOO_BIG, "")
            return
        if budget.spent(self.budget_tat, now):
            # The bytes of this read spent the budget: the next read waits.
            self._wait_for_budget()
        if self.msg_parts is None and parser_idle(parser):
            self.parser = None

    def _wait_for_budget(self) -> None:
        self._pause(PAUSE_BUDGET)
        if self.resume_timer is None:
            self._resume_later()

    def _resume_later(self) -> None:
        loop = asyncio.get_running_loop()
        at = self.limits.budget.resume_at(self.budget_tat)
        # At least a few ms: the timer costs more than a frame.
        self.resume_timer = loop.call_at(max(at, loop.time() + 0.005), self._budget_refilled)

    def _budget_refilled(self) -> None:
        self.resume_timer = None
        if self.closing or self.lost:
            return
        if self.limits.budget.resume_at(self.budget_tat) > asyncio.get_running_loop().time():
            self._resume_later()
            return
        self._resume(PAUSE_BUDGET)
        self._parse()

    def _pause(self, reason: int) -> None:
        if not self.paused and not self.lost:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and not self.closing and not self.lost:
            self.transport.resume_reading()

    def _message_part(
        self, data: str | bytes | bytearray, frame_finished: bool, finished: bool
    ) -> bool:
        # The limit is in bytes, as aiohttp's was; wsproto hands text over decoded.
        n = len(data) if not isinstance(data, str) or data.isascii() else len(data.encode())
        size = self.msg_size + n
        max_size = self.limits.max_size
        if max_size and size > max_size:
            self._close(Close.TOO_BIG, "")
            return False
        parts = self.msg_parts
        if not finished:
            # Counted per frame, empty ones too: a message of endless empty
            # continuation frames is bounded by this, not by its size.
            if frame_finished:
                self.msg_frames += 1
            # The final frame is still to come: this message has more frames
            # than counted so far.
            max_fragments = self.limits.max_fragments
            if max_fragments and self.msg_frames >= max_fragments:
                self._close(Close.POLICY, "too many fragments")
                return False
            if parts is None:
                self.msg_parts = parts = []
            if n:
                parts.append(data)
            self.msg_size = size
            return True
        if parts is not None:
            parts.append(data)
            data = "".join(parts) if isinstance(data, str) else b"".join(parts)
            self.msg_parts = None
        self.msg_size = 0
        self.msg_frames = 0
        self._enqueue(data if isinstance(data, str) else bytes(data))
        return True

    def _enqueue(self, message: str | bytes) -> None:
        inbox = self.inbox
        if inbox is None:
            inbox = self.inbox = deque()
        inbox.append(message)
        self.inbox_bytes += len(message)
        if self.inbox_bytes > INBOX_LIMIT:
            self._pause(PAUSE_INBOX)
        if self.task is None:
            self.owner.frames_waiting(self)

    def next_message(self) -> str | bytes | None:
        """The next client message to handle, in order; None when none waits."""
        inbox = self.inbox
        if not inbox:
            self.inbox = None
            self.inbox_bytes = 0
            return None
        message = inbox.popleft()
        self.inbox_bytes -= len(message)
        if self.paused & PAUSE_INBOX and self.inbox_bytes <= INBOX_LIMIT // 2:
            self._resume(PAUSE_INBOX)
        return message

    def eof_received(self) -> bool | None:
        return None  # close the transport (a half-closed WebSocket is over)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.session.stop_writing()
        self.parser = None
        self._try_finish()

    def pause_writing(self) -> None:
        self.session.start_lagging()

    def resume_writing(self) -> None:
        self.owner.writable(self.session)
        if self.paused & PAUSE_WRITES and not self.closing:
            pong, self.pending_pong = self.pending_pong, None
            if pong is not None:
                self.session.write(pong_frame(pong))
            self._resume(PAUSE_WRITES)
            self._parse()

    # --- keepalive --------------------------------------------------------------

    def on_timer(self, now: float) -> None:
        if self.closing or self.lost:
            return  # leaves the wheel
        interval = self.wheel.interval
        if self.ping_at:
            if self.last_seen < self.ping_at:
                # Nothing from the client for half an interval after a ping:
                # dropped without a close frame (the client sees 1006).
                self.abort(Close.ABNORMAL)
                return
            self.ping_at = 0.0
        due = self.last_seen + interval
        if now >= due:
            # Through the session: a direct write must not overtake it.
            self.session.write(PING_FRAME)
            self.ping_at = now
            self.wheel.add(self, now + interval / 2)
        else:
            self.wheel.add(self, due)

    # --- closing ----------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Send a close frame and close the socket (aiohttp closed at once as
        well rather than waiting for the client's reply)."""
        self.session.stop_writing()
        self._close(code, reason)

    def _close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.session.stop_writing()
        if self.close_code is None:
            self.close_code = code
        if not self.lost:
            # A closing transport would drop the frame; and its own close()
            # (after the client's EOF) may wait for a buffer that never
            # drains: the reset timer below is what frees the socket then.
            if not self.transport.is_closing():
                self.transport.write(close_frame(code, reason))
                self.transport.close()
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_SECONDS, self._reset)
        self._finish_soon()

    def _reset(self) -> None:
        if not self.lost:
            self.transport.abort()

    def abort(self, code: int) -> None:
        """Reset the socket without a close frame (a peer that stopped
        answering: what is queued for it would never be read)."""
        if self.closing:
            return
        self.closing = True
        self.session.stop_writing()
        self.close_code = code
        if not self.lost:
            self.transport.abort()
        self._finish_soon()

    def _finish_soon(self) -> None:
        # Not now: a close can start inside the hub's loop over a topic's
        # sessions, which the clean-up changes.
        asyncio.get_running_loop().call_soon(self._try_finish)

    def _try_finish(self) -> None:
        """Once closed (or lost) and no client message is being handled."""
        if self.finished or self.task is not None or not (self.closing or self.lost):
            return
        self.finished = True
        for timer in (self.auth_timer, self.expiry_timer, self.age_timer, self.resume_timer):
            if timer is not None:
                timer.cancel()
        self.auth_timer = self.expiry_timer = self.age_timer = self.resume_timer = None
        self.inbox = None
        self.owner.connection_gone(self)

    def task_done(self) -> None:
        self.task = None
        self._try_finish()
