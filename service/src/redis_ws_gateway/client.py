"""An asyncio client for the gateway's protocol (used by the CLI and tests).

Replies are matched to requests by ``requestId``; everything else (data,
notices) is queued for the reader. Server errors raise ``ServerError`` with
the protocol's error code.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp
import orjson


class ServerError(Exception):
    def __init__(self, code: str, message: str, frame: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.frame = frame


class ConnectionClosed(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"connection closed (code {code})")
        self.code = code


class GatewayClient:
    def __init__(self, url: str, token: str | None = None, *, timeout: float = 10.0) -> None:
        self.url = url
        self.token = token
        self.timeout = timeout
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.close_code: int | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    async def connect(self) -> GatewayClient:
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

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                frame = orjson.loads(msg.data)
                rid = frame.get("requestId")
                fut = self._pending.pop(rid, None) if isinstance(rid, str) else None
                if fut is not None and not fut.done():
                    fut.set_result(frame)
                else:
                    self.messages.put_nowait(frame)
        finally:
            self.close_code = self._ws.close_code
            err = ConnectionClosed(self.close_code)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self._pending.clear()
            self.closed.set()

    async def request(self, action: str, **fields: Any) -> dict[str, Any]:
        if self._ws is None or self.closed.is_set():
            raise ConnectionClosed(self.close_code)
        rid = f"r{next(self._ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        await self._ws.send_str(
            orjson.dumps({"action": action, "requestId": rid, **fields}).decode()
        )
        try:
            reply = await asyncio.wait_for(fut, self.timeout)
        finally:
            self._pending.pop(rid, None)
        if reply.get("type") == "error":
            raise ServerError(reply.get("code", "?"), reply.get("message", ""), reply)
        return reply

    async def send_raw(self, text: str) -> None:
        assert self._ws is not None
        await self._ws.send_str(text)

    async def subscribe(self, *channels: str) -> dict[str, Any]:
        return await self.request("subscribe", channels=list(channels))

    async def unsubscribe(self, *channels: str) -> dict[str, Any]:
        return await self.request("unsubscribe", channels=list(channels))

    async def ping(self) -> dict[str, Any]:
        return await self.request("ping")

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
