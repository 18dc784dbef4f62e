"""The Python SDK against the real gateway and a real Redis: typed messages and
errors, reconnect after a gateway restart, dead-connection detection, token
refresh, the publisher helpers, and the publish/ping CLI commands."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import redis
import redis.asyncio as aioredis

from redis_ws_client.client import (
    BadChannelError,
    ForbiddenError,
    Gap,
    GatewayClient,
    HandshakeRefused,
    NotSubscribedError,
    TooManyWildcardsError,
    UnauthorizedError,
    UnknownActionError,
)
from redis_ws_client.sdk import ResilientClient, State
from redis_ws_gateway.config import RoleConfig
from redis_ws_gateway.publish import apublish, apublish_durable, publish, publish_durable
from tests.conftest import GatewayFactory
from tests.support.cli import run_cli, run_client_cli
from tests.support.gateway import RunningGateway
from tests.support.redis_server import RedisServer
from tests.support.wait import eventually

SECRET = "sdk-test-secret-" + "0123456789abcdef" * 3


def hs_token(sub: str = "alice", ttl: int = 300, **claims: Any) -> str:
    body = {"sub": sub, "exp": int(time.time()) + ttl, "role": "user", **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


class StateLog:
    """Records state changes; waits (bounded) until one has happened."""

    def __init__(self) -> None:
        self.states: list[State] = []

    def __call__(self, state: State) -> None:
        self.states.append(state)

    async def reach(self, state: State, timeout: float = 10.0) -> None:
        await eventually(lambda: state in self.states, timeout=timeout, what=f"state {state!r}")


def fast_client(url: str, token: Any = None, **kwargs: Any) -> ResilientClient:
    return ResilientClient(url, token, backoff_base=0.05, backoff_max=0.3, **kwargs)


# --- subscribe and iterate ---------------------------------------------------------------


async def test_subscribe_iter_yields_typed_messages_in_order(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    async with fast_client(gateway.url) as client:
        async with client.subscribe_iter("market:tick:*", "engine:signal:N") as sub:
            await redis_client.publish("market:tick:NIFTY", b'{"ltp": 22450.05}')
            await redis_client.publish("engine:signal:N", b"plain text")
            await redis_client.publish("market:tick:BANK", b"\xff\xfe")
            received = []
            async for msg in sub:
                received.append(msg)
                if len(received) == 3:
                    break
    tick, signal, binary = received
    assert (tick.channel, tick.pattern, tick.seq, tick.data) == (
        "market:tick:NIFTY",
        "market:tick:*",
        1,
        {"ltp": 22450.05},
    )
    assert tick.key == "market:tick:*" and tick.offset is None and not tick.replay
    assert (signal.channel, signal.pattern, signal.seq, signal.data) == (
        "engine:signal:N",
        None,
        1,
        "plain text",
    )
    assert binary.data == b"\xff\xfe" and binary.seq == 2
    assert all(m.gap is None and m.epoch for m in received)
    assert client.stats.messages == 3 and client.stats.gaps == 0


async def test_bare_async_for_unsubscribes_when_the_loop_is_left(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    async with fast_client(gateway.url) as client:
        sub = await client.subscribe_iter("bare").start()
        iterator = sub.__aiter__()
        await redis_client.publish("bare", b"1")
        assert (await asyncio.wait_for(iterator.__anext__(), 5)).data == 1
        # What leaving an ``async for`` does, without waiting for the collector.
        await iterator.aclose()
        assert sub.closed and client.subscriptions() == []
        (session,) = gateway.server.sessions
        assert session.subscriptions == {}
        async with client.subscribe_iter("bare") as again:
            await redis_client.publish("bare", b"2")
            assert (await again.get(timeout=5)).data == 2


async def test_two_consumers_of_one_channel_share_the_subscription(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    async with fast_client(gateway.url) as client:
        a = await client.subscribe_iter("shared").start()
        b = await client.subscribe_iter("shared").start()
        await redis_client.publish("shared", b'{"n":1}')
        assert (await a.get(timeout=5)).data == {"n": 1}
        assert (await b.get(timeout=5)).data == {"n": 1}
        await a.close()
        await redis_client.publish("shared", b'{"n":2}')
        assert (await b.get(timeout=5)).data == {"n": 2}
        assert [s.consumers for s in client.subscriptions()] == [1]


# --- typed errors ---------------------------------------------------------------------------


async def test_refusals_raise_typed_errors_and_the_client_keeps_working(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await make_gateway(
        roles={"user": RoleConfig(allow=("market:*",))}, max_wildcard_subscriptions=1
    )
    async with fast_client(gw.url) as client:
        with pytest.raises(BadChannelError) as bad:
            await client.subscribe_iter("bad\x01name").start()
        assert bad.value.code == "bad_channel" and bad.value.channel == "bad\x01name"
        with pytest.raises(ForbiddenError) as forbidden:
            await client.subscribe_iter("engine:decision:X").start()
        assert forbidden.value.channel == "engine:decision:X"
        with pytest.raises(TooManyWildcardsError):
            await client.subscribe_iter("market:a:*", "market:b:*").start()
        with pytest.raises(NotSubscribedError):
            await client.request("unsubscribe", channels=["market:never"])
        with pytest.raises(UnknownActionError):
            await client.request("dance")
        assert client.subscriptions() == []
        async with client.subscribe_iter("market:tick:X") as sub:
            await redis_client.publish("market:tick:X", b"1")
            assert (await sub.get(timeout=5)).data == 1
        assert await client.ping() < 5


async def test_gateway_client_raises_the_same_typed_errors(gateway: RunningGateway) -> None:
    async with GatewayClient(gateway.url) as c:
        with pytest.raises(BadChannelError):
            await c.subscribe("")
        with pytest.raises(NotSubscribedError):
            await c.unsubscribe("nothing")


async def test_first_connect_failure_raises_at_once(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(require_auth=True, jwt_secret=SECRET, jwt_algorithms=("HS256",))
    client = fast_client(gw.url, "not-a-valid-token")
    with pytest.raises(HandshakeRefused) as err:
        await client.connect()
    assert err.value.status == 401 and client.state == "closed"


# --- reconnect ------------------------------------------------------------------------------


async def test_reconnects_after_the_gateway_restarts_on_the_same_port(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await make_gateway()
    port = gw.settings.port
    states = StateLog()
    gaps: list[Gap] = []
    async with fast_client(gw.url, on_state=states, on_gap=gaps.append) as client:
        async with client.subscribe_iter("market:tick:X", "engine:*") as sub:
            await redis_client.publish("market:tick:X", b'{"n":1}')
            assert (await sub.get(timeout=5)).data == {"n": 1}
            await asyncio.wait_for(gw.stop(), 15)
            await states.reach("reconnecting")
            await make_gateway(port=port)
            await client.wait_connected(10)
            await redis_client.publish("market:tick:X", b'{"n":2}')
            await redis_client.publish("engine:signal:Y", b'{"n":3}')
            after = [await sub.get(timeout=5) for _ in range(2)]
    assert [(m.key, m.data, m.seq) for m in after] == [
        ("market:tick:X", {"n": 2}, 1),
        ("engine:*", {"n": 3}, 1),
    ]
    # A plain channel cannot be resumed: the application is told once per key.
    assert sorted((g.key, g.reason) for g in gaps) == [
        ("engine:*", "reconnect"),
        ("market:tick:X", "reconnect"),
    ]
    assert all(m.gap is not None and m.gap.reason == "reconnect" for m in after)
    assert client.stats.reconnects == 1
    assert states.states[:3] == ["connecting", "open", "reconnecting"]


async def test_close_1012_reconnects_and_calls_the_token_provider_again(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await make_gateway(require_auth=True, jwt_secret=SECRET, jwt_algorithms=("HS256",))
    issued: list[str] = []

    async def provider() -> str:
        issued.append(hs_token(jti=str(len(issued))))
        return issued[-1]

    states = StateLog()
    async with fast_client(gw.url, provider, on_state=states) as client:
        async with client.subscribe_iter("market:tick:X") as sub:
            for session in list(gw.server.sessions):
                gw.server.ws.disconnect(session, 1012, "service restart")
            await states.reach("reconnecting")
            await client.wait_connected(10)
            assert client.close_code == 1012
            await redis_client.publish("market:tick:X", b"7")
            assert (await sub.get(timeout=5)).data == 7
    assert len(issued) == 2


class FreezingProxy:
    """A TCP proxy whose open connections can be frozen: bytes stop flowing
    both ways and nothing is closed, as with a dead NAT entry or a peer that
    hangs. Connections made after a freeze flow normally."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._frozen: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> FreezingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def freeze(self) -> None:
        for flag in self._frozen:
            flag.set()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        frozen = asyncio.Event()
        self._frozen.append(frozen)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, frozen))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, frozen: asyncio.Event
    ) -> None:
        try:
            while data := await src.read(65536):
                if not frozen.is_set():
                    dst.write(data)
                    await dst.drain()
        except ConnectionError:
            pass
        if not frozen.is_set():
            dst.close()


@pytest.fixture
async def proxy(gateway: RunningGateway) -> AsyncIterator[FreezingProxy]:
    p = await FreezingProxy(gateway.settings.port).start()
    yield p
    await p.close()


async def test_a_silent_connection_is_pinged_dropped_and_replaced(
    proxy: FreezingProxy, redis_client: aioredis.Redis
) -> None:
    url = f"ws://127.0.0.1:{proxy.port}/ws"
    states = StateLog()
    gaps: list[Gap] = []
    async with fast_client(
        url, idle_timeout=0.3, ping_timeout=0.3, on_state=states, on_gap=gaps.append
    ) as client:
        async with client.subscribe_iter("market:tick:X") as sub:
            proxy.freeze()
            frozen_at = time.monotonic()
            await states.reach("reconnecting", timeout=5)
            # Silence (0.3 s) plus an unanswered ping (0.3 s), not a TCP timeout.
            assert time.monotonic() - frozen_at < 3
            await client.wait_connected(5)
            await redis_client.publish("market:tick:X", b"1")
            msg = await sub.get(timeout=5)
    assert msg.data == 1 and msg.gap is not None and msg.gap.reason == "reconnect"
    assert client.stats.reconnects == 1


async def test_an_idle_but_healthy_connection_is_kept(gateway: RunningGateway) -> None:
    states = StateLog()
    async with fast_client(gateway.url, idle_timeout=0.1, ping_timeout=2, on_state=states) as c:
        # Five idle periods, each answered by a pong.
        await eventually(
            lambda: c.stats.keepalive_pings >= 5, timeout=5, what="five keepalive pings answered"
        )
        assert c.connected
    assert "reconnecting" not in states.states and c.stats.reconnects == 0


# --- tokens -----------------------------------------------------------------------------------


async def test_refresh_token_sends_auth_and_a_refused_token_changes_nothing(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await make_gateway(require_auth=True, jwt_secret=SECRET, jwt_algorithms=("HS256",))
    first = hs_token(ttl=60)
    states = StateLog()
    async with fast_client(gw.url, first, on_state=states) as client:
        async with client.subscribe_iter("market:tick:X") as sub:
            fresh = hs_token(ttl=3600)
            reply = await client.refresh_token(fresh)
            assert reply is not None and reply["type"] == "authenticated"
            assert reply["user"] == "alice"
            exp = jwt.decode(fresh, SECRET, algorithms=["HS256"])["exp"]
            assert reply["expiresAt"] == exp * 1000
            with pytest.raises(UnauthorizedError):
                await client.refresh_token(hs_token(sub="mallory"))
            # The refused token is not used: the next connection presents ``fresh``.
            (old,) = gw.server.sessions
            gw.server.ws.disconnect(old, 1012, "service restart")
            await states.reach("reconnecting")
            await client.wait_connected(10)
            (session,) = await eventually(
                lambda: [s for s in gw.server.sessions if s is not old],
                timeout=5,
                what="the session of the new connection",
            )
            assert (session.principal.user, session.principal.expires_at) == ("alice", exp)
            await redis_client.publish("market:tick:X", b"1")
            assert (await sub.get(timeout=5)).data == 1


# --- publisher helpers --------------------------------------------------------------------


class RecordingRedis(redis.Redis):
    """A real client that also keeps the commands it sent."""

    sent: list[tuple[Any, ...]]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent = [*getattr(self, "sent", []), args]
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def test_publish_durable_is_one_xadd_with_field_data(redis_server: RedisServer) -> None:
    r = RecordingRedis(host="127.0.0.1", port=redis_server.port)
    try:
        offset = publish_durable(r, "engine:decision:X", {"side": "BUY"}, maxlen=1000)
        (command,) = [[a if isinstance(a, bytes) else str(a).encode() for a in c] for c in r.sent]
        assert command == [
            b"XADD",
            b"stream:engine:decision:X",
            b"MAXLEN",
            b"~",
            b"1000",
            b"*",
            b"data",
            b'{"side":"BUY"}',
        ]
        entries = r.xrange("stream:engine:decision:X")
        assert entries == [(offset.encode(), {b"data": b'{"side":"BUY"}'})]
        custom = publish_durable(r, "x", b"raw", prefix="s:", maxlen=5)
        assert r.xrange("s:x") == [(custom.encode(), {b"data": b"raw"})]
    finally:
        r.close()


async def test_async_publishers_reach_subscribers_byte_for_byte(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    when = datetime.datetime(2024, 11, 26, 9, 15, tzinfo=datetime.UTC)
    body = {"px": decimal.Decimal("22450.05"), "at": when, "id": uuid.UUID(int=7)}
    async with GatewayClient(gateway.url) as c:
        await c.subscribe("market:tick:X")
        assert await apublish(redis_client, "market:tick:X", body) == 1
        frame = await c.next_of_type("data")
    assert frame["data"] == {
        "px": "22450.05",
        "at": "2024-11-26T09:15:00+00:00",
        "id": "00000000-0000-0000-0000-000000000007",
    }
    offset = await apublish_durable(redis_client, "d", [1, 2], maxlen=10)
    assert await redis_client.xrange("stream:d") == [(offset.encode(), {b"data": b"[1,2]"})]


async def test_sync_publish_reaches_the_gateway(
    gateway: RunningGateway, redis_server: RedisServer
) -> None:
    r = redis.Redis.from_url(redis_server.url)
    try:
        async with GatewayClient(gateway.url) as c:
            await c.subscribe("market:tick:X")
            # The blocking call is run off the loop the gateway serves on.
            receivers = await asyncio.to_thread(publish, r, "market:tick:X", "hello")
            frame = await c.next_of_type("data")
    finally:
        r.close()
    assert receivers == 1 and frame["data"] == "hello"


# --- CLI ------------------------------------------------------------------------------------


async def test_cli_publish_plain_and_durable(
    gateway: RunningGateway, redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Any
) -> None:
    async with GatewayClient(gateway.url) as c:
        await c.subscribe("market:tick:X")
        payload = '{"ltp": 22450.50}'
        code, out, _ = await run_cli(
            "publish", "--redis-url", redis_server.url, "market:tick:X", payload
        )
        assert (
            code == 0
            and out.strip() == "published to market:tick:X: 1 Redis subscriber received it"
        )
        frame = await c.next_of_type("data")
        assert frame["data"] == {"ltp": 22450.5}
    path = tmp_path / "decision.json"
    path.write_bytes(b'{"side": "SELL"}')
    code, out, _ = await run_cli(
        "publish",
        "--redis-url",
        redis_server.url,
        "--durable",
        "--maxlen",
        "50",
        "dec:X",
        f"@{path}",
    )
    assert code == 0
    entries = await redis_client.xrange("stream:dec:X")
    assert entries == [(out.strip().encode(), {b"data": b'{"side": "SELL"}'})]
    code, _, err = await run_cli("publish", "--redis-url", redis_server.url, "x", "not json")
    assert code == 2 and "not valid JSON" in err
    code, _, _ = await run_cli("publish", "--redis-url", redis_server.url, "--raw", "x", "not json")
    assert code == 0


async def test_cli_ping_prints_latency_percentiles(gateway: RunningGateway) -> None:
    code, out, err = await run_client_cli("ping", gateway.url, "--count", "5", "--interval", "0.01")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("pong ") for line in lines[:5])
    summary = lines[-1]
    for word in ("5 pings", "min", "p50", "p99", "max"):
        assert word in summary


async def test_cli_ping_reports_an_unreachable_gateway() -> None:
    code, _, err = await run_client_cli("ping", "ws://127.0.0.1:9/ws", "--count", "1")
    assert code == 1 and "ping: cannot connect to ws://127.0.0.1:9/ws" in err
