#!/usr/bin/env python3
"""The hub's own Python cost per delivery, without sockets or a kernel.

Routes messages through the hub to sessions whose direct writes go to
/dev/null, so what is timed is the gateway's Python per recipient (W1's
shape: 1 channel x 1,000 sessions), per message (W4's shape: 200 channels x
25 sessions each), per read of ten messages on one channel (W2's: 50
sessions), per read of 20 messages over distinct channels of W6's Zipf
population (1,000 channels, 1,000 sessions on 5 each) and per read of ten
pattern messages to 100 sessions on ``market:*`` whose principals go through
the real ACL. W6 and the pattern shape enter at Hub.on_read with Redis's
replies, as the upstream hands them over, so the read's own parse is timed
too. Compare with the bench's kernel floor: docs/BENCHMARKS-history.md,
"Where W1's and W4's CPU goes", and docs/BENCHMARKS.md, "W4: what is left".

    .venv/bin/python -m redis_ws_bench.hub_micro [--payload-validation off]

Each shape is timed ``--repeat`` times in the process and the least is
printed (the machine is shared: the least is the run the neighbours
disturbed least).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import itertools
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import uvloop

from redis_ws_gateway.fanout.hub import Hub, Topic
from redis_ws_gateway.fanout.session import Session
from redis_ws_gateway.security.acl import Acl, RolePolicy
from redis_ws_gateway.security.auth import Principal
from redis_ws_gateway.ws import protocol


class _Principal:
    def may_read(self, name: str) -> bool:
        return True


# Direct writes go to /dev/null: the cheapest write syscall there is, so what
# is timed is the Python around it plus a syscall that does no work.
_DEVNULL = os.open(os.devnull, os.O_WRONLY)

PAYLOADS = {
    # A tick: a few numbers and a string, 193 bytes.
    "tick": b'{"ltp":22450.5,"ts":1795697863.61,"pad":"' + b"x" * 150 + b'"}',
    # An order book's top 50 levels a side: 1.4 KB, mostly floats, which is
    # what a JSON parser spends its time on.
    "book": b'{"bids":['
    + b",".join(b"[22450.%02d,%d]" % (i, i + 1) for i in range(50))
    + b'],"asks":['
    + b",".join(b"[22451.%02d,%d]" % (i, i + 1) for i in range(50))
    + b"]}",
}


def _session(hub: Hub, transport: asyncio.Transport, principal: Any = None) -> Session:
    session = Session(
        "micro",
        transport,
        _Principal() if principal is None else principal,  # type: ignore[arg-type]
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


def _hub(validation: str) -> Hub:
    kwargs: dict[str, Any] = {}
    if validation != "json":
        # A build from before the setting has no such keyword: say so rather
        # than time it with validation on.
        if "payload_validation" not in inspect.signature(Hub).parameters:
            raise SystemExit("this build has no PAYLOAD_VALIDATION setting")
        kwargs["payload_validation"] = validation
    return Hub(
        linger_seconds=1,
        policies=(),
        default_policy="conflate",
        slow_consumer_grace=1,
        **kwargs,
    )


def _least(repeat: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeat))


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


def _run_replies(hub: Hub, reads: list[list[Any]]) -> float:
    """Each read's replies through Hub.on_read, as the upstream calls it."""

    def control(reply: Any) -> None:
        raise AssertionError(f"not a message: {reply!r}")

    on_read = hub.on_read
    t0 = time.perf_counter()
    for replies in reads:
        on_read(replies, control)
    return time.perf_counter() - t0


def _devnull_write_us(frame: bytes, n: int = 200_000) -> float:
    write, fd = os.write, _DEVNULL
    t0 = time.perf_counter()
    for _ in range(n):
        write(fd, frame)
    return (time.perf_counter() - t0) / n * 1e6


def _call_us(fn: Callable[[bytes], object], arg: bytes, n: int = 200_000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn(arg)
    return (time.perf_counter() - t0) / n * 1e6


def _zipf_sessions(
    hub: Hub, transport: asyncio.Transport, names: list[bytes], n: int, per: int
) -> None:
    """W6's population (bench.py): each session on ``per`` channels, channel
    i drawn with weight 1/(i+1), seeded."""
    rng = random.Random(7)
    cum = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(names))))
    for _ in range(n):
        picked: set[int] = set()
        while len(picked) < per:
            [i] = rng.choices(range(len(names)), cum_weights=cum)
            picked.add(i)
        session = _session(hub, transport)
        for i in sorted(picked):
            raw = names[i]
            topic = hub.channels.get(raw)
            if topic is None:
                topic = hub.channels[raw] = Topic("channel", raw.decode())
            hub.attach(session, topic)


def _one_channel(validation: str, transport: asyncio.Transport, sessions: int) -> Hub:
    """A hub with ``sessions`` sessions on market:tick:X (W1's and W2's shape)."""
    hub = _hub(validation)
    topic = Topic("channel", "market:tick:X")
    hub.channels[b"market:tick:X"] = topic
    for _ in range(sessions):
        hub.attach(_session(hub, transport), topic)
    return hub


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payload-validation", choices=("json", "off"), default="json")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--payload", choices=sorted(PAYLOADS), default="tick")
    parser.add_argument(
        "--pattern-sessions", type=int, default=100, help="the P shape's sessions on market:*"
    )
    parser.add_argument("--shapes", default="W1,W4,W2,W6,P", help="comma-separated: W1,W4,W2,W6,P")
    args = parser.parse_args()
    shapes = set(args.shapes.split(","))
    validation: str = args.payload_validation
    repeat: int = args.repeat
    # A real uvloop transport (on one end of a socket pair) for every
    # session: the hub asks it is_closing() per recipient, as in the gateway.
    loop = asyncio.get_running_loop()
    gateway_end, _client_end = socket.socketpair()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, gateway_end)
    payload = PAYLOADS[args.payload]
    print(f"a bare loop of os.write to /dev/null: {_devnull_write_us(payload):.3f} us per write")
    print(
        f"payload_json: {_call_us(protocol.payload_json, payload):.3f} us per call, "
        f"{len(payload)} B payload"
    )

    if "W1" in shapes:
        hub = _one_channel(validation, transport, 1000)
        n = 3000
        dt = _least(repeat, lambda: _run(hub, [b"market:tick:X"], n, payload))
        print(f"W1 shape: {dt / n / 1000 * 1e6:.3f} us per recipient, 1,000 recipients per message")

    if "W4" in shapes:
        hub = _hub(validation)
        rng = random.Random(7)
        names = [f"market:tick:{i}".encode() for i in range(200)]
        for raw in names:
            hub.channels[raw] = Topic("channel", raw.decode())
        for s in [_session(hub, transport) for _ in range(1000)]:
            for raw in rng.sample(names, 5):
                hub.attach(s, hub.channels[raw])
        per_topic = sum(len(t.sessions) for t in hub.channels.values()) / len(names)
        n = 50_000
        dt = _least(repeat, lambda: _run(hub, names, n, payload))
        print(
            f"W4 shape: {dt / n * 1e6:.2f} us per message, {per_topic:.0f} recipients each, "
            f"{dt / n / per_topic * 1e6:.3f} us per delivery"
        )

    if "W2" in shapes:
        hub = _one_channel(validation, transport, 50)
        reads, per_read = 20_000, 10
        dt = _least(repeat, lambda: _run_reads(hub, b"market:tick:X", reads, per_read, payload))
        print(
            f"W2 shape: {dt / reads * 1e6:.2f} us per read of {per_read} messages, "
            f"50 recipients, {dt / (reads * per_read * 50) * 1e6:.3f} us per delivery"
        )

    if "W6" in shapes:
        # The publisher goes round the channels, ~20 per 1 ms tick: a read
        # holds 20 distinct channels, some watched by hundreds, most by one
        # or two, some by none.
        hub = _hub(validation)
        names = [f"market:tick:{i}".encode() for i in range(1000)]
        _zipf_sessions(hub, transport, names, 1000, 5)
        per_read = 20
        cycle = itertools.cycle(names)
        w6_reads: list[list[Any]] = [
            [[b"message", next(cycle), payload] for _ in range(per_read)] for _ in range(5000)
        ]
        deliveries = sum(
            len(hub.channels[r[1]].sessions) if r[1] in hub.channels else 0
            for read in w6_reads
            for r in read
        )
        dt = _least(repeat, lambda: _run_replies(hub, w6_reads))
        print(
            f"W6 shape: {dt / len(w6_reads) * 1e6:.2f} us per read of {per_read} messages, "
            f"{dt / (len(w6_reads) * per_read) * 1e6:.2f} us per message, "
            f"{dt / deliveries * 1e6:.3f} us per delivery, {len(hub.channels)} channels watched"
        )

    if "P" in shapes:
        # 100 sessions (--pattern-sessions) on market:*, each with a principal the real ACL
        # decides for (a role that may read market:* but not market:secret:*),
        # messages over 1,000 channels, ten to a read.
        hub = _hub(validation)
        acl = Acl({"user": RolePolicy(allow=("market:*",), deny=("market:secret:*",))})
        topic = Topic("pattern", "market:*")
        hub.patterns[b"market:*"] = topic
        sessions = args.pattern_sessions
        for _ in range(sessions):
            hub.attach(_session(hub, transport, Principal("u", ("user",), acl)), topic)
        per_read = 10
        cycle = itertools.cycle([f"market:tick:{i}".encode() for i in range(1000)])
        p_reads: list[list[Any]] = [
            [[b"pmessage", b"market:*", next(cycle), payload] for _ in range(per_read)]
            for _ in range(2000)
        ]
        dt = _least(repeat, lambda: _run_replies(hub, p_reads))
        n = len(p_reads) * per_read
        print(
            f"P shape: {dt / n * 1e6:.2f} us per message, {sessions} recipients, "
            f"{dt / (n * sessions) * 1e6:.3f} us per delivery"
        )


if __name__ == "__main__":
    uvloop.run(main())
