"""Test clients for the e2e suite: a durable-channel follower that reconnects
and resumes the way a production client must, and a steady publisher.

The follower is written on top of ``GatewayClient`` on purpose: the suite
checks the gateway and the topology, so it keeps its own small, obvious
reconnect loop rather than depending on the SDK under test elsewhere.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import aiohttp

from redis_ws_client.client import (
    ConnectionClosed,
    GatewayClient,
    HandshakeRefused,
    RequestTimeout,
    ServerError,
)
from tests.support.wait import eventually

from .topology import PublishError, Topology


def offset_key(offset: str) -> tuple[int, int]:
    ms, _, n = offset.partition("-")
    return int(ms), int(n or 0)


class DurableFollower:
    """Follows one durable channel from its beginning, through every close:
    reconnects through the load balancer at once after a 1012 (with capped
    backoff while no gateway takes it) and resubscribes with ``since`` = the
    last offset it received."""

    def __init__(self, url: str, channel: str, name: str) -> None:
        self.url = url
        self.channel = channel
        self.name = name
        self.offsets: list[str] = []
        self.close_codes: list[int | None] = []
        self.refusals: list[str] = []
        self.errors: list[str] = []
        self.incomplete = 0
        self.subscriptions = 0
        # (since, the gateway's live offset, entries replayed) per subscribe
        self.resumes: list[tuple[str, str, int]] = []
        self.connected = asyncio.Event()
        self._stopping = False
        self._client: GatewayClient | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> DurableFollower:
        self._task = asyncio.create_task(self._run(), name=f"follower-{self.name}")
        return self

    async def stop(self) -> None:
        self._stopping = True
        if self._client is not None:
            await self._client.close()
        if self._task is not None:
            await asyncio.wait_for(self._task, 15)

    async def _run(self) -> None:
        backoff = 0.05
        while not self._stopping:
            client = GatewayClient(self.url, timeout=15)
            try:
                await client.connect()
            except HandshakeRefused as exc:
                self.refusals.append(f"HTTP {exc.status}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.refusals.append(type(exc).__name__)
            else:
                if self._stopping:
                    await client.close()
                    break
                self._client = client
                await self._follow(client)
                self._client = None
                backoff = 0.05
                if not self._stopping:
                    self.close_codes.append(client.close_code)
                # A 1012 means "reconnect at once": another gateway answers.
                continue
            # Nobody took the connection (e.g. every gateway restarting): back
            # off with jitter like a real client, so retries do not spin.
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, 1.0)

    async def _follow(self, client: GatewayClient) -> None:
        self.connected.clear()
        since = self.offsets[-1] if self.offsets else "0"
        try:
            reply = await client.request(
                "subscribe", channels=[{"channel": self.channel, "since": since}]
            )
        except ConnectionClosed:
            pass  # closed mid-subscribe: whatever history arrived is still read below
        except (ServerError, RequestTimeout) as exc:
            self.errors.append(str(exc))
            await client.close()
        else:
            sub = reply["subscriptions"][0]
            if sub.get("complete") is not True:
                self.incomplete += 1
            self.resumes.append((since, sub.get("offset", "?"), sub.get("replayed", -1)))
            self.subscriptions += 1
            self.connected.set()
        # History frames precede the reply in the queue, live ones follow; the
        # iteration ends when the connection is closed and everything is read.
        async for frame in client.frames():
            if frame.get("type") == "data" and frame.get("channel") == self.channel:
                self.offsets.append(frame["offset"])
        self.connected.clear()
        await client.close()

    async def wait_for(self, offset: str, timeout: float) -> None:
        """Until the follower has received ``offset`` (or anything after it)."""
        target = offset_key(offset)

        def reached() -> bool:
            last = self.offsets[-1] if self.offsets else None
            assert last is not None and offset_key(last) >= target, f"last {last}"
            return True

        await eventually(reached, timeout=timeout, what=f"{self.name} to reach {offset}")

    def describe_mismatch(self, expected: list[str]) -> str:
        """What differs from ``expected``: the first divergence, duplicates."""
        dupes = [o for o, n in Counter(self.offsets).items() if n > 1]
        first = next(
            (i for i, (a, b) in enumerate(zip(self.offsets, expected, strict=False)) if a != b),
            min(len(self.offsets), len(expected)),
        )
        return (
            f"{self.name}: got {len(self.offsets)} offsets, expected {len(expected)}; "
            f"first difference at index {first} "
            f"(got {self.offsets[first : first + 3]}, expected {expected[first : first + 3]}); "
            f"duplicates {dupes[:5]}; closes {self.close_codes}; errors {self.errors[:3]}; "
            f"resumes (since, live offset, replayed) {self.resumes}"
        )


class Publisher:
    """Publishes ``{"n": i}`` to a durable channel through the load balancer
    every 20 ms and records the offsets the gateway acknowledged. A failed
    publish (every gateway restarting, say) is retried, never counted."""

    def __init__(self, topology: Topology, channel: str, interval: float = 0.02) -> None:
        self.topology = topology
        self.channel = channel
        self.interval = interval
        self.acked: list[str] = []
        self.failures: list[str] = []
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Publisher:
        self._task = asyncio.create_task(self._run(), name=f"publisher-{self.channel}")
        return self

    async def _run(self) -> None:
        n = 0
        async with aiohttp.ClientSession() as http:
            next_at = time.monotonic()
            while not self._stopping:
                try:
                    reply: dict[str, Any] = await self.topology.publish(
                        self.channel, {"n": n}, session=http
                    )
                except PublishError as exc:
                    self.failures.append(str(exc))
                else:
                    self.acked.append(reply["offset"])
                    n += 1
                # Paced by a schedule, so slow replies do not pile up drift.
                next_at += self.interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def wait_acked(self, count: int, timeout: float = 30) -> None:

        def acknowledged() -> bool:
            assert len(self.acked) >= count, f"only {len(self.acked)} acknowledged"
            return True

        await eventually(acknowledged, timeout=timeout, what=f"{count} publishes acknowledged")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await asyncio.wait_for(self._task, 15)


async def replay_all(url: str, channel: str, timeout: float = 30) -> list[str]:
    """Every offset of the channel's stream, read afresh from the beginning
    through the load balancer: the truth the followers are compared with."""
    async with GatewayClient(url, timeout=timeout) as c:
        reply = await c.request("subscribe", channels=[{"channel": channel, "since": "0"}])
        count = reply["subscriptions"][0]["replayed"]
        offsets = []
        while len(offsets) < count:
            frame = await c.next_of_type("data", timeout)
            if frame.get("channel") == channel:
                offsets.append(frame["offset"])
    return offsets


async def wait_all(events: list[asyncio.Event], timeout: float) -> None:
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout)
