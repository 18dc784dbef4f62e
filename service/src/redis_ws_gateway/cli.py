"""`redis-ws-gateway` command line: serve, tail, demo, demo-publisher, selftest."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections import defaultdict

import orjson
import uvloop

from .config import ConfigError, load_settings


def _cmd_serve(_: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"redis-ws-gateway: {exc}", file=sys.stderr)
        return 2
    from .app import serve
    from .logs import configure_logging

    configure_logging(settings)
    uvloop.run(serve(settings))
    return 0


async def _tail(url: str, patterns: list[str], token: str | None, raw: bool) -> int:
    from .client import GatewayClient, ServerError

    counts: dict[str, int] = defaultdict(int)
    last_seq: dict[str, int] = {}
    gaps = 0
    started = time.monotonic()
    async with GatewayClient(url, token) as client:
        try:
            reply = await client.subscribe(*patterns)
        except ServerError as exc:
            print(f"tail: subscribe refused: {exc}", file=sys.stderr)
            return 1
        for sub in reply["subscriptions"]:
            key = sub.get("channel") or sub.get("pattern")
            last_seq[key] = sub["seq"]
        print(f"tail: subscribed {orjson.dumps(reply['subscriptions']).decode()}", file=sys.stderr)
        try:
            async for frame in client.frames():
                kind = frame.get("type")
                if kind == "data":
                    key = frame.get("pattern") or frame["channel"]
                    expected = last_seq.get(key, 0) + 1
                    if frame["seq"] != expected:
                        gaps += 1
                        print(
                            f"tail: GAP on {key}: expected seq {expected}, got {frame['seq']}",
                            file=sys.stderr,
                        )
                    last_seq[key] = frame["seq"]
                    counts[frame["channel"]] += 1
                    if raw:
                        print(orjson.dumps(frame).decode(), flush=True)
                    else:
                        data = orjson.dumps(frame["data"]).decode()
                        print(f"{frame['channel']} #{frame['seq']} {data}", flush=True)
                else:
                    if kind == "resubscribed":
                        for sub in frame["subscriptions"]:
                            last_seq[sub.get("channel") or sub.get("pattern")] = sub["seq"]
                    print(f"tail: {orjson.dumps(frame).decode()}", file=sys.stderr, flush=True)
        except asyncio.CancelledError:
            pass
    elapsed = max(time.monotonic() - started, 1e-9)
    total = sum(counts.values())
    print(
        f"tail: {total} messages in {elapsed:.1f}s ({total / elapsed:.1f}/s), "
        f"{len(counts)} channels, {gaps} gaps, closed with {client.close_code}",
        file=sys.stderr,
    )
    return 0


def _cmd_tail(args: argparse.Namespace) -> int:
    try:
        return uvloop.run(_tail(args.url, args.channels, args.token, args.raw))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"tail: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        port = args.port or load_settings().port
    except ConfigError as exc:
        print(f"redis-ws-gateway: {exc}", file=sys.stderr)
        return 2
    return run_demo(port)


def _cmd_demo_publisher(args: argparse.Namespace) -> int:
    from .demo import publish_forever

    try:
        uvloop.run(publish_forever(args.redis_url, args.rate))
    except KeyboardInterrupt:
        pass
    return 0


async def _selftest(url: str, redis_url: str, token: str | None, timeout: float) -> int:
    import redis.asyncio as aioredis

    from .client import GatewayClient

    channel = f"selftest:{uuid.uuid4().hex}"
    async with GatewayClient(url, token, timeout=timeout) as client:
        await client.subscribe(channel)
        # The chart passes the password on its own (from a Secret), not in the URL.
        r = aioredis.from_url(
            redis_url,
            username=os.environ.get("REDIS_USERNAME") or None,
            password=os.environ.get("REDIS_PASSWORD") or None,
        )
        try:
            await r.publish(channel, b'{"selftest":true}')
        finally:
            await r.aclose()
        frame = await client.next_of_type("data", timeout)
        if frame["channel"] != channel:
            return 1
    print(f"selftest: received the published message through {url}")
    return 0


def _cmd_selftest(args: argparse.Namespace) -> int:
    try:
        return uvloop.run(_selftest(args.url, args.redis_url, args.token, args.timeout))
    except (OSError, TimeoutError) as exc:
        print(f"selftest: failed: {exc!r}", file=sys.stderr)
        return 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="redis-ws-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway (settings from the environment)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("tail", help="print frames of channels or patterns as they arrive")
    p.add_argument("url", help="gateway WebSocket URL, e.g. ws://localhost:8889/ws")
    p.add_argument("channels", nargs="+", help="channels or glob patterns")
    p.add_argument("--token", default=os.environ.get("GATEWAY_TOKEN"), help="JWT or API key")
    p.add_argument("--raw", action="store_true", help="print whole frames as JSON lines")
    p.set_defaults(func=_cmd_tail)

    p = sub.add_parser("demo", help="run Redis, the gateway and a demo publisher")
    p.add_argument("--port", type=int, default=None, help="default: REDIS_WS_GATEWAY_PORT or 8889")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("demo-publisher", help="publish realistic ticks, signals, decisions")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--rate", type=float, default=10.0, help="ticks per instrument per second")
    p.set_defaults(func=_cmd_demo_publisher)

    p = sub.add_parser("selftest", help="subscribe, publish through Redis, expect delivery")
    p.add_argument("--url", required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--token", default=os.environ.get("GATEWAY_TOKEN"))
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=_cmd_selftest)

    # bench: the load generator; its options live in bench.py.
    from .bench import add_arguments as add_bench_arguments

    p = sub.add_parser("bench", help="load generator: fan-out latency, loss, CPU, memory")
    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result
