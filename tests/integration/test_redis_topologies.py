"""Production Redis: TLS with an ACL user, least-privilege channel grants, and
a Sentinel failover with real redis-server and redis-sentinel processes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from redis_ws_client.client import GatewayClient
from redis_ws_gateway.config import DurableRule
from tests.support.gateway import RunningGateway, gateway_settings
from tests.support.redis_server import RedisServer, free_port
from tests.support.wait import wait_until

ARTIFACTS = Path(__file__).parents[2] / "artifacts"


def _cert(
    subject: str, issuer_key: Any, issuer: x509.Name | None, *, ca: bool
) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return cert, key


def _write(path: Path, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    crt = path.with_suffix(".crt")
    pem = path.with_suffix(".key")
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return crt, pem


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, dict[str, str]]]:
    ca_cert, ca_key = _cert("test-ca", None, None, ca=True)
    ca_crt, _ = _write(tmp_path / "ca", ca_cert, ca_key)
    srv_cert, srv_key = _cert("127.0.0.1", ca_key, ca_cert.subject, ca=False)
    srv_crt, srv_pem = _write(tmp_path / "server", srv_cert, srv_key)
    port = free_port()
    # fmt: off
    args = [
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(srv_crt), "--tls-key-file", str(srv_pem),
        "--tls-ca-cert-file", str(ca_crt), "--tls-auth-clients", "no",
        # An ACL user for the gateway, and one restricted to market:* channels.
        "--user", "default", "off",
        "--user", "gateway", "on", ">gw-pass", "~*", "&*", "+@all",
        "--user", "narrow", "on", ">narrow-pass", "~*", "resetchannels", "&market:*", "+@all",
    ]
    # fmt: on
    server = RedisServer(port=port, extra_args=args)
    # wait_ready speaks plain TCP; over TLS just wait for the port.
    server.wait_ready = lambda timeout: _wait_port(port, timeout)  # type: ignore[method-assign]
    server.start()
    try:
        yield server, {"ca": str(ca_crt), "url": f"rediss://127.0.0.1:{port}"}
    finally:
        server.stop()


def _wait_port(port: int, timeout: float) -> None:
    import socket

    def listening() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True

    wait_until(listening, timeout=timeout, what=f"a TLS listener on {port}", ignoring=(OSError,))


def _tls_client(info: dict[str, str], user: str, password: str) -> aioredis.Redis:
    return aioredis.from_url(info["url"], username=user, password=password, ssl_ca_certs=info["ca"])


@contextlib.asynccontextmanager
async def tls_gateway(
    info: dict[str, str], user: str, password: str, **overrides: Any
) -> AsyncIterator[RunningGateway]:
    gw = RunningGateway(
        gateway_settings(
            info["url"],
            redis_username=user,
            redis_password=password,
            redis_tls_ca_file=info["ca"],
            **overrides,
        )
    )
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


async def test_tls_with_acl_user_serves_pubsub_and_durable(
    tls_redis: tuple[RedisServer, dict[str, str]],
) -> None:
    _, info = tls_redis
    r = _tls_client(info, "gateway", "gw-pass")
    try:
        async with tls_gateway(
            info, "gateway", "gw-pass", durable=(DurableRule("engine:decision:*"),)
        ) as gw:
            await asyncio.wait_for(gw.server.upstream.connected.wait(), 10)
            async with GatewayClient(gw.url) as c:
                await c.subscribe("market:tick:X", "engine:decision:X")
                await r.publish("market:tick:X", b'{"tls":true}')
                entry = await r.xadd("stream:engine:decision:X", {"data": b'{"d":1}'})
                frames = [await c.next_of_type("data") for _ in range(2)]
    finally:
        await r.aclose()
    by = {f["channel"]: f for f in frames}
    assert by["market:tick:X"]["data"] == {"tls": True}
    assert by["engine:decision:X"]["offset"] == entry.decode()


async def test_wrong_redis_password_keeps_the_gateway_unready(
    tls_redis: tuple[RedisServer, dict[str, str]],
) -> None:
    _, info = tls_redis
    async with tls_gateway(info, "gateway", "nope") as gw, aiohttp.ClientSession() as http:
        for _ in range(10):
            async with http.get(gw.http + "/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["reason"] == "redis unreachable"
            await asyncio.sleep(0.05)  # stays unready over the whole window (not a sync)
        assert not gw.server.upstream.is_up


async def test_least_privilege_user_refusal_shows_as_not_live(
    tls_redis: tuple[RedisServer, dict[str, str]],
) -> None:
    _, info = tls_redis
    async with tls_gateway(info, "narrow", "narrow-pass") as gw:
        await asyncio.wait_for(gw.server.upstream.connected.wait(), 10)
        async with GatewayClient(gw.url) as c:
            reply = await c.subscribe("market:tick:X", "engine:decision:X")
    live = {s["channel"]: s["live"] for s in reply["subscriptions"]}
    assert live == {"market:tick:X": True, "engine:decision:X": False}


# --- Sentinel ----------------------------------------------------------------------


class SentinelSet:
    """A master, a replica and three sentinels, all real processes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.master = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
        self.replica = RedisServer(extra_args=["--appendonly", "yes"])
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.master.start()
        self.replica.extra_args += ["--replicaof", "127.0.0.1", str(self.master.port)]
        self.replica.start()
        binary = shutil.which("redis-sentinel") or shutil.which("redis-server")
        assert binary is not None
        for port in self.sentinel_ports:
            conf = self.tmp / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.tmp}\n"
                f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 2\n"
                "sentinel down-after-milliseconds mymaster 500\n"
                "sentinel failover-timeout mymaster 3000\n"
                "sentinel parallel-syncs mymaster 1\n"
            )
            args = [binary, str(conf)]
            if binary.endswith("redis-server"):
                args.append("--sentinel")
            self.sentinels.append(
                subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        for port in self.sentinel_ports:
            _wait_port(port, 10)

    def stop(self) -> None:
        for p in self.sentinels:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)
        self.replica.stop()
        self.master.stop()


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    s = SentinelSet(tmp_path)
    try:
        s.start()
        yield s
    finally:
        s.stop()  # also after a half-way start: no process may outlive the test


async def _master_of(ports: list[int]) -> tuple[str, int]:
    from redis.asyncio.sentinel import Sentinel

    sentinel = Sentinel([("127.0.0.1", p) for p in ports], sentinel_kwargs={"socket_timeout": 1})
    try:
        host, port = await sentinel.discover_master("mymaster")
        return str(host), int(port)
    finally:
        for s in sentinel.sentinels:
            await s.aclose()


@pytest.fixture
async def sentinel_gateway(sentinel_set: SentinelSet) -> AsyncIterator[RunningGateway]:
    gw = RunningGateway(
        gateway_settings(
            "redis://127.0.0.1:1",  # ignored: the sentinels name the master
            redis_sentinels=tuple(("127.0.0.1", p) for p in sentinel_set.sentinel_ports),
            redis_sentinel_master="mymaster",
            redis_sentinel_check_seconds=0.2,
            durable=(DurableRule("engine:decision:*"),),
        )
    )
    await gw.start()
    await asyncio.wait_for(gw.server.upstream.connected.wait(), 15)
    yield gw
    await gw.stop()


async def test_sentinel_failover_heals_pubsub_and_durable_without_gap(
    sentinel_set: SentinelSet, sentinel_gateway: RunningGateway
) -> None:
    gw = sentinel_gateway
    old = aioredis.from_url(sentinel_set.master.url)
    channel = "engine:decision:NIFTY"
    try:
        async with GatewayClient(gw.url, timeout=30) as c:
            await c.subscribe("market:tick:NIFTY", channel)
            before = []
            for i in range(20):
                before.append(
                    (await old.xadd(f"stream:{channel}", {"data": orjson.dumps({"i": i})})).decode()
                )
            # Acknowledged by the replica before the crash: what Redis
            # replication can promise; the gateway must not lose any of it.
            assert await old.execute_command("WAIT", 1, 5000) == 1
            got = [(await c.next_of_type("data"))["offset"] for _ in range(20)]
            assert got == before
            fault = time.monotonic()
            sentinel_set.master.kill()
            await c.next_of_type("upstream_lost", timeout=10)
            await c.next_of_type("resubscribed", timeout=30)
            host, port = await _master_of(sentinel_set.sentinel_ports)
            assert port == sentinel_set.replica.port
            new = aioredis.from_url(f"redis://{host}:{port}")
            try:
                await new.publish("market:tick:NIFTY", b'{"after":"failover"}')
                first = await c.next_of_type("data", 20)
                recovered = time.monotonic() - fault
                after = [
                    (await new.xadd(f"stream:{channel}", {"data": orjson.dumps({"j": j})})).decode()
                    for j in range(10)
                ]
            finally:
                await new.aclose()
            assert first["channel"] == "market:tick:NIFTY" and first["data"] == {
                "after": "failover"
            }
            rest = [(await c.next_of_type("data", 20))["offset"] for _ in range(10)]
            assert rest == after
            assert not c.closed.is_set()
    finally:
        await old.aclose()
    ARTIFACTS.mkdir(exist_ok=True)
    report = {"fault": "sentinel master SIGKILL", "seconds_to_first_delivery": round(recovered, 3)}
    (ARTIFACTS / "failover-sentinel.json").write_text(json.dumps(report))
    print(f"sentinel failover: first delivery {recovered:.2f}s after the master was killed")
