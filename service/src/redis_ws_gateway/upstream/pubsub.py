"""The one Redis pub/sub connection of a pod: connect, handshake, subscribe,
health-check, reconnect with capped exponential backoff and jitter.

Why not redis-py's PubSub: its reader costs about 20 us per message on this
machine class, every message wakes a task, and its own
reconnect re-subscribes silently, which would hide exactly the moment clients
must be told that they may have missed messages. This module keeps the
connection as an asyncio Protocol: hiredis parses the replies and packs the
commands; the replies of one socket read are handed to the listener together,
synchronously inside ``data_received``, so every message of the read is
routed before the loop runs anything else, and the listener can coalesce
writes per client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast
from urllib.parse import unquote, urlparse

import hiredis
import structlog
from opentelemetry import trace
from opentelemetry.trace import Tracer

from redis_ws_gateway.upstream.redis_conn import MasterLocator

log = structlog.get_logger("redis_ws_gateway.upstream.pubsub")

Kind = Literal["channel", "pattern"]
# "shard": an exact channel in sharded pub/sub (SSUBSCRIBE, Redis Cluster).
SubKind = Literal["channel", "pattern", "shard"]
_SUB_CMD: dict[SubKind, bytes] = {
    "channel": b"SUBSCRIBE",
    "pattern": b"PSUBSCRIBE",
    "shard": b"SSUBSCRIBE",
}
_CONFIRMED_VERBS = frozenset(_SUB_CMD.values())
# Pushed messages of an exact channel, classic and sharded (a pmessage's
# channel is routed by its pattern).
EXACT_MESSAGES = frozenset((b"message", b"smessage"))
_UNSUB_CMD: dict[SubKind, bytes] = {
    "channel": b"UNSUBSCRIBE",
    "pattern": b"PUNSUBSCRIBE",
    "shard": b"SUNSUBSCRIBE",
}


class UpstreamListener(Protocol):
    def on_read(self, replies: list[Any], control: Callable[[Any], None]) -> None:
        """The replies of one socket read, in order, each parsed once by
        hiredis. The pushed messages are the listener's (``route`` hands
        them over); it hands every other reply back through ``control`` in
        its place, so a confirmation takes effect before the messages that
        follow it. An exception out of here is logged, never raised into
        the event loop (which would drop the connection)."""

    def on_upstream_up(self) -> None: ...
    def on_upstream_down(self) -> None: ...
    def on_confirmed(self, kind: SubKind, name: bytes, error: str | None) -> None: ...
    def on_shard_lost(self, name: bytes) -> None:
        """The server dropped a sharded subscription (its slot moved away)."""


OnMessage = Callable[[bytes, bytes | None, bytes], None]


def route(replies: list[Any], on_message: OnMessage, control: Callable[[Any], None]) -> None:
    """Each reply of a read, in order: a pushed message to ``on_message``
    (channel, pattern or None, payload), any other reply to ``control``."""
    for reply in replies:
        # A failure to route one reply is a bug to log, never a reason to
        # drop the rest of the read or the connection.
        try:
            if type(reply) is list and len(reply) >= 3:
                kind = reply[0]
                if kind in EXACT_MESSAGES:
                    on_message(reply[1], None, reply[2])
                    continue
                if kind == b"pmessage":
                    on_message(reply[2], reply[1], reply[3])
                    continue
            control(reply)
        except Exception:
            log.exception("upstream_reply_not_routed")


def _one_by_one(listener: Any) -> Callable[[list[Any], Callable[[Any], None]], None]:
    """``on_read`` for a listener that takes a read's messages one by one,
    between ``on_batch_start`` and ``on_batch_end``, with no plan over the
    read (the bench's floor)."""
    on_message: OnMessage = listener.on_message

    def on_read(replies: list[Any], control: Callable[[Any], None]) -> None:
        listener.on_batch_start(frozenset())
        try:
            route(replies, on_message, control)
        finally:
            listener.on_batch_end()

    return on_read


class UpstreamError(Exception):
    """Redis refused a command (its error text) or the connection is gone."""


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool
    unix_path: str | None = None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        u = urlparse(url)
        username = unquote(u.username) if u.username else None
        password = unquote(u.password) if u.password else None
        if u.scheme == "unix":
            return cls("", 0, username, password, False, unix_path=u.path)
        return cls(
            u.hostname or "127.0.0.1", u.port or 6379, username, password, u.scheme == "rediss"
        )

    def describe(self) -> str:
        # Never the password: this string goes to logs.
        return self.unix_path or f"{self.host}:{self.port}"


def _where(address: RedisAddress, connected: tuple[str, int] | None) -> str:
    if connected is not None and not address.unix_path:
        return f"{connected[0]}:{connected[1]}"
    return address.describe()


class _Expect:
    """One outstanding command: answered by one reply, except a subscribe
    command, which gets one confirmation per name (or one error)."""

    __slots__ = ("future", "kind", "left", "names", "verb")

    def __init__(
        self,
        verb: bytes,
        kind: SubKind | None,
        names: tuple[bytes, ...],
        future: asyncio.Future[Any] | None,
    ) -> None:
        self.verb = verb
        self.kind = kind
        self.names = names
        self.left = max(1, len(names))
        self.future = future


class PubSubProtocol(asyncio.Protocol):
    """One TCP connection to Redis in RESP2 subscribe mode.

    Every command sent here (AUTH, CLIENT SETNAME, PING, UNSUBSCRIBE)
    produces exactly one reply, and a subscribe command one confirmation per
    name or a single error, so a FIFO of expectations maps each reply, error
    replies included, to the command that caused it. Pushed
    ``message``/``pmessage``/``smessage`` arrays and ``sunsubscribe`` are the
    other traffic: Redis sends ``sunsubscribe`` on its own when a slot moves
    away, so those replies are matched by name against the SUNSUBSCRIBEs this
    side sent, never through the FIFO.
    """

    def __init__(self, listener: UpstreamListener) -> None:
        self._listener = listener
        on_read = getattr(listener, "on_read", None)
        self._on_read = on_read if on_read is not None else _one_by_one(listener)
        self._reader = hiredis.Reader()
        self._expect: deque[_Expect] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.last_pong = time.monotonic()
        self.ping_sent_at: float | None = None
        self.subscribed_mode = False
        self._sunsubscribing: dict[bytes, int] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        err = UpstreamError(f"connection lost: {exc or 'closed by server'}")
        while self._expect:
            fut = self._expect.popleft().future
            if fut is not None and not fut.done():
                fut.set_exception(err)
        if not self.closed.done():
            self.closed.set_result(exc)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        replies = []
        try:
            while (reply := reader.gets()) is not False:
                replies.append(reply)
        except hiredis.ProtocolError as exc:
            log.error("upstream_protocol_error", error=str(exc))
            if self.transport is not None:
                self.transport.abort()
        if not replies:
            return
        try:
            self._on_read(replies, self.on_control)
        except Exception:
            # Never out of data_received: uvloop would close the connection
            # every client depends on.
            log.exception("upstream_read_not_routed")

    def on_control(self, reply: Any) -> None:
        """A reply that is not a pushed message: a confirmation, a command's
        answer, or a ``sunsubscribe`` of the server's."""
        if type(reply) is list and len(reply) >= 3 and reply[0] == b"sunsubscribe":
            self._on_sunsubscribe(reply[1])
            return
        self._on_reply(reply)

    def _on_sunsubscribe(self, name: bytes) -> None:
        mine = self._sunsubscribing.get(name, 0)
        if mine:
            if mine == 1:
                del self._sunsubscribing[name]
            else:
                self._sunsubscribing[name] = mine - 1
            return
        self._listener.on_shard_lost(name)

    def _on_reply(self, reply: Any) -> None:
        if not self._expect:
            log.warning("upstream_unexpected_reply", reply=repr(reply)[:200])
            return
        exp = self._expect[0]
        is_error = isinstance(reply, hiredis.ReplyError)
        if exp.kind is not None and exp.names and exp.verb in _CONFIRMED_VERBS:
            # Synchronously, so that messages that follow the confirmation in
            # the same read are routed with the subscription's new state.
            if is_error:
                self._expect.popleft()
                log.warning(
                    "upstream_command_refused",
                    command=exp.verb.decode(),
                    names=[n.decode("utf-8", "replace") for n in exp.names[:10]],
                    error=str(reply),
                )
                for name in exp.names:
                    self._listener.on_confirmed(exp.kind, name, str(reply))
                return
            exp.left -= 1
            if exp.left == 0:
                self._expect.popleft()
            name = reply[1] if type(reply) is list and len(reply) >= 2 else exp.names[0]
            self._listener.on_confirmed(exp.kind, name, None)
            return
        self._expect.popleft()
        if exp.verb == b"PING":
            self.last_pong = time.monotonic()
            self.ping_sent_at = None
        fut = exp.future
        if fut is None or fut.done():
            if isinstance(reply, hiredis.ReplyError):
                log.warning(
                    "upstream_command_refused",
                    command=exp.verb.decode(),
                    names=[n.decode("utf-8", "replace") for n in exp.names[:10]],
                    error=str(reply),
                )
            return
        if isinstance(reply, hiredis.ReplyError):
            fut.set_exception(UpstreamError(str(reply)))
        else:
            fut.set_result(reply)

    def send(
        self,
        verb: bytes,
        *args: bytes,
        kind: SubKind | None = None,
        names: tuple[bytes, ...] = (),
        want_reply: bool = True,
    ) -> asyncio.Future[Any] | None:
        if self.transport is None or self.transport.is_closing():
            raise UpstreamError("not connected")
        fut = asyncio.get_running_loop().create_future() if want_reply else None
        if verb == b"SUNSUBSCRIBE":
            for name in names:
                self._sunsubscribing[name] = self._sunsubscribing.get(name, 0) + 1
        else:
            self._expect.append(_Expect(verb, kind, names, fut))
        # hiredis's stub types the command as a 1-tuple; any length is accepted.
        self.transport.write(hiredis.pack_command((verb, *args)))  # type: ignore[arg-type]
        return fut

    def ping(self) -> None:
        self.ping_sent_at = time.monotonic()
        self.send(b"PING", want_reply=False)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Upstream:
    """Keeps one PubSubProtocol connected for as long as the gateway runs."""

    def __init__(
        self,
        url: str,
        listener: UpstreamListener,
        *,
        connect_timeout: float,
        health_interval: float,
        health_timeout: float,
        backoff_min: float,
        backoff_max: float,
        client_name: str = "redis-ws-gateway",
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        on_state: Callable[[str], None] | None = None,
        locator: MasterLocator | None = None,
        sentinel_check: float = 1.0,
        tracer: Tracer | None = None,
    ) -> None:
        address = RedisAddress.from_url(url)
        # A password from its own setting (a Kubernetes Secret) wins over the URL,
        # so the URL can live in a ConfigMap without credentials.
        if username is not None or password is not None:
            address = dataclasses.replace(
                address,
                username=username or address.username,
                password=password or address.password,
            )
        self.address = address
        self._listener = listener
        self._connect_timeout = connect_timeout
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._client_name = client_name
        self._ssl = ssl_context
        self._on_state = on_state
        self._locator = locator if locator is not None and locator.dynamic else None
        self._check_master = locator is not None and locator.via_sentinel
        self._sentinel_check = sentinel_check
        self._connected_to: tuple[str, int] | None = None
        self._conn: PubSubProtocol | None = None
        self.tracer: Tracer = tracer if tracer is not None else trace.NoOpTracer()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.last_message_at = time.monotonic()

    @property
    def is_up(self) -> bool:
        return self._conn is not None and self.connected.is_set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="upstream")

    async def stop(self) -> None:
        self._stopping = True
        if self._locator is not None:
            await self._locator.close()
        if self._conn is not None:
            self._conn.abort()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def subscribe(self, kind: SubKind, *names: bytes) -> bool:
        """Send one (P|S)SUBSCRIBE for ``names`` now if connected; the
        listener's on_confirmed answers each name. False: not connected, the
        listener subscribes again from on_upstream_up. (Names of one SSUBSCRIBE
        must share a hash slot.)"""
        if not self.is_up or self._conn is None:
            return False
        try:
            self._conn.send(_SUB_CMD[kind], *names, kind=kind, names=names, want_reply=False)
        except UpstreamError:
            return False
        return True

    def unsubscribe(self, kind: SubKind, name: bytes) -> None:
        if self.is_up and self._conn is not None:
            try:
                self._conn.send(_UNSUB_CMD[kind], name, kind=kind, names=(name,), want_reply=False)
            except UpstreamError:
                pass

    async def _run(self) -> None:
        delay = self._backoff_min
        first = True
        while not self._stopping:
            try:
                with self.tracer.start_as_current_span(
                    "upstream.connect",
                    attributes={"server.address": self.address.describe(), "reconnect": not first},
                ):
                    # Not asyncio.wait_for: on Python 3.11 it returns a connect
                    # that finished as the task was cancelled, swallowing the
                    # cancel, and whoever cancelled (asyncio.run's clean-up
                    # after a failed start) then waits forever.
                    async with asyncio.timeout(self._connect_timeout):
                        conn = await self._connect()
            except Exception as exc:
                # Anything at all (refused, TLS, AUTH, no master known to the
                # sentinels yet...): this loop is what keeps the pod healing,
                # so it must never die of an error it did not foresee.
                # Full jitter keeps a fleet of pods from reconnecting in step
                # after a Redis restart.
                sleep_for = random.uniform(delay / 2, delay)
                log.warning(
                    "upstream_connect_failed",
                    redis=_where(self.address, self._connected_to),
                    error=str(exc) or type(exc).__name__,
                    retry_in=round(sleep_for, 3),
                )
                await asyncio.sleep(sleep_for)
                delay = min(delay * 2, self._backoff_max)
                continue
            delay = self._backoff_min
            if not first:
                self.reconnects += 1
            first = False
            self._conn = conn
            self.connected.set()
            log.info(
                "upstream_up",
                redis=_where(self.address, self._connected_to),
                reconnects=self.reconnects,
            )
            if self._on_state:
                self._on_state("up")
            self._listener.on_upstream_up()
            reason = await self._watch(conn)
            self.connected.clear()
            self._conn = None
            log.warning(
                "upstream_down", redis=_where(self.address, self._connected_to), reason=reason
            )
            if self._on_state:
                self._on_state("down")
            self._listener.on_upstream_down()

    async def _connect(self) -> PubSubProtocol:
        loop = asyncio.get_running_loop()
        a = self.address
        self._connected_to = None
        if self._locator is not None:
            host, port = await self._locator.master()
            a = dataclasses.replace(a, host=host, port=port)
        self._connected_to = (a.host, a.port)
        conn: PubSubProtocol
        if a.unix_path:
            _, conn = await loop.create_unix_connection(
                lambda: PubSubProtocol(self._listener), a.unix_path
            )
        else:
            ctx = self._ssl
            if a.tls and ctx is None:
                ctx = ssl.create_default_context()
            _, conn = await loop.create_connection(
                lambda: PubSubProtocol(self._listener),
                a.host,
                a.port,
                ssl=ctx if a.tls else None,
                server_hostname=a.host if a.tls else None,
            )
        try:
            if a.password is not None:
                creds = (
                    (a.username.encode(), a.password.encode())
                    if a.username
                    else (a.password.encode(),)
                )
                await _reply(conn.send(b"AUTH", *creds))
            await _reply(conn.send(b"CLIENT", b"SETNAME", self._client_name.encode()))
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _watch(self, conn: PubSubProtocol) -> str:
        """Wait until the connection dies, stops answering PING, or (with
        Sentinel) stops being the master."""
        next_master_check = time.monotonic() + self._sentinel_check
        while True:
            if (
                self._locator is not None
                and self._check_master
                and time.monotonic() >= next_master_check
            ):
                next_master_check = time.monotonic() + self._sentinel_check
                try:
                    current = await self._locator.master()
                except Exception as err:  # sentinels unreachable: keep what works
                    log.warning("sentinel_query_failed", error=str(err) or type(err).__name__)
                else:
                    if current != self._connected_to:
                        conn.abort()
                        await conn.closed
                        return f"sentinel switched master to {current[0]}:{current[1]}"
            done, _ = await asyncio.wait({conn.closed}, timeout=self._health_interval)
            if done:
                exc = conn.closed.result()
                return str(exc) if exc else "closed by server"
            now = time.monotonic()
            if conn.ping_sent_at is not None:
                if now - conn.ping_sent_at > self._health_timeout:
                    conn.abort()
                    await conn.closed
                    return f"no PONG within {self._health_timeout}s (Redis hung?)"
                continue
            try:
                conn.ping()
            except UpstreamError:
                continue


async def _reply(fut: asyncio.Future[Any] | None) -> Any:
    assert fut is not None
    return await fut
