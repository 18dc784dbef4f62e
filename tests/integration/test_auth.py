"""Authentication, ACL and guardrails against a hostile client: real gateway,
real Redis, real sockets, real signatures."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac as hmac_mod
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from redis_ws_client.client import GatewayClient, ServerError
from redis_ws_gateway.config import RoleConfig
from redis_ws_gateway.security.acl import Acl, RolePolicy
from redis_ws_gateway.security.auth import Principal
from tests.conftest import GatewayFactory
from tests.support.gateway import RunningGateway
from tests.support.redis_server import free_port

SECRET = "hs-secret-for-tests-" + "0123456789abcdef" * 3  # 67 bytes: long enough for HS512
ROLES = {
    "admin": RoleConfig(allow=("*",)),
    "user": RoleConfig(allow=("market:*", "indicators:*"), deny=("engine:decision:*",)),
    "md": RoleConfig(allow=("md:[a-z]*",)),
}


def hs_token(**claims: Any) -> str:
    body = {"sub": "alice", "exp": int(time.time()) + 300, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, SECRET, algorithm="HS256")


async def status_of(url: str, **kwargs: Any) -> int:
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(url, **kwargs)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


@pytest.fixture
async def hs_gateway(make_gateway: GatewayFactory) -> RunningGateway:
    return await make_gateway(
        require_auth=True,
        api_key="admin-key-0123",
        jwt_secret=SECRET,
        jwt_algorithms=("HS256",),
        roles=ROLES,
        auth_timeout_seconds=0.5,
    )


# --- credential sources ---------------------------------------------------------


async def test_missing_credential_gets_auth_timeout_close(hs_gateway: RunningGateway) -> None:
    async with GatewayClient(hs_gateway.url) as c:
        with pytest.raises(ServerError) as err:
            await c.subscribe("market:tick:X")
        assert err.value.code == "unauthorized"
        await asyncio.wait_for(c.closed.wait(), 5)
    assert c.close_code == 4001


async def test_auth_frame_authenticates_then_subscribe_works(hs_gateway: RunningGateway) -> None:
    async with GatewayClient(hs_gateway.url) as c:
        reply = await c.request("auth", token=hs_token(role="user"))
        assert reply["type"] == "authenticated" and reply["user"] == "alice"
        assert reply["roles"] == ["user"] and reply["expiresAt"] > time.time() * 1000
        await c.subscribe("market:tick:X")


async def test_api_key_in_query_header_and_subprotocol(hs_gateway: RunningGateway) -> None:
    key = "admin-key-0123"
    assert await status_of(hs_gateway.url + f"?token={key}") == 101
    assert await status_of(hs_gateway.url, headers={"Authorization": f"Bearer {key}"}) == 101
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(hs_gateway.url, protocols=("rwg.v1", f"bearer.{key}"))
        # Only the protocol name comes back, never the token.
        assert ws.protocol == "rwg.v1"
        await ws.send_str('{"action":"subscribe","channels":["engine:decision:X"]}')
        reply = json.loads((await ws.receive()).data)
        assert reply["type"] == "subscribed"
        await ws.close()


@pytest.mark.parametrize("bad", ["wrong-key", "a.b.c", "x" * 5000])
async def test_invalid_credential_is_refused_before_upgrade(
    hs_gateway: RunningGateway, bad: str
) -> None:
    assert await status_of(hs_gateway.url + f"?token={bad}") == 401


# --- JWT attack vectors --------------------------------------------------------------


def _unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(payload)}."


def _attack_tokens() -> dict[str, str]:
    now = int(time.time())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "alg none": _unsigned({"alg": "none", "typ": "JWT"}, {"sub": "eve", "exp": now + 300}),
        "alg None": _unsigned({"alg": "None"}, {"sub": "eve", "exp": now + 300}),
        "bad signature": hs_token()[:-4] + "AAAA",
        "other secret": jwt.encode(
            {"sub": "eve", "exp": now + 300},
            "a-guessed-secret-that-is-long-enough!",
            algorithm="HS256",
        ),
        "alg not allowed": jwt.encode({"sub": "eve", "exp": now + 300}, SECRET, algorithm="HS512"),
        "rs256 without key": jwt.encode(
            {"sub": "eve", "exp": now + 300}, rsa_key, algorithm="RS256"
        ),
        "expired": hs_token(exp=now - 120),
        "not yet valid": hs_token(nbf=now + 120),
        "exp as string": hs_token(exp=str(now + 300)),
        "nbf as string": hs_token(nbf=str(now - 10)),
        "exp as bool": hs_token(exp=True),
        "missing exp": jwt.encode({"sub": "eve"}, SECRET, algorithm="HS256"),
        "missing sub": jwt.encode({"exp": now + 300}, SECRET, algorithm="HS256"),
        "roles not list": hs_token(roles="admin"),
        "channels not list": hs_token(channels="market:*"),
    }


@pytest.mark.parametrize("case", sorted(_attack_tokens()))
async def test_jwt_attack_is_rejected(hs_gateway: RunningGateway, case: str) -> None:
    token = _attack_tokens()[case]
    assert await status_of(hs_gateway.url + f"?token={token}") == 401
    # The same token in an auth frame is refused too, and the socket survives.
    async with GatewayClient(hs_gateway.url) as c:
        with pytest.raises(ServerError) as err:
            await c.request("auth", token=token)
        assert err.value.code == "unauthorized"


async def test_unknown_role_is_forbidden(hs_gateway: RunningGateway) -> None:
    assert await status_of(hs_gateway.url + f"?token={hs_token(role='root')}") == 403


async def test_issuer_and_audience_are_enforced(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(
        require_auth=True,
        jwt_secret=SECRET,
        jwt_algorithms=("HS256",),
        jwt_issuer="https://idp.example",
        jwt_audience="gateway",
        roles=ROLES,
    )
    good = hs_token(iss="https://idp.example", aud="gateway", role="user")
    assert await status_of(gw.url + f"?token={good}") == 101
    for bad in (
        hs_token(iss="https://evil.example", aud="gateway"),
        hs_token(iss="https://idp.example", aud="other"),
        hs_token(iss="https://idp.example"),
    ):
        assert await status_of(gw.url + f"?token={bad}") == 401


async def test_rs_hs_key_confusion_is_rejected(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem_file = tmp_path / "pub.pem"
    pem_file.write_bytes(pem)
    gw = await make_gateway(
        require_auth=True,
        jwt_secret=SECRET,
        jwt_public_key_file=str(pem_file),
        jwt_algorithms=("HS256", "RS256"),
        roles=ROLES,
    )
    now = int(time.time())
    good = jwt.encode({"sub": "bob", "exp": now + 300, "role": "user"}, key, algorithm="RS256")
    assert await status_of(gw.url + f"?token={good}") == 101
    # The classic confusion: sign HS256 with the public key as the HMAC secret.
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    payload = base64.urlsafe_b64encode(
        json.dumps({"sub": "eve", "exp": now + 300, "role": "admin"}).encode()
    ).rstrip(b"=")
    sig = hmac_mod.new(pem, header + b"." + payload, hashlib.sha256).digest()
    forged = (header + b"." + payload + b"." + base64.urlsafe_b64encode(sig).rstrip(b"=")).decode()
    assert await status_of(gw.url + f"?token={forged}") == 401


# --- JWKS ---------------------------------------------------------------------------


def _jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key())
    )
    data.update(kid=kid, alg=alg, use="sig")
    return data


class JwksServer:
    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.hits = 0
        self.up = True
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def handle(self, _: web.Request) -> web.Response:
        self.hits += 1
        if not self.up:
            return web.Response(status=503)
        return web.json_response({"keys": self.keys})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks.json", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    await server.start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()


async def test_jwks_url_selects_key_by_kid_and_refetches_at_most_once_per_cooldown(
    make_gateway: GatewayFactory, jwks_server: JwksServer
) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    jwks_server.keys = [
        _jwk(rsa_key, "r1", "RS256"),
        _jwk(ec_key, "e1", "ES256"),
        _jwk(ed_key, "d1", "EdDSA"),
    ]
    gw = await make_gateway(
        require_auth=True,
        jwks_url=jwks_server.url,
        jwt_algorithms=("RS256", "ES256", "EdDSA"),
        jwks_refetch_cooldown_seconds=3600,
        roles=ROLES,
    )
    assert jwks_server.hits == 1
    now = int(time.time())
    claims = {"sub": "carol", "exp": now + 300, "role": "user"}
    for key, kid, alg in (
        (rsa_key, "r1", "RS256"),
        (ec_key, "e1", "ES256"),
        (ed_key, "d1", "EdDSA"),
    ):
        token = jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})
        assert await status_of(gw.url + f"?token={token}") == 101, alg
    # A key signed by somebody else, advertised through jku/x5u: ignored.
    rogue = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    hostile = jwt.encode(
        claims, rogue, algorithm="RS256", headers={"kid": "r1", "jku": "http://127.0.0.1:1/x"}
    )
    assert await status_of(gw.url + f"?token={hostile}") == 401
    # Unknown kids: one refetch, then the cooldown holds however many arrive.
    for i in range(5):
        token = jwt.encode(claims, rogue, algorithm="RS256", headers={"kid": f"unknown-{i}"})
        assert await status_of(gw.url + f"?token={token}") == 401
    assert jwks_server.hits == 2
    # A kid whose key is for another algorithm is refused.
    mixed = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "e1"})
    assert await status_of(gw.url + f"?token={mixed}") == 401


async def test_jwks_source_down_keeps_last_good_set(
    make_gateway: GatewayFactory, jwks_server: JwksServer
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks_server.keys = [_jwk(key, "k1", "RS256")]
    gw = await make_gateway(
        require_auth=True,
        jwks_url=jwks_server.url,
        jwt_algorithms=("RS256",),
        jwks_refetch_cooldown_seconds=0,
        roles=ROLES,
    )
    jwks_server.up = False
    claims = {"sub": "dave", "exp": int(time.time()) + 300, "role": "user"}
    unknown = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k2"})
    assert await status_of(gw.url + f"?token={unknown}") == 401  # triggers a failed refetch
    good = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})
    assert await status_of(gw.url + f"?token={good}") == 101


# --- expiry and refresh on open connections -------------------------------------------


async def test_open_connection_is_closed_when_token_expires(hs_gateway: RunningGateway) -> None:
    token = hs_token(role="user", exp=time.time() + 1.0)
    async with GatewayClient(hs_gateway.url + f"?token={token}") as c:
        await c.subscribe("market:tick:X")
        await asyncio.wait_for(c.closed.wait(), 5)
    assert c.close_code == 4001


async def test_refreshed_token_extends_the_connection(hs_gateway: RunningGateway) -> None:
    short = hs_token(role="user", exp=time.time() + 1.0)
    async with GatewayClient(hs_gateway.url + f"?token={short}") as c:
        await c.request("auth", token=hs_token(role="user", exp=int(time.time()) + 300))
        # Past the first token's expiry the socket still answers. Not a sync:
        # the window in which nothing may happen (no 4001 close).
        await asyncio.sleep(1.5)
        assert (await c.ping())["type"] == "pong"


async def test_refresh_for_another_subject_is_refused(hs_gateway: RunningGateway) -> None:
    async with GatewayClient(hs_gateway.url + f"?token={hs_token(role='user')}") as c:
        with pytest.raises(ServerError) as err:
            await c.request("auth", token=hs_token(sub="mallory", role="admin"))
        assert err.value.code == "unauthorized"


async def test_refresh_with_narrower_rights_drops_subscriptions(hs_gateway: RunningGateway) -> None:
    async with GatewayClient(hs_gateway.url + f"?token={hs_token(role='admin')}") as c:
        await c.subscribe("engine:decision:X", "market:tick:X")
        await c.request("auth", token=hs_token(role="user"))
        notice = await c.next_of_type("unsubscribed")
        assert notice["channels"] == ["engine:decision:X"] and notice["reason"] == "forbidden"


# --- ACL ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("market:tick:BANKNIFTY", True),
        ("market:tick:*", True),
        ("market:*", True),
        ("indicators:NIFTY", True),
        ("engine:decision:X", False),
        ("engine:*", False),
        ("*", False),
        ("market*", False),
        ("market:[*]", False),  # neither verbatim nor literal-prefix form
        ("md?x", False),
        ("\\*", False),
        ("?arket:tick:X", False),
        ("[m]arket:*", False),
    ],
)
async def test_user_role_acl(hs_gateway: RunningGateway, name: str, allowed: bool) -> None:
    async with GatewayClient(hs_gateway.url + f"?token={hs_token(role='user')}") as c:
        if allowed:
            await c.subscribe(name)
        else:
            with pytest.raises(ServerError) as err:
                await c.subscribe(name)
            assert err.value.code == "forbidden"
            assert err.value.frame["channel"] == name


async def test_token_channels_claim_only_narrows(hs_gateway: RunningGateway) -> None:
    token = hs_token(role="user", channels=["market:tick:*", "engine:decision:*"])
    async with GatewayClient(hs_gateway.url + f"?token={token}") as c:
        await c.subscribe("market:tick:X")
        for name in ("indicators:X", "engine:decision:X"):
            with pytest.raises(ServerError) as err:
                await c.subscribe(name)
            assert err.value.code == "forbidden"


async def test_second_wall_filters_every_routed_message(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    async with GatewayClient(gateway.url) as c:
        await c.subscribe("engine:*")
        # Simulate a subscribe-time check that let too much through: the
        # router must still refuse to deliver what the role may not read.
        [session] = gateway.server.sessions
        narrow_acl = Acl({"user": RolePolicy(allow=("engine:signal:*",))})
        session.principal = Principal("x", ("user",), narrow_acl)
        await redis_client.publish("engine:decision:X", b"secret")
        await redis_client.publish("engine:signal:X", b"ok")
        frame = await c.next_of_type("data")
        assert frame["channel"] == "engine:signal:X"
        await c.ping()
        assert c.messages.empty()


async def test_second_wall_holds_after_the_read_decisions_are_warm(
    gateway: RunningGateway, redis_client: aioredis.Redis
) -> None:
    async with GatewayClient(gateway.url) as c:
        await c.subscribe("engine:*")
        # Both channels routed once: the hub now keeps their read decisions.
        for name in ("engine:decision:X", "engine:signal:X"):
            await redis_client.publish(name, b"before")
            assert (await c.next_of_type("data"))["channel"] == name
        # The principal replaced as a token refresh replaces it, with fewer
        # rights than the subscribe-time check allowed.
        [session] = gateway.server.sessions
        narrow_acl = Acl({"user": RolePolicy(allow=("engine:signal:*",))})
        session.principal = Principal("x", ("user",), narrow_acl)
        await redis_client.publish("engine:decision:X", b"secret")
        await redis_client.publish("engine:signal:X", b"ok")
        frame = await c.next_of_type("data")
        assert (frame["channel"], frame["data"]) == ("engine:signal:X", "ok")
        await c.ping()
        assert c.messages.empty()


# --- guardrails -------------------------------------------------------------------------


async def test_origin_allow_list_is_exact(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(allowed_origins=("https://ui.example.com",))
    assert await status_of(gw.url, headers={"Origin": "https://ui.example.com"}) == 101
    for origin in (
        "https://evil.example.com",
        "https://ui.example.com.evil.com",
        "http://ui.example.com",
        "https://ui.example.com:8443",
        "null",
    ):
        assert await status_of(gw.url, headers={"Origin": origin}) == 403, origin
    assert await status_of(gw.url) == 101  # non-browser clients send no Origin


async def test_rate_limit_answers_then_closes_abusers(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    gw = await make_gateway(rate_limit_per_second=5, rate_limit_burst=5, rate_limit_close_after=10)
    async with GatewayClient(gw.url) as bystander, GatewayClient(gw.url) as abuser:
        await bystander.subscribe("market:tick:X")
        for _ in range(40):
            if abuser.closed.is_set():
                break
            await abuser.send_raw('{"action":"ping"}')
        await asyncio.wait_for(abuser.closed.wait(), 5)
        codes = []
        while not abuser.messages.empty():
            codes.append(abuser.messages.get_nowait().get("code"))
        assert "rate_limited" in codes
        assert abuser.close_code == 4029
        await redis_client.publish("market:tick:X", b"1")
        assert (await bystander.next_of_type("data"))["data"] == 1


async def test_connection_limits(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(max_connections=2)
    async with GatewayClient(gw.url), GatewayClient(gw.url):
        assert await status_of(gw.url) == 503
    gw = await make_gateway(max_connections_per_ip=1)
    async with GatewayClient(gw.url):
        assert await status_of(gw.url) == 429
    gw = await make_gateway(max_connections_per_user=1, api_key="k-0123")
    async with GatewayClient(gw.url + "?token=k-0123"):
        assert await status_of(gw.url + "?token=k-0123") == 429
        assert await status_of(gw.url) == 101  # anonymous is not one user


async def test_name_length_and_pattern_complexity_limits(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(max_pattern_metachars=3, max_channel_name_length=64)
    async with GatewayClient(gw.url) as c:
        for name in ("a*b*c*d*", "x" * 10_000, "*" * 10_000, "m:" + "[a]" * 40):
            with pytest.raises(ServerError) as err:
                await c.subscribe(name)
            assert err.value.code == "bad_channel"
        await c.subscribe("a*b*c")
