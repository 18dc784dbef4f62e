"""Prometheus metrics. The hot path only bumps plain integers on the hub and
the sessions; this collector turns them into metric families at scrape time,
so a scrape costs O(connections) and a delivered message costs nothing extra.

Labels are bounded sets (close reasons, rejection reasons, policies, kinds):
never a channel name or a user id.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from redis_ws_wire import CLOSE_NAMES

if TYPE_CHECKING:
    from redis_ws_gateway.fanout.hub import Hub
    from redis_ws_gateway.fanout.session import Session
    from redis_ws_gateway.upstream.durable import Durable
    from redis_ws_gateway.upstream.pubsub import Upstream
    from redis_ws_gateway.upstream.sharded import ShardedUpstream

PREFIX = "redis_ws_gateway"

# The `reason` label of a closed connection: the close code's wire name.
# A client's own close code is the one recorded, so 1001 (a browser leaving
# the page), which the gateway never sends, has a label too.
CLOSE_REASONS: dict[int, str] = {**CLOSE_NAMES, 1001: "going_away"}

_BUFFER_BUCKETS = (0, 1024, 16_384, 65_536, 262_144, 1_048_576, 4_194_304)


class PlainHistogram:
    """A histogram for the hot path: plain integers, no lock.

    prometheus_client's Histogram takes a mutex per bucket and per sum on
    every observe(); the hub observes once per read from Redis, in the event
    loop's one thread, so nothing else writes these. In W4 (one message per
    read, 25 recipients) the two locked increments were 1.5-2% of the
    gateway's CPU in py-spy (measured on 2026-11-27 before ad2e00e;
    docs/BENCHMARKS-history.md)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self) -> HistogramMetricFamily:
        cumulative = []
        seen = 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            seen += n
            cumulative.append((bound, seen))
        return HistogramMetricFamily(
            self.name, self.documentation, buckets=cumulative, sum_value=self.sum
        )


class GatewayState(Protocol):
    """What a scrape reads of the running gateway (server.Server). A
    protocol rather than the class, so this module does not import the
    server that imports it."""

    @property
    def sessions(self) -> Collection[Session]: ...

    @property
    def draining(self) -> bool: ...

    @property
    def hub(self) -> Hub: ...

    @property
    def upstream(self) -> Upstream: ...

    @property
    def sharded(self) -> ShardedUpstream | None: ...

    @property
    def durable(self) -> Durable: ...


def close_reason(code: int | None) -> str:
    if code is None:
        return "abnormal"
    return CLOSE_REASONS.get(code, "other")


def processing_histogram() -> PlainHistogram:
    """The hub's per-read processing time. Made before the hub, which
    observes it, and the metrics, which read the hub: neither waits for the
    other."""
    return PlainHistogram(
        f"{PREFIX}_processing_seconds",
        "Gateway time from reading an upstream batch to the socket writes of its frames",
        (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
    )


class Metrics:
    def __init__(self, gateway: GatewayState, processing: PlainHistogram | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.opened = Counter(
            f"{PREFIX}_connections_opened", "WebSocket connections accepted", registry=r
        )
        self.closed = Counter(
            f"{PREFIX}_connections_closed",
            "WebSocket connections closed, by reason",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            f"{PREFIX}_connections_rejected",
            "Upgrades refused before the WebSocket opened, by reason",
            ["reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            f"{PREFIX}_auth_failures", "Credentials refused, by reason", ["reason"], registry=r
        )
        self.rate_limited = Counter(
            f"{PREFIX}_rate_limited", "Client frames refused by the rate limit", registry=r
        )
        self.client_errors = Counter(
            f"{PREFIX}_client_errors", "Error frames sent to clients, by code", ["code"], registry=r
        )
        self.processing = processing_histogram() if processing is None else processing
        # Counters of sessions that have closed, so totals survive them.
        self.closed_frames = 0
        self.closed_bytes = 0
        self.closed_dropped = 0
        self.closed_conflated = 0
        r.register(_StateCollector(gateway, self))
        # process_* (memory, CPU seconds, open and maximum file descriptors):
        # the registry is our own, so the default one's collector is not in it.
        ProcessCollector(registry=r)


class _StateCollector(Collector):
    def __init__(self, gateway: GatewayState, metrics: Metrics) -> None:
        self._gw = gateway
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        gw, m = self._gw, self._m
        sessions = list(gw.sessions)
        yield GaugeMetricFamily(
            f"{PREFIX}_connections", "Open WebSocket connections", len(sessions)
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_client_subscriptions",
            "Subscriptions held by clients",
            sum(len(s.subscriptions) for s in sessions),
        )
        up = GaugeMetricFamily(
            f"{PREFIX}_upstream_subscriptions",
            "Subscriptions held on Redis, by kind",
            labels=["kind"],
        )
        up.add_metric(["channel"], len(gw.hub.channels))
        up.add_metric(["pattern"], len(gw.hub.patterns))
        up.add_metric(["stream"], len(gw.hub.streams))
        yield up
        yield CounterMetricFamily(
            f"{PREFIX}_upstream_messages",
            "Messages and stream entries read from Redis",
            gw.hub.messages_in,
        )
        frames, size = m.closed_frames, m.closed_bytes
        for session in sessions:
            f, b = session.sent()
            frames += f
            size += b
        yield CounterMetricFamily(
            f"{PREFIX}_frames_sent", "WebSocket frames written to clients", frames
        )
        yield CounterMetricFamily(f"{PREFIX}_bytes_sent", "Bytes written to client sockets", size)
        dropped = CounterMetricFamily(
            f"{PREFIX}_messages_dropped",
            "Messages a lagging client did not get, by slow-consumer policy",
            labels=["policy"],
        )
        dropped.add_metric(["drop-oldest"], m.closed_dropped + sum(s.dropped for s in sessions))
        dropped.add_metric(["conflate"], m.closed_conflated + sum(s.conflated for s in sessions))
        yield dropped
        buckets = [0] * len(_BUFFER_BUCKETS)
        total = 0
        for s in sessions:
            fill = s.buffered_bytes()
            total += fill
            for i, bound in enumerate(_BUFFER_BUCKETS):
                if fill <= bound:
                    buckets[i] += 1
        yield GaugeHistogramMetricFamily(
            f"{PREFIX}_session_buffer_bytes",
            "Bytes waiting per connection (socket buffer plus backlog)",
            buckets=[(str(b), c) for b, c in zip(_BUFFER_BUCKETS, buckets, strict=True)]
            + [("+Inf", len(sessions))],
            gsum_value=total,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_lagging_sessions",
            "Connections over the high-water mark",
            gw.hub.lagging_count(),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_upstream_up",
            "1 while the Redis pub/sub connection is up",
            int(gw.upstream.is_up),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_upstream_reconnects",
            "Reconnects of the Redis pub/sub connection",
            gw.upstream.reconnects,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_seconds_since_upstream_message",
            "Seconds since the last read from Redis",
            time.monotonic() - gw.hub.last_message_at,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_durable_reader_up",
            "1 while the stream reader reaches Redis",
            int(gw.durable.reader_up),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_durable_replays", "Durable history replays served", gw.durable.replays
        )
        yield CounterMetricFamily(
            f"{PREFIX}_durable_replayed_entries",
            "Durable history entries sent",
            gw.durable.replayed_entries,
        )
        if gw.sharded is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_sharded_connections",
                "Sharded pub/sub connections (one per cluster master in use)",
                gw.sharded.connections(),
            )
            yield CounterMetricFamily(
                f"{PREFIX}_sharded_channel_moves",
                "Sharded channels moved to another master (slot migration, failover)",
                gw.sharded.moves,
            )
        yield GaugeMetricFamily(f"{PREFIX}_draining", "1 while shutting down", int(gw.draining))
        yield m.processing.family()
