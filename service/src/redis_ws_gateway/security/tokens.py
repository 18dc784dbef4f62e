"""JWT verification with pyjwt: an allow-listed algorithm, a key chosen by
the gateway (never by the token), strict claim types.

What the token may not choose: its key source (``jku``, ``x5u``, ``jwk``
headers are ignored; only the in-memory key set is consulted), an algorithm
outside ``JWT_ALGORITHMS`` (``none`` is never allowed), or the key family:
HS* tokens are checked only against ``JWT_SECRET``, asymmetric ones only
against the public key or JWKS, so an RSA public key can never be used as an
HMAC secret.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import structlog
from cryptography.hazmat.primitives.serialization import load_pem_public_key

log = structlog.get_logger("redis_ws_gateway.security.tokens")

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
SUPPORTED_ALGORITHMS = HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS


class TokenRejected(Exception):
    """The token is not acceptable; the message is safe to show the client."""


@dataclass(frozen=True)
class Claims:
    subject: str
    roles: tuple[str, ...] | None
    channels: tuple[str, ...] | None
    expires_at: float
    # The later of nbf and iat, when the token has either: pyjwt refuses a
    # token before either (less the leeway), and a cached verification is
    # checked against it and exp again at each use.
    not_before: float | None = None


class KeySet:
    """Public keys by ``kid``: from a JWKS file or URL, kept in memory.

    An unknown ``kid`` may trigger one refetch per cooldown, so a flood of
    tokens with random kids cannot turn the gateway into a JWKS hammer. When
    the source is down the last good set stays in use.
    """

    def __init__(
        self,
        *,
        path: str | None = None,
        url: str | None = None,
        cooldown: float = 30.0,
        timeout: float = 5.0,
        fetch: Callable[[str], Any] | None = None,
    ) -> None:
        self._path = path
        self._url = url
        self._cooldown = cooldown
        self._timeout = timeout
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._last_fetch = float("-inf")
        self._lock = asyncio.Lock()
        self._fetch = fetch
        self.fetches = 0
        # Bumped whenever a key set is installed: verifications made with an
        # older set are not reused (TokenCache).
        self.generation = 0
        self._raw = b""

    def load_file(self) -> None:
        assert self._path is not None
        self._install(orjson.loads(Path(self._path).read_bytes()))

    def _install(self, data: Mapping[str, Any]) -> None:
        keys: dict[str | None, jwt.PyJWK] = {}
        for raw in data.get("keys", []):
            try:
                key = jwt.PyJWK(raw)
            except jwt.PyJWTError as exc:
                log.warning("jwks_key_skipped", kid=raw.get("kid"), error=str(exc))
                continue
            keys[raw.get("kid")] = key
        if not keys:
            raise ValueError("JWKS has no usable keys")
        # A refetch that brings the same keys revokes nothing: cached
        # verifications stay. Any change (a key added, removed or replaced)
        # makes every earlier verification unusable.
        raw = orjson.dumps(data.get("keys", []), option=orjson.OPT_SORT_KEYS)
        if raw != self._raw:
            self._raw = raw
            self.generation += 1
        self._keys = keys

    def get(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def refresh(self, force: bool = False) -> bool:
        """Refetch the URL; unless forced, at most once per cooldown. True
        when a new key set was installed."""
        if self._url is None:
            return False
        async with self._lock:
            now = time.monotonic()
            if not force:
                # Only unknown-kid refetches count against the cooldown, so the
                # fetch at start does not block a key rotation for a cooldown.
                if now - self._last_fetch < self._cooldown:
                    return False
                self._last_fetch = now
            self.fetches += 1
            try:
                data = await asyncio.wait_for(self._download(self._url), self._timeout)
                self._install(data)
            except (OSError, TimeoutError, ValueError, aiohttp.ClientError) as exc:
                log.warning(
                    "jwks_fetch_failed", error=str(exc) or type(exc).__name__, kept=len(self._keys)
                )
                return False
            return True

    async def _download(self, url: str) -> Mapping[str, Any]:
        if self._fetch is not None:
            result: Mapping[str, Any] = await self._fetch(url)
            return result
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            resp.raise_for_status()
            data = orjson.loads(await resp.read())
            if not isinstance(data, dict):
                raise ValueError("JWKS is not a JSON object")
            return data


# Longer tokens are verified every time, not cached: 10,000 entries of at
# most this many characters bound the cache's memory (~40 MB at worst;
# typical tokens are under 1 KB).
MAX_CACHED_TOKEN_CHARS = 4096


class TokenCache:
    """Verified tokens by their exact string: a client that connects again
    with the token it had (a reconnect storm after a drain, several tabs of
    one browser) costs a dictionary look-up instead of a signature check.

    Bounded LRU of ``size`` entries; only successful verifications enter it.
    An entry is used only while

    - the time is still inside the token's validity, checked at each use
      with the verifier's leeway exactly as pyjwt checks it (its ``int()`` of
      each date included: ``exp``: ``int(exp) > now - leeway``; ``nbf`` and
      ``iat``: ``int(x) <= now + leeway``); outside it the entry is dropped
      and the token verified again, which rejects it with the usual reason;
    - the key set that verified it is current: ``generation`` changes when a
      JWKS refetch installs a different set, so a revoked or replaced key
      stops a token at its next use.
    """

    def __init__(self, size: int, leeway: float, clock: Callable[[], float] = time.time) -> None:
        self.size = size
        self._leeway = leeway
        self._clock = clock
        self._entries: OrderedDict[str, tuple[int, Claims]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str, generation: int) -> Claims | None:
        entry = self._entries.get(token)
        if entry is None:
            self.misses += 1
            return None
        cached_generation, claims = entry
        now = self._clock()
        if (
            cached_generation != generation
            or int(claims.expires_at) <= now - self._leeway
            or (claims.not_before is not None and int(claims.not_before) > now + self._leeway)
        ):
            del self._entries[token]
            self.misses += 1
            return None
        self._entries.move_to_end(token)
        self.hits += 1
        return claims

    def put(self, token: str, generation: int, claims: Claims) -> None:
        if len(token) > MAX_CACHED_TOKEN_CHARS:
            return
        self._entries[token] = (generation, claims)
        self._entries.move_to_end(token)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


class JwtVerifier:
    def __init__(
        self,
        *,
        algorithms: Sequence[str],
        secret: str | None = None,
        public_key_pem: bytes | None = None,
        keyset: KeySet | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway: float = 0.0,
        cache_size: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._algorithms = frozenset(algorithms)
        self._secret = secret.encode() if secret else None
        # Parsed once here, not by pyjwt at every verification (its RSA
        # prepare_key even tries the PEM as a private key first). A key object
        # of another family than the token's algorithm is refused by pyjwt as
        # the PEM was. What does not parse as a public key is passed on as
        # bytes, as before.
        self._public_key: Any = public_key_pem
        if public_key_pem is not None:
            try:
                self._public_key = load_pem_public_key(public_key_pem)
            except (ValueError, TypeError):
                pass
        self._keyset = keyset
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        # 0 disables it (JWT_CACHE_SIZE).
        self.cache = TokenCache(cache_size, leeway, clock) if cache_size > 0 else None

    def cached(self, token: str) -> Claims | None:
        """The claims of a token verified before and still valid, without
        awaiting anything; None when it must go through verify()."""
        cache = self.cache
        if cache is None:
            return None
        return cache.get(token, self._keyset.generation if self._keyset is not None else 0)

    async def verify(self, token: str) -> Claims:
        claims = self.cached(token)
        return claims if claims is not None else await self.verify_uncached(token)

    async def verify_uncached(self, token: str) -> Claims:
        """The signature and claims checked (for a token cached() did not
        answer), the result cached."""
        cache = self.cache
        if cache is None:
            return await self._verify(token)
        # Read before the key is looked up: a refetch during the await makes
        # what this call verifies stale at once.
        generation = self._keyset.generation if self._keyset is not None else 0
        claims = await self._verify(token)
        cache.put(token, generation, claims)
        return claims

    async def _verify(self, token: str) -> Claims:
        header = _peek_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise TokenRejected("token algorithm not allowed")
        key = await self._key_for(alg, header.get("kid"))
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp"], "verify_signature": True},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected("token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("token not yet valid") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise TokenRejected("token issuer or audience not accepted") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("bad token signature") from None
        except jwt.MissingRequiredClaimError:
            raise TokenRejected("token has no exp claim") from None
        except (jwt.PyJWTError, ValueError, TypeError, ArithmeticError):
            # ArithmeticError: pyjwt's int() of an exp of Infinity (its JSON
            # parser reads the literal) overflows.
            raise TokenRejected("invalid token") from None
        return _claims(payload)

    async def _key_for(self, alg: str, kid: object) -> Any:
        if alg in HMAC_ALGORITHMS:
            if self._secret is None:
                raise TokenRejected("token algorithm not allowed")
            return self._secret
        if kid is not None and not isinstance(kid, str):
            raise TokenRejected("invalid token key id")
        if self._keyset is not None:
            if isinstance(kid, str) and len(kid) > 256:
                raise TokenRejected("unknown token key id")
            key = self._keyset.get(kid)
            # Shielded: a handshake that times out (HANDSHAKE_TIMEOUT_SECONDS)
            # must not cancel a refetch that other handshakes wait for, after
            # the cooldown has started and before the keys are installed.
            if key is None and await asyncio.shield(self._keyset.refresh()):
                key = self._keyset.get(kid)
            if key is None:
                raise TokenRejected("unknown token key id")
            if key.algorithm_name is not None and key.algorithm_name != alg:
                raise TokenRejected("token algorithm does not match its key")
            return key
        if self._public_key is not None:
            return self._public_key
        raise TokenRejected("token algorithm not allowed")


def _peek_header(token: str) -> Mapping[str, Any]:
    """The header, only to choose the algorithm and key: pyjwt's decode parses
    and checks the whole token again, strictly, and refuses it unless its
    own reading of ``alg`` is the one chosen here. jwt.get_unverified_header
    did the same parse as decode (a Python loop over every character of each
    segment), twice per token in all."""
    head, sep, _ = token.partition(".")
    if not sep:
        raise TokenRejected("malformed token")
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise TokenRejected("malformed token") from None
    if not isinstance(header, dict):
        raise TokenRejected("malformed token")
    return header


# 9999-12-31T23:59:59Z: later dates are not dates a token means.
MAX_NUMERIC_DATE = 253_402_300_799


def _numeric_date(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    # pyjwt converts with int(), which would accept "9999999999" as a string.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenRejected(f"token claim {name} must be a number")
    # pyjwt takes any number; the gateway turns exp into timers and into
    # the 64-bit expiresAt of its frames, so it must be a date it can hold.
    if not 0 <= value <= MAX_NUMERIC_DATE:
        raise TokenRejected(f"token claim {name} out of range")
    return float(value)


def _claims(payload: Mapping[str, Any]) -> Claims:
    exp = _numeric_date(payload, "exp")
    nbf = _numeric_date(payload, "nbf")
    iat = _numeric_date(payload, "iat")
    dates = [d for d in (nbf, iat) if d is not None]
    assert exp is not None
    sub = payload.get("sub")
    if not isinstance(sub, str) or not sub:
        raise TokenRejected("token has no sub claim")
    roles: tuple[str, ...] | None = None
    if "roles" in payload:
        raw = payload["roles"]
        if not isinstance(raw, list) or not raw or not all(isinstance(r, str) for r in raw):
            raise TokenRejected("token claim roles must be a list of strings")
        roles = tuple(raw)
    elif "role" in payload:
        if not isinstance(payload["role"], str):
            raise TokenRejected("token claim role must be a string")
        roles = (payload["role"],)
    channels: tuple[str, ...] | None = None
    if "channels" in payload:
        raw = payload["channels"]
        if not isinstance(raw, list) or not all(isinstance(c, str) and c for c in raw):
            raise TokenRejected("token claim channels must be a list of patterns")
        channels = tuple(raw)
    return Claims(sub, roles, channels, exp, max(dates) if dates else None)
