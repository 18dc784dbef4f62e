"""Process-level behaviour: SIGTERM drain as Kubernetes does it, the tail tool,
frame sizes on the wire."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

import aiohttp
import pytest
import redis.asyncio as aioredis

from redis_ws_client.client import GatewayClient
from tests.support.gateway import RunningGateway, spawn_gateway, wait_ready
from tests.support.redis_server import RedisServer, free_port
from tests.support.wait import eventually


async def test_sigterm_drains_clients_with_1012_spread_over_window(
    redis_server: RedisServer,
) -> None:
    port = free_port()
    window = 1.5
    proc = await spawn_gateway(
        redis_server.url,
        port,
        ready=False,
        DRAIN_WINDOW_SECONDS=str(window),
        SHUTDOWN_TIMEOUT_SECONDS="6",
    )
    clients: list[GatewayClient] = []
    try:
        await wait_ready(f"http://127.0.0.1:{port}")
        url = f"ws://127.0.0.1:{port}/ws"
        clients = list(await asyncio.gather(*(GatewayClient(url).connect() for _ in range(20))))
        await asyncio.gather(*(c.subscribe("market:tick:NIFTY") for c in clients))
        closed_at: list[float] = []

        async def watch(c: GatewayClient) -> None:
            await c.closed.wait()
            closed_at.append(time.monotonic())

        watchers = [asyncio.create_task(watch(c)) for c in clients]
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # Once the child has handled the signal, readiness is 503 while it
        # drains, and the listener closes when the drain is over. Until it
        # has, /readyz may still say 200, but never after a 503.
        not_ready = False

        async def listener_closed() -> bool:
            nonlocal not_ready
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 503:
                        not_ready = True
                    else:
                        assert resp.status == 200 and not not_ready
            return False  # until the request fails: the listener is closed

        with pytest.raises(aiohttp.ClientError):
            # ignoring=(): a 200 after a 503 fails at once.
            await eventually(
                listener_closed, timeout=window + 10, what="the listener to close", ignoring=()
            )
        await asyncio.wait_for(asyncio.gather(*watchers), 10)
        rc = await asyncio.wait_for(proc.wait(), 10)
        exited = time.monotonic() - sent
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for c in clients:
            await c.close()
    assert rc == 0
    assert {c.close_code for c in clients} == {1012}
    spread = max(closed_at) - min(closed_at)
    assert spread >= window * 0.5, f"closes not spread over the window: {spread:.2f}s"
    assert not_ready, "/readyz never answered 503 while draining"
    assert exited < 6 + 1


async def test_tail_prints_frames(gateway: RunningGateway, redis_client: aioredis.Redis) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "redis_ws_client",
        "tail",
        gateway.url,
        "market:tick:*",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 15)
        assert b"tail: subscribed" in line
        await redis_client.publish("market:tick:BANKNIFTY", b'{"ltp":51200.5}')
        out = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert out.decode().strip() == 'market:tick:BANKNIFTY #1 {"ltp":51200.5}'
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 10)


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 300_000])
async def test_frames_of_every_header_size_reach_the_client(
    gateway: RunningGateway, redis_client: aioredis.Redis, size: int
) -> None:
    payload = ("x" * size).encode()
    async with GatewayClient(gateway.url) as c:
        await c.subscribe("big")
        await redis_client.publish("big", payload)
        frame = await c.next_of_type("data")
    assert frame["data"] == "x" * size


async def test_json_logs_carry_connection_ids_and_never_the_token(
    redis_server: RedisServer,
) -> None:
    port = free_port()
    secret = "sk-test-3f9a1c0d"
    proc = await spawn_gateway(
        redis_server.url,
        port,
        ready=False,
        stderr=asyncio.subprocess.PIPE,
        GATEWAY_API_KEY=secret,
        DRAIN_WINDOW_SECONDS="0",
    )
    try:
        await wait_ready(f"http://127.0.0.1:{port}")
        async with GatewayClient(f"ws://127.0.0.1:{port}/ws?token={secret}") as c:
            await c.subscribe("market:tick:NIFTY")
            await c.unsubscribe("market:tick:NIFTY")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        raw = await asyncio.wait_for(proc.stderr.read(), 15)
        await proc.wait()
    text = raw.decode()
    assert secret not in text
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    by_name = {e["event"]: e for e in events}
    for name in (
        "upstream_up",
        "connection_open",
        "subscribed",
        "unsubscribed",
        "connection_closed",
    ):
        assert name in by_name, f"missing log event {name}"
    conn = by_name["connection_open"]["conn"]
    assert by_name["subscribed"]["conn"] == conn == by_name["connection_closed"]["conn"]
    assert by_name["connection_open"]["via"] == "api_key"


@pytest.mark.parametrize("via_redis", [False, True])
async def test_selftest_passes_against_a_live_gateway(
    make_gateway: object, redis_server: RedisServer, via_redis: bool
) -> None:
    gw = await make_gateway(api_key="k-selftest-1")  # type: ignore[operator]
    args = ["--url", gw.url, "--token", "k-selftest-1", "--timeout", "10"]
    if via_redis:
        args += ["--redis-url", redis_server.url]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "redis_ws_gateway", "selftest", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert b"received the published message" in out


async def test_a_failure_while_starting_stops_what_had_started(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Server.serve stops the parts that started before one failed: the
    Redis connection's task ends and the listening socket is closed, and
    the error is the one that stopped the start."""
    import socket

    from redis_ws_gateway.server import Server
    from tests.support.gateway import gateway_settings

    server = Server(gateway_settings(redis_server.url))

    def refuse() -> None:
        raise RuntimeError("the stream reader could not start")

    monkeypatch.setattr(server.durable, "start", refuse)
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    with pytest.raises(RuntimeError, match="could not start"):
        await server.serve([("all", sock)])
    task = server.upstream._task
    assert task is not None and task.done()
    assert sock.fileno() == -1


async def test_the_listen_backlog_is_the_setting(redis_server: RedisServer) -> None:
    """LISTEN_BACKLOG reaches the kernel: a reconnect storm overflowed the
    old fixed 128, and each dropped SYN waits 1-7 s for its retry. The
    queue's size is what `ss` reports as Send-Q of a listening socket."""
    import shutil

    ss = shutil.which("ss")
    assert ss is not None, "ss (iproute2) is needed to read a listener's backlog"
    port = free_port()
    proc = await spawn_gateway(redis_server.url, port, LISTEN_BACKLOG="777")
    try:
        ss_proc = await asyncio.create_subprocess_exec(
            ss, "-ltnH", f"sport = :{port}", stdout=asyncio.subprocess.PIPE
        )
        stdout, _ = await ss_proc.communicate()
        out = stdout.decode().split()
        assert out[0] == "LISTEN" and out[2] == "777", out
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
