"""What a well-behaved subscriber sees while one hostile client attacks the
same gateway process: delivery latency percentiles, the gateway's RSS growth
and the slowest /healthz answer, per attack (docs/SECURITY.md lists them).

    .venv/bin/python scripts/bench_hostile.py [--seconds 10] [--rate 200] [--attack NAME ...]

Each attack gets a fresh gateway process and Redis. The attacker runs in its
own process, so its CPU is not the subscriber's; the publisher and the
subscriber share a third. Latency is publish-to-receive on one clock.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.gateway import spawn_gateway
from tests.support.rawws import (
    EMPTY_PING,
    PING,
    RawClient,
    connect_raw,
    frame,
    healthz_seconds,
    rss_bytes,
    text,
    upgrade,
)
from tests.support.redis_server import RedisServer, free_port

ATTACKS = [
    "none",
    "pings-no-read",
    "empty-pings",
    "fragments",
    "garbage",
    "slowloris-1000",
    "connect-flood",
]


async def _flood(client: RawClient, chunk: bytes, end: float) -> None:
    """``chunk`` again and again until ``end``, or until the gateway stops
    reading (the write does not drain before then)."""
    while time.monotonic() < end:
        client.writer.write(chunk)
        try:
            async with asyncio.timeout(max(0.01, end - time.monotonic())):
                await client.writer.drain()
        except TimeoutError:
            return


async def _attack(kind: str, port: int, seconds: float) -> None:
    end = time.monotonic() + seconds
    if kind == "none":
        return
    if kind == "pings-no-read":
        client = await upgrade(port, rcvbuf=4096)
        await _flood(client, frame(PING, b"x" * 125) * 512, end)
        return
    if kind == "empty-pings":
        client = await upgrade(port)
        reader = asyncio.create_task(client.reader.read(-1))  # reads its pongs
        await _flood(client, EMPTY_PING * 10_000, end)
        reader.cancel()
        return
    if kind in ("fragments", "garbage"):
        # Each connection is closed by the gateway (1008, 1002): reconnect.
        while time.monotonic() < end:
            client = await upgrade(port)
            if kind == "fragments":
                client.writer.write(frame(0x1, b"{", fin=False) + frame(0x0, b"", fin=False) * 2000)
            else:
                client.writer.write(os.urandom(65536))
            try:
                async with asyncio.timeout(max(0.01, end - time.monotonic())):
                    await client.reader.read(-1)
            except (TimeoutError, ConnectionError):
                pass
            client.writer.transport.abort()
        return
    if kind in ("slowloris-1000", "connect-flood"):
        # slowloris: 1000 sockets kept open, each opened again a second after
        # the gateway closes it, as slowloris tools do. connect-flood: the
        # same, opened again at once: a flood of new connections, which
        # costs the gateway an accept and a refusal each.
        again = 1.0 if kind == "slowloris-1000" else 0.0
        socks: list[Any] = []

        async def hold() -> None:
            while time.monotonic() < end:
                try:
                    reader, writer = await connect_raw(port, source="127.0.0.2")
                except OSError:
                    await asyncio.sleep(0.01)  # out of local ports: try again
                    continue
                writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
                socks.append(writer)
                try:
                    async with asyncio.timeout(max(0.01, end - time.monotonic())):
                        await reader.read(-1)  # closed by the gateway: open another
                except (TimeoutError, ConnectionError):
                    pass
                writer.transport.abort()
                if again:
                    await asyncio.sleep(again)

        await asyncio.gather(*(hold() for _ in range(1000)))
        return
    raise ValueError(kind)


def _attacker(kind: str, port: int, seconds: float) -> None:
    uvloop.run(_attack(kind, port, seconds))


async def _measure(kind: str, seconds: float, rate: float) -> dict[str, Any]:
    with RedisServer() as redis:
        port = free_port()
        proc = await spawn_gateway(redis.url, port)
        try:
            watcher = await upgrade(port)
            watcher.writer.write(text(b'{"action":"subscribe","channels":["feed"]}'))
            while orjson.loads((await watcher.read_frame()).payload).get("type") != "subscribed":
                pass
            await asyncio.sleep(0.5)  # the process settles after start
            rss_before = rss_bytes(proc.pid)
            attacker = multiprocessing.Process(target=_attacker, args=(kind, port, seconds))
            attacker.start()
            publisher = aioredis.from_url(redis.url)
            latencies: list[float] = []
            health: list[float] = []
            received = 0
            expected: int | None = None
            all_in = asyncio.Event()

            async def receive() -> None:
                nonlocal received
                while True:
                    f = await watcher.read_frame(timeout=seconds + 10)
                    if f.opcode == PING:
                        # Unanswered, the gateway drops it after 1.5 ping intervals.
                        watcher.writer.write(frame(0xA, f.payload))
                    if f.opcode != 0x1:
                        continue
                    msg = orjson.loads(f.payload)
                    if msg.get("type") == "data":
                        latencies.append(time.time() - msg["data"]["t"])
                        received += 1
                        if expected is not None and received >= expected:
                            all_in.set()

            async def probe() -> None:
                while True:
                    try:
                        health.append(await healthz_seconds(port, timeout=5))
                    except (TimeoutError, OSError):
                        health.append(5.0)
                    await asyncio.sleep(0.25)

            tasks = [asyncio.create_task(receive()), asyncio.create_task(probe())]
            sent = 0
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                await publisher.publish("feed", orjson.dumps({"t": time.time(), "n": sent}))
                sent += 1
                next_at = started + sent / rate
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            rss_after = rss_bytes(proc.pid)
            expected = sent
            if received < sent:
                try:
                    async with asyncio.timeout(5):
                        await all_in.wait()
                except TimeoutError:
                    pass  # reported as delivered < sent
            for t in tasks:
                t.cancel()
            await publisher.aclose()
            attacker.join(timeout=30)
            if attacker.is_alive():
                attacker.kill()
            watcher.writer.transport.abort()
        finally:
            proc.kill()
            await proc.wait()
    lat = sorted(latencies) or [float("nan")]
    return {
        "attack": kind,
        "sent": sent,
        "received": received,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max_ms": 1000 * lat[-1],
        "rss_growth_mb": (rss_after - rss_before) / (1 << 20),
        "healthz_max_ms": 1000 * max(health or [float("nan")]),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second")
    parser.add_argument("--attack", action="append", choices=ATTACKS)
    args = parser.parse_args()
    rows = []
    for kind in args.attack or ATTACKS:
        print(f"bench_hostile: {kind} for {args.seconds:.0f} s ...", file=sys.stderr, flush=True)
        rows.append(await _measure(kind, args.seconds, args.rate))
    print("| attack | delivered | p50 ms | p99 ms | max ms | RSS growth MB | /healthz max ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['attack']} | {r['received']}/{r['sent']} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['rss_growth_mb']:.1f} | "
            f"{r['healthz_max_ms']:.1f} |"
        )


if __name__ == "__main__":
    uvloop.run(main())
