"""One gateway: its parts built in dependency order, its routes, and its
lifecycle from start to stop.

Shutdown follows Kubernetes: readiness fails at once and new upgrades are
refused with 503 while clients are told to reconnect (1012) spread over the
drain window; then the listeners close and the process exits within a
bounded time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import resource
import signal
import socket
from collections.abc import Sequence
from typing import Any, Literal

import structlog
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind

from redis_ws_gateway.config import Settings
from redis_ws_gateway.fanout.hub import Hub
from redis_ws_gateway.fanout.session import Session
from redis_ws_gateway.observability.metrics import Metrics, processing_histogram
from redis_ws_gateway.observability.tracing import (
    context_from_headers,
    provider_from_env,
    tracer_for,
)
from redis_ws_gateway.security.auth import Authenticator, build_acl
from redis_ws_gateway.security.limits import ConnectionCounter
from redis_ws_gateway.upstream.durable import Durable
from redis_ws_gateway.upstream.pubsub import Upstream
from redis_ws_gateway.upstream.redis_conn import MasterLocator, tls_context
from redis_ws_gateway.upstream.sharded import ShardedUpstream
from redis_ws_gateway.upstream.snapshots import Snapshots
from redis_ws_gateway.web.access import HttpAuth
from redis_ws_gateway.web.admin import Admin
from redis_ws_gateway.web.health import Health
from redis_ws_gateway.web.publish import Publish
from redis_ws_gateway.web.sse import SseHandler
from redis_ws_gateway.web.static import PUBLIC_STATIC, STATIC_ROUTES, static_file
from redis_ws_gateway.ws.admission import Admission
from redis_ws_gateway.ws.connection import OpenConnection
from redis_ws_gateway.ws.handler import WsHandler

log = structlog.get_logger("redis_ws_gateway.server")

Part = Literal["all", "public", "internal"]


class Server:
    """The gateway's parts and what binds them: the constructor builds each
    one from the ones it needs (Redis side first, then the connections'
    handler, then the HTTP routes), ``build_app``/``runner`` lay out the
    routes per port, and ``serve`` runs the whole life of the process."""

    def __init__(self, settings: Settings, tracer_provider: TracerProvider | None = None) -> None:
        self.settings = settings
        self.tracer_provider = tracer_provider
        self.tracing = tracer_provider is not None
        self.tracer = tracer_for(tracer_provider)
        self.auth = Authenticator(settings, build_acl(settings.roles))
        processing = processing_histogram()
        self.hub = Hub(
            linger_seconds=settings.unsubscribe_linger_seconds,
            policies=settings.channel_policies,
            default_policy=settings.default_policy,
            slow_consumer_grace=settings.slow_consumer_grace_seconds,
            compression_min_bytes=settings.ws_compression_min_bytes,
            compression_level=settings.ws_compression_level,
            payload_validation=settings.payload_validation,
            sharded_patterns=settings.redis_sharded_channels,
            tracer=self.tracer if self.tracing else None,
            trace_sample_rate=settings.trace_delivery_sample_rate,
            observe_processing=processing.observe,
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
            tracer=self.tracer,
        )
        self.sharded = (
            ShardedUpstream(settings, self.hub) if settings.redis_sharded_channels else None
        )
        self.durable = Durable(settings, self.hub)
        self.snapshots = Snapshots(settings, self.durable.redis)
        # Every open connection: the WebSocket handler adds and removes them,
        # the metrics and the admin API read them.
        self.sessions: dict[Session, OpenConnection] = {}
        # Set once shutdown begins: /readyz and new upgrades answer 503.
        self.drain_started = asyncio.Event()
        # Reads the state above at every scrape (and once as it registers).
        self.metrics = Metrics(self, processing)
        self.hub.connect_upstreams(self.upstream, self.sharded)
        connections = ConnectionCounter(
            settings.max_connections,
            settings.max_connections_per_ip,
            settings.max_connections_per_user,
            settings.max_pending_handshakes,
            # Behind a proxy every socket comes from the proxy's address: the
            # client's is known only from the request, and counted then.
            settings.max_pending_handshakes_per_ip,
        )
        self.admission = Admission(settings, connections, self.metrics)
        self.ws = WsHandler(
            settings,
            auth=self.auth,
            hub=self.hub,
            durable=self.durable,
            snapshots=self.snapshots,
            connections=connections,
            admission=self.admission,
            metrics=self.metrics,
            tracer=self.tracer,
            tracing=self.tracing,
            sessions=self.sessions,
            draining=self.drain_started,
        )
        # The Server-Sent Events fallback: the same checks, hub and table.
        self.sse = SseHandler(self.ws)
        http_auth = HttpAuth(self.auth)
        self.publish = Publish(settings, http_auth, self.hub, self.durable)
        self.admin = Admin(
            http_auth,
            self.ws,
            self.hub,
            self.upstream,
            self.sharded,
            self.durable,
            self.drain_started,
        )
        self.health = Health(self.upstream, self.sharded, self.drain_started, self.metrics.registry)

    @property
    def draining(self) -> bool:
        return self.drain_started.is_set()

    # --- lifecycle ----------------------------------------------------------

    async def serve(
        self, listeners: Sequence[tuple[Part, socket.socket]], ready: asyncio.Event | None = None
    ) -> None:
        """Start, listen on ``listeners``, wait for SIGTERM/SIGINT, drain and
        stop, in this order; however it ends, what started is stopped and the
        listening sockets, which are the server's from here on, are closed."""
        runners: list[web.AppRunner] = []
        sites: list[web.SockSite] = []
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        signals: list[signal.Signals] = []
        try:
            await self.start()
            for part, sock in listeners:
                runner = self.runner(part)
                await runner.setup()
                runners.append(runner)
                # aiohttp listens again on the socket, with its own default of 128.
                site = web.SockSite(runner, sock, backlog=self.settings.listen_backlog)
                await site.start()
                sites.append(site)
            ports = {part: sock.getsockname()[1] for part, sock in listeners}
            log.info(
                "listening",
                host=self.settings.host,
                port=ports.get("all", ports.get("public")),
                internal_port=ports.get("internal"),
                redis=self.upstream.address.describe(),
            )
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, signalled.set)
                signals.append(sig)
            if ready is not None:
                ready.set()
            await signalled.wait()
            log.info("shutdown_requested")
            # The listeners stay open while draining: /readyz answers 503 and
            # new upgrades get 503 "draining", which a probe or a client can
            # act on, where a closed port only says "refused".
            try:
                await asyncio.wait_for(self.drain(), self.settings.shutdown_timeout_seconds)
            except TimeoutError:
                log.warning("drain_timeout", remaining=len(self.sessions))
        finally:
            # Stopped in order, so an error in start surfaces now rather than
            # after asyncio.run has cancelled tasks that were never told to stop.
            for site in sites:
                await site.stop()
            await self.stop()
            for runner in runners:
                await runner.cleanup()
            # Listeners no site took (a failure before they were served) too.
            for _, sock in listeners:
                sock.close()
            for sig in signals:
                loop.remove_signal_handler(sig)
            if self.tracer_provider is not None:
                self.tracer_provider.shutdown()
        log.info("stopped")

    async def start(self) -> None:
        """Start the parts that run on their own: key fetches, the Redis
        connections and the stream readers."""
        await self.auth.start()
        self.upstream.start()
        if self.sharded is not None:
            self.sharded.start()
        self.durable.start()

    async def drain(self) -> None:
        """Refuse new upgrades and tell every client to reconnect elsewhere,
        spread over the drain window."""
        self.drain_started.set()
        await self.ws.drain(self.settings.drain_window_seconds)

    async def stop(self) -> None:
        """Close the connections still open, then the parts start() started
        (each stops cleanly when it never started)."""
        self.ws.stop()
        await self.upstream.stop()
        if self.sharded is not None:
            await self.sharded.stop()
        await self.durable.stop()

    # --- routes -------------------------------------------------------------

    def runner(self, part: Part = "all") -> web.AppRunner:
        """The aiohttp runner for ``part`` of the routes (see build_app).
        Where clients connect, sockets are counted from accept (ws/admission.py);
        the internal port is for operators and probes, and no flood of client
        sockets can lock them out of it."""
        app = self.build_app(part)
        if part == "internal":
            return web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        return self.admission.runner(app)

    def build_app(self, part: Part = "all") -> web.Application:
        """``all``: every route on one port. With an internal port, ``public``
        is what clients reach (WebSocket, /publish, /client.js, health) and
        ``internal`` what only operators should (metrics, admin, console)."""
        app = web.Application(
            client_max_size=self.settings.publish_max_bytes + 1024,
            # Without tracing no span middleware at all: aiohttp wraps the
            # handler in each middleware per request.
            middlewares=[
                self.admission.first_request,
                *([self._trace_http] if self.tracing else []),
            ],
        )
        app.router.add_get("/healthz", self.health.healthz)
        app.router.add_get("/readyz", self.health.readyz)
        if part in ("all", "public"):
            app.router.add_post("/publish", self.publish.publish)
            app.router.add_get("/ws", self.ws.handle_ws)
            app.router.add_get("/sse", self.sse.handle_sse, allow_head=False)
            for route in PUBLIC_STATIC:
                app.router.add_get(route, static_file)
        if part in ("all", "internal"):
            admin = self.admin
            app.router.add_get("/admin/connections", admin.connections)
            app.router.add_delete("/admin/connections/{conn_id}", admin.disconnect)
            app.router.add_delete("/admin/users/{user}/connections", admin.disconnect_user)
            app.router.add_get("/admin/stats", admin.stats)
            app.router.add_get("/metrics", self.health.metrics)
            for route in STATIC_ROUTES:
                if route not in PUBLIC_STATIC:
                    app.router.add_get(route, static_file)
        return app

    @web.middleware
    async def _trace_http(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path in ("/ws", "/sse"):
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
    # (ws/admission.py) on top of the open connections.
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


def _bind(host: str, port: int, setting: str, backlog: int) -> socket.socket:
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
        sock = socket.create_server(address, family=family, backlog=backlog)
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
    public_sock = _bind(
        settings.host, settings.port, "REDIS_WS_GATEWAY_PORT", settings.listen_backlog
    )
    internal_sock = (
        _bind(
            settings.host,
            settings.internal_port,
            "REDIS_WS_GATEWAY_INTERNAL_PORT",
            settings.listen_backlog,
        )
        if settings.internal_port
        else None
    )
    listeners: list[tuple[Part, socket.socket]] = (
        [("all", public_sock)]
        if internal_sock is None
        else [("public", public_sock), ("internal", internal_sock)]
    )
    await Server(settings, provider_from_env()).serve(listeners, ready)
