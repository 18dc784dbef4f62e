"""An asyncio client for the gateway's protocol, one connection at a time.

``GatewayClient`` is the thin layer the CLI and the tests use: replies are
matched to requests by ``requestId``; everything else (data, notices) is
queued for the reader. Server errors raise a ``ServerError`` subclass chosen
by the protocol's error code. It never reconnects.

The reconnecting client with typed messages, gap detection and durable
resume is ``redis_ws_client.sdk.ResilientClient``; it is built on this class
and shares its types (``Message``, ``Gap``, the exceptions).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal

import aiohttp
import orjson

from redis_ws_wire import REFUSAL_HEADER, ErrorCode

# --- exceptions ----------------------------------------------------------------


class GatewayClientError(Exception):
    """Base of every exception the client raises on its own account."""


class ServerError(GatewayClientError):
    """An ``error`` frame in reply to a request. ``code`` is the protocol's
    error code; ``ServerError.from_frame`` picks the subclass for it."""

    code_name: ClassVar[str | None] = None
    _by_code: ClassVar[dict[str, type[ServerError]]] = {}

    def __init__(self, code: str, message: str, frame: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.frame = frame
        channel = frame.get("channel")
        self.channel: str | None = channel if isinstance(channel, str) else None
        self.request_id: str | int | None = frame.get("requestId")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.code_name is not None:
            ServerError._by_code[cls.code_name] = cls

    @classmethod
    def from_frame(cls, frame: dict[str, Any]) -> ServerError:
        code = str(frame.get("code", "?"))
        kind = ServerError._by_code.get(code, ServerError)
        return kind(code, str(frame.get("message", "")), frame)


class BadJsonError(ServerError):
    code_name = ErrorCode.BAD_JSON


class BadRequestError(ServerError):
    code_name = ErrorCode.BAD_REQUEST


class UnknownActionError(ServerError):
    code_name = ErrorCode.UNKNOWN_ACTION


class BadChannelError(ServerError):
    code_name = ErrorCode.BAD_CHANNEL


class ForbiddenError(ServerError):
    code_name = ErrorCode.FORBIDDEN


class TooManyChannelsError(ServerError):
    code_name = ErrorCode.TOO_MANY_CHANNELS


class TooManyWildcardsError(ServerError):
    code_name = ErrorCode.TOO_MANY_WILDCARDS


class NotSubscribedError(ServerError):
    code_name = ErrorCode.NOT_SUBSCRIBED


class UnauthorizedError(ServerError):
    code_name = ErrorCode.UNAUTHORIZED


class RateLimitedError(ServerError):
    code_name = ErrorCode.RATE_LIMITED


class UpstreamUnavailableError(ServerError):
    """Redis could not be reached to serve a durable channel; retry later."""

    code_name = ErrorCode.UPSTREAM_UNAVAILABLE


class ConnectionClosed(GatewayClientError):
    def __init__(self, code: int | None, reason: str | None = None) -> None:
        detail = f"connection closed (code {code})"
        super().__init__(f"{detail}: {reason}" if reason else detail)
        self.code = code
        self.reason = reason


class NotConnected(ConnectionClosed):
    """A request was made while no connection was open (a reconnecting client)."""

    def __init__(self) -> None:
        super().__init__(None, "not connected")


class HandshakeRefused(GatewayClientError):
    """The gateway refused the WebSocket upgrade (401, 403, 429, 503, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"gateway refused the connection: HTTP {status} {message}".rstrip())
        self.status = status


class RequestTimeout(GatewayClientError, TimeoutError):
    """No reply within the request timeout. A ``TimeoutError`` as well, so
    code written against plain ``asyncio.wait_for`` keeps working."""

    def __init__(self, action: str, timeout: float) -> None:
        super().__init__(f"{action}: no reply within {timeout:g} s")
        self.action = action
        self.timeout = timeout


# --- typed frames ----------------------------------------------------------------

GapReason = Literal["seq", "reconnect", "upstream", "trimmed"]


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages of one subscription may have been lost.

    ``reason``:
    - ``seq``: the subscription's ``seq`` jumped within an epoch; ``missed``
      is exactly how many messages were dropped or conflated by the gateway.
    - ``reconnect``: the connection was re-established and the subscription
      could not be resumed (not a durable channel), so what was published in
      between is unknown (``missed`` is None).
    - ``upstream``: the gateway lost Redis and re-created the subscription
      (``upstream_lost`` ... ``resubscribed``); ``missed`` is None.
    - ``trimmed``: a durable channel resumed from an offset the stream had
      already trimmed (``complete: false``); refetch state.
    """

    key: str
    reason: GapReason
    channel: str | None = None
    expected: int | None = None
    got: int | None = None
    missed: int | None = None
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """One ``data`` frame (or a state ``snapshot`` frame, ``kind="snapshot"``).

    ``data`` is the payload as the gateway delivered it: parsed JSON, a string
    for non-JSON text, or ``bytes`` when the frame was base64 (the payload was
    not UTF-8). ``seq`` is None for replayed history, ``offset`` is None for
    plain (non-durable) channels. ``gap`` is set on the first message after a
    detected gap.
    """

    channel: str
    pattern: str | None
    seq: int | None
    offset: str | None
    data: Any
    replay: bool = False
    epoch: str | None = None
    gap: Gap | None = None
    kind: Literal["data", "snapshot"] = "data"

    @property
    def key(self) -> str:
        """The subscription this message belongs to: the pattern or the channel."""
        return self.pattern if self.pattern is not None else self.channel

    @classmethod
    def from_frame(
        cls, frame: Mapping[str, Any], *, epoch: str | None = None, gap: Gap | None = None
    ) -> Message:
        data = frame.get("data")
        if frame.get("encoding") == "base64" and isinstance(data, str):
            data = base64.b64decode(data)
        seq = frame.get("seq")
        offset = frame.get("offset")
        pattern = frame.get("pattern")
        return cls(
            channel=str(frame.get("channel", "")),
            pattern=pattern if isinstance(pattern, str) else None,
            seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
            offset=offset if isinstance(offset, str) else None,
            data=data,
            replay=frame.get("replay") is True,
            epoch=epoch,
            gap=gap,
            kind="snapshot" if frame.get("type") == "snapshot" else "data",
        )


ChannelSpec = str | Mapping[str, Any]
"""A name to subscribe to, or a channel object such as
``{"channel": "engine:decision:X", "since": "1732610000000-5"}``."""

FrameHook = Callable[[dict[str, Any]], Awaitable[bool]]


# --- one connection ----------------------------------------------------------------


class GatewayClient:
    """One WebSocket connection to the gateway.

    ``on_frame``, when given, sees every frame in wire order before a reply
    resolves its request; returning True keeps the frame out of ``messages``.
    The reader awaits it, so a hook that waits applies backpressure to the
    socket.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        on_frame: FrameHook | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.timeout = timeout
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.close_code: int | None = None
        self._on_frame = on_frame
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    async def connect(self) -> GatewayClient:
        """Open the connection. A refused upgrade raises ``HandshakeRefused``;
        an unreachable host raises ``aiohttp.ClientError`` or ``OSError``."""
        self._session = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            self._ws = await self._session.ws_connect(
                self.url,
                headers=headers,
                autoping=True,
                max_msg_size=0,
                timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
            )
        except aiohttp.WSServerHandshakeError as exc:
            await self._session.close()
            got = exc.headers
            reason = (got.get(REFUSAL_HEADER) if got else None) or exc.message
            raise HandshakeRefused(exc.status, reason) from exc
        except BaseException:
            await self._session.close()
            raise
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aenter__(self) -> GatewayClient:
        return await self.connect()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await self._reader
        if self._session is not None:
            await self._session.close()

    async def abort(self) -> None:
        """Drop the connection without the closing handshake: a peer that
        stopped answering would hold ``close()`` for its whole timeout."""
        if self._session is not None:
            await self._session.close()
        if self._reader is not None:
            await self._reader

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                frame = orjson.loads(msg.data)
                consumed = False
                if self._on_frame is not None:
                    consumed = await self._on_frame(frame)
                rid = frame.get("requestId")
                fut = self._pending.pop(rid, None) if isinstance(rid, str) else None
                if fut is not None and not fut.done():
                    fut.set_result(frame)
                elif not consumed:
                    self.messages.put_nowait(frame)
        finally:
            self.close_code = self._ws.close_code
            err = ConnectionClosed(self.close_code)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self._pending.clear()
            self.closed.set()

    async def request(
        self,
        action: str,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Send ``{"action": action, **fields}`` and return the reply frame.

        Raises the ``ServerError`` subclass of the reply's code, ``RequestTimeout``
        or ``ConnectionClosed``. ``request_id`` lets a frame hook recognise the
        reply; it must be unique among this connection's pending requests.
        """
        if self._ws is None or self.closed.is_set():
            raise ConnectionClosed(self.close_code)
        rid = request_id if request_id is not None else f"r{next(self._ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        limit = self.timeout if timeout is None else timeout
        try:
            await self._ws.send_str(
                orjson.dumps({"action": action, "requestId": rid, **fields}).decode()
            )
            reply = await asyncio.wait_for(fut, limit)
        except TimeoutError:
            raise RequestTimeout(action, limit) from None
        except ConnectionResetError:
            raise ConnectionClosed(self.close_code) from None
        finally:
            self._pending.pop(rid, None)
        if reply.get("type") == "error":
            raise ServerError.from_frame(reply)
        return reply

    async def send_raw(self, text: str) -> None:
        assert self._ws is not None
        await self._ws.send_str(text)

    async def subscribe(self, *channels: ChannelSpec) -> dict[str, Any]:
        return await self.request("subscribe", channels=list(channels))

    async def unsubscribe(self, *channels: str) -> dict[str, Any]:
        return await self.request("unsubscribe", channels=list(channels))

    async def ping(self) -> dict[str, Any]:
        return await self.request("ping")

    async def auth(self, token: str) -> dict[str, Any]:
        """Authenticate this connection, or refresh its token before it expires."""
        return await self.request("auth", token=token)

    async def next_message(self, timeout: float | None = None) -> dict[str, Any]:
        return await asyncio.wait_for(self.messages.get(), timeout or self.timeout)

    async def next_of_type(self, kind: str, timeout: float | None = None) -> dict[str, Any]:
        """The next queued frame of ``kind``; frames of other types are skipped."""
        deadline = asyncio.get_running_loop().time() + (timeout or self.timeout)
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"no {kind!r} frame")
            frame = await asyncio.wait_for(self.messages.get(), left)
            if frame.get("type") == kind:
                return frame

    async def frames(self) -> AsyncIterator[dict[str, Any]]:
        while not (self.closed.is_set() and self.messages.empty()):
            getter = asyncio.ensure_future(self.messages.get())
            closed = asyncio.ensure_future(self.closed.wait())
            done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            if getter in done:
                yield getter.result()
            else:
                getter.cancel()
