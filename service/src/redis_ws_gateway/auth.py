"""Credentials -> Principal (who, which roles, which channels it may read).

This module turns what a client presents into a Principal; the ACL decides
what the principal may read. No I/O happens here on the hot path.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from .acl import Acl, RolePolicy
from .config import RoleConfig, Settings
from .errors import Unauthorized

ADMIN_ROLE = "admin"


@dataclass(frozen=True, eq=False)
class Principal:
    user: str
    roles: tuple[str, ...]
    acl: Acl = field(repr=False)
    narrow: tuple[str, ...] | None = None
    via: str = "anonymous"

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

    def anonymous(self) -> Principal:
        return Principal("anonymous", (self._settings.default_role,), self._acl)

    def authenticate(self, credential: str | None) -> Principal:
        """Resolve a credential; raises Unauthorized with a short reason."""
        if credential is None:
            if self._settings.require_auth:
                raise Unauthorized("authentication required")
            return self.anonymous()
        if self._api_key is not None and hmac.compare_digest(credential.encode(), self._api_key):
            return Principal("api-key", (ADMIN_ROLE,), self._acl, via="api_key")
        raise Unauthorized("invalid credential")
