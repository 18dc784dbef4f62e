"""`redis-ws-client` command line: tail (print what channels carry) and ping
(round trips through the gateway)."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from collections import defaultdict
from typing import Any

import orjson

from redis_ws_wire import is_pattern, ws_url_error


def _run(coro: Any) -> int:
    # uvloop when installed; the client does not require it.
    try:
        import uvloop
    except ImportError:
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))


def _client_failure(command: str, url: str, exc: BaseException) -> str:
    """One line for a failure to reach or use the gateway."""
    from redis_ws_client.client import HandshakeRefused

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
    from redis_ws_client.client import GatewayClient, ServerError

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
    if args.since is not None and all(is_pattern(c) for c in args.channels):
        print("tail: --since applies to exact (durable) channels, not patterns", file=sys.stderr)
        return 2
    import aiohttp

    from redis_ws_client.client import GatewayClientError

    if (problem := ws_url_error(args.url)) is not None:
        print(f"tail: {problem}", file=sys.stderr)
        return 2
    try:
        return _run(_tail(args.url, args.channels, args.token, args.raw, args.since))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (GatewayClientError, OSError, aiohttp.ClientError, TimeoutError) as exc:
        print(_client_failure("tail", args.url, exc), file=sys.stderr)
        return 1


def _percentile(ordered: list[float], pct: float) -> float:
    """Nearest rank: a value that was actually measured."""
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


async def _ping(url: str, token: str | None, count: int, interval: float, timeout: float) -> int:
    from redis_ws_client.client import GatewayClient

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

    from redis_ws_client.client import GatewayClientError

    if args.count < 1:
        print("ping: --count must be at least 1", file=sys.stderr)
        return 2
    if (problem := ws_url_error(args.url)) is not None:
        print(f"ping: {problem}", file=sys.stderr)
        return 2
    try:
        return _run(_ping(args.url, args.token, args.count, args.interval, args.timeout))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (GatewayClientError, OSError, aiohttp.ClientError, TimeoutError) as exc:
        print(_client_failure("ping", args.url, exc), file=sys.stderr)
        return 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("redis-ws-client")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="redis-ws-client", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

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
