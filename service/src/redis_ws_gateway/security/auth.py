"""Credentials -> Principal (who, which roles, which channels it may read).

A credential is the gateway API key (role ``admin``) or a JWT. This module
turns it into a Principal; the ACL decides what the principal may read.
No I/O happens here on the hot path (JWKS refetches are rare and bounded).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from redis_ws_gateway.config import RoleConfig, Settings
from redis_ws_gateway.errors import Forbidden, Unauthorized
from redis_ws_gateway.security.acl import Acl, RolePolicy
from redis_ws_gateway.security.tokens import Claims, JwtVerifier, KeySet, TokenRejected

ADMIN_ROLE = "admin"


@dataclass(frozen=True, eq=False)
class Principal:
    user: str
    roles: tuple[str, ...]
    acl: Acl = field(repr=False)
    narrow: tuple[str, ...] | None = None
    via: str = "anonymous"
    expires_at: float | None = None

    def may_read(self, channel: str) -> bool:
        return self.acl.may_read_channel(self.roles, channel, self.narrow)

    def may_subscribe_pattern(self, pattern: str) -> bool:
        return self.acl.may_subscribe_pattern(self.roles, pattern, self.narrow)


def build_acl(roles: Mapping[str, RoleConfig]) -> Acl:
    return Acl({name: RolePolicy(allow=r.allow, deny=r.deny) for name, r in roles.items()})


class Authenticator:
    def __init__(self, settings: Settings, acl: Acl) -> None:
        self._settings = settings
        self._acl = acl
        self._api_key = settings.api_key.encode() if settings.api_key else None
        self.keyset: KeySet | None = None
        if settings.jwks_file or settings.jwks_url:
            self.keyset = KeySet(
                path=settings.jwks_file,
                url=settings.jwks_url,
                cooldown=settings.jwks_refetch_cooldown_seconds,
            )
            if settings.jwks_file:
                self.keyset.load_file()
        self._jwt: JwtVerifier | None = None
        if settings.jwt_algorithms:
            pem = (
                Path(settings.jwt_public_key_file).read_bytes()
                if settings.jwt_public_key_file
                else None
            )
            self._jwt = JwtVerifier(
                algorithms=settings.jwt_algorithms,
                secret=settings.jwt_secret,
                public_key_pem=pem,
                keyset=self.keyset,
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
                leeway=settings.jwt_leeway_seconds,
                cache_size=settings.jwt_cache_size,
            )

        # Immutable, so one of each serves every connection without a
        # credential (W3 counted 177 B per connection for a fresh one).
        self._anonymous = Principal("anonymous", (settings.default_role,), acl)
        self._unauthenticated = Principal("unauthenticated", (), acl, via="pending")
        self._api_key_principal = Principal("api-key", (ADMIN_ROLE,), acl, via="api_key")

    async def start(self) -> None:
        if self.keyset is not None and self._settings.jwks_url:
            await self.keyset.refresh(force=True)

    def anonymous(self) -> Principal:
        return self._anonymous

    def unauthenticated(self) -> Principal:
        """A connection still waiting for its ``auth`` frame: reads nothing."""
        return self._unauthenticated

    def known(self, credential: str) -> Principal | None:
        """The principal of the API key, or of a JWT verified before and
        still valid (the token cache), without a coroutine or a deadline: a
        reconnect storm's handshakes mostly end here. None: verify() it."""
        if self._api_key is not None and hmac.compare_digest(
            credential.encode("utf-8", "surrogatepass"), self._api_key
        ):
            return self._api_key_principal
        if self._jwt is None:
            return None
        claims = self._jwt.cached(credential)
        return None if claims is None else self._principal(claims)

    async def verify(self, credential: str) -> Principal:
        """A credential known() did not answer: a JWT checked in full.
        Raises Unauthorized or Forbidden with a short reason."""
        if self._jwt is None or credential.count(".") != 2:
            raise Unauthorized("invalid credential")
        try:
            claims = await self._jwt.verify_uncached(credential)
        except TokenRejected as exc:
            raise Unauthorized(str(exc)) from None
        return self._principal(claims)

    async def authenticate(self, credential: str) -> Principal:
        """Resolve a credential; raises Unauthorized or Forbidden with a short reason."""
        known = self.known(credential)
        return known if known is not None else await self.verify(credential)

    def _principal(self, claims: Claims) -> Principal:
        roles = claims.roles or (self._settings.default_role,)
        known = tuple(r for r in roles if r in self._settings.roles)
        if not known:
            raise Forbidden("token grants no known role")
        return Principal(
            claims.subject,
            known,
            self._acl,
            narrow=claims.channels,
            via="jwt",
            expires_at=claims.expires_at,
        )
