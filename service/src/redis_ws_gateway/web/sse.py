"""GET /sse: the Server-Sent Events fallback for networks that refuse
WebSocket upgrades.

The request carries everything a WebSocket client would say over its life:
the credential, the channels (fixed for the stream's life) and where durable
channels resume (``Last-Event-ID``, or ``since`` on a first connect). It is
checked as the upgrade is (origin, credential, connection limits) and as a
``subscribe`` is (names, limits, ACL); then the response streams the same
JSON objects a WebSocket client receives, one per event.

The hub writes every subscriber the same pre-built WebSocket frames. An SSE
client's session (``SseSession``) is never written directly: its frames go
through ``Session.write`` to ``_transport_write``, which this subclass turns
into SSE events (the 2-10 byte frame header dropped, ``data:`` lines and an
``id:`` for durable offsets added) in one HTTP chunk on aiohttp's transport.
The WebSocket path runs no new code per message (docs/ARCHITECTURE.md,
"SSE fallback").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import os
import random
import socket
import time
from typing import Any, Final

import orjson
import structlog
from aiohttp import web
from aiohttp.http import HttpVersion11

from redis_ws_gateway.errors import (
    BadChannel,
    BadField,
    Forbidden,
    GatewayError,
    TooManyChannels,
    TooManyWildcards,
    Unauthorized,
)
from redis_ws_gateway.fanout.session import Session
from redis_ws_gateway.security.auth import Principal
from redis_ws_gateway.security.limits import pattern_metachars
from redis_ws_gateway.web.access import client_ip, credential
from redis_ws_gateway.ws import protocol
from redis_ws_gateway.ws.connection import CLOSE_TIMEOUT_SECONDS
from redis_ws_gateway.ws.handler import WsHandler, _auth_reason, _counted_user, _origin_allowed
from redis_ws_wire import REFUSAL_HEADER, Close, ErrorCode

log = structlog.get_logger("redis_ws_gateway.web.sse")

# Event ids: "d1." and base64url (no padding) of a JSON object
# {channel: last offset} of the stream's durable channels. Opaque to clients.
ID_PREFIX: Final = "d1."
MAX_ID_LENGTH: Final = 16_384
MAX_SENT_ID_LENGTH: Final = 4096
# How often an idle stream checks that its client is still there.
_POLL_SECONDS: Final = 1.0
# What EventSource waits before it reconnects (ms).
RETRY_MS: Final = 1000

_HEARTBEAT: Final = b":\n\n"
_TEXT: Final = 0x81


def _offset(text: str) -> tuple[int, int]:
    ms, _, n = text.partition("-")
    return int(ms), int(n)


def encode_id(offsets: dict[str, str]) -> str:
    raw = base64.urlsafe_b64encode(orjson.dumps(offsets)).rstrip(b"=")
    return ID_PREFIX + raw.decode()


def decode_id(text: str) -> dict[str, str]:
    """The offsets in a Last-Event-ID this gateway issued; raises BadField
    for anything else."""
    bad = BadField("Last-Event-ID is not an event id this gateway issued")
    if len(text) > MAX_ID_LENGTH or not text.startswith(ID_PREFIX):
        raise bad
    body = text[len(ID_PREFIX) :]
    try:
        obj = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError):
        raise bad from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and protocol.is_stream_id(v, zero=False)
        for k, v in obj.items()
    ):
        raise bad
    return obj


class SseSession(Session):
    """A session whose frames become SSE events on aiohttp's transport.

    ``fd`` is always -1, so the hub never writes it directly: every frame
    reaches ``_transport_write`` (through flush, send_control, the replays
    and the backlog drain), always as whole WebSocket frames.
    """

    __slots__ = ("chunked", "offsets")

    def __init__(self, *args: Any, chunked: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs, fd=-1)
        self.chunked = chunked
        # The last offset sent of each durable channel: the next event id.
        self.offsets: dict[str, str] = {}

    def _transport_write(self, data: bytes) -> None:
        self.raw(self.events(data))
        # aiohttp's handler, not the session, hears pause_writing(): the
        # high-water mark is checked here, and the hub's drain loop writes
        # the backlog out once the transport has room again.
        if not self.lagging and self.transport.get_write_buffer_size() > self.high_water:
            self.start_lagging()

    def raw(self, body: bytes) -> None:
        """SSE bytes as one HTTP chunk (the response is chunked)."""
        if self.chunked:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        try:
            self.transport.write(body)
        except RuntimeError:
            self.stop_writing()

    def heartbeat(self) -> None:
        """A comment line, unless something is queued anyway."""
        if self.closing or self.lagging or self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() == 0:
            self.raw(_HEARTBEAT)

    def events(self, data: bytes) -> bytes:
        """Whole WebSocket text frames to SSE events with the same JSON."""
        out: list[bytes] = []
        i, n = 0, len(data)
        while i < n:
            size = data[i + 1] & 0x7F
            start = i + 2
            if size == 126:
                size = int.from_bytes(data[start : start + 2], "big")
                start += 2
            elif size == 127:
                size = int.from_bytes(data[start : start + 8], "big")
                start += 8
            opcode = data[i]
            i = start + size
            if opcode != _TEXT:
                continue  # never written to an SSE session; skipped if it were
            body = data[start:i]
            if b'"offset"' in body:
                event_id = self._advance(body)
                if event_id is not None:
                    out.append(b"id: " + event_id.encode() + b"\n")
            if b"\n" in body or b"\r" in body:
                # A publisher's JSON may hold line breaks (whitespace only:
                # JSON strings cannot): one data line each, rejoined with
                # "\n" by the client, the same JSON value.
                body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                body = body.replace(b"\n", b"\ndata: ")
            out.append(b"data: " + body + b"\n\n")
        return b"".join(out)

    def _advance(self, body: bytes) -> str | None:
        """A durable offset in this frame moves the event id forward."""
        # Only what the gateway wrote is read: a data frame's publisher
        # payload comes last, after ',"data":', which no JSON-encoded channel
        # name can contain; under PAYLOAD_VALIDATION=off it could otherwise
        # add a "channel" or "offset" of its own.
        cut = body.find(b',"data":')
        try:
            obj = orjson.loads(body if cut < 0 else body[:cut] + b"}")
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        moved = False
        kind = obj.get("type")
        if kind == "data" and isinstance(obj.get("offset"), str):
            moved = self._move(obj.get("channel"), obj["offset"])
        elif kind == "subscribed":
            for state in obj.get("subscriptions") or ():
                if isinstance(state, dict) and state.get("durable"):
                    moved = self._move(state.get("channel"), state.get("offset")) or moved
        if not moved:
            return None
        event_id = encode_id(self.offsets)
        # A browser sends it back as a header, which servers (aiohttp too)
        # cap at 8 KB: an id past that would make the reconnect itself fail.
        # Without an id the client keeps the last one it got, an earlier
        # state: a resume from it repeats entries (offsets tell them apart),
        # it loses none.
        return event_id if len(event_id) <= MAX_SENT_ID_LENGTH else None

    def _move(self, channel: Any, offset: Any) -> bool:
        if not isinstance(channel, str) or not isinstance(offset, str):
            return False
        if not protocol.is_stream_id(offset, zero=False):
            return False
        old = self.offsets.get(channel)
        if old is not None and _offset(old) >= _offset(offset):
            return False
        self.offsets[channel] = offset
        return True


class SseConnection:
    """One open event stream, as the handler's table of connections sees it."""

    __slots__ = ("close_code", "closing", "counted_user", "done", "ip", "lost", "session")

    def __init__(self, session: SseSession, ip: str, counted_user: str | None) -> None:
        self.session = session
        self.ip = ip
        self.counted_user = counted_user
        self.closing = False
        self.lost = False
        self.close_code: int | None = None
        self.done = asyncio.Event()

    def close(self, code: int, reason: str) -> None:
        """The gateway ends the stream (drain, admin, slow consumer, expiry):
        a comment says why, then the response ends. A client that does not
        read it within CLOSE_TIMEOUT_SECONDS is reset."""
        if self.closing or self.lost:
            return
        self.closing = True
        self.close_code = code
        session = self.session
        session.stop_writing()
        transport = session.transport
        if not transport.is_closing():
            session.raw(f": close {code} {reason}\n\n".encode())
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_SECONDS, _reset, transport)
        self.done.set()


def _reset(transport: asyncio.Transport) -> None:
    # Closing or not: a close() still waits for the buffer to drain.
    transport.abort()


def _channels(request: web.Request, max_length: int) -> tuple[str, ...]:
    names: list[str] = []
    for value in request.query.getall("channels", ()):
        names.extend(n for n in value.split(",") if n)
    if not names:
        raise BadField("channels must name at least one channel: /sse?channels=a,b")
    for name in names:
        protocol.validate_channel(name, max_length)
    return tuple(dict.fromkeys(names))


def _since(request: web.Request) -> dict[str | None, str]:
    """``since=OFFSET`` (None: every durable channel) and
    ``since=CHANNEL@OFFSET`` (one channel), repeatable."""
    out: dict[str | None, str] = {}
    for value in request.query.getall("since", ()):
        channel, _, offset = value.rpartition("@")
        if offset != "0" and not protocol.is_stream_id(offset, zero=False):
            raise BadField("since must be an offset like 1732610000000-0")
        out[channel or None] = offset
    return out


class SseHandler:
    """GET /sse, checked as /ws is, served by the WebSocket handler's hub,
    durable channels and table of connections."""

    def __init__(self, ws: WsHandler) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._prefix = "sse-" + os.urandom(2).hex()

    def _refuse(self, status: int, label: str, code: str, message: str) -> web.Response:
        """Counted and logged as a refused upgrade is; the body says the
        code and message as every HTTP route's error does."""
        ws = self.ws
        ws.metrics.rejected.labels(label).inc()
        ws.admission.log_refusal(status, label, message)
        return web.json_response(
            {"error": code, "message": message},
            status=status,
            headers={REFUSAL_HEADER: message},
        )

    async def handle_sse(self, request: web.Request) -> web.StreamResponse:
        ws = self.ws
        s = ws.settings
        if ws.draining.is_set():
            return self._refuse(503, "draining", ErrorCode.UNAVAILABLE, "draining")
        origin = request.headers.get("Origin")
        if (
            origin is not None
            and s.allowed_origins
            and not _origin_allowed(
                origin, s.allowed_origins, request.host if s.allow_same_host_origin else None
            )
        ):
            return self._refuse(403, "origin", ErrorCode.FORBIDDEN, "origin not allowed")
        try:
            channels = _channels(request, s.max_channel_name_length)
            last_id = request.headers.get("Last-Event-ID", "")
            resume = decode_id(last_id) if last_id else {}
            since = _since(request)
        except GatewayError as exc:
            return self._refuse(400, "bad_request", exc.code, str(exc))
        ip = client_ip(request, s.trusted_proxy_hops)
        token, _ = credential(request)
        try:
            if token is not None:
                async with asyncio.timeout(s.handshake_timeout_seconds):
                    principal = await ws.auth.authenticate(token)
            elif s.require_auth:
                # No auth frame can follow on an event stream.
                raise Unauthorized("credential required")
            else:
                principal = ws.auth.anonymous()
        except TimeoutError:
            return self._refuse(
                503, "handshake_timeout", ErrorCode.UNAVAILABLE, "authentication timed out"
            )
        except Unauthorized as exc:
            ws.metrics.auth_failures.labels(_auth_reason(str(exc))).inc()
            return self._refuse(401, "unauthorized", ErrorCode.UNAUTHORIZED, str(exc))
        except Forbidden as exc:
            ws.metrics.auth_failures.labels("no_known_role").inc()
            return self._refuse(403, "forbidden", ErrorCode.FORBIDDEN, str(exc))
        try:
            options, refused = self._plan(principal, channels, resume, since)
        except GatewayError as exc:
            return self._refuse(400, "bad_request", exc.code, str(exc))
        user = _counted_user(principal)
        handler = request.protocol
        refusal = ws.admission.upgrade_refusal(handler, ip, user)
        if refusal is not None:
            text = refusal.text.strip() if refusal.text else "refused"
            code = ErrorCode.RATE_LIMITED if refusal.status == 429 else ErrorCode.UNAVAILABLE
            return web.json_response(
                {"error": code, "message": text},
                status=refusal.status,
                headers={REFUSAL_HEADER: text},
            )
        transport = request.transport
        if transport is None or transport.is_closing():
            return self._refuse(503, "handshake_timeout", ErrorCode.UNAVAILABLE, "connection gone")
        headers = {
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
        if origin is not None and s.allowed_origins:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Vary"] = "Origin"
        resp = web.StreamResponse(status=200, headers=headers)
        # One stream per connection: the socket closes with it.
        resp.force_close()
        chunked = request.version >= HttpVersion11
        if chunked:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        # Headers and a first event through aiohttp; the rest as raw chunks.
        await resp.write(b"retry: %d\n\n" % RETRY_MS)
        ws.admission.upgraded(handler, ip, user)
        sock = transport.get_extra_info("socket")
        if s.socket_send_buffer_bytes and sock is not None:
            # A peer gone since the headers must not skip the release of
            # the counts taken just above (_gone, below).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, s.socket_send_buffer_bytes)
        transport.set_write_buffer_limits(
            high=s.outbound_high_water_bytes, low=s.outbound_high_water_bytes // 2
        )
        conn: SseConnection | None = None

        def close(session: Session, code: int, reason: str) -> None:
            if conn is not None:
                conn.close(code, reason)

        session = SseSession(
            f"{self._prefix}-{next(self._ids)}",
            transport,
            principal,
            ip,
            buffer_limit=s.outbound_buffer_bytes,
            high_water=s.outbound_high_water_bytes,
            on_dirty=ws.hub.mark_dirty,
            on_lagging=ws.hub.mark_lagging,
            close=close,
            chunked=chunked,
        )
        conn = SseConnection(session, ip, user)
        await self._serve(conn, channels, options, refused)
        return resp

    def _plan(
        self,
        principal: Principal,
        channels: tuple[str, ...],
        resume: dict[str, str],
        since: dict[str | None, str],
    ) -> tuple[dict[str, protocol.ChannelOptions], list[str]]:
        """The subscribe options of each durable channel, and the channels
        the ACL refuses (each an ``error`` event; the others go ahead)."""
        s = self.ws.settings
        hub, durable = self.ws.hub, self.ws.durable
        if len(channels) > s.max_channels_per_client:
            raise TooManyChannels(
                f"at most {s.max_channels_per_client} subscriptions per connection"
            )
        patterns = [c for c in channels if hub.topic_key(c)[0] == "pattern"]
        if len(patterns) > s.max_wildcard_subscriptions:
            raise TooManyWildcards(
                f"at most {s.max_wildcard_subscriptions} wildcard subscriptions per connection"
            )
        for name in patterns:
            if pattern_metachars(name) > s.max_pattern_metachars:
                raise BadChannel(
                    f"pattern has more than {s.max_pattern_metachars} wildcards", channel=name
                )
        durables = [
            c for c in channels if hub.topic_key(c)[0] == "channel" and durable.spec(c) is not None
        ]
        if None in since and not durables:
            raise BadField("since needs a durable channel in channels")
        options: dict[str, protocol.ChannelOptions] = {}
        for name in durables:
            # Last-Event-ID first: it is where this client's stream stopped.
            offset = resume.get(name, since.get(name, since.get(None)))
            if offset is not None:
                options[name] = protocol.ChannelOptions(since=offset)
        refused = [
            c
            for c in channels
            if not (
                principal.may_subscribe_pattern(c)
                if hub.topic_key(c)[0] == "pattern"
                else principal.may_read(c)
            )
        ]
        return options, refused

    async def _serve(
        self,
        conn: SseConnection,
        channels: tuple[str, ...],
        options: dict[str, protocol.ChannelOptions],
        refused: list[str],
    ) -> None:
        ws = self.ws
        s = ws.settings
        session = conn.session
        transport = session.transport
        ws.sessions[session] = conn
        ws.metrics.opened.inc()
        loop = asyncio.get_running_loop()
        timers: list[asyncio.TimerHandle] = []
        exp = session.principal.expires_at
        if exp is not None:
            timers.append(
                loop.call_later(
                    max(0.0, exp - time.time()), session.close, Close.UNAUTHORIZED, "token expired"
                )
            )
        if s.max_connection_age_seconds:
            age = s.max_connection_age_seconds * random.uniform(0.85, 1.15)
            timers.append(
                loop.call_later(age, session.close, Close.SERVICE_RESTART, "max connection age")
            )
        log.info(
            "connection_open",
            conn=session.id,
            remote=conn.ip,
            user=session.principal.user,
            via=session.principal.via,
            transport="sse",
        )
        try:
            for name in refused:
                ws.metrics.client_errors.labels(ErrorCode.FORBIDDEN).inc()
                session.send_control(
                    protocol.error_message(Forbidden(f"role may not read {name}", channel=name))
                )
            allowed = tuple(c for c in channels if c not in refused)
            if allowed:
                request = protocol.Request("subscribe", None, channels=allowed, options=options)
                try:
                    await ws.subscribe_request(session, request)
                except GatewayError as exc:
                    ws.metrics.client_errors.labels(exc.code).inc()
                    session.send_control(protocol.error_message(exc))
                log.info("subscribed", conn=session.id, channels=list(allowed))
            interval = s.ws_ping_interval_seconds
            dead_after = max(s.slow_consumer_grace_seconds, 1.5 * interval)
            beat = loop.time() + interval
            while not conn.done.is_set():
                if transport.is_closing():
                    conn.lost = True
                    break
                now = loop.time()
                if (
                    session.lagging
                    and time.monotonic() - session.lag_since > dead_after
                    and not session.closing
                ):
                    # Whatever the channels' policy: a stream that has taken
                    # nothing for this long is a dead peer, as an unanswered
                    # ping is on the WebSocket (whose keepalive SSE lacks).
                    conn.close(Close.SLOW_CONSUMER, "slow consumer: lagging too long")
                if now >= beat:
                    session.heartbeat()
                    beat = now + interval
                try:
                    async with asyncio.timeout(min(_POLL_SECONDS, max(0.01, beat - now))):
                        await conn.done.wait()
                except TimeoutError:
                    pass
        finally:
            for timer in timers:
                timer.cancel()
            session.stop_writing()
            self._gone(conn)

    def _gone(self, conn: SseConnection) -> None:
        self.ws.forget(conn, transport="sse")
