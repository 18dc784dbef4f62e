"""`redis-ws-gateway` command line: serve, tail, demo, demo-publisher, selftest,
bench, publish, ping."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import uvloop

from .config import ConfigError, load_settings, settings_help, unknown_setting_warnings


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("redis-ws-gateway")
    except PackageNotFoundError:
        return "unknown"


def _cmd_serve(_: argparse.Namespace) -> int:
    from .tracing import check_env

    try:
        settings = load_settings()
        check_env()
    except ConfigError as exc:
        print(f"redis-ws-gateway: {exc}", file=sys.stderr)
        return 2
    import structlog

    from .app import ListenError, serve
    from .logs import configure_logging

    configure_logging(settings)
    for warning in unknown_setting_warnings():
        structlog.get_logger("redis_ws_gateway.config").warning("setting_ignored", detail=warning)
    try:
        uvloop.run(serve(settings))
    except ListenError as exc:
        print(f"redis-ws-gateway: {exc}", file=sys.stderr)
        return 1
    return 0


def _ws_url_error(url: str) -> str | None:
    """Why ``url`` cannot be a gateway WebSocket URL, or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        return f"not a valid URL: {url} ({exc})"
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        return f"not a WebSocket URL: {url} (expected ws://HOST:PORT/ws or wss://...)"
    return None


def _client_failure(command: str, url: str, exc: BaseException) -> str:
    """One line for a failure to reach or use the gateway."""
    from .client import HandshakeRefused

    if isinstance(exc, HandshakeRefused):
        hint = ""
        if exc.status == 401:
            hint = " (pass a valid --token, or set GATEWAY_TOKEN)"
        return f"{command}: {exc}{hint}"
    if isinstance(exc, TimeoutError):
        return f"{command}: {url} did not answer in time"
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"{command}: cannot connect to {url}: {detail}"


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (``| head``): that ends the command
    normally. Further writes to the closed pipe must not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


async def _tail(
    url: str, patterns: list[str], token: str | None, raw: bool, since: str | None = None
) -> int:
    from .client import GatewayClient, ServerError
    from .sdk import is_pattern

    counts: dict[str, int] = defaultdict(int)
    last_seq: dict[str, int] = {}
    gaps = 0
    started = time.monotonic()
    specs: list[str | dict[str, Any]] = [
        {"channel": c, "since": since} if since is not None and not is_pattern(c) else c
        for c in patterns
    ]
    async with GatewayClient(url, token) as client:
        try:
            reply = await client.subscribe(*specs)
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
                    seq = frame.get("seq")
                    # Replayed history of a durable channel has an offset but no seq.
                    if seq is not None:
                        expected = last_seq.get(key, 0) + 1
                        if seq != expected:
                            gaps += 1
                            print(
                                f"tail: GAP on {key}: expected seq {expected}, got {seq}",
                                file=sys.stderr,
                            )
                        last_seq[key] = seq
                    counts[frame["channel"]] += 1
                    if raw:
                        print(orjson.dumps(frame).decode(), flush=True)
                    else:
                        data = orjson.dumps(frame["data"]).decode()
                        where = f"#{seq}" if seq is not None else "replay"
                        if "offset" in frame:
                            where += f" @{frame['offset']}"
                        print(f"{frame['channel']} {where} {data}", flush=True)
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
    from .sdk import is_pattern

    if args.since is not None and all(is_pattern(c) for c in args.channels):
        print("tail: --since applies to exact (durable) channels, not patterns", file=sys.stderr)
        return 2
    import aiohttp

    from .client import GatewayClientError

    if (problem := _ws_url_error(args.url)) is not None:
        print(f"tail: {problem}", file=sys.stderr)
        return 2
    try:
        return uvloop.run(_tail(args.url, args.channels, args.token, args.raw, args.since))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (GatewayClientError, OSError, aiohttp.ClientError, TimeoutError) as exc:
        print(_client_failure("tail", args.url, exc), file=sys.stderr)
        return 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        # Validated even with --port: a bad REDIS_URL is one line here, not a
        # traceback from each child process.
        settings = load_settings()
        port = args.port or settings.port
    except ConfigError as exc:
        print(f"redis-ws-gateway: {exc}", file=sys.stderr)
        return 2
    return run_demo(port)


def _cmd_demo_publisher(args: argparse.Namespace) -> int:
    import redis

    from .demo import publish_forever

    try:
        uvloop.run(publish_forever(args.redis_url, args.rate))
    except KeyboardInterrupt:
        pass
    except (redis.RedisError, OSError, ValueError) as exc:
        print(f"demo-publisher: cannot publish to {args.redis_url}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _selftest(url: str, redis_url: str | None, token: str | None, timeout: float) -> int:
    import aiohttp
    import redis.asyncio as aioredis

    from .client import GatewayClient

    channel = f"selftest:{uuid.uuid4().hex}"
    async with GatewayClient(url, token, timeout=timeout) as client:
        await client.subscribe(channel)
        if redis_url is None:
            # Through the gateway's own /publish: works with whatever Redis
            # topology the gateway uses (Sentinel, TLS) without knowing it.
            http_url = url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
            http_url = http_url.rsplit("/ws", 1)[0] + "/publish"
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    http_url, json={"channel": channel, "data": {"selftest": True}}, headers=headers
                ) as resp,
            ):
                if resp.status != 200:
                    hint = " (pass the gateway's API key as --token)" if resp.status == 401 else ""
                    print(f"selftest: /publish answered {resp.status}{hint}", file=sys.stderr)
                    return 1
        else:
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


def aiohttp_errors() -> type[Exception]:
    import aiohttp

    return aiohttp.ClientError


def _cmd_selftest(args: argparse.Namespace) -> int:
    from .client import GatewayClientError

    if (problem := _ws_url_error(args.url)) is not None:
        print(f"selftest: {problem}", file=sys.stderr)
        return 2
    try:
        return uvloop.run(_selftest(args.url, args.redis_url, args.token, args.timeout))
    except (GatewayClientError, OSError, TimeoutError, aiohttp_errors()) as exc:
        print(_client_failure("selftest", args.url, exc), file=sys.stderr)
        return 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args)


def _payload_arg(text: str) -> bytes:
    """DATA as given, or the contents of the file after ``@`` (``@-``: stdin)."""
    if text.startswith("@"):
        name = text[1:]
        return sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    return text.encode()


def _cmd_publish(args: argparse.Namespace) -> int:
    import redis

    from .publish import publish, publish_durable

    try:
        payload = _payload_arg(args.data)
    except OSError as exc:
        print(f"publish: cannot read {args.data[1:]}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if not args.raw:
        try:
            orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            print(
                f"publish: DATA is not valid JSON ({exc}); a JSON string needs its quotes "
                "('\"text\"' in a shell), or pass --raw to publish the bytes as they are",
                file=sys.stderr,
            )
            return 2
    if args.sharded and args.durable:
        print("publish: --sharded is for pub/sub channels, not --durable ones", file=sys.stderr)
        return 2
    if not args.redis_url:
        # No silent default: a message sent to some other Redis is lost without a trace.
        print(
            "publish: which Redis? pass --redis-url redis://HOST:PORT or set REDIS_URL",
            file=sys.stderr,
        )
        return 2
    # The bytes go out as written: the gateway forwards valid JSON byte for
    # byte, so re-encoding would only change number formatting.
    credentials = {
        "username": os.environ.get("REDIS_USERNAME") or None,
        "password": os.environ.get("REDIS_PASSWORD") or None,
        "socket_connect_timeout": 5.0,
    }
    client: Any
    try:
        if args.cluster:
            # Routes SPUBLISH and XADD to the master owning the key's slot.
            client = redis.RedisCluster.from_url(args.redis_url, **credentials)
        else:
            client = redis.Redis.from_url(args.redis_url, **credentials)
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        print(f"publish: {exc}", file=sys.stderr)
        return 1
    try:
        if args.durable:
            offset = publish_durable(
                client, args.channel, payload, maxlen=args.maxlen, prefix=args.stream_prefix
            )
            print(offset)
        else:
            receivers = publish(client, args.channel, payload, sharded=args.sharded)
            # Redis counts its own subscribers: gateway processes with a
            # client on the channel, not the clients themselves.
            noun = "Redis subscriber" if receivers == 1 else "Redis subscribers"
            print(f"published to {args.channel}: {receivers} {noun} received it")
            if receivers == 0:
                print(
                    "publish: no gateway is subscribed to it on this Redis (no client "
                    "watches the channel, or the gateway uses another REDIS_URL)",
                    file=sys.stderr,
                )
    except redis.RedisError as exc:
        print(f"publish: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text}")
    return value


def _percentile(ordered: list[float], pct: float) -> float:
    """Nearest rank: a value that was actually measured."""
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


async def _ping(url: str, token: str | None, count: int, interval: float, timeout: float) -> int:
    from .client import GatewayClient

    rtts: list[float] = []
    async with GatewayClient(url, token, timeout=timeout) as client:
        for i in range(count):
            if i:
                await asyncio.sleep(interval)
            started = time.perf_counter()
            await client.ping()
            rtt = time.perf_counter() - started
            rtts.append(rtt)
            print(f"pong {i + 1}: {rtt * 1000:.2f} ms", flush=True)
    ordered = sorted(rtts)
    print(
        f"ping: {count} pings to {url}: min {ordered[0] * 1000:.2f} ms, "
        f"p50 {_percentile(ordered, 50) * 1000:.2f} ms, "
        f"p99 {_percentile(ordered, 99) * 1000:.2f} ms, max {ordered[-1] * 1000:.2f} ms"
    )
    return 0


def _cmd_ping(args: argparse.Namespace) -> int:
    import aiohttp

    from .client import GatewayClientError

    if args.count < 1:
        print("ping: --count must be at least 1", file=sys.stderr)
        return 2
    if (problem := _ws_url_error(args.url)) is not None:
        print(f"ping: {problem}", file=sys.stderr)
        return 2
    try:
        return uvloop.run(_ping(args.url, args.token, args.count, args.interval, args.timeout))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (GatewayClientError, OSError, aiohttp.ClientError, TimeoutError) as exc:
        print(_client_failure("ping", args.url, exc), file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="redis-ws-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "serve",
        help="run the gateway (settings from the environment)",
        description="Run the gateway. Every setting comes from the environment; "
        "an invalid value stops the start with one line naming it.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("tail", help="print frames of channels or patterns as they arrive")
    p.add_argument("url", help="gateway WebSocket URL, e.g. ws://localhost:8889/ws")
    p.add_argument("channels", nargs="+", help="channels or glob patterns")
    p.add_argument("--token", default=os.environ.get("GATEWAY_TOKEN"), help="JWT or API key")
    p.add_argument("--raw", action="store_true", help="print whole frames as JSON lines")
    p.add_argument(
        "--since",
        metavar="OFFSET",
        help="durable channels: replay what came after OFFSET first (0: the whole stream)",
    )
    p.set_defaults(func=_cmd_tail)

    p = sub.add_parser("demo", help="run Redis, the gateway and a demo publisher")
    p.add_argument("--port", type=int, default=None, help="default: REDIS_WS_GATEWAY_PORT or 8889")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("demo-publisher", help="publish realistic ticks, signals, decisions")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--rate", type=float, default=10.0, help="ticks per instrument per second")
    p.set_defaults(func=_cmd_demo_publisher)

    p = sub.add_parser("selftest", help="subscribe, publish, expect delivery")
    p.add_argument("--url", required=True)
    p.add_argument(
        "--redis-url",
        default=None,
        help="publish straight to this Redis; default: through the gateway's /publish",
    )
    p.add_argument("--token", default=os.environ.get("GATEWAY_TOKEN"))
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=_cmd_selftest)

    # bench: the load generator; its options live in bench.py.
    from .bench import add_arguments as add_bench_arguments

    p = sub.add_parser("bench", help="load generator: fan-out latency, loss, CPU, memory")
    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)

    from .publish import DEFAULT_MAXLEN, STREAM_PREFIX

    p = sub.add_parser("publish", help="publish one message to Redis (plain or durable channel)")
    p.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL"),
        help="the Redis the gateway reads (default: REDIS_URL; required)",
    )
    p.add_argument("--durable", action="store_true", help="append to the channel's stream (XADD)")
    p.add_argument(
        "--maxlen", type=_positive_int, default=DEFAULT_MAXLEN, help="durable: MAXLEN ~ N"
    )
    p.add_argument("--stream-prefix", default=STREAM_PREFIX, help="durable: stream key prefix")
    p.add_argument("--raw", action="store_true", help="publish DATA even if it is not JSON")
    p.add_argument(
        "--cluster", action="store_true", help="--redis-url names a node of a Redis Cluster"
    )
    p.add_argument(
        "--sharded",
        action="store_true",
        help="SPUBLISH, for the gateway's REDIS_SHARDED_CHANNELS (with --cluster)",
    )
    p.add_argument("channel")
    p.add_argument("data", help="JSON text, or @FILE (@- reads stdin)")
    p.set_defaults(func=_cmd_publish)

    p = sub.add_parser("ping", help="round-trip latency through the gateway (application pings)")
    p.add_argument("url", help="gateway WebSocket URL, e.g. ws://localhost:8889/ws")
    p.add_argument("--token", default=os.environ.get("GATEWAY_TOKEN"), help="JWT or API key")
    p.add_argument("-c", "--count", type=int, default=10)
    # The gateway rate-limits client frames (20/s by default): stay under it.
    p.add_argument("-i", "--interval", type=float, default=0.1, help="seconds between pings")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each pong")
    p.set_defaults(func=_cmd_ping)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result
