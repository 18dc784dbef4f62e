"""Sockets on the client port from accept to upgrade: counted, refused or
given a deadline before aiohttp reads a byte of them.

A flood of sockets must meet the caps (MAX_PENDING_HANDSHAKES, the per-address
ones) at accept, not after their requests were parsed; and a refusal is a
response the client can act on, not a reset.
"""

from __future__ import annotations

import asyncio
import os
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web

from redis_ws_gateway.config import Settings
from redis_ws_gateway.observability.metrics import Metrics
from redis_ws_gateway.security.limits import ConnectionCounter, TokenBucket
from redis_ws_wire import REFUSAL_HEADER

log = structlog.get_logger("redis_ws_gateway.ws.admission")

# Refused handshakes logged per second (and at once) before lines are only counted.
REFUSAL_LOG_PER_SECOND = 5.0
REFUSAL_LOG_BURST = 20
REFUSED_LINGER_SECONDS = 2.0

# Each message ConnectionCounter refuses with: its HTTP status and the label
# of the connections_rejected metric.
LIMIT_REFUSALS: dict[str, tuple[int, str]] = {
    "too many connections on this gateway": (503, "limit_total"),
    "too many handshakes in progress": (503, "limit_pending"),
    "too many connections from this address": (429, "limit_ip"),
    "too many handshakes from this address": (429, "limit_pending"),
    "too many connections for this user": (429, "limit_user"),
}


class Admission:
    """The client port's sockets before their upgrade, and every refusal
    of one (at accept, or of its upgrade request)."""

    def __init__(
        self, settings: Settings, connections: ConnectionCounter, metrics: Metrics
    ) -> None:
        self._settings = settings
        self._connections = connections
        self._metrics = metrics
        # Accepted sockets not yet upgraded, with the address they count under.
        self._pending: dict[web.RequestHandler, str | None] = {}
        # Their request-head deadlines, until the first request starts.
        self._deadlines: dict[web.RequestHandler, asyncio.TimerHandle] = {}
        # Refused sockets whose request is being read and thrown away.
        self._refused: set[_Refused] = set()
        # Whether sockets are counted from accept (served through runner()).
        self._counting = False
        self.refusal_log = TokenBucket(REFUSAL_LOG_PER_SECOND, REFUSAL_LOG_BURST)
        self._refusals_unlogged = 0

    def runner(self, app: web.Application) -> web.AppRunner:
        """A runner for ``app`` whose sockets are counted from accept."""
        self._counting = True
        return _CountingRunner(
            self,
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=1.0,
            # Idle time allowed between requests on a kept-alive socket, and
            # for a later request's head (the first one's is the deadline
            # armed in socket_opened).
            keepalive_timeout=self._settings.http_keepalive_timeout_seconds,
            # No SO_KEEPALIVE: the kernel's first probe comes after two hours,
            # while the WebSocket ping and the timeout above find a dead peer
            # in seconds; the option was one more system call per accept.
            tcp_keepalive=False,
        )

    # --- accept and close -------------------------------------------------------

    def socket_opened(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        ip: str | None = None
        if not self._settings.trusted_proxy_hops:
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and peer:
                ip = str(peer[0])
        refusal = self._connections.admit(ip)
        if refusal is None:
            self._pending[handler] = ip
            self._deadlines[handler] = asyncio.get_running_loop().call_later(
                self._settings.handshake_timeout_seconds, self._head_too_late, handler
            )
            return
        status, label = LIMIT_REFUSALS[refusal]
        self._metrics.rejected.labels(label).inc()
        self.log_refusal(status, label, refusal)
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
        # server._fit_fd_limit keeps descriptors for both.
        refused.answer(_early_refusal(status, reason), self._settings.max_pending_handshakes)

    def socket_closed(self, handler: web.RequestHandler) -> None:
        if handler in self._pending:
            self._connections.closed(self._pending.pop(handler), None, pending=True)
        self._head_received(handler)

    def _head_received(self, handler: web.RequestHandler) -> None:
        timer = self._deadlines.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def _head_too_late(self, handler: web.RequestHandler) -> None:
        """No complete request head within HANDSHAKE_TIMEOUT_SECONDS of
        accept: a slowloris client, or one too slow to serve."""
        self._deadlines.pop(handler, None)
        self._metrics.rejected.labels("handshake_timeout").inc()
        self.log_limited(
            "handshake_refused",
            status=None,
            reason="handshake_timeout",
            detail="no complete request head in time",
        )
        handler.force_close()

    @web.middleware
    async def first_request(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # The request head is complete: the deadline that bounds it is met.
        self._head_received(request.protocol)
        result: web.StreamResponse = await handler(request)
        return result

    # --- the upgrade --------------------------------------------------------------

    def upgrade_refusal(
        self, handler: web.RequestHandler, ip: str, user: str | None
    ) -> web.Response | None:
        """The refusal of an upgrade the limits do not allow, else None."""
        if handler not in self._pending:
            if not self._counting:
                raise RuntimeError("serve the gateway through Server.runner()")
            # Its socket went while the credential was checked.
            return self.reject(503, "handshake_timeout", "connection gone")
        refusal = self._connections.upgrade_refusal(self._pending[handler], ip, user)
        if refusal is not None:
            return self.reject(*LIMIT_REFUSALS[refusal], refusal)
        return None

    def upgraded(self, handler: web.RequestHandler, ip: str, user: str | None) -> None:
        """The socket is a connection now: counted as open, not pending,
        before detach() makes aiohttp report it lost."""
        self._connections.upgraded(self._pending.pop(handler), ip, user)

    # --- refusals -------------------------------------------------------------------

    def reject(self, status: int, reason: str, text: str) -> web.Response:
        self._metrics.rejected.labels(reason).inc()
        self.log_refusal(status, reason, text)
        # A WebSocket client library seldom exposes the body of a refused
        # upgrade; the header carries the same reason to it.
        return web.Response(status=status, text=f"{text}\n", headers={REFUSAL_HEADER: text})

    def log_refusal(self, status: int, reason: str, text: str) -> None:
        """A browser shows only a failed upgrade, so the log is where an
        operator learns why."""
        self.log_limited("handshake_refused", status=status, reason=reason, detail=text)

    def log_limited(self, event: str, **fields: Any) -> None:
        """Refusals share one bucket, so a flood of bad handshakes or auth
        frames cannot fill the disk; the next line that gets through counts
        the ones left out."""
        if not self.refusal_log.take():
            self._refusals_unlogged += 1
            return
        log.warning(event, **fields, unlogged_since_last=self._refusals_unlogged)
        self._refusals_unlogged = 0


class _CountingRunner(web.AppRunner):
    """An AppRunner whose server reports each accepted and closed socket to
    the admission before aiohttp reads a byte from it."""

    def __init__(self, admission: Admission, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._admission = admission

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        admission = self._admission
        made, lost = server.connection_made, server.connection_lost

        # aiohttp's Server is the one object told of every socket; it has
        # no hook, so its two methods are wrapped on this instance.
        def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            admission.socket_opened(handler, transport)

        def connection_lost(handler: web.RequestHandler, exc: BaseException | None = None) -> None:
            admission.socket_closed(handler)
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


def _discard_input(fd: int) -> None:
    for _ in range(16):
        try:
            if not os.read(fd, 65536):
                return
        except OSError:  # nothing more to read now, or the peer is gone
            return


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
