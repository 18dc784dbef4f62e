#!/usr/bin/env python3
"""The hub's own Python cost per delivery, without sockets or a kernel.

Routes messages through Hub.on_message/on_batch_end to sessions whose
direct writes go to /dev/null, so what is timed is the gateway's Python per
recipient (W1's shape: 1 channel x 1,000 sessions), per message (W4's
shape: 200 channels x 25 sessions each) and per read of ten messages on one
channel (W2's: 50 sessions). Compare with the bench's kernel
floor: docs/BENCHMARKS-history.md, "Where W1's and W4's CPU goes", and
docs/BENCHMARKS.md, "W4: what is left".

    .venv/bin/python scripts/hub_micro.py
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service" / "src"))

from redis_ws_gateway.fanout.hub import Hub, Topic
from redis_ws_gateway.fanout.session import Session


class _Principal:
    def may_read(self, name: str) -> bool:
        return True


# Direct writes go to /dev/null: the cheapest write syscall there is, so what
# is timed is the Python around it plus a syscall that does no work.
_DEVNULL = os.open(os.devnull, os.O_WRONLY)


def _session(hub: Hub, transport: asyncio.Transport) -> Session:
    session = Session(
        "micro",
        transport,
        _Principal(),  # type: ignore[arg-type]
        "127.0.0.1",
        buffer_limit=1 << 20,
        high_water=1 << 16,
        on_dirty=hub.mark_dirty,
        on_lagging=hub.mark_lagging,
        close=lambda s, code, reason: None,
        fd=_DEVNULL,
    )
    session.check_direct()
    return session


def _run(hub: Hub, channels: list[bytes], messages: int, payload: bytes) -> float:
    t0 = time.perf_counter()
    for i in range(messages):
        hub.on_batch_start(frozenset())
        hub.on_message(channels[i % len(channels)], None, payload)
        hub.on_batch_end()
    return time.perf_counter() - t0


def _run_reads(hub: Hub, channel: bytes, reads: int, per_read: int, payload: bytes) -> float:
    """Reads of ``per_read`` messages, all on one channel (W2's shape at its
    higher rates, where a read carries several messages)."""
    repeated = frozenset([channel])
    t0 = time.perf_counter()
    for _ in range(reads):
        hub.on_batch_start(repeated)
        for _ in range(per_read):
            hub.on_message(channel, None, payload)
        hub.on_batch_end()
    return time.perf_counter() - t0


def _devnull_write_us(frame: bytes, n: int = 200_000) -> float:
    write, fd = os.write, _DEVNULL
    t0 = time.perf_counter()
    for _ in range(n):
        write(fd, frame)
    return (time.perf_counter() - t0) / n * 1e6


async def main() -> None:
    # A real uvloop transport (on one end of a socket pair) for every
    # session: the hub asks it is_closing() per recipient, as in the gateway.
    loop = asyncio.get_running_loop()
    gateway_end, _client_end = socket.socketpair()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, gateway_end)
    payload = b'{"ltp":22450.5,"ts":1795697863.61,"pad":"' + b"x" * 150 + b'"}'
    print(f"a bare loop of os.write to /dev/null: {_devnull_write_us(payload):.3f} us per write")
    hub = Hub(linger_seconds=1, policies=(), default_policy="conflate", slow_consumer_grace=1)
    one = Topic("channel", "market:tick:X")
    hub.channels[b"market:tick:X"] = one
    sessions = [_session(hub, transport) for _ in range(1000)]
    for s in sessions:
        hub.attach(s, one)
    n = 3000
    dt = _run(hub, [b"market:tick:X"], n, payload)
    print(f"W1 shape: {dt / n / 1000 * 1e6:.3f} us per recipient, 1,000 recipients per message")

    hub = Hub(linger_seconds=1, policies=(), default_policy="conflate", slow_consumer_grace=1)
    rng = random.Random(7)
    names = [f"market:tick:{i}".encode() for i in range(200)]
    for raw in names:
        hub.channels[raw] = Topic("channel", raw.decode())
    sessions = [_session(hub, transport) for _ in range(1000)]
    for s in sessions:
        for raw in rng.sample(names, 5):
            hub.attach(s, hub.channels[raw])
    per_topic = sum(len(t.sessions) for t in hub.channels.values()) / len(names)
    n = 50_000
    dt = _run(hub, names, n, payload)
    print(
        f"W4 shape: {dt / n * 1e6:.2f} us per message, {per_topic:.0f} recipients each, "
        f"{dt / n / per_topic * 1e6:.3f} us per delivery"
    )

    hub = Hub(linger_seconds=1, policies=(), default_policy="conflate", slow_consumer_grace=1)
    w2 = Topic("channel", "market:tick:X")
    hub.channels[b"market:tick:X"] = w2
    for s in [_session(hub, transport) for _ in range(50)]:
        hub.attach(s, w2)
    reads, per_read = 20_000, 10
    dt = _run_reads(hub, b"market:tick:X", reads, per_read, payload)
    print(
        f"W2 shape: {dt / reads * 1e6:.2f} us per read of {per_read} messages, 50 recipients, "
        f"{dt / (reads * per_read * 50) * 1e6:.3f} us per delivery"
    )


if __name__ == "__main__":
    uvloop.run(main())
