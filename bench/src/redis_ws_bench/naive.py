"""A deliberately naive gateway: the baseline ``redis-ws-bench
--compare-naive`` measures the real one against.

It is what a first version usually looks like: redis-py's asyncio PubSub
``listen()``, and for every message and every recipient a ``json.dumps`` of a
fresh dict and an ``await ws.send_str``. It speaks the subset of the protocol
the bench uses (subscribe -> subscribed, then data frames with a per-channel
seq) and nothing else: no auth, no ACL, no limits, no slow-consumer policy.
Do not deploy it.

    python -m redis_ws_bench.naive --port 8890 --redis-url redis://127.0.0.1:6379
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

import redis.asyncio as aioredis
from aiohttp import WSMsgType, web


class NaiveGateway:
    def __init__(self, redis_url: str) -> None:
        self.redis = aioredis.Redis.from_url(redis_url)
        self.pubsub = self.redis.pubsub()
        self.subscribers: dict[str, set[web.WebSocketResponse]] = {}
        self.seq: dict[str, int] = {}
        self.reader: asyncio.Task[None] | None = None
        self.subscribing = asyncio.Lock()

    async def handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        mine: set[str] = set()
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    req = json.loads(msg.data)
                except ValueError:
                    await ws.send_str(json.dumps({"type": "error", "code": "bad_json"}))
                    continue
                if req.get("action") == "subscribe" and isinstance(req.get("channels"), list):
                    await self.subscribe(ws, req, mine)
                else:
                    await ws.send_str(
                        json.dumps(
                            {
                                "type": "error",
                                "code": "unknown_action",
                                "requestId": req.get("requestId"),
                            }
                        )
                    )
        finally:
            for channel in mine:
                self.subscribers[channel].discard(ws)
        return ws

    async def subscribe(
        self, ws: web.WebSocketResponse, req: dict[str, Any], mine: set[str]
    ) -> None:
        channels = [str(c) for c in req["channels"]]
        for channel in channels:
            if channel not in self.subscribers:
                self.subscribers[channel] = set()
                self.seq.setdefault(channel, 0)
                # Concurrent first subscribes would each open their own Redis
                # connection, and listen() reads only one of them.
                async with self.subscribing:
                    await self.pubsub.subscribe(channel)
                if self.reader is None:
                    # listen() fails unless a SUBSCRIBE has gone out first.
                    self.reader = asyncio.create_task(self.listen())
                    self.reader.add_done_callback(_report_death)
            self.subscribers[channel].add(ws)
            mine.add(channel)
        subs = [
            {"channel": c, "epoch": "naive", "seq": self.seq[c], "live": True} for c in channels
        ]
        reply = {"type": "subscribed", "channels": channels, "subscriptions": subs}
        if "requestId" in req:
            reply["requestId"] = req["requestId"]
        await ws.send_str(json.dumps(reply))

    async def listen(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] != "message":
                continue
            channel = message["channel"].decode()
            self.seq[channel] = seq = self.seq.get(channel, 0) + 1
            data = json.loads(message["data"])
            for ws in list(self.subscribers.get(channel, ())):
                try:
                    await ws.send_str(
                        json.dumps({"type": "data", "channel": channel, "seq": seq, "data": data})
                    )
                except ConnectionError:
                    pass

    async def readyz(self, _: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.redis.aclose()


def _report_death(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        print(f"bench_naive: reader died: {task.exception()!r}", file=sys.stderr, flush=True)


async def serve_until_signalled(app: web.Application, host: str, port: int) -> None:
    """Serve ``app`` until SIGTERM or SIGINT (the bench stops its targets so)."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def target_args(prog: str, description: str | None, argv: list[str] | None) -> argparse.Namespace:
    """The command line every bench target takes."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-url", required=True)
    return p.parse_args(argv)


async def serve(host: str, port: int, redis_url: str) -> None:
    gateway = NaiveGateway(redis_url)
    app = web.Application()
    app.router.add_get("/ws", gateway.handle_ws)
    app.router.add_get("/readyz", gateway.readyz)
    app.on_shutdown.append(lambda _: gateway.close())
    await serve_until_signalled(app, host, port)


def main(argv: list[str] | None = None) -> int:
    import uvloop

    args = target_args("python -m redis_ws_bench.naive", __doc__, argv)
    uvloop.run(serve(args.host, args.port, args.redis_url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
