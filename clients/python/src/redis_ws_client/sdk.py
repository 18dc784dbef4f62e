"""The reconnecting asyncio client for applications: ``ResilientClient``.

    from redis_ws_client.sdk import ResilientClient

    async with ResilientClient("ws://localhost:8889/ws", token=get_token) as client:
        async with client.subscribe_iter("market:tick:*", "engine:decision:X") as sub:
            async for msg in sub:
                print(msg.channel, msg.seq, msg.offset, msg.data)

What it does on top of ``client.GatewayClient`` (one connection, no
reconnect), following docs/PROTOCOL.md:

- Any close the application did not ask for (1006, 1012, 4008, a network
  error, a dead connection, ...) is followed by reconnecting with exponential
  backoff and full jitter; 1012 (a draining pod) resets the backoff. Only 1008
  and 1009 (the client must change something) and a refused credential without
  a token provider stop it for good.
- After reconnecting, every subscription is sent again in one request. A
  durable channel is resumed from the last offset seen (``{"channel": c,
  "since": offset}``), so nothing is lost or repeated; a plain channel cannot
  be resumed and reports a ``Gap`` with reason ``reconnect``.
- ``seq`` is checked per subscription within an epoch: a jump is a ``Gap``
  (reason ``seq``) passed to ``on_gap``, counted in ``stats.gaps`` and attached
  to the next message as ``msg.gap``.
- A connection that has been silent for ``idle_timeout`` gets an application
  ping; no pong within ``ping_timeout`` and it is dropped and replaced.
- Messages go to each ``Subscription``'s bounded queue. A full queue stops
  the socket reader, so a slow consumer pushes back on the gateway (whose
  slow-consumer policy then applies) instead of growing memory.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import random as _random
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal

import aiohttp

from redis_ws_client.client import (
    BadChannelError,
    BadJsonError,
    BadRequestError,
    ChannelSpec,
    ConnectionClosed,
    ForbiddenError,
    Gap,
    GapReason,
    GatewayClient,
    GatewayClientError,
    HandshakeRefused,
    Message,
    NotConnected,
    NotSubscribedError,
    RateLimitedError,
    RequestTimeout,
    ServerError,
    TooManyChannelsError,
    TooManyWildcardsError,
    UnauthorizedError,
    UnknownActionError,
    UpstreamUnavailableError,
)
from redis_ws_wire import (
    FATAL_CLOSE_CODES,
    FROM_START,
    TRANSIENT_ERROR_CODES,
    Close,
    is_pattern,
)

__all__ = [
    "BadChannelError",
    "BadJsonError",
    "BadRequestError",
    "ConnectionClosed",
    "ForbiddenError",
    "Gap",
    "GatewayClient",
    "GatewayClientError",
    "HandshakeRefused",
    "Message",
    "NotConnected",
    "NotSubscribedError",
    "RateLimitedError",
    "RequestTimeout",
    "ResilientClient",
    "ServerError",
    "State",
    "Stats",
    "Subscription",
    "SubscriptionDropped",
    "SubscriptionState",
    "TooManyChannelsError",
    "TooManyWildcardsError",
    "UnauthorizedError",
    "UnknownActionError",
    "UpstreamUnavailableError",
    "backoff_delay",
    "is_pattern",
]

log = logging.getLogger("redis_ws_client.sdk")

# Earlier names of the wire module's values, kept for code that imports them.
CLOSE_SERVICE_RESTART: Final = Close.SERVICE_RESTART
TRANSIENT_CODES: Final = TRANSIENT_ERROR_CODES

State = Literal["idle", "connecting", "open", "reconnecting", "closed"]
TokenProvider = Callable[[], str | Awaitable[str | None] | None]


def backoff_delay(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = _random.random
) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)). Spreading
    reconnects over the whole window keeps a restarted gateway from being hit
    by every client at the same instant."""
    return float(rand() * min(cap, base * 2 ** min(attempt, 30)))


def offset_key(offset: str) -> tuple[int, int] | None:
    """A stream entry ID as a comparable pair; None when it is not one."""
    ms, _, seq = offset.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return None


def _newer(offset: str, than: str) -> bool:
    a, b = offset_key(offset), offset_key(than)
    # Unparseable offsets cannot be ordered; deliver rather than drop.
    return a is None or b is None or a > b


class SubscriptionDropped(GatewayClientError):
    """The gateway ended a subscription on its own (``unsubscribed`` with a
    reason, e.g. ``forbidden`` after a token refresh), or refused it when it
    was sent again after a reconnect."""

    def __init__(self, key: str, reason: str, cause: ServerError | None = None) -> None:
        super().__init__(f"subscription {key!r} dropped: {reason}")
        self.key = key
        self.reason = reason
        self.cause = cause


@dataclass(slots=True)
class Stats:
    """Counters since the client was created, for metrics."""

    messages: int = 0
    replayed: int = 0
    duplicates: int = 0
    gaps: int = 0
    missed: int = 0
    reconnects: int = 0
    # Keepalive pings the idle watchdog sent that were answered by a pong.
    keepalive_pings: int = 0


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    key: str
    kind: Literal["channel", "pattern"]
    confirmed: bool
    live: bool
    epoch: str | None
    last_seq: int | None
    durable: bool
    offset: str | None
    consumers: int


class _Ended(Exception):
    pass


class _Inbox:
    """A bounded queue whose producer can be released when the consumer leaves."""

    def __init__(self, maxsize: int) -> None:
        self._items: deque[Message] = deque()
        self._maxsize = maxsize
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._final: BaseException | None = None
        self.finished = False

    def full(self) -> bool:
        return bool(self._maxsize) and len(self._items) >= self._maxsize

    async def put(self, item: Message) -> None:
        while self.full() and not self.finished:
            self._writable.clear()
            await self._writable.wait()
        if not self.finished:
            self._items.append(item)
            self._readable.set()

    def finish(self, error: BaseException | None) -> None:
        """No more items; queued ones are still read, then ``error`` is raised
        (or the iteration ends)."""
        if self.finished:
            return
        self.finished = True
        self._final = error
        self._readable.set()
        self._writable.set()

    async def get(self) -> Message:
        while not self._items:
            if self.finished:
                if self._final is not None:
                    raise self._final
                raise _Ended
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        if not self.full():
            self._writable.set()
        return item


class _Entry:
    """One subscription key as the server sees it, shared by every
    ``Subscription`` that asked for it."""

    def __init__(self, key: str, since: str | None, snapshot: int | None) -> None:
        self.key = key
        self.kind: Literal["channel", "pattern"] = "pattern" if is_pattern(key) else "channel"
        self.sinks: dict[Subscription, None] = {}
        self.offset = since
        self.snapshot = snapshot
        self.durable = False
        self.plain_only = False
        self.sent = False
        self.request_id: str | None = None
        self.resumed = False
        self.confirmed = False
        self.ever_confirmed = False
        self.live = False
        self.synced = False
        self.saw_unsynced = False
        self.upstream_lost = False
        self.epoch: str | None = None
        self.last_seq: int | None = None
        self.pending_gap: Gap | None = None

    def wire(self) -> ChannelSpec:
        if self.kind == "channel" and not self.plain_only:
            if self.offset is not None:
                return {"channel": self.key, "since": self.offset}
            if self.durable:
                # Durable, but nothing seen yet: everything the stream holds
                # arrived after we subscribed.
                return {"channel": self.key, "since": FROM_START}
            if self.snapshot:
                # First time: the latest entries of a durable channel, or the
                # state of a plain one. Again after a reconnect only for a plain
                # channel, where fresh state stands in for the lost messages.
                return {"channel": self.key, "snapshot": self.snapshot}
        return self.key

    def reset(self) -> None:
        self.sent = False
        self.request_id = None
        self.resumed = False
        self.confirmed = False
        self.live = False
        self.synced = False
        self.saw_unsynced = False
        self.upstream_lost = False

    def advance(self, offset: str) -> None:
        if self.offset is None or _newer(offset, self.offset):
            self.offset = offset


class Subscription:
    """Messages of one or more channels/patterns, from ``subscribe_iter``.

    Use it as an async iterator (``async for msg in sub``) and preferably as
    an async context manager, which unsubscribes on exit. The subscription is
    sent on ``start()`` (called by ``async with`` and by the first iteration);
    a refusal raises the ``ServerError`` subclass there. Iteration ends when
    the client is closed, and raises ``ConnectionClosed`` when the client gave
    up reconnecting or ``SubscriptionDropped`` when the gateway ended it.
    """

    def __init__(
        self,
        client: ResilientClient,
        keys: tuple[str, ...],
        since: Mapping[str, str],
        snapshot: int | None,
        queue_size: int,
    ) -> None:
        self.keys = keys
        self._client = client
        self._since = since
        self._snapshot = snapshot
        self._inbox = _Inbox(queue_size)
        self._started = False
        self._closed = False
        self._managed = False

    async def start(self) -> Subscription:
        if not self._started:
            self._started = True
            await self._client._start(self, self._since, self._snapshot)
        return self

    async def __aenter__(self) -> Subscription:
        self._managed = True
        return await self.start()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> AsyncGenerator[Message, None]:
        return self._iterate()

    async def _iterate(self) -> AsyncGenerator[Message, None]:
        await self.start()
        try:
            while True:
                try:
                    msg = await self._inbox.get()
                except _Ended:
                    return
                yield msg
        finally:
            # A bare ``async for`` has no other place to unsubscribe.
            if not self._managed:
                await self.close()

    async def get(self, timeout: float | None = None) -> Message:
        """The next message. Raises ``TimeoutError``, or ``ConnectionClosed``
        once the subscription has ended."""
        await self.start()
        try:
            return await asyncio.wait_for(self._inbox.get(), timeout)
        except _Ended:
            raise ConnectionClosed(None, "subscription closed") from None

    async def close(self) -> None:
        """Stop receiving; the last consumer of a key unsubscribes it."""
        if self._closed:
            return
        self._closed = True
        self._inbox.finish(None)
        if self._started:
            await self._client._stop(self)

    @property
    def closed(self) -> bool:
        return self._closed

    async def _deliver(self, msg: Message) -> None:
        await self._inbox.put(msg)

    def _blocks(self) -> bool:
        return self._inbox.full() and not self._inbox.finished

    def _end(self, error: BaseException | None) -> None:
        self._inbox.finish(error)


class ResilientClient:
    """A gateway client that stays connected; see the module docstring.

    ``token`` is a string, or a callable (sync or async) returning the token
    to use; it is called before every connection attempt, so a refreshed
    token is picked up on reconnect.
    """

    def __init__(
        self,
        url: str,
        token: str | TokenProvider | None = None,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 10.0,
        reconnect: bool = True,
        backoff_base: float = 0.25,
        backoff_max: float = 10.0,
        stable_after: float = 5.0,
        idle_timeout: float | None = 20.0,
        ping_timeout: float = 10.0,
        queue_size: int = 1024,
        on_gap: Callable[[Gap], None] | None = None,
        on_state: Callable[[State], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_notice: Callable[[dict[str, Any]], None] | None = None,
        rand: Callable[[], float] = _random.random,
    ) -> None:
        self.url = url
        if callable(token):
            self._token_provider: TokenProvider | None = token
            self._token: str | None = None
        else:
            self._token_provider = None
            self._token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.backoff_base = backoff_base
        self.backoff_max = max(backoff_base, backoff_max)
        self.stable_after = stable_after
        self.idle_timeout = idle_timeout
        self.ping_timeout = ping_timeout
        self.queue_size = queue_size
        self.on_gap = on_gap
        self.on_state = on_state
        self.on_error = on_error
        self.on_notice = on_notice
        self._rand = rand
        self.state: State = "idle"
        self.stats = Stats()
        self.error: BaseException | None = None
        self.close_code: int | None = None
        self._entries: dict[str, _Entry] = {}
        self._subs: dict[Subscription, None] = {}
        self._conn: GatewayClient | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closing = False
        self._rids = itertools.count(1)
        self._last_frame = 0.0
        self._blocked = False

    # --- lifecycle ------------------------------------------------------------------

    async def connect(self) -> ResilientClient:
        """Open the first connection. Its failure raises (``HandshakeRefused``,
        ``OSError``, ``aiohttp.ClientError``, ``TimeoutError``) so that a wrong
        URL or credential shows at once; later failures are retried."""
        if self._runner is not None and not self._runner.done():
            return self
        self._closing = False
        self._stopping.clear()
        self.error = None
        self._set_state("connecting")
        try:
            conn = await self._open()
        except BaseException:
            self._set_state("closed")
            raise
        runner = self._runner = asyncio.create_task(self._run(conn), name="gateway-client")
        # The first connection may be gone again before it is up; do not wait
        # through the reconnects for it, report it.
        ready = asyncio.ensure_future(self._connected.wait())
        await asyncio.wait({ready, runner}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            raise self.error or ConnectionClosed(self.close_code)
        return self

    async def __aenter__(self) -> ResilientClient:
        return await self.connect()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection, stop reconnecting, end every subscription."""
        self._closing = True
        self._stopping.set()
        for sub in list(self._subs):
            sub._end(None)
        self._subs.clear()
        self._entries.clear()
        conn = self._conn
        if conn is not None:
            await conn.close()
        if self._runner is not None:
            await self._runner
            self._runner = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._set_state("closed")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def backpressured(self) -> bool:
        """True while the socket reader waits for room in a full subscription
        queue: a consumer that does not keep up is holding the connection
        back (and the gateway will soon see a slow consumer)."""
        return self._blocked

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until a connection is open and its subscriptions were sent."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def _resolve_token(self) -> str | None:
        if self._token_provider is None:
            return self._token
        value = self._token_provider()
        token = await value if inspect.isawaitable(value) else value
        self._token = token
        return token

    async def _open(self) -> GatewayClient:
        token = await self._resolve_token()
        conn = GatewayClient(self.url, token, timeout=self.timeout, on_frame=self._on_frame)
        await asyncio.wait_for(conn.connect(), self.connect_timeout)
        return conn

    async def _run(self, conn: GatewayClient) -> None:
        try:
            await self._keep_connected(conn)
        except Exception as exc:
            # A bug must not leave consumers waiting for messages forever.
            log.exception("gateway client: connection supervisor failed")
            self._fail(exc)

    async def _keep_connected(self, conn: GatewayClient | None) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while not self._closing:
            if conn is None:
                delay = backoff_delay(attempt, self.backoff_base, self.backoff_max, self._rand)
                attempt += 1
                self._set_state("reconnecting")
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                    break
                except TimeoutError:
                    pass
                try:
                    conn = await self._open()
                except HandshakeRefused as exc:
                    self._report(exc)
                    if exc.status in (401, 403) and self._token_provider is None:
                        self._fail(exc)
                        break
                    continue
                except (OSError, aiohttp.ClientError, TimeoutError) as exc:
                    log.debug("reconnect attempt %d failed: %r", attempt, exc)
                    continue
                except Exception as exc:
                    # A failing token provider, most likely: it may recover.
                    self._report(exc)
                    continue
                self.stats.reconnects += 1
            opened = loop.time()
            await self._serve(conn)
            code = conn.close_code
            self.close_code = code
            conn = None
            if self._closing:
                break
            if code in FATAL_CLOSE_CODES or not self.reconnect:
                self._fail(ConnectionClosed(code))
                break
            if code == CLOSE_SERVICE_RESTART or loop.time() - opened >= self.stable_after:
                attempt = 0

    async def _serve(self, conn: GatewayClient) -> None:
        self._conn = conn
        self._last_frame = asyncio.get_running_loop().time()
        self._set_state("open")
        watchdog = asyncio.create_task(self._watchdog(conn), name="gateway-client-watchdog")
        try:
            pending = [e for e in self._entries.values() if not e.sent]
            if pending:
                try:
                    await self._send_subscribe(conn, pending, initial=False)
                except (ConnectionClosed, ConnectionError):
                    pass  # gone again: the next connection sends them
            if not conn.closed.is_set():
                self._connected.set()
            await conn.closed.wait()
        finally:
            self._connected.clear()
            self._conn = None
            watchdog.cancel()
            try:
                await watchdog
            except asyncio.CancelledError:
                pass
            await conn.close()
            for entry in self._entries.values():
                entry.reset()

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self._closing = True
        for sub in list(self._subs):
            sub._end(exc)
        self._set_state("closed")

    async def _watchdog(self, conn: GatewayClient) -> None:
        """Application pings after ``idle_timeout`` of silence: a half-open TCP
        connection (a dead NAT entry, a frozen peer) never closes by itself."""
        idle_timeout = self.idle_timeout
        if not idle_timeout:
            return
        loop = asyncio.get_running_loop()
        while not conn.closed.is_set():
            now = loop.time()
            if self._blocked:
                # The reader is waiting for our own consumer, not for the network.
                self._last_frame = now
            wait = self._last_frame + idle_timeout - now
            if wait > 0:
                try:
                    await asyncio.wait_for(conn.closed.wait(), wait)
                except TimeoutError:
                    pass
                continue
            try:
                await conn.request("ping", timeout=self.ping_timeout)
                self.stats.keepalive_pings += 1
            except RequestTimeout:
                if self._blocked:
                    continue
                log.warning("no pong within %.1f s: dropping the connection", self.ping_timeout)
                await conn.abort()
                return
            except (ConnectionClosed, ConnectionError, ServerError):
                return

    # --- requests ---------------------------------------------------------------------

    def _require_conn(self) -> GatewayClient:
        conn = self._conn
        if conn is None or conn.closed.is_set():
            raise NotConnected
        return conn

    async def request(
        self, action: str, *, timeout: float | None = None, **fields: Any
    ) -> dict[str, Any]:
        """One request on the current connection; raises ``NotConnected``
        while reconnecting (requests are not queued)."""
        return await self._require_conn().request(action, timeout=timeout, **fields)

    async def ping(self, timeout: float | None = None) -> float:
        """Round-trip time of an application ping, in seconds."""
        started = time.perf_counter()
        await self.request("ping", timeout=timeout)
        return time.perf_counter() - started

    async def refresh_token(self, token: str) -> dict[str, Any] | None:
        """Use ``token`` from now on: sends it with the ``auth`` action on the
        open connection (returns the ``authenticated`` reply) and, unless a
        token provider was given, for later reconnects. While disconnected it
        is only stored (returns None). A refused token raises and the previous
        one stays in use."""
        previous = self._token
        self._token = token
        conn = self._conn
        if conn is None or conn.closed.is_set():
            return None
        try:
            return await conn.auth(token)
        except ServerError:
            self._token = previous
            raise

    # --- subscriptions -----------------------------------------------------------------

    def subscribe_iter(
        self,
        *names: str,
        since: str | Mapping[str, str] | None = None,
        snapshot: int | None = None,
        queue_size: int | None = None,
    ) -> Subscription:
        """Messages of ``names`` (channels or patterns) as a ``Subscription``.

        ``since``: resume durable channels after an offset (one for every
        exact channel among ``names``, or a mapping channel -> offset; ``"0"``
        is the start of the stream). ``snapshot``: the latest N entries of the
        durable channels first. Patterns ignore both, and so does a channel
        this client is already subscribed to (the first subscriber's options
        win).
        """
        if not names:
            raise ValueError("subscribe_iter needs at least one channel or pattern")
        if since is not None and snapshot is not None:
            raise ValueError("use either since or snapshot, not both")
        keys = tuple(dict.fromkeys(names))
        for key in keys:
            if not isinstance(key, str) or not key:
                raise ValueError(f"not a channel name: {key!r}")
        if isinstance(since, str):
            offsets = {k: since for k in keys if not is_pattern(k)}
        else:
            offsets = dict(since or {})
            bad = [k for k in offsets if k not in keys or is_pattern(k)]
            if bad:
                raise ValueError(f"since must name exact channels of this subscription: {bad}")
        size = self.queue_size if queue_size is None else queue_size
        return Subscription(self, keys, offsets, snapshot, size)

    def subscriptions(self) -> list[SubscriptionState]:
        return [
            SubscriptionState(
                key=e.key,
                kind=e.kind,
                confirmed=e.confirmed,
                live=e.live,
                epoch=e.epoch,
                last_seq=e.last_seq,
                durable=e.durable,
                offset=e.offset,
                consumers=len(e.sinks),
            )
            for e in self._entries.values()
        ]

    async def _start(
        self, sub: Subscription, since: Mapping[str, str], snapshot: int | None
    ) -> None:
        if self._closing:
            raise ConnectionClosed(self.close_code, "client closed")
        new: list[_Entry] = []
        for key in sub.keys:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry(key, since.get(key), snapshot if not is_pattern(key) else None)
                self._entries[key] = entry
                new.append(entry)
            entry.sinks[sub] = None
        self._subs[sub] = None
        conn = self._conn
        unsent = [e for e in new if not e.sent]
        if conn is None or conn.closed.is_set() or not unsent:
            return
        try:
            await self._send_subscribe(conn, unsent, initial=True)
        except ConnectionClosed:
            # Registered: sent again with everything else once reconnected.
            pass
        except BaseException:
            for entry in new:
                entry.sinks.pop(sub, None)
                if not entry.sinks and self._entries.get(entry.key) is entry:
                    del self._entries[entry.key]
            self._subs.pop(sub, None)
            sub._end(None)
            raise

    async def _stop(self, sub: Subscription) -> None:
        self._subs.pop(sub, None)
        gone: list[str] = []
        for key in sub.keys:
            entry = self._entries.get(key)
            if entry is None or sub not in entry.sinks:
                continue
            del entry.sinks[sub]
            if not entry.sinks:
                del self._entries[key]
                if entry.sent:
                    gone.append(key)
        conn = self._conn
        while gone and conn is not None and not conn.closed.is_set():
            try:
                await conn.request("unsubscribe", channels=gone)
                return
            except NotSubscribedError as exc:
                # All or nothing: take out the name the server does not know
                # and drop the rest.
                if exc.channel not in gone:
                    return
                gone.remove(exc.channel)
            except (ServerError, RequestTimeout) as exc:
                self._report(exc)
                return
            except ConnectionClosed:
                return

    async def _send_subscribe(
        self, conn: GatewayClient, entries: list[_Entry], *, initial: bool
    ) -> None:
        """One subscribe request for ``entries``.

        ``initial`` (the application's own call): errors are raised to it.
        Otherwise (after a reconnect) the request is all or nothing on the
        server, so a refused name is taken out, reported to its consumers,
        and the rest is sent again.
        """
        entries = list(entries)
        while entries:
            rid = f"s{next(self._rids)}"
            wire: list[ChannelSpec] = []
            for entry in entries:
                spec = entry.wire()
                entry.sent = True
                entry.request_id = rid
                entry.resumed = isinstance(spec, Mapping) and "since" in spec
                wire.append(spec)
            try:
                await conn.request("subscribe", channels=wire, request_id=rid)
                return
            except ServerError as exc:
                if initial:
                    raise
                for entry in entries:
                    if entry.request_id == rid:
                        entry.sent = False
                if exc.code in TRANSIENT_CODES:
                    self._report(exc)
                    self._resend_later(conn)
                    return
                culprit = next((e for e in entries if e.key == exc.channel), None)
                if culprit is None and len(entries) == 1:
                    culprit = entries[0]
                if culprit is None:
                    # No name given (e.g. too_many_channels): one at a time
                    # finds what fits.
                    for entry in entries:
                        if self._entries.get(entry.key) is entry:
                            await self._send_subscribe(conn, [entry], initial=False)
                    return
                entries.remove(culprit)
                if (
                    isinstance(exc, BadRequestError)
                    and culprit.kind == "channel"
                    and not culprit.plain_only
                    and not isinstance(culprit.wire(), str)
                ):
                    # A gateway that does not know channel objects: resume is
                    # impossible there, a plain subscription still works.
                    culprit.plain_only = True
                    culprit.offset = None
                    culprit.durable = False
                    entries.append(culprit)
                    continue
                self._drop(culprit, exc.code, exc)
            except RequestTimeout as exc:
                # Kept as sent: a late reply still confirms it.
                if initial:
                    raise
                self._report(exc)
                return

    def _resend_later(self, conn: GatewayClient) -> None:
        delay = backoff_delay(1, self.backoff_base, self.backoff_max, self._rand) + 0.05

        async def resend() -> None:
            await asyncio.sleep(delay)
            if self._conn is not conn or conn.closed.is_set():
                return
            unsent = [e for e in self._entries.values() if not e.sent]
            if unsent:
                try:
                    await self._send_subscribe(conn, unsent, initial=False)
                except (ConnectionClosed, ConnectionError):
                    pass

        task = asyncio.create_task(resend())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _drop(self, entry: _Entry, reason: str, cause: ServerError | None) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        error = SubscriptionDropped(entry.key, reason, cause)
        self._report(error)
        for sub in list(entry.sinks):
            sub._end(error)

    # --- frames ----------------------------------------------------------------------------

    async def _on_frame(self, frame: dict[str, Any]) -> bool:
        self._last_frame = asyncio.get_running_loop().time()
        kind = frame.get("type")
        if kind == "data" or kind == "snapshot":
            await self._on_data(frame)
            return True
        if kind == "subscribed":
            rid = frame.get("requestId")
            self._apply_states(frame.get("subscriptions") or (), str(rid) if rid else "")
        elif kind == "resubscribed":
            self._apply_states(frame.get("subscriptions") or (), None)
            self._notice(frame)
        elif kind == "upstream_lost":
            for state in frame.get("subscriptions") or ():
                entry = self._entries.get(state.get("pattern") or state.get("channel") or "")
                if entry is not None:
                    entry.live = entry.synced = entry.saw_unsynced = False
                    entry.upstream_lost = True
            self._notice(frame)
        elif kind == "unsubscribed" and frame.get("reason"):
            for key in frame.get("channels") or ():
                entry = self._entries.get(key)
                if entry is not None:
                    self._drop(entry, str(frame["reason"]), None)
            self._notice(frame)
        elif kind == "error" and frame.get("requestId") is None:
            self._report(ServerError.from_frame(frame))
        elif frame.get("requestId") is None:
            self._notice(frame)
        return True

    def _apply_states(self, states: Iterable[dict[str, Any]], request_id: str | None) -> None:
        """``request_id`` is the reply's, None for a ``resubscribed`` notice.

        Only the latest request for a key counts: a reply to an older one
        describes a subscription the server has since replaced.
        """
        for state in states:
            key = state.get("pattern") or state.get("channel")
            entry = self._entries.get(key) if isinstance(key, str) else None
            if entry is None:
                continue
            if request_id is not None and entry.request_id not in (None, request_id):
                continue
            seq = state.get("seq")
            seq = seq if isinstance(seq, int) else 0
            if request_id is None and entry.saw_unsynced and entry.last_seq is not None:
                # Frames of the new epoch may precede the notice that names it.
                entry.last_seq = max(entry.last_seq, seq)
            else:
                entry.last_seq = seq
            entry.epoch = state.get("epoch")
            entry.live = state.get("live") is not False
            entry.synced = entry.live
            entry.saw_unsynced = False
            if state.get("durable"):
                entry.durable = True
                offset = state.get("offset")
                if isinstance(offset, str):
                    entry.advance(offset)
            if request_id is None:
                if entry.upstream_lost:
                    self._gap(entry, "upstream")
                entry.upstream_lost = False
            elif state.get("durable") and state.get("complete") is False:
                self._gap(entry, "trimmed")
            elif (
                entry.ever_confirmed
                and not entry.confirmed
                and not (entry.durable and entry.resumed)
            ):
                self._gap(entry, "reconnect")
            entry.confirmed = True
            entry.ever_confirmed = True

    async def _on_data(self, frame: dict[str, Any]) -> None:
        pattern = frame.get("pattern")
        key = pattern if isinstance(pattern, str) else frame.get("channel")
        entry = self._entries.get(key) if isinstance(key, str) else None
        if entry is None or not entry.sinks:
            return
        offset = frame.get("offset")
        if isinstance(offset, str) and entry.kind == "channel":
            if entry.offset is not None and not _newer(offset, entry.offset):
                self.stats.duplicates += 1
                return
            entry.offset = offset
            entry.durable = True
        seq = frame.get("seq")
        if isinstance(seq, int):
            if not entry.synced:
                entry.saw_unsynced = True
            elif entry.last_seq is not None and seq != entry.last_seq + 1:
                self._gap(
                    entry,
                    "seq",
                    channel=frame.get("channel"),
                    expected=entry.last_seq + 1,
                    got=seq,
                    missed=max(0, seq - entry.last_seq - 1),
                )
            entry.last_seq = seq
        self.stats.messages += 1
        if frame.get("replay") is True:
            self.stats.replayed += 1
        gap, entry.pending_gap = entry.pending_gap, None
        msg = Message.from_frame(frame, epoch=entry.epoch, gap=gap)
        for sub in list(entry.sinks):
            if sub._blocks():
                self._blocked = True
                try:
                    await sub._deliver(msg)
                finally:
                    self._blocked = False
            else:
                await sub._deliver(msg)

    def _gap(
        self,
        entry: _Entry,
        reason: GapReason,
        *,
        channel: Any = None,
        expected: int | None = None,
        got: int | None = None,
        missed: int | None = None,
    ) -> None:
        gap = Gap(
            key=entry.key,
            reason=reason,
            channel=channel if isinstance(channel, str) else None,
            expected=expected,
            got=got,
            missed=missed,
            epoch=entry.epoch,
        )
        self.stats.gaps += 1
        self.stats.missed += missed or 0
        entry.pending_gap = gap
        if self.on_gap is not None:
            self._call(self.on_gap, gap)

    # --- callbacks -------------------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        if state == self.state and state != "reconnecting":
            return
        self.state = state
        if self.on_state is not None:
            self._call(self.on_state, state)

    def _notice(self, frame: dict[str, Any]) -> None:
        if self.on_notice is not None:
            self._call(self.on_notice, frame)

    def _report(self, exc: BaseException) -> None:
        if self.on_error is not None:
            self._call(self.on_error, exc)
        else:
            log.warning("gateway client: %s", exc)

    def _call(self, callback: Callable[..., Any], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            # A throwing callback must not break frame handling.
            log.exception("gateway client: callback %r raised", callback)
