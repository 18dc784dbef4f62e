"""HTTP and WebSocket surface, and the gateway's lifecycle.

Routes only translate between HTTP and the parts: the WebSocket handler turns
client frames into hub calls after auth, ACL and limit checks; health routes
report state. Shutdown follows Kubernetes: readiness fails at once and new
upgrades are refused with 503 while clients are told to reconnect (1012)
spread over the drain window; then the listeners close and the process exits
within a bounded time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools
import os
import random
import resource
import signal
import socket
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

import orjson
import structlog
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

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
from redis_ws_gateway.observability.tracing import (
    context_from_headers,
    provider_from_env,
    tracer_for,
)
from redis_ws_gateway.security.auth import Authenticator, Principal, build_acl
from redis_ws_gateway.security.limits import (
    ConnectionCounter,
    TokenBucket,
    WireBudget,
    pattern_metachars,
)
from redis_ws_gateway.upstream.durable import Durable, StreamSpec
from redis_ws_gateway.upstream.pubsub import Upstream
from redis_ws_gateway.upstream.redis_conn import MasterLocator, tls_context
from redis_ws_gateway.upstream.sharded import ShardedUpstream
from redis_ws_gateway.upstream.snapshots import Snapshots
from redis_ws_gateway.ws import protocol
from redis_ws_gateway.ws.connection import Detached, Limits, Wheel, WsConnection, detach

log = structlog.get_logger("redis_ws_gateway.server")

CLOSE_ABNORMAL = 1006
CLOSE_POLICY = 1008
CLOSE_SERVICE_RESTART = 1012
CLOSE_ADMIN = 4000
CLOSE_SERVER_ERROR = 1011
CLOSE_UNAUTHORIZED = 4001
CLOSE_RATE_LIMITED = 4029
SUBPROTOCOL = "rwg.v1"
REFUSAL_HEADER = "X-Refusal-Reason"
# Refused handshakes logged per second (and at once) before lines are only counted.
REFUSAL_LOG_PER_SECOND = 5.0
REFUSAL_LOG_BURST = 20
TOKEN_PROTOCOL_PREFIX = "bearer."


class Gateway:
    def __init__(self, settings: Settings, tracer_provider: TracerProvider | None = None) -> None:
        self.settings = settings
        self.tracing = tracer_provider is not None
        self.tracer = tracer_for(tracer_provider)
        self.acl = build_acl(settings.roles)
        self.auth = Authenticator(settings, self.acl)
        self.hub = Hub(
            linger_seconds=settings.unsubscribe_linger_seconds,
            policies=settings.channel_policies,
            default_policy=settings.default_policy,
            slow_consumer_grace=settings.slow_consumer_grace_seconds,
            native_writes=settings.native_writes,
        )
        self.upstream = Upstream(
            settings.redis_url,
            self.hub,
            connect_timeout=settings.redis_connect_timeout_seconds,
            health_interval=settings.redis_health_check_interval_seconds,
            health_timeout=settings.redis_health_check_timeout_seconds,
            backoff_min=settings.redis_reconnect_min_seconds,
            backoff_max=settings.redis_reconnect_max_seconds,
            username=settings.redis_username,
            password=settings.redis_password,
            ssl_context=tls_context(settings),
            locator=MasterLocator(settings),
            sentinel_check=settings.redis_sentinel_check_seconds,
        )
        self.hub.upstream = self.upstream
        self.sharded: ShardedUpstream | None = None
        if settings.redis_sharded_channels:
            self.sharded = ShardedUpstream(settings, self.hub)
            self.hub.sharded = self.sharded
            self.hub.sharded_patterns = settings.redis_sharded_channels
        self.durable = Durable(settings, self.hub)
        if self.tracing:
            self.hub.tracer = self.tracer
            self.hub.trace_sample_rate = settings.trace_delivery_sample_rate
        self.upstream.tracer = self.tracer
        self.snapshots = Snapshots(settings, self.durable.redis)
        self.sessions: dict[Session, WsConnection] = {}
        # Server pings and dead-peer checks of every connection: one timer.
        self.wheel = Wheel(settings.ws_ping_interval_seconds)
        self.draining = False
        self.started_at = time.time()
        self._ids = itertools.count(1)
        self._prefix = os.urandom(2).hex()
        self.connections = ConnectionCounter(
            settings.max_connections,
            settings.max_connections_per_ip,
            settings.max_connections_per_user,
            settings.max_pending_handshakes,
            # Behind a proxy every socket comes from the proxy's address: the
            # client's is known only from the request, and counted then.
            settings.max_pending_handshakes_per_ip,
        )
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
        # Accepted sockets not yet upgraded, with the address they count under.
        self._pending: dict[web.RequestHandler, str | None] = {}
        # Their request-head deadlines, until the first request starts.
        self._deadlines: dict[web.RequestHandler, asyncio.TimerHandle] = {}
        # Refused sockets whose request is being read and thrown away.
        self._refused: set[_Refused] = set()
        # Whether sockets are counted from accept (served through runner()).
        self._counting = False
        self._refusal_log = TokenBucket(REFUSAL_LOG_PER_SECOND, REFUSAL_LOG_BURST)
        self._refusals_unlogged = 0
        # Last: its collector reads the state above.
        self.metrics = Metrics(self)
        self.hub.observe_processing = self.metrics.processing.observe

    # --- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        await self.auth.start()
        self.upstream.start()
        if self.sharded is not None:
            self.sharded.start()
        self.durable.start()

    async def drain(self) -> None:
        """Tell every client to reconnect elsewhere, spread over the window."""
        self.draining = True
        sessions = list(self.sessions)
        window = self.settings.drain_window_seconds
        log.info("drain_started", sessions=len(sessions), window=window)
        if not sessions:
            return
        random.shuffle(sessions)
        step = window / len(sessions)

        async def close_later(session: Session, delay: float) -> None:
            await asyncio.sleep(delay)
            self.disconnect(session, CLOSE_SERVICE_RESTART, "service restart")

        # One task per client, all concurrent; the spread, not a sequential
        # await, is what paces them.
        await asyncio.gather(
            *(close_later(s, i * step) for i, s in enumerate(sessions)), return_exceptions=True
        )
        log.info("drain_finished")

    async def stop(self) -> None:
        # Connections left after the drain (or without one): aiohttp no
        # longer owns them, so its cleanup would not close them.
        for session in list(self.sessions):
            self.disconnect(session, CLOSE_SERVICE_RESTART, "service restart")
        self.wheel.stop()
        await self.upstream.stop()
        if self.sharded is not None:
            await self.sharded.stop()
        await self.durable.stop()

    # --- sessions -----------------------------------------------------------

    def _close_session(self, session: Session, code: int, reason: str) -> None:
        """Session.close(): the close frame goes out now; the clean-up waits
        for the next loop iteration (see WsConnection._finish_soon)."""
        self.disconnect(session, code, reason)

    def disconnect(self, session: Session, code: int, reason: str) -> None:
        """Close one client's connection with ``code`` (close frame, then the
        socket)."""
        conn = self.sessions.get(session)
        if conn is None or conn.closing or conn.lost:
            return
        log.info("connection_closing", conn=session.id, code=code, reason=reason)
        conn.close(code, reason)

    async def handle_ws(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            return self._reject(503, "draining", "draining")
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
            return self._reject(403, "origin", "origin not allowed")
        ip = _client_ip(request, s.trusted_proxy_hops)
        credential, via_protocol = _credential(request)
        try:
            with self.tracer.start_as_current_span("ws.connect") as span:
                span.set_attribute("client.address", ip)
                if credential is not None:
                    # The upgrade has a deadline as the request head has: a
                    # slow key fetch must not hold sockets open without end.
                    async with asyncio.timeout(s.handshake_timeout_seconds):
                        principal = await self.auth.authenticate(credential)
                elif s.require_auth:
                    principal = self.auth.unauthenticated()
                else:
                    principal = self.auth.anonymous()
                span.set_attribute("redis_ws_gateway.security.auth", principal.via)
        except TimeoutError:
            return self._reject(503, "handshake_timeout", "authentication timed out")
        except Unauthorized as exc:
            self.metrics.auth_failures.labels(_auth_reason(str(exc))).inc()
            return self._reject(401, "unauthorized", str(exc))
        except Forbidden as exc:
            self.metrics.auth_failures.labels("no_known_role").inc()
            return self._reject(403, "forbidden", str(exc))
        user = _counted_user(principal)
        handler = request.protocol
        if handler not in self._pending:
            if not self._counting:
                raise RuntimeError("serve the gateway through Gateway.runner()")
            # Its socket went while the credential was checked.
            return self._reject(503, "handshake_timeout", "connection gone")
        sock_ip = self._pending[handler]
        refusal = self.connections.upgrade_refusal(sock_ip, ip, user)
        if refusal is not None:
            return self._reject(*_LIMIT_REFUSALS[refusal], refusal)
        # aiohttp validates the upgrade and writes the 101; pings, client
        # frames and closing are the WsConnection's (heartbeat off here).
        ws = web.WebSocketResponse(
            max_msg_size=s.ws_max_message_bytes,
            compress=False,
            # Only our protocol name is ever echoed, never the token a browser
            # put in Sec-WebSocket-Protocol.
            protocols=(SUBPROTOCOL,) if via_protocol else (),
        )
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
        # The socket is the connection's now: counted as open, not pending,
        # before detach() makes aiohttp report it lost.
        del self._pending[handler]
        self.connections.upgraded(sock_ip, ip, user)
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

    def _open(self, conn: WsConnection) -> None:
        s = self.settings
        session = conn.session
        principal = session.principal
        self.sessions[session] = conn
        loop = asyncio.get_running_loop()
        if principal.via == "pending":
            conn.auth_timer = loop.call_later(
                s.auth_timeout_seconds, session.close, CLOSE_UNAUTHORIZED, "authentication timeout"
            )
        self._arm_expiry(conn)
        if s.max_connection_age_seconds:
            # Jitter spreads reconnects so a scale-out rebalances gradually.
            age = s.max_connection_age_seconds * random.uniform(0.85, 1.15)
            conn.age_timer = loop.call_later(
                age, session.close, CLOSE_SERVICE_RESTART, "max connection age"
            )
        self.metrics.opened.inc()
        log.info(
            "connection_open",
            conn=session.id,
            remote=conn.ip,
            user=principal.user,
            via=principal.via,
        )

    # --- WsConnection callbacks ----------------------------------------------

    def frames_waiting(self, conn: WsConnection) -> None:
        """Client messages are queued on ``conn``: handle them in order, one
        at a time, in a task that lives only while there are some."""
        task = asyncio.get_running_loop().create_task(self._serve_frames(conn))
        conn.task = task

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
                        self.disconnect(session, CLOSE_RATE_LIMITED, "rate limit exceeded")
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
            conn.close(CLOSE_SERVER_ERROR, "internal error")
        finally:
            conn.task_done()
            if conn.inbox and not conn.closing and not conn.lost:
                # Arrived while the last one finished: keep going.
                self.frames_waiting(conn)

    def writable(self, session: Session) -> None:
        self.hub.writable(session)

    def connection_gone(self, conn: WsConnection) -> None:
        """Closed or lost, and no client message is being handled: forget it."""
        session = conn.session
        self.hub.remove_session(session)
        del self.sessions[session]
        self.connections.closed(conn.ip, conn.counted_user)
        code = conn.close_code if conn.close_code is not None else CLOSE_ABNORMAL
        m = self.metrics
        m.closed.labels(close_reason(code)).inc()
        frames, size = session.sent()
        m.closed_frames += frames
        m.closed_bytes += size
        m.closed_dropped += session.dropped
        m.closed_conflated += session.conflated
        log.info(
            "connection_closed",
            conn=session.id,
            code=code,
            frames_sent=frames,
            dropped=session.dropped,
            conflated=session.conflated,
        )

    # --- sockets before their upgrade --------------------------------------

    def runner(self, part: Literal["all", "public", "internal"] = "all") -> web.AppRunner:
        """The aiohttp runner for ``part`` of this gateway's routes (see
        build_app). Where clients connect, sockets are counted from accept
        (socket_opened/socket_closed); the internal port is for operators and
        probes, and no flood of client sockets can lock them out of it."""
        if part == "internal":
            return web.AppRunner(
                self.build_app(part), handle_signals=False, access_log=None, shutdown_timeout=1.0
            )
        self._counting = True
        return _GatewayRunner(
            self,
            self.build_app(part),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=1.0,
            # Idle time allowed between requests on a kept-alive socket, and
            # for a later request's head (the first one's is the deadline
            # armed in socket_opened).
            keepalive_timeout=self.settings.http_keepalive_timeout_seconds,
        )

    def socket_opened(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        ip: str | None = None
        if not self.settings.trusted_proxy_hops:
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and peer:
                ip = str(peer[0])
        refusal = self.connections.admit(ip)
        if refusal is None:
            self._pending[handler] = ip
            self._deadlines[handler] = asyncio.get_running_loop().call_later(
                self.settings.handshake_timeout_seconds, self._head_too_late, handler
            )
            return
        status, label = _LIMIT_REFUSALS[refusal]
        self.metrics.rejected.labels(label).inc()
        self._log_refusal(status, label, refusal)
        # Next in the loop, once aiohttp's handler has started: it is then
        # let go of like an upgraded connection's (detach()).
        asyncio.get_running_loop().call_soon(self._refuse, handler, transport, status, refusal)

    def _refuse(
        self, handler: web.RequestHandler, transport: asyncio.Transport, status: int, reason: str
    ) -> None:
        """Answer a socket refused at accept without reading its request,
        and close it: with a response rather than a reset, and holding its
        descriptor only briefly (_Refused), so a flood of sockets never
        holds more descriptors than the caps allow."""
        if transport.is_closing():
            return
        refused = _Refused(transport, self._refused)
        transport.set_protocol(refused)
        # Taken from aiohttp like an upgraded connection (detach()); its
        # request task has not run yet and would fail on the handler it
        # finds torn down, so it is cancelled before its first step.
        task = handler._task_handler
        handler.transport = None
        handler.connection_lost(None)
        if task is not None:
            task.cancel()
        # As many refused sockets may linger as handshakes may be pending:
        # _fit_fd_limit keeps descriptors for both.
        refused.answer(_early_refusal(status, reason), self.settings.max_pending_handshakes)

    def socket_closed(self, handler: web.RequestHandler) -> None:
        if handler in self._pending:
            self.connections.closed(self._pending.pop(handler), None, pending=True)
        self._head_received(handler)

    def _head_received(self, handler: web.RequestHandler) -> None:
        timer = self._deadlines.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def _head_too_late(self, handler: web.RequestHandler) -> None:
        """No complete request head within HANDSHAKE_TIMEOUT_SECONDS of
        accept: a slowloris client, or one too slow to serve."""
        self._deadlines.pop(handler, None)
        self.metrics.rejected.labels("handshake_timeout").inc()
        self._log_limited(
            "handshake_refused",
            status=None,
            reason="handshake_timeout",
            detail="no complete request head in time",
        )
        handler.force_close()

    @web.middleware
    async def _first_request(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # The request head is complete: the deadline that bounds it is met.
        self._head_received(request.protocol)
        result: web.StreamResponse = await handler(request)
        return result

    def _reject(self, status: int, reason: str, text: str) -> web.Response:
        self.metrics.rejected.labels(reason).inc()
        self._log_refusal(status, reason, text)
        # A WebSocket client library seldom exposes the body of a refused
        # upgrade; the header carries the same reason to it.
        return web.Response(status=status, text=f"{text}\n", headers={REFUSAL_HEADER: text})

    def _log_refusal(self, status: int, reason: str, text: str) -> None:
        """A browser shows only a failed upgrade, so the log is where an
        operator learns why."""
        self._log_limited("handshake_refused", status=status, reason=reason, detail=text)

    def _log_limited(self, event: str, **fields: Any) -> None:
        """Refusals share one bucket, so a flood of bad handshakes or auth
        frames cannot fill the disk; the next line that gets through counts
        the ones left out."""
        if not self._refusal_log.take():
            self._refusals_unlogged += 1
            return
        log.warning(event, **fields, unlogged_since_last=self._refusals_unlogged)
        self._refusals_unlogged = 0

    def _client_error(self, session: Session, exc: GatewayError) -> None:
        self.metrics.client_errors.labels(exc.code).inc()
        if exc.code == "unauthorized":
            self.metrics.auth_failures.labels(_auth_reason(str(exc))).inc()
            # An in-band login (the auth frame) that fails is as invisible to
            # the operator as a refused handshake.
            self._log_limited("auth_refused", conn=session.id, detail=str(exc))
        session.send_control(protocol.error_message(exc))

    async def metrics_endpoint(self, _: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

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
                delay, session.close, CLOSE_UNAUTHORIZED, "token expired"
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
                with self.tracer.start_as_current_span("ws.auth") as span:
                    span.set_attribute("redis_ws_gateway.ws.connection", session.id)
                    await self._authenticate(conn, req)
            elif session.principal.via == "pending" and req.action != "ping":
                raise Unauthorized("authenticate first: send an auth action with a token")
            elif req.action == "subscribe" and self.tracing:
                with self.tracer.start_as_current_span("ws.subscribe") as span:
                    span.set_attribute("redis_ws_gateway.ws.connection", session.id)
                    span.set_attribute("redis_ws_gateway.channels", len(req.channels or ()))
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
                session.close(CLOSE_POLICY, refusal)
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

    # --- health ---------------------------------------------------------------

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, _: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"ready": False, "reason": "draining"}, status=503)
        if not self.upstream.is_up:
            return web.json_response({"ready": False, "reason": "redis unreachable"}, status=503)
        if self.sharded is not None and not self.sharded.ready:
            return web.json_response(
                {"ready": False, "reason": "cluster slot map not read yet"}, status=503
            )
        return web.json_response({"ready": True})

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        name = _STATIC_ROUTES[request.path]
        return web.FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-cache"})

    async def publish(self, request: web.Request) -> web.Response:
        """POST /publish {"channel": ..., "data": <JSON>} for services that do
        not speak Redis. Durable channels get one XADD (the reply carries the
        offset); others a PUBLISH (the reply carries the receiver count)."""
        refusal = await self._http_principal(
            request, "publisher", "needs the API key or the publisher role"
        )
        if refusal is not None:
            return refusal
        if (request.content_length or 0) > self.settings.publish_max_bytes:
            return _http_error(
                413, "too_large", f"body over {self.settings.publish_max_bytes} bytes"
            )
        raw = await request.content.read(self.settings.publish_max_bytes + 1)
        if len(raw) > self.settings.publish_max_bytes:
            return _http_error(
                413, "too_large", f"body over {self.settings.publish_max_bytes} bytes"
            )
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _http_error(400, "bad_json", "body is not valid JSON")
        if not isinstance(body, dict) or set(body) != {"channel", "data"}:
            return _http_error(400, "bad_request", 'body must be {"channel": ..., "data": ...}')
        channel = body["channel"]
        try:
            if not isinstance(channel, str):
                raise BadChannel("channel must be a string")
            protocol.validate_channel(channel, self.settings.max_channel_name_length)
            if self.hub.topic_key(channel)[0] == "pattern":
                raise BadChannel("cannot publish to a pattern", channel=channel)
        except GatewayError as exc:
            return _http_error(400, exc.code, str(exc))
        payload = orjson.dumps(body["data"])
        spec = self.durable.spec(channel)
        trace.get_current_span().set_attribute("messaging.destination.name", channel)
        try:
            if spec is not None:
                offset = await self.durable.publish(spec, payload)
                return web.json_response({"channel": channel, "offset": offset.decode()})
            if self.hub.is_sharded(channel):
                # SPUBLISH: routed by the cluster client to the slot's master.
                receivers = await self.durable.redis.spublish(channel, payload)
            else:
                receivers = await self.durable.redis.publish(channel, payload)
        except (OSError, RedisError) as exc:
            log.warning("publish_failed", channel=channel, error=str(exc) or type(exc).__name__)
            return _http_error(503, "upstream_unavailable", "Redis is unreachable; retry")
        return web.json_response({"channel": channel, "receivers": receivers})

    # --- admin API (docs/openapi.yaml) ----------------------------------------------

    async def _http_principal(
        self, request: web.Request, role: str | None, refusal: str
    ) -> web.Response | None:
        """None when the request carries the API key (or a token with
        ``role``), else the HTTP refusal to send."""
        credential, _ = _credential(request)
        if credential is None:
            return _http_error(401, "unauthorized", "credential required")
        try:
            principal = await self.auth.authenticate(credential)
        except (Unauthorized, Forbidden) as exc:
            return _http_error(401, "unauthorized", str(exc))
        if principal.via != "api_key" and (role is None or role not in principal.roles):
            return _http_error(403, "forbidden", refusal)
        return None

    async def _admin(self, request: web.Request) -> web.Response | None:
        return await self._http_principal(request, None, "the admin API needs the gateway API key")

    def _describe_session(self, session: Session) -> dict[str, Any]:
        frames, size = session.sent()
        return {
            "id": session.id,
            "user": session.principal.user,
            "auth": session.principal.via,
            "roles": list(session.principal.roles),
            "remote": session.remote,
            "openedAt": int(session.opened_at * 1000),
            "subscriptions": [{kind: name} for kind, name in session.subscriptions],
            "bufferedBytes": session.buffered_bytes(),
            "lagging": session.lagging,
            "framesSent": frames,
            "bytesSent": size,
            "dropped": session.dropped,
            "conflated": session.conflated,
        }

    async def admin_connections(self, request: web.Request) -> web.Response:
        if (refusal := await self._admin(request)) is not None:
            return refusal
        user = request.query.get("user")
        sessions = [s for s in self.sessions if user is None or s.principal.user == user]
        return web.json_response({"connections": [self._describe_session(s) for s in sessions]})

    async def admin_disconnect(self, request: web.Request) -> web.Response:
        if (refusal := await self._admin(request)) is not None:
            return refusal
        conn_id = request.match_info["conn_id"]
        session = next((s for s in self.sessions if s.id == conn_id), None)
        if session is None:
            return _http_error(404, "not_found", f"no connection {conn_id}")
        self.disconnect(session, CLOSE_ADMIN, "closed by an administrator")
        return web.json_response({"closed": [conn_id]})

    async def admin_disconnect_user(self, request: web.Request) -> web.Response:
        if (refusal := await self._admin(request)) is not None:
            return refusal
        user = request.match_info["user"]
        victims = [s for s in self.sessions if s.principal.user == user]
        for s in victims:
            self.disconnect(s, CLOSE_ADMIN, "closed by an administrator")
        return web.json_response({"closed": [s.id for s in victims]})

    async def admin_stats(self, request: web.Request) -> web.Response:
        if (refusal := await self._admin(request)) is not None:
            return refusal
        sessions = list(self.sessions)
        return web.json_response(
            {
                "uptimeSeconds": round(time.time() - self.started_at, 3),
                "draining": self.draining,
                "connections": len(sessions),
                "clientSubscriptions": sum(len(s.subscriptions) for s in sessions),
                "upstream": {
                    "up": self.upstream.is_up,
                    "redis": self.upstream.address.describe(),
                    "reconnects": self.upstream.reconnects,
                    "channels": len(self.hub.channels),
                    "patterns": len(self.hub.patterns),
                    "streams": len(self.hub.streams),
                    "messagesIn": self.hub.messages_in,
                    "sharded": self.sharded.stats() if self.sharded is not None else None,
                },
                "durable": {
                    "readerUp": self.durable.reader_up,
                    "replays": self.durable.replays,
                    "replayedEntries": self.durable.replayed_entries,
                },
                "laggingSessions": self.hub.lagging_count(),
                "bufferedBytes": sum(s.buffered_bytes() for s in sessions),
            }
        )

    @web.middleware
    async def _trace_http(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not self.tracing or request.path == "/ws":
            result: web.StreamResponse = await handler(request)
            return result
        # A caller's traceparent makes this span a child of the caller's, so a
        # /publish shows up inside the trace of whatever published it.
        with self.tracer.start_as_current_span(
            f"HTTP {request.method} {request.path}",
            context=context_from_headers(request.headers),
            kind=SpanKind.SERVER,
        ) as span:
            span.set_attribute("http.request.method", request.method)
            span.set_attribute("url.path", request.path)
            response: web.StreamResponse = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            return response

    def build_app(self, part: Literal["all", "public", "internal"] = "all") -> web.Application:
        """``all``: every route on one port. With an internal port, ``public``
        is what clients reach (WebSocket, /publish, /client.js, health) and
        ``internal`` what only operators should (metrics, admin, console)."""
        app = web.Application(
            client_max_size=self.settings.publish_max_bytes + 1024,
            middlewares=[self._first_request, self._trace_http],
        )
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        if part in ("all", "public"):
            app.router.add_post("/publish", self.publish)
            app.router.add_get("/ws", self.handle_ws)
            app.router.add_get("/client.js", self.static_file)
        if part in ("all", "internal"):
            app.router.add_get("/admin/connections", self.admin_connections)
            app.router.add_delete("/admin/connections/{conn_id}", self.admin_disconnect)
            app.router.add_delete("/admin/users/{user}/connections", self.admin_disconnect_user)
            app.router.add_get("/admin/stats", self.admin_stats)
            app.router.add_get("/metrics", self.metrics_endpoint)
            for route in _STATIC_ROUTES:
                if route != "/client.js":
                    app.router.add_get(route, self.static_file)
        return app


STATIC_DIR = Path(__file__).parent / "static"
# Only these files are served: no directory listing, no path from the request.
_STATIC_ROUTES = {
    "/": "console.html",
    "/client.js": "client.js",
    "/console.js": "console.js",
    "/console.css": "console.css",
}


def _credential(request: web.Request) -> tuple[str | None, bool]:
    """The credential a client presented, and whether it offered our subprotocol.

    Browsers cannot set headers on a WebSocket, so besides ``?token=`` they
    may offer ``["rwg.v1", "bearer.<token>"]`` as subprotocols.
    """
    offered = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    token: str | None = None
    for p in offered:
        if p.startswith(TOKEN_PROTOCOL_PREFIX) and len(p) > len(TOKEN_PROTOCOL_PREFIX):
            token = p[len(TOKEN_PROTOCOL_PREFIX) :]
    query = request.query.get("token")
    if query:
        token = query
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer ") and header[7:].strip():
        token = header[7:].strip()
    return token, SUBPROTOCOL in offered


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


def _http_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


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


class _GatewayRunner(web.AppRunner):
    """An AppRunner whose server reports each accepted and closed socket to
    the gateway before aiohttp reads a byte from it."""

    def __init__(self, gateway: Gateway, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._gateway = gateway

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        gateway = self._gateway
        made, lost = server.connection_made, server.connection_lost

        # aiohttp's Server is the one object told of every socket; it has
        # no hook, so its two methods are wrapped on this instance.
        def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            gateway.socket_opened(handler, transport)

        def connection_lost(handler: web.RequestHandler, exc: BaseException | None = None) -> None:
            gateway.socket_closed(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]
        return server


class _Refused(asyncio.Protocol):
    """A socket refused at accept: its response goes out, then what the
    client still sends is read and dropped until it closes (or for at most
    REFUSED_LINGER_SECONDS). Closing a socket with unread input makes the
    kernel send a reset, and the client may lose the response to it."""

    def __init__(self, transport: asyncio.Transport, lingering: set[_Refused]) -> None:
        self.transport = transport
        self.lingering = lingering
        self.timer: asyncio.TimerHandle | None = None

    def answer(self, response: bytes, linger_max: int) -> None:
        transport = self.transport
        transport.write(response)
        if len(self.lingering) >= linger_max or not transport.can_write_eof():
            # No descriptor to spare for reading the rest later: what has
            # come in already (usually the whole request) is read now.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                _discard_input(sock.fileno())
            transport.close()
            return
        transport.write_eof()
        self.lingering.add(self)
        self.timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_SECONDS, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lingering.discard(self)
        if self.timer is not None:
            self.timer.cancel()


REFUSED_LINGER_SECONDS = 2.0


def _discard_input(fd: int) -> None:
    for _ in range(16):
        try:
            if not os.read(fd, 65536):
                return
        except OSError:  # nothing more to read now, or the peer is gone
            return


# Each message ConnectionCounter refuses with: its HTTP status and the label
# of the connections_rejected metric.
_LIMIT_REFUSALS: dict[str, tuple[int, str]] = {
    "too many connections on this gateway": (503, "limit_total"),
    "too many handshakes in progress": (503, "limit_pending"),
    "too many connections from this address": (429, "limit_ip"),
    "too many handshakes from this address": (429, "limit_pending"),
    "too many connections for this user": (429, "limit_user"),
}


def _early_refusal(status: int, reason: str) -> bytes:
    """A whole HTTP response for a socket refused when it is accepted, before
    any request: aiohttp has no way to answer a request not yet read."""
    body = f"{reason}\n".encode()
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{REFUSAL_HEADER}: {reason}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


def _client_ip(request: web.Request, trusted_hops: int) -> str:
    """The client's address; behind N trusted proxies, the Nth from the right
    of X-Forwarded-For (entries further left are whatever the client sent)."""
    if trusted_hops:
        hops = [
            h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()
        ]
        if len(hops) >= trusted_hops:
            return hops[-trusted_hops]
    return request.remote or "?"


def _counted_user(principal: Principal) -> str | None:
    return principal.user if principal.via in ("jwt", "api_key") else None


def _fit_fd_limit(settings: Settings) -> Settings:
    """Raise the open-file limit to its hard maximum, and cap MAX_CONNECTIONS
    plus MAX_PENDING_HANDSHAKES below it: past the limit the event loop would
    accept and drop sockets silently, which is worse than a 503 the client
    can act on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft == resource.RLIM_INFINITY:
        return settings
    usable = max(3, soft - 128)  # Redis connections, log and config files, listeners
    # Pending handshakes and as many refused sockets being read out
    # (_Refused) on top of the open connections.
    pending = min(settings.max_pending_handshakes, max(1, usable // 6))
    connections = min(settings.max_connections, usable - 2 * pending)
    if (connections, pending) != (settings.max_connections, settings.max_pending_handshakes):
        # Only a limit someone chose is worth a warning; the defaults are a
        # ceiling, and fitting them to a smaller machine is routine.
        chosen = settings.max_connections != Settings.max_connections
        (log.warning if chosen else log.info)(
            "max_connections_capped_by_fd_limit",
            configured=settings.max_connections,
            effective=connections,
            pending=pending,
            nofile=soft,
        )
        return dataclasses.replace(
            settings, max_connections=connections, max_pending_handshakes=pending
        )
    return settings


class ListenError(Exception):
    """The gateway cannot listen where it was told to (one line for the user)."""


def _bind(host: str, port: int, setting: str) -> socket.socket:
    """A listening socket, made before anything else starts: a port in use
    then ends the start at once with one line, instead of surfacing only
    after Redis connections and tasks have been started and torn down."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ListenError(
            f"cannot listen on {host}: {exc.strerror} (REDIS_WS_GATEWAY_HOST)"
        ) from None
    try:
        sock = socket.create_server(address, family=family, backlog=128)
    except OSError as exc:
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(
                f"port {port} on {host} is already in use (another gateway or demo?): "
                f"stop it or set {setting}"
            ) from None
        raise ListenError(f"cannot listen on {where}: {exc.strerror or exc} ({setting})") from None
    sock.setblocking(False)
    return sock


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain and exit within the shutdown timeout.

    Raises ListenError, before starting anything, when a port cannot be bound."""
    settings = _fit_fd_limit(settings)
    public_sock = _bind(settings.host, settings.port, "REDIS_WS_GATEWAY_PORT")
    internal_sock = (
        _bind(settings.host, settings.internal_port, "REDIS_WS_GATEWAY_INTERNAL_PORT")
        if settings.internal_port
        else None
    )
    provider = provider_from_env()
    gateway = Gateway(settings, provider)
    await gateway.start()
    runners: list[web.AppRunner] = []
    sites: list[web.SockSite] = []
    parts: list[tuple[Literal["all", "public", "internal"], socket.socket]] = (
        [("all", public_sock)]
        if internal_sock is None
        else [("public", public_sock), ("internal", internal_sock)]
    )
    try:
        for part, sock in parts:
            runner = gateway.runner(part)
            await runner.setup()
            runners.append(runner)
            site = web.SockSite(runner, sock)
            await site.start()
            sites.append(site)
    except BaseException:
        # Stopped in order, so the error surfaces now rather than after
        # asyncio.run has cancelled tasks that were never told to stop.
        await gateway.stop()
        for runner in runners:
            await runner.cleanup()
        raise
    log.info(
        "listening",
        host=settings.host,
        port=public_sock.getsockname()[1],
        internal_port=internal_sock.getsockname()[1] if internal_sock is not None else None,
        redis=gateway.upstream.address.describe(),
        # Which fan-out loop runs: "c", or "python" when the _fanout
        # extension was not built or NATIVE_WRITES is off.
        fanout="c" if gateway.hub.fanout_native else "python",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutdown_requested")
    # The listeners stay open while draining: /readyz answers 503 and new
    # upgrades get 503 "draining", which a probe or a client can act on,
    # where a closed port only says "refused".
    gateway.draining = True
    try:
        await asyncio.wait_for(gateway.drain(), settings.shutdown_timeout_seconds)
    except TimeoutError:
        log.warning("drain_timeout", remaining=len(gateway.sessions))
    for site in sites:
        await site.stop()
    await gateway.stop()
    for runner in runners:
        await runner.cleanup()
    if provider is not None:
        provider.shutdown()
    log.info("stopped")
