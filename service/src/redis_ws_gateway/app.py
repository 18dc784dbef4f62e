"""HTTP and WebSocket surface, and the gateway's lifecycle.

Routes only translate between HTTP and the parts: the WebSocket handler turns
client frames into hub calls after auth, ACL and limit checks; health routes
report state. Shutdown follows Kubernetes: readiness fails at once, the
listener closes, clients are told to reconnect (1012) spread over the drain
window, and the process exits within a bounded time.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import time
from pathlib import Path

import structlog
from aiohttp import WSMsgType, web

from . import protocol
from .auth import Authenticator, Principal, build_acl
from .config import Settings
from .errors import (
    BadField,
    Forbidden,
    GatewayError,
    NotSubscribed,
    TooManyChannels,
    TooManyWildcards,
    Unauthorized,
)
from .hub import Hub
from .session import Session
from .upstream import Upstream

log = structlog.get_logger("redis_ws_gateway.app")

CLOSE_SERVICE_RESTART = 1012


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.acl = build_acl(settings.roles)
        self.auth = Authenticator(settings, self.acl)
        self.hub = Hub(
            linger_seconds=settings.unsubscribe_linger_seconds,
            policies=settings.channel_policies,
            default_policy=settings.default_policy,
            slow_consumer_grace=settings.slow_consumer_grace_seconds,
        )
        self.upstream = Upstream(
            settings.redis_url,
            self.hub,
            connect_timeout=settings.redis_connect_timeout_seconds,
            health_interval=settings.redis_health_check_interval_seconds,
            health_timeout=settings.redis_health_check_timeout_seconds,
            backoff_min=settings.redis_reconnect_min_seconds,
            backoff_max=settings.redis_reconnect_max_seconds,
        )
        self.hub.upstream = self.upstream
        self.sessions: dict[Session, web.WebSocketResponse] = {}
        self.draining = False
        self.started_at = time.time()
        self._ids = itertools.count(1)
        self._prefix = os.urandom(2).hex()
        self._close_tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        self.upstream.start()

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
            await self._close_ws(session, CLOSE_SERVICE_RESTART, "service restart")

        # One task per client, all concurrent; the spread, not a sequential
        # await, is what paces them.
        await asyncio.gather(
            *(close_later(s, i * step) for i, s in enumerate(sessions)), return_exceptions=True
        )
        log.info("drain_finished")

    async def stop(self) -> None:
        await self.upstream.stop()

    # --- sessions -----------------------------------------------------------

    def _schedule_close(self, session: Session, code: int, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._close_ws(session, code, reason))
        self._close_tasks.add(task)
        task.add_done_callback(self._close_tasks.discard)

    async def _close_ws(self, session: Session, code: int, reason: str) -> None:
        ws = self.sessions.get(session)
        if ws is None or ws.closed:
            return
        session.closing = True
        log.info("connection_closing", conn=session.id, code=code, reason=reason)
        try:
            await ws.close(code=code, message=reason.encode())
        except (ConnectionError, RuntimeError):
            pass

    async def handle_ws(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            return web.Response(status=503, text="draining\n")
        try:
            principal = self.auth.authenticate(_credential(request))
        except Unauthorized as exc:
            return web.Response(status=401, text=f"{exc}\n")
        s = self.settings
        ws = web.WebSocketResponse(
            heartbeat=s.ws_ping_interval_seconds,
            max_msg_size=s.ws_max_message_bytes,
            compress=False,
            autoping=True,
            # How long close() waits for the client's close reply: bounded so
            # that a dead peer cannot stretch the drain past the grace period.
            timeout=3.0,
        )
        await ws.prepare(request)
        transport = request.transport
        if transport is None:
            return ws
        session = Session(
            f"{self._prefix}-{next(self._ids)}",
            transport,
            principal,
            request.remote or "?",
            buffer_limit=s.outbound_buffer_bytes,
            high_water=s.outbound_high_water_bytes,
            on_dirty=self.hub.mark_dirty,
            on_lagging=self.hub.mark_lagging,
            close=self._schedule_close,
        )
        self.sessions[session] = ws
        clog = log.bind(conn=session.id)
        clog.info("connection_open", remote=session.remote, user=principal.user, via=principal.via)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._handle_frame(session, principal, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    session.send_control(
                        protocol.error_message(BadField("binary frames are not supported"))
                    )
        finally:
            self.hub.remove_session(session)
            del self.sessions[session]
            clog.info(
                "connection_closed",
                code=ws.close_code,
                frames_sent=session.frames_sent,
                dropped=session.dropped,
                conflated=session.conflated,
            )
        return ws

    async def _handle_frame(self, session: Session, principal: Principal, text: str) -> None:
        try:
            req = protocol.decode_request(text)
        except GatewayError as exc:
            session.send_control(protocol.error_message(exc))
            return
        try:
            await self._dispatch(session, principal, req)
        except GatewayError as exc:
            if exc.request_id is None:
                exc.request_id = req.request_id
            session.send_control(protocol.error_message(exc))

    async def _dispatch(
        self, session: Session, principal: Principal, req: protocol.Request
    ) -> None:
        if req.action == "ping":
            session.send_control(protocol.pong_message(req.request_id, int(time.time() * 1000)))
        elif req.action == "subscribe":
            assert req.channels is not None
            self._check_subscribe(session, principal, req.channels)
            subs = await self.hub.subscribe(
                session, req.channels, self.settings.subscribe_timeout_seconds
            )
            session.send_control(protocol.subscribed_message(req.request_id, req.channels, subs))
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
        else:
            raise BadField("auth action is not enabled")

    def _check_subscribe(
        self, session: Session, principal: Principal, channels: tuple[str, ...]
    ) -> None:
        """All-or-nothing: one bad name rejects the whole request."""
        s = self.settings
        new = [c for c in channels if self.hub.topic_key(c) not in session.subscriptions]
        new_wild = sum(1 for c in new if self.hub.topic_key(c)[0] == "pattern")
        for name in new:
            kind, _ = self.hub.topic_key(name)
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
        return web.json_response({"ready": True})

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        name = _STATIC_ROUTES[request.path]
        return web.FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-cache"})

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self.handle_ws)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        for route in _STATIC_ROUTES:
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


def _credential(request: web.Request) -> str | None:
    token = request.query.get("token")
    if token:
        return token
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return None


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain and exit within the shutdown timeout."""
    gateway = Gateway(settings)
    await gateway.start()
    runner = web.AppRunner(
        gateway.build_app(),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    log.info(
        "listening",
        host=settings.host,
        port=settings.port,
        redis=gateway.upstream.address.describe(),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutdown_requested")
    gateway.draining = True
    await site.stop()
    try:
        await asyncio.wait_for(gateway.drain(), settings.shutdown_timeout_seconds)
    except TimeoutError:
        log.warning("drain_timeout", remaining=len(gateway.sessions))
    await gateway.stop()
    await runner.cleanup()
    log.info("stopped")
