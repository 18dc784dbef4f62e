"""What a new user meets in the first hour (issue 20): one line and an exit
code for every mistake, settings that do nothing warned about, refusals in
the log, readiness while draining, the internal port, exporter errors in the
JSON log. Real gateway processes and a real redis-server throughout."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from redis_ws_client.client import GatewayClient, HandshakeRefused, ServerError
from redis_ws_client.sdk import ResilientClient
from redis_ws_gateway.security.limits import TokenBucket
from redis_ws_gateway.ws import admission as admission_module
from tests.conftest import GatewayFactory
from tests.support.cli import run_cli, run_client_cli
from tests.support.gateway import RunningGateway, spawn_gateway, wait_ready
from tests.support.redis_server import RedisServer, free_port

KEY = "first-hour-key-0123"
# A cold interpreter on a loaded CI machine takes seconds to import the
# gateway; every wait below ends as soon as its event happens.
START_S = 60.0


async def _run(*args: str, timeout: float = START_S, **env: str) -> tuple[int, str, str]:
    """Exit code, stdout, stderr of ``python -m redis_ws_gateway ARGS`` with ``env``
    over a copy of the test's environment (``""`` removes a variable)."""
    full = {k: v for k, v in {**os.environ, **env}.items() if v != ""}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "redis_ws_gateway", *args, env=full,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _read_until(
    stream: asyncio.StreamReader, done: Callable[[str], bool], timeout: float = START_S
) -> list[str]:
    """Lines of ``stream`` up to and including the first for which ``done`` holds."""
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            raw = await stream.readline()
            if not raw:
                raise AssertionError(f"stream ended before the awaited line; got {lines}")
            line = raw.decode().rstrip("\n")
            lines.append(line)
            if done(line):
                return lines


def _events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.startswith("{")]


async def _stop(proc: Any) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


# --- the command line -----------------------------------------------------------------


async def test_version_and_serve_help_list_the_settings() -> None:
    code, out, _ = await run_cli("--version")
    assert code == 0 and out.startswith("redis-ws-gateway ") and out.strip().split()[1][0].isdigit()
    code, out, _ = await run_cli("serve", "--help")
    assert code == 0
    for name in ("REDIS_URL=redis://127.0.0.1:6379", "MAX_CONNECTIONS=50000", "GATEWAY_API_KEY"):
        assert name in out


async def test_a_redis_url_with_a_bad_port_is_one_line() -> None:
    code, _, err = await _run("serve", REDIS_URL="redis://127.0.0.1:99999")
    assert code == 2
    assert err.strip().splitlines() == [
        "redis-ws-gateway: invalid setting REDIS_URL='redis://127.0.0.1:99999': "
        "the port must be a number from 1 to 65535"
    ]


async def test_a_port_in_use_is_one_line_before_anything_starts(redis_server: RedisServer) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, _, err = await _run(
            "serve",
            REDIS_URL=redis_server.url,
            REDIS_WS_GATEWAY_HOST="127.0.0.1",
            REDIS_WS_GATEWAY_PORT=str(port),
            LOG_FORMAT="json",
        )
    assert code == 1
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"redis-ws-gateway: port {port} on 127.0.0.1 is already in use")
    # Refused before Redis was contacted: nothing started that must be torn
    # down first (the old order connected to Redis, then failed to bind).
    assert "upstream_up" not in err and "upstream.connect" not in err


async def test_unknown_and_misspelt_settings_are_warned_at_start(redis_server: RedisServer) -> None:
    proc = await spawn_gateway(
        redis_server.url, free_port(), stderr=asyncio.subprocess.PIPE, ready=False,
        REDIS_URI="redis://elsewhere:6379", MAX_CONECTIONS="10",
        REDIS_WS_GATEWAY_POOL_SIZE="4",
    )  # fmt: skip
    try:
        lines = await _read_until(proc.stderr, lambda line: '"listening"' in line)
    finally:
        await _stop(proc)
    ignored = [e["detail"] for e in _events(lines) if e["event"] == "setting_ignored"]
    assert any("REDIS_URI" in d and "did you mean REDIS_URL" in d for d in ignored), ignored
    assert any("MAX_CONECTIONS" in d and "MAX_CONNECTIONS" in d for d in ignored), ignored
    assert any("REDIS_WS_GATEWAY_POOL_SIZE" in d for d in ignored), ignored
    assert all(e["level"] == "warning" for e in _events(lines) if e["event"] == "setting_ignored")


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))


@pytest.mark.parametrize(("chosen", "level"), [(None, "info"), ("10000", "warning")])
async def test_the_fd_limit_line_warns_only_about_a_chosen_limit(
    redis_server: RedisServer, chosen: str | None, level: str
) -> None:
    port = free_port()
    env = dict(
        os.environ,
        REDIS_URL=redis_server.url,
        REDIS_WS_GATEWAY_HOST="127.0.0.1",
        REDIS_WS_GATEWAY_PORT=str(port),
        LOG_FORMAT="json",
    )
    if chosen is not None:
        env["MAX_CONNECTIONS"] = chosen
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "redis_ws_gateway", "serve", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        preexec_fn=_low_fd_limit,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        lines = await _read_until(proc.stderr, lambda line: '"listening"' in line)
    finally:
        await _stop(proc)
    [capped] = [e for e in _events(lines) if e["event"] == "max_connections_capped_by_fd_limit"]
    assert capped["level"] == level and capped["nofile"] == 4096


async def test_tail_with_a_bad_token_says_why_in_one_line(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(api_key=KEY, require_auth=True)
    code, _, err = await run_client_cli("tail", "--token", "not-the-key", gw.url, "market:tick:*")
    assert code == 1
    assert err.strip().splitlines() == [
        "tail: gateway refused the connection: HTTP 401 invalid credential "
        "(pass a valid --token, or set GATEWAY_TOKEN)"
    ]


@pytest.mark.parametrize("url", ["localhost:8889/ws", "http://localhost:8889/ws", "ws://h:99999"])
async def test_tail_and_ping_with_a_bad_url_say_so_in_one_line(url: str) -> None:
    for command in (("tail", url, "x"), ("ping", url)):
        code, _, err = await run_client_cli(*command)
        assert code == 2, err
        [line] = err.strip().splitlines()
        assert line.startswith(f"{command[0]}: not a") and url in line


async def test_tail_into_head_ends_quietly(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    script = (
        f"{sys.executable} -m redis_ws_client tail {gateway.url} 'market:tick:*' | head -n 1; "
        "exit ${PIPESTATUS[0]}"
    )
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )

    async def publish_until_done() -> None:
        # Publishing goes on until tail notices that head has gone, which
        # takes the write after head's exit.
        while proc.returncode is None:
            await redis_client.publish("market:tick:NIFTY", '{"ltp": 1}')
            await asyncio.sleep(0.05)  # paces the publisher

    publisher = asyncio.create_task(publish_until_done())
    try:
        out, err = await asyncio.wait_for(proc.communicate(), START_S)
    finally:
        publisher.cancel()
    assert proc.returncode == 0, err
    assert out.decode().startswith("market:tick:NIFTY #")
    assert "Broken pipe" not in err.decode() and "cannot connect" not in err.decode()


async def test_publish_needs_a_redis_url_and_counts_receivers(
    gateway: RunningGateway, redis_server: RedisServer
) -> None:
    code, out, err = await _run("publish", "market:tick:X", "{}", REDIS_URL="")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        "publish: which Redis? pass --redis-url redis://HOST:PORT or set REDIS_URL"
    ]
    async with GatewayClient(gateway.url) as c:
        await c.subscribe("market:tick:X")
        code, out, _ = await _run("publish", "market:tick:X", "{}", REDIS_URL=redis_server.url)
        assert code == 0
        assert out.strip() == "published to market:tick:X: 1 Redis subscriber received it"
    code, out, err = await _run("publish", "nobody:here", "{}", REDIS_URL=redis_server.url)
    assert code == 0 and "0 Redis subscribers" in out and "no gateway is subscribed" in err


async def test_the_sdk_says_why_a_token_is_refused(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(api_key=KEY, require_auth=True)
    client = ResilientClient(gw.url, token="not-the-key")
    with pytest.raises(HandshakeRefused) as err:
        await client.connect()
    await client.close()
    assert err.value.status == 401
    assert str(err.value) == "gateway refused the connection: HTTP 401 invalid credential"


# --- refusals in the log ---------------------------------------------------------------


async def test_a_refused_handshake_is_logged_with_its_reason(redis_server: RedisServer) -> None:
    port = free_port()
    proc = await spawn_gateway(
        redis_server.url, port, stderr=asyncio.subprocess.PIPE, ready=False,
        REQUIRE_AUTH="true", GATEWAY_API_KEY=KEY, ALLOWED_ORIGINS="https://ui.example.com",
    )  # fmt: skip
    try:
        await _read_until(proc.stderr, lambda line: '"listening"' in line)
        url = f"ws://127.0.0.1:{port}/ws"
        async with aiohttp.ClientSession() as http:
            for headers, target in (
                ({}, url + "?token=wrong"),
                ({"Origin": "https://evil.example.com"}, url),
            ):
                with pytest.raises(aiohttp.WSServerHandshakeError):
                    await http.ws_connect(target, headers=headers)
        lines = await _read_until(proc.stderr, lambda line: "origin not allowed" in line)
    finally:
        await _stop(proc)
    refused = [e for e in _events(lines) if e["event"] == "handshake_refused"]
    assert [(e["status"], e["reason"], e["detail"]) for e in refused] == [
        (401, "unauthorized", "invalid credential"),
        (403, "origin", "origin not allowed"),
    ]
    assert all(e["level"] == "warning" for e in refused)
    assert "wrong" not in "\n".join(lines)


async def test_a_failed_auth_frame_is_logged_with_its_reason(redis_server: RedisServer) -> None:
    port = free_port()
    proc = await spawn_gateway(
        redis_server.url, port, stderr=asyncio.subprocess.PIPE, ready=False,
        REQUIRE_AUTH="true", GATEWAY_API_KEY=KEY,
    )  # fmt: skip
    try:
        await _read_until(proc.stderr, lambda line: '"listening"' in line)
        async with GatewayClient(f"ws://127.0.0.1:{port}/ws") as c:
            with pytest.raises(ServerError):
                await c.auth("not-the-key")
        lines = await _read_until(proc.stderr, lambda line: '"auth_refused"' in line)
    finally:
        await _stop(proc)
    [refused] = [e for e in _events(lines) if e["event"] == "auth_refused"]
    assert refused["detail"] == "invalid credential" and refused["level"] == "warning"
    assert refused["conn"] and "not-the-key" not in "\n".join(lines)


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.calls.append((event, fields))

    def __getattr__(self, _: str) -> Callable[..., None]:
        return lambda *a, **k: None


async def test_a_flood_of_refusals_is_logged_at_a_bounded_rate(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _Recorder()
    monkeypatch.setattr(admission_module, "log", recorder)
    started = time.monotonic()
    for _ in range(2000):
        gateway.server.admission.reject(401, "unauthorized", "invalid credential")
    elapsed = time.monotonic() - started
    logged = [f for e, f in recorder.calls if e == "handshake_refused"]
    allowed = (
        admission_module.REFUSAL_LOG_BURST + admission_module.REFUSAL_LOG_PER_SECOND * elapsed + 1
    )
    assert 1 <= len(logged) <= allowed
    # Nothing is lost without a trace: the next line that gets through counts the rest.
    gateway.server.admission.refusal_log = TokenBucket(1.0, 1)
    gateway.server.admission.reject(401, "unauthorized", "invalid credential")
    assert recorder.calls[-1][1]["unlogged_since_last"] == 2000 - len(logged)


# --- shutdown, ports, telemetry -----------------------------------------------------


async def test_readyz_answers_503_while_draining(redis_server: RedisServer) -> None:
    port = free_port()
    proc = await spawn_gateway(
        redis_server.url, port, stderr=asyncio.subprocess.PIPE, ready=False,
        DRAIN_WINDOW_SECONDS="20", SHUTDOWN_TIMEOUT_SECONDS="25",
    )  # fmt: skip
    url = f"ws://127.0.0.1:{port}/ws"
    clients: list[GatewayClient] = []
    try:
        await _read_until(proc.stderr, lambda line: '"listening"' in line)
        # Two clients: the second is closed half a window after SIGTERM, so
        # the drain is still going on when readiness is asked.
        clients = [await GatewayClient(url).connect() for _ in range(2)]
        proc.send_signal(signal.SIGTERM)
        await _read_until(proc.stderr, lambda line: '"drain_started"' in line)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                assert resp.status == 503
                assert await resp.json() == {"ready": False, "reason": "draining"}
        with pytest.raises(HandshakeRefused) as refused:
            await GatewayClient(url).connect()
        assert refused.value.status == 503 and "draining" in str(refused.value)
    finally:
        for c in clients:
            await c.close()
        await _stop(proc)


async def test_the_internal_port_keeps_metrics_admin_and_console_off_the_public_one(
    redis_server: RedisServer,
) -> None:
    public, internal = free_port(), free_port()
    proc = await spawn_gateway(
        redis_server.url, public, REDIS_WS_GATEWAY_INTERNAL_PORT=str(internal), GATEWAY_API_KEY=KEY
    )
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        async with aiohttp.ClientSession() as http:

            async def status(port: int, path: str) -> int:
                async with http.get(f"http://127.0.0.1:{port}{path}", headers=auth) as resp:
                    return resp.status

            for path in ("/metrics", "/admin/stats", "/", "/console.js", "/console.css"):
                assert await status(public, path) == 404, path
                assert await status(internal, path) == 200, path
            for path in ("/healthz", "/readyz", "/client.js"):
                assert await status(public, path) == 200, path
            assert await status(internal, "/ws") == 404
        async with GatewayClient(f"ws://127.0.0.1:{public}/ws") as c:
            await c.ping()
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


async def test_exporter_errors_reach_the_log_as_json(redis_server: RedisServer) -> None:
    port = free_port()
    proc = await spawn_gateway(
        redis_server.url, port, stderr=asyncio.subprocess.PIPE, ready=False,
        GATEWAY_API_KEY=KEY,
        # Nothing listens there: every export fails, and the exporter says so.
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        OTEL_EXPORTER_OTLP_TIMEOUT="1", OTEL_BSP_SCHEDULE_DELAY="50",
    )  # fmt: skip
    try:
        await _read_until(proc.stderr, lambda line: '"listening"' in line)
        await wait_ready(f"http://127.0.0.1:{port}")
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{port}/publish",
                json={"channel": "x", "data": 1},
                headers={"Authorization": f"Bearer {KEY}"},
            ) as resp:
                assert resp.status == 200
        lines = await _read_until(proc.stderr, lambda line: "opentelemetry" in line)
    finally:
        await _stop(proc)
    events = [json.loads(line) for line in lines]  # every line, or this raises
    exporter = [e for e in events if str(e.get("logger", "")).startswith("opentelemetry")]
    assert exporter and exporter[-1]["level"] in ("warning", "error")


# --- the demo's own mistakes -------------------------------------------------------


async def test_the_demo_refuses_a_redis_url_with_a_bad_port_in_one_line() -> None:
    code, out, err = await _run(
        "demo", "--port", str(free_port()), REDIS_URL="redis://127.0.0.1:99999"
    )
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert "REDIS_URL" in line and "port" in line


async def test_the_demo_says_once_that_redis_is_unreachable() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{closed.getsockname()[1]}"
        code, out, err = await _run("demo", "--port", str(free_port()), REDIS_URL=url)
    assert code == 1 and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith(f"demo: cannot reach REDIS_URL={url}: ")


async def test_the_demo_says_its_port_is_in_use_before_starting_anything() -> None:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, out, err = await _run("demo", "--port", str(port), REDIS_URL="")
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [
        f"demo: port {port} is already in use (another demo or gateway?): use --port"
    ]
