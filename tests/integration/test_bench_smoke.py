"""The load generator end to end at a tiny scale: it starts its own Redis and
gateway, delivers, measures and writes its reports. A functional test of the
tool, not a performance assertion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _command() -> list[str]:
    script = Path(sys.executable).with_name("redis-ws-bench")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "redis_ws_bench"]


def _receivers() -> list[str]:
    try:
        from redis_ws_bench import _recvloop  # noqa: F401
    except ImportError:
        return ["python"]
    return ["c", "python"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("receiver", _receivers())
def test_bench_w1_quick_delivers_everything_and_reports(tmp_path: Path, receiver: str) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            *_command(),
            "--workload",
            "W1",
            "--quick",
            "--retries",
            "0",
            "--out",
            str(out),
            "--receiver",
            receiver,
        ],
        capture_output=True,
        text=True,
        timeout=50,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sent=" in proc.stderr and "recv=" in proc.stderr  # per-second progress

    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("# Bench report")
    assert report["machine"]["receiver"] == receiver
    assert f"receive loop {receiver}" in (out / "report.md").read_text()
    by_target = {r["target"]: r for r in report["results"] if r["workload"] == "W1"}
    assert sorted(by_target) == ["floor", "gateway"]
    w1 = by_target["gateway"]
    assert w1["clients"] == 20
    [step] = w1["steps"]
    assert step["published"] == 100  # 50 msg/s for 2 s
    assert step["expected"] == 20 * 100
    assert step["received"] == step["expected"]
    assert step["lost"] == 0
    assert step["groups"]["fast"]["latency"]["samples"] == step["received"]
    assert step["groups"]["fast"]["latency"]["p99_ms"] > 0
    assert step["target"]["cpu_s"] > 0
    assert step["target"]["cpu_us_per_delivery"] > 0
    assert step["target"]["hwm_kb"] > 0
    assert step["generator"]["cpu_us_per_frame"] > 0
    # The kernel's part of each (stime: whole clock ticks, read at the start
    # and the end of the step, so it may read 0 in a 2 s step and may pass
    # the whole by up to two ticks spread over the frames, never by more).
    ticks_us = 2 * 1e6 / os.sysconf("SC_CLK_TCK") / step["received"]
    for part, whole in (
        (step["target"]["sys_us_per_delivery"], step["target"]["cpu_us_per_delivery"]),
        (step["generator"]["sys_us_per_frame"], step["generator"]["cpu_us_per_frame"]),
    ):
        assert part is not None and 0 <= part <= whole * 1.05 + ticks_us
    assert step["redis"]["cpu_s"] > 0
    floor = report["floor"]
    assert floor["start"]["one_frame"]["cpu_us_per_write"] > 0
    assert floor["one_frame_us"] > 0
    # The floor in W1's shape: the same receivers got every message from it.
    [fstep] = by_target["floor"]["steps"]
    assert fstep["received"] == fstep["expected"] == 20 * 100 and fstep["lost"] == 0
    assert fstep["target"]["cpu_us_per_delivery"] > 0
    [shaped] = [a for a in report["assessment"] if "W1's shape" in a["target"]]
    assert shaped["met"] in (True, False) and "x of" in shaped["actual"]


@pytest.mark.timeout(120)
def test_bench_durable_quick_replays_resumes_and_delivers(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            *_command(), "--workload", "D1,D2,D3", "--quick", "--retries", "0",
            "--no-floor", "--out", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    by = {r["workload"]: r for r in report["results"]}

    d1 = by["D1"]
    assert d1["replay_frames"] == d1["reply_replayed"] == 10_000
    assert d1["count_ok"] and d1["out_of_order_or_dup"] == 0
    assert d1["subscribe_to_subscribed_s"] > 0 and d1["target_cpu_us_per_entry"] > 0

    [d2] = by["D2"]["steps"]
    storm = d2["storm"]
    assert storm["resumed"] == 100 and storm["failed"] == 0
    assert storm["clients_missing"] == 0 and storm["clients_extra"] == 0
    assert storm["replayed_total"] >= 100 * 100
    assert d2["groups"]["live"]["lost"] == 0 and d2["groups"]["live"]["extra"] == 0
    assert d2["groups"]["live"]["received"] == 10 * d2["published"]

    [d3] = by["D3"]["steps"]
    for kind in ("durable", "plain"):
        g = d3["groups"][kind]
        assert g["clients"] == 50 and g["lost"] == 0 and g["extra"] == 0
        assert g["received"] == 50 * 100  # 50 msg/s for 2 s per channel
        assert g["latency"]["samples"] == g["received"]
    assert "## Durable channels" in (out / "report.md").read_text()


@pytest.mark.timeout(120)
def test_bench_w5_quick_slows_some_clients_and_samples_the_kernel_queues(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [*_command(), "--workload", "W5,W5B", "--quick", "--retries", "0", "--no-floor",
         "--out", str(out)],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for wl in ("W5", "W5B"):
        [res] = [r for r in report["results"] if r["workload"] == wl]
        [step] = res["steps"]
        slow, fast = step["groups"]["slow"], step["groups"]["fast"]
        assert slow["latency"]["samples"] > 0 and fast["latency"]["samples"] > 0
        # Slow readers (paced in W5, stalled in W5B) fall behind the fast ones.
        assert slow["latency"]["p50_ms"] > 5 * fast["latency"]["p50_ms"]
        # The sampler child saw their bytes queue in the kernel.
        queue = step["kernel_send_queue"]
        assert queue["max_total_bytes"] >= queue["max_socket_bytes"] > 0
        # The gateway's slow-consumer counters were read from its /metrics.
        assert set(step["slow_consumer"]) >= {"conflated", "dropped", "lagging_sessions"}
        assert res["target_env"]["DEFAULT_CHANNEL_POLICY"] == "conflate"


@pytest.mark.timeout(150)
def test_bench_w6_w7_quick_many_instruments_and_a_reconnect_storm(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [*_command(), "--workload", "W6,W7", "--quick", "--retries", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=140,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()

    w6 = {r["target"]: r for r in report["results"] if r["workload"] == "W6"}
    assert sorted(w6) == ["floor", "gateway"]
    pop = w6["gateway"]["popularity"]
    # Skewed: the most watched channel has many times the median's watchers.
    assert pop["watchers_max"] >= 5 * max(1, pop["watchers_median"])
    for kind in ("gateway", "floor"):
        [step] = w6[kind]["steps"]
        assert step["lost"] == 0 and step["received"] == step["expected"] > 0
        assert step["target"]["cpu_us_per_delivery"] > 0
        assert step["target"]["sys_us_per_delivery"] is not None
        assert step["target"]["rss_kb"] > 0
        assert step["groups"]["fast"]["latency"]["p99_ms"] > 0
    assert w6["gateway"]["steps"][0]["publisher"]["msgs_per_batch"] > 1
    [ratio] = [a for a in report["assessment"] if "W6's shape" in a["target"]]
    assert "x of" in ratio["actual"]

    storms = {r["alg"]: r for r in report["results"] if r["workload"] == "W7"}
    assert sorted(storms) == ["HS256", "RS256"]
    for r in storms.values():
        assert r["target_env"]["MAX_PENDING_HANDSHAKES_PER_IP"] == "1024"
        assert [p["phase"] for p in r["phases"]] == ["first", "reconnect"]
        for phase in r["phases"]:
            assert phase["live"] == phase["clients"] == 200 and phase["failed"] == 0
            assert phase["all_live_s"] > 0
            assert phase["target_ms_per_connection"] > 0
            assert phase["connect_to_live_ms"]["p99"] > 0
    assert "## W7: reconnect storm" in md and "JWT_SECRET" not in md
