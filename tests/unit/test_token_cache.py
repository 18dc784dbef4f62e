"""The verified-token cache (security/tokens.py TokenCache, JWT_CACHE_SIZE):
a token seen before skips the signature check, but never outlives its exp,
never comes before its nbf/iat, never survives a change of the key set, and
the cache never holds more than its size."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from redis_ws_gateway.config import load_settings
from redis_ws_gateway.security.tokens import (
    MAX_CACHED_TOKEN_CHARS,
    Claims,
    JwtVerifier,
    KeySet,
    TokenCache,
    TokenRejected,
)

SECRET = "s" * 32


def _hs(sub: str = "u", **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def _verifier(size: int = 10, **kw: Any) -> JwtVerifier:
    return JwtVerifier(algorithms=["HS256"], secret=SECRET, cache_size=size, **kw)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return calls


async def test_a_token_seen_before_skips_the_signature_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_decodes(monkeypatch)
    v = _verifier()
    token = _hs("alice", roles=["user"])
    first = await v.verify(token)
    again = await v.verify(token)
    assert again == first and first.subject == "alice" and first.roles == ("user",)
    assert calls[0] == 1
    assert v.cache is not None and (v.cache.hits, v.cache.misses) == (1, 1)


async def test_size_zero_disables_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_decodes(monkeypatch)
    v = _verifier(size=0)
    token = _hs()
    await v.verify(token)
    await v.verify(token)
    assert v.cache is None and calls[0] == 2


async def test_rejections_are_not_cached() -> None:
    v = _verifier()
    bad = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, "x" * 32, algorithm="HS256")
    for _ in range(2):
        with pytest.raises(TokenRejected, match="signature"):
            await v.verify(bad)
    assert v.cache is not None and len(v.cache) == 0


async def test_a_cached_token_is_refused_once_it_expires() -> None:
    # Real time, as pyjwt reads it: the cache must not keep a token alive.
    v = _verifier(leeway=0.0)
    exp = int(time.time()) + 1
    token = _hs(exp=exp)
    await v.verify(token)
    await v.verify(token)
    assert v.cache is not None and v.cache.hits == 1
    await asyncio.sleep(max(0.0, exp - time.time()) + 0.05)
    with pytest.raises(TokenRejected, match="expired"):
        await v.verify(token)
    assert len(v.cache) == 0


def test_exp_and_nbf_are_checked_at_each_use_with_the_leeway() -> None:
    clock = Clock(1000.0)
    cache = TokenCache(10, leeway=10.0, clock=clock)
    cache.put("t", 0, Claims("u", None, None, expires_at=1100.0, not_before=1050.0))
    # nbf 1050 with a leeway of 10: usable from 1040, as pyjwt decides.
    assert cache.get("t", 0) is None  # before nbf - leeway: dropped
    cache.put("t", 0, Claims("u", None, None, expires_at=1100.0, not_before=1050.0))
    clock.now = 1040.0
    assert cache.get("t", 0) is not None
    # exp 1100 with a leeway of 10: pyjwt refuses once exp <= now - leeway.
    clock.now = 1109.9
    assert cache.get("t", 0) is not None
    clock.now = 1110.0
    assert cache.get("t", 0) is None
    assert len(cache) == 0


def test_fractional_dates_are_truncated_as_pyjwt_does() -> None:
    clock = Clock(100.5)
    cache = TokenCache(10, leeway=0.0, clock=clock)
    # pyjwt compares int(exp): an exp of 100.9 has passed at 100.5.
    cache.put("t", 0, Claims("u", None, None, expires_at=100.9))
    assert cache.get("t", 0) is None


async def test_not_before_is_the_later_of_nbf_and_iat() -> None:
    # pyjwt refuses a token before either; the cache checks the later one.
    v = _verifier(leeway=0.0)
    now = int(time.time())
    assert (await v.verify(_hs("a", iat=now - 5, nbf=now - 10))).not_before == now - 5
    assert (await v.verify(_hs("b", iat=now - 10, nbf=now - 5))).not_before == now - 5
    assert (await v.verify(_hs("c"))).not_before is None


async def test_the_cache_is_bounded_least_recently_used_first_out() -> None:
    v = _verifier(size=3)
    tokens = [_hs(f"user-{i}") for i in range(5)]
    for t in tokens[:3]:
        await v.verify(t)
    await v.verify(tokens[0])  # the most recently used now
    for t in tokens[3:]:
        await v.verify(t)
    assert v.cache is not None and len(v.cache) == 3
    hits = v.cache.hits
    await v.verify(tokens[0])
    assert v.cache.hits == hits + 1  # kept
    await v.verify(tokens[1])
    assert v.cache.hits == hits + 1  # evicted: verified again
    assert len(v.cache) == 3


async def test_very_long_tokens_are_not_cached() -> None:
    v = _verifier()
    token = _hs(pad="x" * MAX_CACHED_TOKEN_CHARS)
    await v.verify(token)
    assert v.cache is not None and len(v.cache) == 0


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    data.update(kid=kid, alg="RS256", use="sig")
    return data


def _rs(key: rsa.RSAPrivateKey, kid: str) -> str:
    payload = {"sub": "u", "exp": int(time.time()) + 3600}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


class Jwks:
    def __init__(self, *keys: dict[str, Any]) -> None:
        self.keys = list(keys)

    async def __call__(self, url: str) -> dict[str, Any]:
        return {"keys": self.keys}


async def test_a_changed_key_set_invalidates_cached_verifications(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old, new = _rsa(), _rsa()
    source = Jwks(_jwk(old, "k1"))
    keyset = KeySet(url="http://jwks.invalid/", cooldown=3600, fetch=source)
    assert await keyset.refresh(force=True)
    v = JwtVerifier(algorithms=["RS256"], keyset=keyset, cache_size=10)
    token = _rs(old, "k1")
    await v.verify(token)
    calls = _count_decodes(monkeypatch)

    # The same set fetched again revokes nothing: the entry stays usable.
    generation = keyset.generation
    assert await keyset.refresh(force=True)
    assert keyset.generation == generation
    await v.verify(token)
    assert calls[0] == 0

    # The key behind kid k1 replaced (rotation, or revocation of the old
    # key): the cached verification goes, the token is checked and refused.
    source.keys = [_jwk(new, "k1")]
    assert await keyset.refresh(force=True)
    assert keyset.generation == generation + 1
    with pytest.raises(TokenRejected, match="signature"):
        await v.verify(token)
    assert calls[0] == 1


async def test_a_removed_key_refuses_its_cached_tokens() -> None:
    a, b = _rsa(), _rsa()
    source = Jwks(_jwk(a, "a"), _jwk(b, "b"))
    keyset = KeySet(url="http://jwks.invalid/", cooldown=3600, fetch=source)
    assert await keyset.refresh(force=True)
    v = JwtVerifier(algorithms=["RS256"], keyset=keyset, cache_size=10)
    token_a, token_b = _rs(a, "a"), _rs(b, "b")
    await v.verify(token_a)
    await v.verify(token_b)
    source.keys = [_jwk(b, "b")]
    assert await keyset.refresh(force=True)
    with pytest.raises(TokenRejected, match="unknown token key id"):
        await v.verify(token_a)
    assert (await v.verify(token_b)).subject == "u"


def test_cache_size_setting() -> None:
    assert load_settings({}).jwt_cache_size == 10_000
    assert load_settings({"JWT_CACHE_SIZE": "0"}).jwt_cache_size == 0
    assert load_settings({"JWT_CACHE_SIZE": "50"}).jwt_cache_size == 50


def _authenticator(**env: str) -> Any:
    from redis_ws_gateway.security.auth import Authenticator, build_acl

    settings = load_settings({"JWT_SECRET": SECRET, "JWT_ALGORITHMS": "HS256", **env})
    return Authenticator(settings, build_acl(settings.roles))


async def test_known_answers_only_for_a_token_verified_before_and_still_valid() -> None:
    """The handshake's synchronous path (Authenticator.known) is the cache
    and nothing else: an unseen or a bad token goes through authenticate()."""
    auth = _authenticator(JWT_LEEWAY_SECONDS="0")
    token = _hs("alice", exp=int(time.time()) + 2)
    assert auth.known(token) is None
    assert auth.known(token[:-2] + "xx") is None
    verified = await auth.authenticate(token)
    known = auth.known(token)
    assert known is not None
    assert (known.user, known.roles, known.via, known.expires_at) == (
        verified.user,
        verified.roles,
        verified.via,
        verified.expires_at,
    )
    with pytest.raises(Exception, match="expired"):
        async with asyncio.timeout(10):
            while True:  # the exp passes within ~2 s; then neither path accepts it
                if auth.known(token) is None:
                    await auth.authenticate(token)
                await asyncio.sleep(0.1)


async def test_known_without_a_cache_or_with_the_api_key() -> None:
    auth = _authenticator(JWT_CACHE_SIZE="0", GATEWAY_API_KEY="k" * 32)
    token = _hs("bob")
    await auth.authenticate(token)
    assert auth.known(token) is None  # nothing is cached
    admin = auth.known("k" * 32)
    assert admin is not None and admin.via == "api_key"
    assert auth.known("k" * 31) is None


def test_principals_without_a_credential_are_shared() -> None:
    auth = _authenticator()
    assert auth.anonymous() is auth.anonymous()
    assert auth.unauthenticated() is auth.unauthenticated()
    assert auth.unauthenticated().via == "pending"
    assert not auth.unauthenticated().may_read("market:tick:X")


@pytest.mark.parametrize("credential", ["\udcff", "\ud800", "k\udcff" * 8])
async def test_a_credential_that_is_not_utf8_is_refused_not_an_error(credential: str) -> None:
    """aiohttp decodes header bytes with surrogateescape: compared with the
    API key, such a credential is a refusal (401), not an exception (500)."""
    from redis_ws_gateway.errors import Unauthorized

    auth = _authenticator(GATEWAY_API_KEY="k" * 32)
    assert auth.known(credential) is None
    with pytest.raises(Unauthorized):
        await auth.authenticate(credential)


async def test_a_new_token_is_looked_up_once_and_then_hits() -> None:
    """The handshake's order, known() then verify() on a miss, looks the
    token up once; then it is a hit."""
    auth = _authenticator()
    cache = auth._jwt.cache
    token = _hs("carol")
    assert auth.known(token) is None
    await auth.verify(token)
    assert (cache.misses, cache.hits) == (1, 0)
    assert auth.known(token) is not None
    await auth.authenticate(token)
    assert (cache.misses, cache.hits) == (1, 2)
