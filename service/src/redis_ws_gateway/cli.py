"""`redis-ws-gateway` command line: serve, demo, demo-publisher, selftest,
publish. The client commands (tail, ping) are `redis-ws-client`'s, the load
generator is `redis-ws-bench` (a development tool, not in the product)."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import uvloop

from redis_ws_gateway.config import (
    ConfigError,
    load_settings,
    settings_help,
    unknown_setting_warnings,
)
from redis_ws_wire import ws_url_error


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("redis-ws-gateway")
    except PackageNotFoundError:
        return "unknown"


def _cmd_serve(_: argparse.Namespace) -> int:
    from redis_ws_gateway.observability.tracing import check_env

    try:
        settings = load_settings()
        check_env()
    except ConfigError as exc:
        print(f"redis-ws-gateway: {exc}", file=sys.stderr)
        return 2
    import structlog

    from redis_ws_gateway.observability.logs import configure_logging
    from redis_ws_gateway.server import ListenError, serve

    configure_logging(settings)
    for warning in unknown_setting_warnings():
        structlog.get_logger("redis_ws_gateway.config").warning("setting_ignored", detail=warning)
    try:
        uvloop.run(serve(settings))
    except ListenError as exc:
        print(f"redis-ws-gateway: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from redis_ws_gateway.demo import run_demo

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

    from redis_ws_gateway.demo import publish_forever

    try:
        uvloop.run(publish_forever(args.redis_url, args.rate))
    except KeyboardInterrupt:
        pass
    except (redis.RedisError, OSError, ValueError) as exc:
        print(f"demo-publisher: cannot publish to {args.redis_url}: {exc}", file=sys.stderr)
        return 1
    return 0


class _SelftestFailed(Exception):
    pass


async def _selftest(url: str, redis_url: str | None, token: str | None, timeout: float) -> int:
    # On aiohttp alone: the image carries the gateway, not the client package.
    import aiohttp
    import redis.asyncio as aioredis

    channel = f"selftest:{uuid.uuid4().hex}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
        http.ws_connect(url, headers=headers) as ws,
    ):

        async def next_frame() -> dict[str, Any]:
            msg = await ws.receive(timeout)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise _SelftestFailed(f"the gateway closed the connection ({ws.close_code})")
            frame: dict[str, Any] = orjson.loads(msg.data)
            if frame.get("type") == "error":
                raise _SelftestFailed(f"{frame.get('code')}: {frame.get('message')}")
            return frame

        await ws.send_str(
            orjson.dumps({"action": "subscribe", "channels": [channel], "requestId": 1}).decode()
        )
        while (await next_frame()).get("type") != "subscribed":
            pass
        if redis_url is None:
            # Through the gateway's own /publish: works with whatever Redis
            # topology the gateway uses (Sentinel, TLS) without knowing it.
            http_url = url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
            http_url = http_url.rsplit("/ws", 1)[0] + "/publish"
            body = {"channel": channel, "data": {"selftest": True}}
            async with http.post(http_url, json=body, headers=headers) as resp:
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
        while (frame := await next_frame()).get("type") != "data":
            pass
        if frame["channel"] != channel:
            return 1
    print(f"selftest: received the published message through {url}")
    return 0


def _cmd_selftest(args: argparse.Namespace) -> int:
    import aiohttp

    if (problem := ws_url_error(args.url)) is not None:
        print(f"selftest: {problem}", file=sys.stderr)
        return 2
    try:
        return uvloop.run(_selftest(args.url, args.redis_url, args.token, args.timeout))
    except _SelftestFailed as exc:
        print(f"selftest: {exc}", file=sys.stderr)
        return 1
    except aiohttp.WSServerHandshakeError as exc:
        hint = " (pass a valid --token, or set GATEWAY_TOKEN)" if exc.status == 401 else ""
        print(f"selftest: the gateway refused the upgrade: {exc.status}{hint}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"selftest: {args.url} did not answer in time", file=sys.stderr)
        return 1
    except (OSError, aiohttp.ClientError) as exc:
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        print(f"selftest: cannot connect to {args.url}: {detail}", file=sys.stderr)
        return 1


def _payload_arg(text: str) -> bytes:
    """DATA as given, or the contents of the file after ``@`` (``@-``: stdin)."""
    if text.startswith("@"):
        name = text[1:]
        return sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    return text.encode()


def _cmd_publish(args: argparse.Namespace) -> int:
    import redis

    from redis_ws_gateway.publish import publish, publish_durable

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

    from redis_ws_gateway.publish import DEFAULT_MAXLEN, STREAM_PREFIX

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

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result
