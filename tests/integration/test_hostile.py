"""One hostile client against a real gateway and a real Redis, at the byte
level: floods of control frames, endless fragments, slowloris sockets,
rebinding origins, absurd token claims, and a client that resets while its
frames are being written. docs/SECURITY.md lists the limits these test."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import GatewayFactory
from tests.support.gateway import spawn_gateway
from tests.support.rawws import (
    EMPTY_PING,
    PING,
    RawClient,
    abort_all,
    connect_raw,
    frame,
    healthz_seconds,
    rss_bytes,
    text,
    upgrade,
)
from tests.support.redis_server import RedisServer, free_port
from tests.support.wait import eventually

MIB = 1 << 20
SECRET = "s" * 32


@pytest.fixture(autouse=True)
async def _reset_raw_clients(make_gateway: GatewayFactory) -> AsyncIterator[None]:
    # Torn down before the gateways (it depends on their factory), in the
    # test's own event loop.
    yield
    abort_all()


@pytest.fixture
async def spawned(redis_server: RedisServer) -> AsyncIterator[Any]:
    """Start gateway processes with extra settings; all are killed after,
    and none may have logged an error or a traceback."""
    procs: list[Any] = []

    with contextlib.ExitStack() as files:

        async def start(nofile: int | None = None, **env: str) -> tuple[Any, int]:
            port = free_port()
            log = files.enter_context(tempfile.TemporaryFile())
            proc = await spawn_gateway(redis_server.url, port, nofile=nofile, stderr=log, **env)
            procs.append((proc, log))
            return proc, port

        yield start
        for proc, log in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            log.seek(0)
            lines = log.read().decode(errors="replace").splitlines()
            bad = [line for line in lines if not line.startswith("{") or '"level":"error"' in line]
            assert not bad, "the gateway logged:\n" + "\n".join(bad[:20])


async def subscribe(client: RawClient, *channels: str) -> None:
    client.writer.write(text(orjson.dumps({"action": "subscribe", "channels": list(channels)})))
    while True:
        f = await client.read_frame()
        if f.opcode == 0x1 and orjson.loads(f.payload).get("type") == "subscribed":
            return


async def next_json(client: RawClient, timeout: float = 5.0) -> dict[str, Any]:
    while True:
        f = await client.read_frame(timeout)
        if f.opcode == 0x1:
            msg: dict[str, Any] = orjson.loads(f.payload)
            return msg
        assert f.opcode != 0x8, f"closed with {f.close_code}"


# --- 1. Pongs to a client that does not read ---------------------------------


@pytest.mark.parametrize("authenticated", [True, False], ids=["authenticated", "before-auth"])
async def test_ping_flood_from_a_client_that_never_reads_is_bounded(
    spawned: Any, authenticated: bool
) -> None:
    # The frame budget would slow this flood too; lifted here so that what is
    # tested is the bound on pongs alone.
    env = {
        "WS_MAX_FRAMES_PER_SECOND": "1000000",
        "WS_FRAME_BURST": "1000000",
        "WS_MAX_BYTES_PER_SECOND": str(1 << 30),
    }
    if not authenticated:
        env |= {"REQUIRE_AUTH": "true", "GATEWAY_API_KEY": "k" * 32}
    proc, port = await spawned(**env)
    client = await upgrade(port, rcvbuf=4096)
    assert client.status == 101
    before = rss_bytes(proc.pid)
    chunk = frame(PING, b"x" * 125) * 512

    async def stalled() -> bool:
        client.writer.write(chunk)
        try:
            async with asyncio.timeout(1.0):
                await client.writer.drain()
        except TimeoutError:
            return True  # the gateway stopped reading from this client
        return False

    try:
        await eventually(
            stalled, timeout=8, interval=0, what="the gateway to stop reading unanswerable pings"
        )
    finally:
        grown = rss_bytes(proc.pid) - before
        assert grown < 20 * MIB, f"gateway grew {grown / MIB:.0f} MiB answering pings"
    assert await healthz_seconds(port) < 1.0
    client.close()


# --- 2. Every frame costs: control frames and fragments ------------------------


async def test_empty_ping_flood_is_slowed_to_the_frame_budget(
    spawned: Any, redis_server: RedisServer
) -> None:
    _, port = await spawned(WS_MAX_FRAMES_PER_SECOND="100", WS_FRAME_BURST="200")
    watcher = await upgrade(port)
    await subscribe(watcher, "feed")
    flooder = await upgrade(port)
    pongs = 0

    async def count_pongs() -> None:
        nonlocal pongs
        while True:
            f = await flooder.read_frame(timeout=30)
            pongs += f.opcode == 0xA

    counter = asyncio.create_task(count_pongs())
    chunk = EMPTY_PING * 10_000
    publisher = aioredis.from_url(redis_server.url)
    started = time.monotonic()
    received = 0
    health: list[float] = []
    try:
        for i in range(30):
            flooder.writer.write(chunk)
            await publisher.publish("feed", orjson.dumps({"i": i}))
            msg = await next_json(watcher, timeout=2.0)
            assert msg["data"] == {"i": i}
            received += 1
            if i % 10 == 0:
                health.append(await healthz_seconds(port))
        elapsed = time.monotonic() - started
    finally:
        counter.cancel()
        await publisher.aclose()
    assert received == 30
    assert max(health) < 1.0
    # At most the burst plus the rate over the time taken (a second of slack
    # for the refill timers): the gateway read the rest only later, or never.
    assert pongs <= 200 + 100 * (elapsed + 1), f"{pongs} pongs in {elapsed:.1f} s"
    watcher.close()
    flooder.close()


async def test_endless_empty_continuation_frames_close_with_1008(spawned: Any) -> None:
    proc, port = await spawned(WS_MAX_FRAGMENTS="64")
    client = await upgrade(port)
    before = rss_bytes(proc.pid)
    client.writer.write(frame(0x1, b'{"action"', fin=False))
    client.writer.write(frame(0x0, b"", fin=False) * 5000)
    closing = await client.read_until_close(timeout=5)
    assert closing is not None and closing.close_code == 1008
    assert rss_bytes(proc.pid) - before < 20 * MIB
    client.close()


async def test_fragments_count_toward_the_message_size(spawned: Any) -> None:
    _, port = await spawned(WS_MAX_MESSAGE_BYTES="1024")
    client = await upgrade(port)
    client.writer.write(frame(0x1, b"[", fin=False))
    client.writer.write(frame(0x0, b"0," * 300, fin=False) * 3)
    closing = await client.read_until_close(timeout=5)
    assert closing is not None and closing.close_code == 1009
    client.close()


# --- 3. Slowloris ---------------------------------------------------------------


async def _partial_heads(port: int, sources: list[str], per_source: int) -> list[Any]:
    socks = []
    for source in sources:
        for _ in range(per_source):
            reader, writer = await connect_raw(port, source=source)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            socks.append((reader, writer))
    return socks


async def test_a_request_head_that_never_ends_is_closed_at_the_deadline(spawned: Any) -> None:
    _, port = await spawned(HANDSHAKE_TIMEOUT_SECONDS="1")
    socks = await _partial_heads(port, ["127.0.0.2"], 10)
    started = time.monotonic()
    for reader, _ in socks:
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # EOF: the gateway closed it
    assert time.monotonic() - started < 5
    for _, writer in socks:
        writer.transport.abort()


async def test_handshakes_from_one_address_are_capped_and_others_still_connect(
    spawned: Any,
) -> None:
    _, port = await spawned(MAX_PENDING_HANDSHAKES_PER_IP="16", HANDSHAKE_TIMEOUT_SECONDS="30")
    socks = await _partial_heads(port, ["127.0.0.3"], 16)
    refused = await upgrade(port, source="127.0.0.3")
    assert refused.status == 429
    assert b"too many handshakes from this address" in refused.body
    legit = await upgrade(port, source="127.0.0.1")
    assert legit.status == 101
    assert await healthz_seconds(port) < 1.0
    for _, writer in socks:
        writer.transport.abort()


async def test_at_the_open_file_limit_an_upgrade_gets_503_not_a_reset(spawned: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:  # this test's own 1050 sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    proc, port = await spawned(nofile=400, HANDSHAKE_TIMEOUT_SECONDS="30")
    # 1000 sockets from 70 addresses, each under its per-address cap: past
    # what 400 descriptors can hold.
    sources = [f"127.0.1.{i}" for i in range(1, 71)]
    socks = []
    refused = 0
    for source in sources:
        for _ in range(15):
            reader, writer = await connect_raw(port, source=source)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            socks.append((reader, writer))
    for reader, _ in socks:
        try:
            async with asyncio.timeout(0.05):
                if (await reader.read(12)).startswith(b"HTTP/1.1 503"):
                    refused += 1
        except (TimeoutError, ConnectionResetError):
            # Still pending; or refused past what the gateway keeps
            # descriptors for, and reset after its response.
            pass
    assert refused > 0, "nothing was refused: the caps did not apply"
    client = await upgrade(port)
    assert client.status == 503
    assert b"too many" in client.body
    assert proc.returncode is None
    for _, writer in socks:
        writer.transport.abort()


# --- 4. Exact origins -------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "same_host", "status"),
    [
        ("https://ui.example.com", None, False, 101),
        ("https://ui.example.com:443", None, False, 101),
        ("HTTPS://UI.EXAMPLE.COM", None, False, 101),
        ("http://ui.example.com", None, False, 403),  # scheme
        ("https://ui.example.com:8443", None, False, 403),  # port
        ("https://ui.example.com.evil.example", None, False, 403),
        ("http://evil.example:{port}", "evil.example:{port}", False, 403),  # DNS rebinding
        ("http://127.0.0.1:{port}", None, False, 403),
        ("null", None, False, 403),
        ("http://evil.example:{port}", "evil.example:{port}", True, 101),  # opted in
        ("https://evil.example:{port}", "evil.example:{port}", True, 101),
        ("http://evil.example:1", "evil.example:{port}", True, 403),
    ],
)
async def test_origins_match_exactly(
    make_gateway: GatewayFactory, origin: str, host: str | None, same_host: bool, status: int
) -> None:
    opt_in = {"allow_same_host_origin": True} if same_host else {}
    gw = await make_gateway(allowed_origins=("https://ui.example.com",), **opt_in)
    port = gw.settings.port
    headers = {"Origin": origin.format(port=port)}
    if host is not None:
        headers["Host"] = host.format(port=port)
    client = await upgrade(port, headers=headers)
    assert client.status == status, (origin, client.head)
    client.close()


# --- 5. Token claims a frame cannot hold --------------------------------------------


ABSURD_DATES = pytest.mark.parametrize(
    "claims",
    [{"exp": 1e300}, {"exp": 2**64}, {"exp": 253_402_300_800}, {"nbf": -1}, {"iat": -1}],
    ids=["exp-1e300", "exp-2**64", "exp-year-10000", "nbf-negative", "iat-negative"],
)


def _absurd_token(claims: dict[str, float]) -> str:
    return jwt.encode({"sub": "eve", "exp": time.time() + 300} | claims, SECRET, algorithm="HS256")


@ABSURD_DATES
async def test_an_absurd_numeric_date_in_an_auth_frame_is_an_error_not_1011(
    make_gateway: GatewayFactory, claims: dict[str, float]
) -> None:
    gw = await make_gateway(jwt_secret=SECRET, jwt_algorithms=("HS256",), require_auth=True)
    client = await upgrade(gw.settings.port)
    assert client.status == 101
    token = _absurd_token(claims)
    client.writer.write(text(orjson.dumps({"action": "auth", "token": token, "requestId": "a"})))
    reply = await next_json(client)
    assert reply["type"] == "error" and reply["code"] == "unauthorized", reply
    assert reply["message"] == f"token claim {next(iter(claims))} out of range", reply
    # Still open and answering.
    client.writer.write(text(b'{"action": "ping", "requestId": "p"}'))
    assert (await next_json(client))["type"] == "pong"


@ABSURD_DATES
async def test_an_absurd_numeric_date_at_connect_is_refused(
    make_gateway: GatewayFactory, claims: dict[str, float]
) -> None:
    gw = await make_gateway(jwt_secret=SECRET, jwt_algorithms=("HS256",), require_auth=True)
    client = await upgrade(gw.settings.port, path=f"/ws?token={_absurd_token(claims)}")
    assert client.status == 401
    assert client.body == f"token claim {next(iter(claims))} out of range\n".encode()


async def test_an_infinite_exp_is_refused(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(jwt_secret=SECRET, jwt_algorithms=("HS256",), require_auth=True)
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
    body = jwt.utils.base64url_encode(b'{"sub":"eve","exp":Infinity}')
    import hashlib
    import hmac

    signing = header + b"." + body
    sig = jwt.utils.base64url_encode(hmac.new(SECRET.encode(), signing, hashlib.sha256).digest())
    token = (signing + b"." + sig).decode()
    client = await upgrade(gw.settings.port)
    client.writer.write(text(orjson.dumps({"action": "auth", "token": token})))
    reply = await next_json(client)
    assert reply["type"] == "error" and reply["code"] == "unauthorized", reply
    client.close()


# --- 6. A client reset while its frames are written ------------------------------


async def test_a_client_socket_closed_under_the_fanout_leaves_redis_alone(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    """uvloop can close a client's socket (a failed read) before the
    connection hears of it; a write to it then raises "the handler is
    closed". Here the victim's socket is closed that way, behind its
    connection's back, and a Redis message for it is routed through its
    batch (a pattern subscription): the other client keeps its data and the
    upstream connection is not dropped."""
    gw = await make_gateway()
    port = gw.settings.port
    victim = await upgrade(port)
    await subscribe(victim, "tick:*")  # pattern frames go through the batch
    healthy = await upgrade(port)
    await subscribe(healthy, "tick:*")
    victim_port = victim.writer.get_extra_info("sockname")[1]
    session = next(
        s for s in gw.server.sessions if s.transport.get_extra_info("peername")[1] == victim_port
    )
    upstream_before = gw.server.upstream._conn

    class Bystander(asyncio.Protocol):
        gone = asyncio.Event()

        def connection_lost(self, exc: Exception | None) -> None:
            self.gone.set()

    transport = session.transport
    bystander = Bystander()
    transport.set_protocol(bystander)  # the connection will not hear of it
    transport.abort()
    async with asyncio.timeout(5):
        await bystander.gone.wait()  # uvloop has closed the handle
    assert not session.closing

    await redis_client.publish("tick:A", b'{"p": 1}')
    msg = await next_json(healthy)
    assert msg["type"] == "data" and msg["data"] == {"p": 1}, msg
    await redis_client.publish("tick:A", b'{"p": 2}')
    msg = await next_json(healthy)
    assert msg["type"] == "data" and msg["data"] == {"p": 2}, msg
    assert gw.server.upstream._conn is upstream_before
    # What uvloop tells the connection in the end.
    gw.server.sessions[session].connection_lost(None)
