"""The lock-free histogram the hub observes per upstream read, exported in
Prometheus's text format exactly as prometheus_client's own Histogram."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.registry import Collector

from redis_ws_gateway.observability.metrics import PlainHistogram

BOUNDS = (0.001, 0.01, 0.1)
VALUES = (0.0005, 0.001, 0.002, 0.01, 0.05, 0.5, 7.0)


class _One(Collector):
    def __init__(self, h: PlainHistogram) -> None:
        self.h = h

    def collect(self):  # type: ignore[no-untyped-def]
        yield self.h.family()


def _samples(text: bytes) -> list[str]:
    # The reference also exports a _created sample: not part of what is compared.
    return [
        line
        for line in text.decode().splitlines()
        if line.startswith("h_") and "_created" not in line
    ]


def test_plain_histogram_exports_what_prometheus_clients_histogram_does() -> None:
    ours = PlainHistogram("h", "doc", BOUNDS)
    reference_registry = CollectorRegistry()
    reference = Histogram("h", "doc", buckets=BOUNDS, registry=reference_registry)
    for v in VALUES:
        ours.observe(v)
        reference.observe(v)
    registry = CollectorRegistry()
    registry.register(_One(ours))
    got = _samples(generate_latest(registry))
    want = _samples(generate_latest(reference_registry))
    assert got == want
    # And the numbers themselves: le is inclusive, +Inf counts everything.
    assert 'h_bucket{le="0.001"} 2.0' in got
    assert 'h_bucket{le="0.01"} 4.0' in got
    assert 'h_bucket{le="+Inf"} 7.0' in got
    assert "h_count 7.0" in got
