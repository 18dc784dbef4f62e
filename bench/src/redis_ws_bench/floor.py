"""The kernel floor in a workload's own shape: the least a forwarder can do
per delivery, which ``redis-ws-bench`` measures next to the gateway.

It reads Redis the way the gateway does (the same hiredis ``Upstream``) and
builds each message's frame once with the gateway's own functions; then it
hands the frame and the file descriptors of its recipients to a write loop
in C (``_writeloop``, the gateway's own loop in Python when the bench was
built without a compiler), one ``write`` per recipient: no session, no
batch, no buffer accounting, no slow-consumer policy, no per-recipient
Python. Its CPU per delivery is what one small loopback write costs with the
same receivers, the same publisher
and the same rhythm as the workload (receivers that sleep between messages
must be woken, sockets are cold). A tight loop of writes to receivers that
are always busy (the bench's other floor) pays for neither.

A write that the kernel does not take whole hands the rest, and everything
after it on that connection, to the transport, so nothing is lost or
reordered; such fallbacks are counted and printed at exit.

It speaks only the bench's subset of the protocol (subscribe -> subscribed,
then data frames). Do not deploy it.

    python -m redis_ws_bench.floor --port 8891 --redis-url redis://127.0.0.1:6379
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Container
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from redis_ws_bench.naive import serve_until_signalled, target_args
from redis_ws_gateway.fanout import writer
from redis_ws_gateway.upstream.pubsub import SubKind, Upstream
from redis_ws_gateway.ws import protocol

write_each: writer.WriteEach
try:
    from redis_ws_bench._writeloop import write_each
except ImportError:  # built without a C compiler
    write_each = writer.write_each
NATIVE = write_each is not writer.write_each


@dataclass(eq=False)
class _Conn:
    fd: int
    transport: asyncio.Transport
    # Set once the kernel refused part of a write: from then on this
    # connection's frames go through its transport, in order.
    buffered: bool = False


@dataclass(eq=False)
class _Channel:
    prefix: bytes
    seq: int = 0
    raw: list[_Conn] = field(default_factory=list)
    # The descriptors of ``raw``, in its order: what write_each takes.
    fds: list[int] = field(default_factory=list)
    buffered: list[_Conn] = field(default_factory=list)

    def add_raw(self, conn: _Conn) -> None:
        self.raw.append(conn)
        self.fds.append(conn.fd)

    def remove_raw(self, conn: _Conn) -> bool:
        """Take ``conn`` out of ``raw`` and its descriptor out of ``fds``."""
        if conn not in self.raw:
            return False
        i = self.raw.index(conn)
        del self.raw[i]
        del self.fds[i]
        return True


class Floor:
    def __init__(self, redis_url: str) -> None:
        self.channels: dict[bytes, _Channel] = {}
        self.confirmed: dict[bytes, asyncio.Future[None]] = {}
        self.fallbacks = 0
        self.upstream = Upstream(
            redis_url,
            self,
            connect_timeout=5.0,
            health_interval=30.0,
            health_timeout=10.0,
            backoff_min=0.1,
            backoff_max=1.0,
            client_name="redis-ws-gateway-bench-floor",
        )

    # --- the measured path -------------------------------------------------------

    def on_message(self, channel: bytes, pattern: bytes | None, payload: bytes) -> None:
        ch = self.channels.get(channel)
        if ch is None:
            return
        ch.seq += 1
        body, is_b64 = protocol.payload_json(payload)
        frame = protocol.text_frame(protocol.data_message(ch.prefix, ch.seq, body, is_b64))
        failed = write_each(frame, ch.fds)
        if failed is not None:
            raw = ch.raw
            # Backwards: _fall_back removes the connection from raw and fds.
            for i, sent in reversed(failed):
                if sent >= 0:
                    self._fall_back(ch, raw[i], frame[sent:])
                # sent < 0: the peer is gone; its handler removes it
        for conn in ch.buffered:
            conn.transport.write(frame)

    def _fall_back(self, ch: _Channel, conn: _Conn, rest: bytes) -> None:
        self.fallbacks += 1
        conn.buffered = True
        conn.transport.write(rest)
        ch.remove_raw(conn)
        ch.buffered.append(conn)

    # --- the rest of UpstreamListener -----------------------------------------------

    def on_batch_start(self, repeated: Container[bytes]) -> None:
        pass

    def on_batch_end(self) -> None:
        pass

    def on_upstream_up(self) -> None:
        if self.channels:
            self.upstream.subscribe("channel", *self.channels)

    def on_upstream_down(self) -> None:
        print("bench_floor: Redis connection lost", file=sys.stderr, flush=True)

    def on_confirmed(self, kind: SubKind, name: bytes, error: str | None) -> None:
        fut = self.confirmed.pop(name, None)
        if fut is not None and not fut.done():
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(RuntimeError(f"SUBSCRIBE {name!r}: {error}"))

    def on_shard_lost(self, name: bytes) -> None:
        pass

    # --- connections -----------------------------------------------------------------

    async def channel(self, name: bytes) -> _Channel:
        ch = self.channels.get(name)
        if ch is not None:
            if name in self.confirmed:
                await asyncio.shield(self.confirmed[name])
            return ch
        ch = self.channels[name] = _Channel(protocol.data_prefix(name, None))
        fut = self.confirmed[name] = asyncio.get_running_loop().create_future()
        await self.upstream.connected.wait()
        self.upstream.subscribe("channel", name)
        await asyncio.shield(fut)
        return ch

    async def handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if transport is None or sock is None:
            raise web.HTTPInternalServerError(text="no socket")
        conn = _Conn(sock.fileno(), transport)
        mine: list[_Channel] = []
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                req = json.loads(msg.data)
                if req.get("action") != "subscribe":
                    await ws.send_str(json.dumps({"type": "error", "code": "unknown_action"}))
                    continue
                names = [str(c) for c in req["channels"]]
                chans = [await self.channel(n.encode()) for n in names]
                subs = [
                    {"channel": n, "epoch": "floor", "seq": c.seq, "live": True}
                    for n, c in zip(names, chans, strict=True)
                ]
                reply = {"type": "subscribed", "channels": names, "subscriptions": subs}
                if "requestId" in req:
                    reply["requestId"] = req["requestId"]
                # The reply is on the wire before the first raw write.
                await ws.send_str(json.dumps(reply))
                for c in chans:
                    if conn.buffered:
                        c.buffered.append(conn)
                    else:
                        c.add_raw(conn)
                    mine.append(c)
        finally:
            for c in mine:
                if not c.remove_raw(conn) and conn in c.buffered:
                    c.buffered.remove(conn)
        return ws

    async def readyz(self, _: web.Request) -> web.Response:
        return web.json_response({"ready": self.upstream.is_up})


async def serve(host: str, port: int, redis_url: str) -> None:
    floor = Floor(redis_url)
    floor.upstream.start()
    app = web.Application()
    app.router.add_get("/ws", floor.handle_ws)
    app.router.add_get("/readyz", floor.readyz)

    async def stop(_: web.Application) -> None:
        print(f"bench_floor: {floor.fallbacks} writes fell back to the transport", flush=True)
        await floor.upstream.stop()

    app.on_shutdown.append(stop)
    await serve_until_signalled(app, host, port)


def main(argv: list[str] | None = None) -> int:
    import uvloop

    args = target_args("python -m redis_ws_bench.floor", __doc__, argv)
    uvloop.run(serve(args.host, args.port, args.redis_url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
