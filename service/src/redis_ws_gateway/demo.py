"""A demo publisher that behaves like our users' trading modules, and the
`demo` command that runs Redis, the gateway and the publisher together."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis

# A cold start (imports on a busy machine) takes seconds; a dead one is seen at once.
START_TIMEOUT_SECONDS = 60.0

INSTRUMENTS = {"BANKNIFTY": 51_200.0, "NIFTY": 23_450.0}

# What the demo gateway runs with: per-instrument decisions are durable
# channels, and tick channels offer the latest tick as a snapshot.
DEMO_CONFIG = """\
durable:
  - {pattern: "engine:decision:*", maxlen: 10000}
snapshots:
  - {pattern: "market:tick:*", key: "market:last:{suffix}"}
"""


async def publish_forever(redis_url: str, rate: float = 10.0) -> None:
    """Ticks at ``rate`` per instrument per second; signals, decisions and
    indicators now and then, on the seed's channel names."""
    r = aioredis.from_url(redis_url)
    prices = dict(INSTRUMENTS)
    step = 0
    try:
        while True:
            now = time.time()
            async with r.pipeline(transaction=False) as pipe:
                for sym, price in prices.items():
                    price *= math.exp(random.gauss(0, 0.0004))
                    prices[sym] = price
                    tick = {
                        "symbol": sym,
                        "ltp": round(price, 2),
                        "volume": random.randint(25, 900),
                        "bid": round(price - 0.05, 2),
                        "ask": round(price + 0.05, 2),
                        "ts": now,
                    }
                    body = orjson.dumps(tick)
                    # The latest tick stays readable, for `snapshot` subscribers.
                    pipe.set(f"market:last:{sym}", body)
                    pipe.publish(f"market:tick:{sym}", body)
                    pipe.publish("market:tick", body)
                    if step % 10 == 0:
                        rsi = 50 + 20 * math.sin(step / 50 + len(sym))
                        pipe.publish(
                            f"indicators:{sym}",
                            orjson.dumps({"symbol": sym, "rsi": round(rsi, 2), "ts": now}),
                        )
                    if step % 50 == 0:
                        side = random.choice(["BUY", "SELL"])
                        signal_msg = orjson.dumps(
                            {
                                "symbol": sym,
                                "side": side,
                                "strength": round(random.random(), 2),
                                "ts": now,
                            }
                        )
                        pipe.publish(f"engine:signal:{sym}", signal_msg)
                        pipe.publish("engine:signal", signal_msg)
                    if step % 150 == 0:
                        decision = orjson.dumps(
                            {
                                "symbol": sym,
                                "action": random.choice(["ENTER", "EXIT", "HOLD"]),
                                "ts": now,
                            }
                        )
                        # Decisions are durable (DEMO_CONFIG): one stream entry
                        # each, replayable after a reconnect.
                        pipe.xadd(
                            f"stream:engine:decision:{sym}",
                            {"data": decision},
                            maxlen=10_000,
                            approximate=True,
                        )
                        pipe.publish("engine:decision", decision)
                await pipe.execute()
            step += 1
            await asyncio.sleep(1.0 / rate)
    finally:
        await r.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_redis() -> tuple[subprocess.Popen[bytes], str, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: run `make demo` (it installs it)")
    port = _free_port()
    data_dir = tempfile.mkdtemp(prefix="rwg-demo-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", data_dir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc, f"redis://127.0.0.1:{port}", data_dir
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


def _port_problem(port: int) -> str | None:
    """Why the gateway could not listen on ``port``, found before anything starts."""
    with socket.socket() as s:
        # As the gateway binds: connections of a demo that just stopped,
        # still in TIME_WAIT, must not count as "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((os.environ.get("REDIS_WS_GATEWAY_HOST", "0.0.0.0"), port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} is already in use (another demo or gateway?): use --port"
            return f"cannot listen on port {port}: {exc.strerror}"
    return None


def _redis_problem(url: str) -> str | None:
    """Why the Redis at ``url`` cannot serve the demo, or None: found once,
    here, instead of as a traceback from the publisher and reconnect
    warnings from the gateway."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3.0, socket_timeout=3.0)
    try:
        client.ping()
    except redis.RedisError as exc:
        return str(exc) or type(exc).__name__
    finally:
        client.close()
    return None


def _wait_listening(
    proc: subprocess.Popen[Any], port: int, timeout: float, stopped: Callable[[], bool]
) -> bool:
    """True once the gateway answers /healthz; False if it exits, Ctrl-C is
    pressed or the time runs out."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/healthz"
    while time.monotonic() < deadline and not stopped():
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _step(text: str) -> None:
    print(f"demo: {text}", flush=True)


def run_demo(port: int) -> int:
    """Redis (private unless REDIS_URL is set) + gateway + publisher, until Ctrl-C."""
    problem = _port_problem(port)
    if problem is not None:
        print(f"demo: {problem}", file=sys.stderr)
        return 1
    procs: list[subprocess.Popen[Any]] = []
    redis_url = os.environ.get("REDIS_URL")
    data_dir = None
    if redis_url and (problem := _redis_problem(redis_url)) is not None:
        print(f"demo: cannot reach REDIS_URL={redis_url}: {problem}", file=sys.stderr)
        return 1
    if not redis_url:
        redis_proc, redis_url, data_dir = _start_redis()
        procs.append(redis_proc)
        _step(f"started a private redis-server at {redis_url}")
    env = dict(os.environ, REDIS_URL=redis_url, REDIS_WS_GATEWAY_PORT=str(port))
    env.setdefault("LOG_FORMAT", "console")
    # The demo's own key, so /publish, /admin and selftest work in it; a
    # fresh one per run, printed below, never a fixed one a copy could reuse.
    api_key = env.setdefault("GATEWAY_API_KEY", secrets.token_urlsafe(18))
    config_dir = tempfile.mkdtemp(prefix="rwg-demo-config-")
    if "REDIS_WS_GATEWAY_CONFIG" not in env:
        config_path = os.path.join(config_dir, "demo.yaml")
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(DEMO_CONFIG)
        env["REDIS_WS_GATEWAY_CONFIG"] = config_path
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    exe = [sys.executable, "-m", "redis_ws_gateway"]
    _step(f"starting the gateway on port {port}")
    gateway = subprocess.Popen([*exe, "serve"], env=env)
    procs.append(gateway)
    procs.append(subprocess.Popen([*exe, "demo-publisher", "--redis-url", redis_url], env=env))
    if not _wait_listening(gateway, port, START_TIMEOUT_SECONDS, lambda: stopping):
        # The gateway printed its own one-line reason when it exited.
        print(
            "demo: the gateway did not start listening"
            + (f" (exit code {gateway.returncode})" if gateway.returncode is not None else ""),
            file=sys.stderr,
        )
        _stop_all(procs, data_dir, config_dir)
        return 0 if stopping else 1
    url = f"ws://localhost:{port}/ws"
    http = f"http://localhost:{port}"
    print(
        "\n"
        f"demo: gateway on {url}, publishing ticks, signals, decisions, indicators\n"
        f"demo: console in a browser (live ticks): {http}/?channels=market:tick:*\n"
        f"demo: watch in a terminal:  .venv/bin/redis-ws-client tail {url} 'market:tick:*'\n"
        f"demo: durable decisions, replayed from the start:\n"
        f"      .venv/bin/redis-ws-client tail --since 0 {url} engine:decision:NIFTY\n"
        f"demo: API key for /publish, /admin and selftest (this run only): {api_key}\n"
        f"      curl -H 'Authorization: Bearer {api_key}' -d "
        f"""'{{"channel":"engine:signal:NIFTY","data":{{"side":"BUY"}}}}' {http}/publish\n"""
        f"      .venv/bin/redis-ws-gateway selftest --url {url} --token {api_key}\n"
        "demo: Ctrl-C stops everything this command started\n",
        flush=True,
    )
    try:
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        _stop_all(procs, data_dir, config_dir)
    failed = [p.args for p in procs if p.returncode not in (0, -signal.SIGTERM, None)]
    if failed and not stopping:
        print(f"demo: a process exited unexpectedly: {failed}", file=sys.stderr)
        return 1
    return 0


def _stop_all(procs: list[subprocess.Popen[Any]], data_dir: str | None, config_dir: str) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
    if data_dir:
        shutil.rmtree(data_dir, ignore_errors=True)
    shutil.rmtree(config_dir, ignore_errors=True)
