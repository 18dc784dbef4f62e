"""The /ws upgrade and everything a connected client asks for.

The upgrade checks origin, credential and limits, then hands the socket to a
WsConnection (connection.py); from then on each client message is decoded,
checked against auth, ACL and limits, and turned into hub calls. The
handler owns the open connections: it closes them on request (admin, drain,
a session that must go) and forgets them when they are gone.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
import time
from typing import Any

import structlog
from aiohttp import hdrs, web
from opentelemetry.trace import Tracer

from redis_ws_gateway.config import Settings, SnapshotRule, origin_key
from redis_ws_gateway.errors import (
    BadChannel,
    BadField,
    Forbidden,
    GatewayError,
    NotSubscribed,
    RateLimited,
    TooManyChannels,
    TooManyWildcards,
    Unauthorized,
)
from redis_ws_gateway.fanout.hub import Hub
from redis_ws_gateway.fanout.session import Session
from redis_ws_gateway.fanout.writer import socket_fd
from redis_ws_gateway.observability.metrics import Metrics, close_reason
from redis_ws_gateway.observability.tracing import span
from redis_ws_gateway.security.auth import Authenticator, Principal
from redis_ws_gateway.security.limits import (
    ConnectionCounter,
    TokenBucket,
    WireBudget,
    pattern_metachars,
)
from redis_ws_gateway.upstream.durable import Durable, StreamSpec
from redis_ws_gateway.upstream.snapshots import Snapshots
from redis_ws_gateway.web.access import client_ip, credential
from redis_ws_gateway.ws import protocol
from redis_ws_gateway.ws.admission import Admission
from redis_ws_gateway.ws.connection import (
    Detached,
    Limits,
    OpenConnection,
    Wheel,
    WsConnection,
    detach,
)
from redis_ws_wire import SUBPROTOCOL, Close, ErrorCode

log = structlog.get_logger("redis_ws_gateway.ws.handler")


class WsHandler:
    def __init__(
        self,
        settings: Settings,
        *,
        auth: Authenticator,
        hub: Hub,
        durable: Durable,
        snapshots: Snapshots,
        connections: ConnectionCounter,
        admission: Admission,
        metrics: Metrics,
        tracer: Tracer,
        tracing: bool,
        sessions: dict[Session, OpenConnection],
        draining: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.hub = hub
        self.durable = durable
        self.snapshots = snapshots
        self.connections = connections
        self.admission = admission
        self.metrics = metrics
        self.tracer = tracer
        self.tracing = tracing
        # Every open connection by its session: what the admin API lists, the
        # drain closes and the metrics count.
        self.sessions = sessions
        self.draining = draining
        # Server pings and dead-peer checks of every connection: one timer.
        self.wheel = Wheel(settings.ws_ping_interval_seconds)
        self._ids = itertools.count(1)
        self._prefix = os.urandom(2).hex()
        # What each client may send, one set of limits for all (connection.py).
        self.limits = Limits(
            WireBudget(
                settings.ws_max_frames_per_second,
                settings.ws_frame_burst,
                settings.ws_max_bytes_per_second,
                settings.ws_max_message_bytes,
            ),
            max_size=settings.ws_max_message_bytes,
            max_fragments=settings.ws_max_fragments,
            high_water=settings.outbound_high_water_bytes,
        )

    # --- closing --------------------------------------------------------------

    def disconnect(self, session: Session, code: int, reason: str) -> None:
        """Close one client's connection with ``code`` (close frame, then the
        socket)."""
        conn = self.sessions.get(session)
        if conn is None or conn.closing or conn.lost:
            return
        log.info("connection_closing", conn=session.id, code=code, reason=reason)
        conn.close(code, reason)

    def _close_session(self, session: Session, code: int, reason: str) -> None:
        """Session.close(): the close frame goes out now; the clean-up waits
        for the next loop iteration (see WsConnection._finish_soon)."""
        self.disconnect(session, code, reason)

    async def drain(self, window: float) -> None:
        """Tell every client to reconnect elsewhere, spread over ``window``."""
        sessions = list(self.sessions)
        log.info("drain_started", sessions=len(sessions), window=window)
        if not sessions:
            return
        random.shuffle(sessions)
        step = window / len(sessions)

        async def close_later(session: Session, delay: float) -> None:
            await asyncio.sleep(delay)
            self.disconnect(session, Close.SERVICE_RESTART, "service restart")

        # One task per client, all concurrent; the spread, not a sequential
        # await, is what paces them.
        await asyncio.gather(
            *(close_later(s, i * step) for i, s in enumerate(sessions)), return_exceptions=True
        )
        log.info("drain_finished")

    def stop(self) -> None:
        # Connections left after the drain (or without one): aiohttp no
        # longer owns them, so its cleanup would not close them.
        for session in list(self.sessions):
            self.disconnect(session, Close.SERVICE_RESTART, "service restart")
        self.wheel.stop()

    # --- the upgrade ------------------------------------------------------------

    async def handle_ws(self, request: web.Request) -> web.StreamResponse:
        admission = self.admission
        if self.draining.is_set():
            return admission.reject(503, "draining", "draining")
        s = self.settings
        origin = request.headers.get("Origin")
        if (
            origin is not None
            and s.allowed_origins
            and not _origin_allowed(
                origin, s.allowed_origins, request.host if s.allow_same_host_origin else None
            )
        ):
            # Cross-site WebSocket hijacking: a page elsewhere must not ride on
            # the user's cookies or network position.
            return admission.reject(403, "origin", "origin not allowed")
        ip = client_ip(request, s.trusted_proxy_hops)
        token, via_protocol = credential(request)
        try:
            with span(self.tracer, self.tracing, "ws.connect") as connect:
                connect.set_attribute("client.address", ip)
                principal = await self._principal(token)
                connect.set_attribute("redis_ws_gateway.auth", principal.via)
        except TimeoutError:
            return admission.reject(503, "handshake_timeout", "authentication timed out")
        except Unauthorized as exc:
            self.metrics.auth_failures.labels(_auth_reason(str(exc))).inc()
            return admission.reject(401, "unauthorized", str(exc))
        except Forbidden as exc:
            self.metrics.auth_failures.labels("no_known_role").inc()
            return admission.reject(403, "forbidden", str(exc))
        user = _counted_user(principal)
        handler = request.protocol
        refused = admission.upgrade_refusal(handler, ip, user)
        if refused is not None:
            return refused
        # aiohttp validates the upgrade and writes the 101; pings, client
        # frames and closing are the WsConnection's (heartbeat off here).
        ws = web.WebSocketResponse(
            max_msg_size=s.ws_max_message_bytes,
            # aiohttp's own negotiation would answer server_no_context_takeover
            # only when the client asks; the gateway always needs it (one
            # compressed frame for every client), so it answers itself.
            compress=False,
            # Only our protocol name is ever echoed, never the token a browser
            # put in Sec-WebSocket-Protocol.
            protocols=(SUBPROTOCOL,) if via_protocol else (),
        )
        deflate = s.ws_compression and (
            protocol.accept_deflate(request.headers.get(hdrs.SEC_WEBSOCKET_EXTENSIONS)) is not None
        )
        if deflate:
            # Kept by prepare(), which adds the handshake's headers to these.
            ws.headers[hdrs.SEC_WEBSOCKET_EXTENSIONS] = protocol.DEFLATE_RESPONSE
        transport = request.transport
        if transport is None or not ws.can_prepare(request).ok:
            # A malformed upgrade: aiohttp refuses it as it always did.
            await ws.prepare(request)
            return ws
        sock = transport.get_extra_info("socket")
        if s.socket_send_buffer_bytes and sock is not None:
            # Bounds what the kernel queues for a stalled client: without it a
            # loopback or LAN socket can hold megabytes before the gateway sees
            # any backpressure, outside OUTBOUND_BUFFER_BYTES.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, s.socket_send_buffer_bytes)
        session = Session(
            f"{self._prefix}-{next(self._ids)}",
            transport,
            principal,
            ip,
            buffer_limit=s.outbound_buffer_bytes,
            high_water=s.outbound_high_water_bytes,
            on_dirty=self.hub.mark_dirty,
            on_lagging=self.hub.mark_lagging,
            close=self._close_session,
            # Client sockets are plain TCP (TLS ends at the ingress), so
            # frames may go to the descriptor itself (fanout/writer.py).
            fd=socket_fd(transport),
            deflate=deflate,
        )
        conn = WsConnection(
            self,
            transport,
            session,
            self.wheel,
            ip=ip,
            counted_user=user,
            bucket=TokenBucket(s.rate_limit_per_second, s.rate_limit_burst),
            limits=self.limits,
        )
        # From here on the socket's bytes go to conn (held until start()).
        transport.set_protocol(conn)
        try:
            await ws.prepare(request)
        except BaseException:
            transport.set_protocol(handler)
            raise
        admission.upgraded(handler, ip, user)
        detach(request)
        # pause_writing() past the high-water mark makes the session lag;
        # resume_writing() at half of it drains the backlog.
        transport.set_write_buffer_limits(
            high=s.outbound_high_water_bytes, low=s.outbound_high_water_bytes // 2
        )
        # Direct writes start once the handshake's bytes have left the transport.
        session.check_direct()
        self._open(conn)
        conn.start()
        return Detached()

    async def _principal(self, token: str | None) -> Principal:
        s = self.settings
        if token is not None:
            known = self.auth.known(token)
            if known is not None:
                return known
            # The upgrade has a deadline as the request head has: a slow key
            # fetch must not hold sockets open without end.
            async with asyncio.timeout(s.handshake_timeout_seconds):
                return await self.auth.verify(token)
        if s.require_auth:
            return self.auth.unauthenticated()
        return self.auth.anonymous()

    def _open(self, conn: WsConnection) -> None:
        s = self.settings
        session = conn.session
        principal = session.principal
        self.sessions[session] = conn
        loop = asyncio.get_running_loop()
        if principal.via == "pending":
            conn.auth_timer = loop.call_later(
                s.auth_timeout_seconds, session.close, Close.UNAUTHORIZED, "authentication timeout"
            )
        self._arm_expiry(conn)
        if s.max_connection_age_seconds:
            # Jitter spreads reconnects so a scale-out rebalances gradually.
            age = s.max_connection_age_seconds * random.uniform(0.85, 1.15)
            conn.age_timer = loop.call_later(
                age, session.close, Close.SERVICE_RESTART, "max connection age"
            )
        self.metrics.opened.inc()
        log.info(
            "connection_open",
            conn=session.id,
            remote=conn.ip,
            user=principal.user,
            via=principal.via,
        )

    # --- WsConnection callbacks (connection.Owner) ----------------------------

    def frames_waiting(self, conn: WsConnection) -> None:
        """Client messages are queued on ``conn``: handle them in order, one
        at a time, in a task that lives only while there are some."""
        task = asyncio.get_running_loop().create_task(self._serve_frames(conn))
        conn.task = task

    def writable(self, session: Session) -> None:
        self.hub.writable(session)

    def connection_gone(self, conn: WsConnection) -> None:
        """Closed or lost, and no client message is being handled: forget it."""
        self.forget(conn)

    def forget(self, conn: OpenConnection, transport: str | None = None) -> None:
        """A closed connection (WebSocket, or an SSE stream with
        ``transport="sse"``) leaves the hub, the counts and the table; what it
        was sent is kept in the metrics' totals."""
        session = conn.session
        self.hub.remove_session(session)
        self.sessions.pop(session, None)
        self.connections.closed(conn.ip, conn.counted_user)
        code = conn.close_code if conn.close_code is not None else Close.ABNORMAL
        m = self.metrics
        m.closed.labels(close_reason(code)).inc()
        frames, size = session.sent()
        m.closed_frames += frames
        m.closed_bytes += size
        m.closed_dropped += session.dropped
        m.closed_conflated += session.conflated
        extra = {} if transport is None else {"transport": transport}
        log.info(
            "connection_closed",
            conn=session.id,
            code=code,
            frames_sent=frames,
            dropped=session.dropped,
            conflated=session.conflated,
            **extra,
        )

    # --- client messages ----------------------------------------------------------

    async def _serve_frames(self, conn: WsConnection) -> None:
        s = self.settings
        session = conn.session
        bucket = conn.bucket
        try:
            while not conn.closing and not conn.lost:
                msg = conn.next_message()
                if msg is None:
                    break
                if not bucket.take():
                    if bucket.rejected >= s.rate_limit_close_after:
                        self.disconnect(session, Close.RATE_LIMITED, "rate limit exceeded")
                        break
                    self.metrics.rate_limited.inc()
                    session.send_control(
                        protocol.error_message(
                            RateLimited(
                                "too many messages, slow down",
                                request_id=protocol.peek_request_id(msg),
                            )
                        )
                    )
                    continue
                if isinstance(msg, str):
                    await self._handle_frame(conn, msg)
                else:
                    session.send_control(
                        protocol.error_message(BadField("binary frames are not supported"))
                    )
        except Exception:
            log.exception("connection_error", conn=session.id)
            conn.close(Close.SERVER_ERROR, "internal error")
        finally:
            conn.task_done()
            if conn.inbox and not conn.closing and not conn.lost:
                # Arrived while the last one finished: keep going.
                self.frames_waiting(conn)

    def _client_error(self, session: Session, exc: GatewayError) -> None:
        self.metrics.client_errors.labels(exc.code).inc()
        if exc.code == ErrorCode.UNAUTHORIZED:
            self.metrics.auth_failures.labels(_auth_reason(str(exc))).inc()
            # An in-band login (the auth frame) that fails is as invisible to
            # the operator as a refused handshake.
            self.admission.log_limited("auth_refused", conn=session.id, detail=str(exc))
        session.send_control(protocol.error_message(exc))

    def _arm_expiry(self, conn: WsConnection) -> None:
        old = conn.expiry_timer
        if old is not None:
            old.cancel()
            conn.expiry_timer = None
        session = conn.session
        exp = session.principal.expires_at
        if exp is not None:
            delay = max(0.0, exp - time.time())
            conn.expiry_timer = asyncio.get_running_loop().call_later(
                delay, session.close, Close.UNAUTHORIZED, "token expired"
            )

    async def _handle_frame(self, conn: WsConnection, text: str) -> None:
        session = conn.session
        try:
            req = protocol.decode_request(text, self.settings.max_channel_name_length)
        except GatewayError as exc:
            self._client_error(session, exc)
            return
        try:
            if req.action == "auth":
                with span(self.tracer, self.tracing, "ws.auth") as auth:
                    auth.set_attribute("redis_ws_gateway.connection", session.id)
                    await self._authenticate(conn, req)
            elif session.principal.via == "pending" and req.action != "ping":
                raise Unauthorized("authenticate first: send an auth action with a token")
            elif req.action == "subscribe":
                with span(self.tracer, self.tracing, "ws.subscribe") as sub:
                    sub.set_attribute("redis_ws_gateway.connection", session.id)
                    sub.set_attribute("redis_ws_gateway.channels", len(req.channels or ()))
                    await self._dispatch(session, req)
            else:
                await self._dispatch(session, req)
        except GatewayError as exc:
            if exc.request_id is None:
                exc.request_id = req.request_id
            self._client_error(session, exc)

    async def _authenticate(self, conn: WsConnection, req: protocol.Request) -> None:
        assert req.token is not None
        session = conn.session
        old = session.principal
        new = await self.auth.authenticate(req.token)
        if old.via != "pending" and old.user != new.user:
            raise Unauthorized("a refreshed token must be for the same subject")
        user = _counted_user(new)
        if old.via == "pending":
            refusal = self.connections.user_refusal(user)
            if refusal is not None:
                session.close(Close.POLICY, refusal)
                return
            self.connections.move_user(conn.counted_user, user)
            conn.counted_user = user
            timer = conn.auth_timer
            if timer is not None:
                timer.cancel()
                conn.auth_timer = None
        session.principal = new
        self._arm_expiry(conn)
        session.send_control(
            protocol.authenticated_message(req.request_id, new.user, new.roles, new.expires_at)
        )
        # Rights may have narrowed: drop what the new token may not read.
        lost = [
            name
            for (kind, name) in list(session.subscriptions)
            if not (new.may_subscribe_pattern(name) if kind == "pattern" else new.may_read(name))
        ]
        if lost:
            self.hub.unsubscribe(session, lost)
            session.send_control(protocol.unsubscribed_message(None, lost, reason="forbidden"))
        log.info(
            "authenticated",
            conn=session.id,
            user=new.user,
            via=new.via,
            refreshed=old.via != "pending",
        )

    async def _dispatch(self, session: Session, req: protocol.Request) -> None:
        principal = session.principal
        if req.action == "ping":
            session.send_control(protocol.pong_message(req.request_id, int(time.time() * 1000)))
        elif req.action == "subscribe":
            assert req.channels is not None
            self._check_subscribe(session, principal, req.channels)
            await self._subscribe(session, req)
            log.info("subscribed", conn=session.id, channels=list(req.channels))
        elif req.action == "unsubscribe":
            if req.channels is not None:
                missing = [
                    c for c in req.channels if self.hub.topic_key(c) not in session.subscriptions
                ]
                if missing:
                    raise NotSubscribed(
                        f"not subscribed to {', '.join(missing[:5])}",
                        channel=missing[0],
                    )
            removed = self.hub.unsubscribe(session, req.channels)
            session.send_control(protocol.unsubscribed_message(req.request_id, removed))
            log.info("unsubscribed", conn=session.id, channels=removed)

    async def subscribe_request(self, session: Session, req: protocol.Request) -> None:
        """A subscribe whose names, limits and ACL were checked by the
        caller (the SSE fallback, web/sse.py)."""
        await self._subscribe(session, req)

    async def _subscribe(self, session: Session, req: protocol.Request) -> None:
        assert req.channels is not None
        durable: dict[str, StreamSpec] = {}
        snapshots: dict[str, SnapshotRule] = {}
        for name in req.channels:
            spec = self.durable.spec(name) if self.hub.topic_key(name)[0] == "channel" else None
            opts = req.options.get(name)
            if spec is not None:
                durable[name] = spec
            elif opts is not None and opts.since is not None:
                raise BadField(f"{name} is not a durable channel: since needs one", channel=name)
            elif opts is not None and opts.snapshot is not None:
                rule = self.snapshots.rule(name)
                if rule is None:
                    raise BadField(f"no snapshot is configured for {name}", channel=name)
                snapshots[name] = rule
        plain = [n for n in req.channels if n not in durable]
        states: dict[str, dict[str, Any]] = {}
        if snapshots:
            session.hold()
        try:
            if plain:
                subs = await self.hub.subscribe(
                    session, plain, self.settings.subscribe_timeout_seconds
                )
                states.update(zip(plain, subs, strict=True))
            first: list[bytes] = []
            for name, rule in snapshots.items():
                body = await self.snapshots.read(name, rule)
                states[name]["snapshot"] = body is not None
                if body is not None:
                    first.append(protocol.snapshot_message(name, body))
        except BaseException:
            if snapshots:
                session.release([])
            raise
        for name, spec in durable.items():
            states[name] = await self.durable.subscribe(session, spec, req.options.get(name))
        reply = protocol.subscribed_message(
            req.request_id, req.channels, [states[n] for n in req.channels]
        )
        if snapshots:
            # The snapshot and the reply go out before what arrived live meanwhile.
            session.release([*first, reply])
        else:
            session.send_control(reply)

    def _check_subscribe(
        self, session: Session, principal: Principal, channels: tuple[str, ...]
    ) -> None:
        """All-or-nothing: one bad name rejects the whole request."""
        s = self.settings
        new = [c for c in channels if self.hub.topic_key(c) not in session.subscriptions]
        new_wild = sum(1 for c in new if self.hub.topic_key(c)[0] == "pattern")
        for name in new:
            kind, _ = self.hub.topic_key(name)
            if kind == "pattern" and pattern_metachars(name) > s.max_pattern_metachars:
                raise BadChannel(
                    f"pattern has more than {s.max_pattern_metachars} wildcards", channel=name
                )
            allowed = (
                principal.may_subscribe_pattern(name)
                if kind == "pattern"
                else principal.may_read(name)
            )
            if not allowed:
                raise Forbidden(f"role may not read {name}", channel=name)
        if len(session.subscriptions) + len(new) > s.max_channels_per_client:
            raise TooManyChannels(
                f"at most {s.max_channels_per_client} subscriptions per connection"
            )
        if session.wildcards + new_wild > s.max_wildcard_subscriptions:
            raise TooManyWildcards(
                f"at most {s.max_wildcard_subscriptions} wildcard subscriptions per connection"
            )


_AUTH_REASONS = {
    "invalid credential": "invalid_credential",
    "token expired": "expired",
    "token not yet valid": "not_yet_valid",
    "bad token signature": "bad_signature",
    "token algorithm not allowed": "algorithm",
    "token algorithm does not match its key": "algorithm",
    "unknown token key id": "unknown_kid",
    "token issuer or audience not accepted": "issuer_audience",
    "token has no exp claim": "claims",
    "token has no sub claim": "claims",
    "malformed token": "malformed",
}


def _auth_reason(message: str) -> str:
    """A bounded label for an auth failure message (never the token)."""
    if message.startswith("token claim"):
        return "claims"
    return _AUTH_REASONS.get(message, "other")


def _origin_allowed(origin: str, allowed: tuple[str, ...], host: str | None) -> bool:
    """Exact scheme, host and port (default ports spelled or not): no
    suffix or substring matching.

    ``host``: the request's Host header, accepted as the origin's host under
    either scheme only when ALLOW_SAME_HOST_ORIGIN asks for it. Off by
    default: a DNS-rebinding page sends its own name as both Origin and Host.
    """
    if "*" in allowed:
        return True
    key = origin_key(origin)
    if key is None:
        return False
    if key in {origin_key(a) for a in allowed}:
        return True
    if host is None:
        return False
    return origin_key(f"{key[0]}://{host}") == key


def _counted_user(principal: Principal) -> str | None:
    return principal.user if principal.via in ("jwt", "api_key") else None
