"""What can go wrong because of a client, one class per protocol error code.

Each class maps to exactly one ``code`` in the ``error`` frame; the table in
docs/PROTOCOL.md lists them all.
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    code: ClassVar[str] = "internal_error"

    def __init__(
        self, message: str, *, channel: str | None = None, request_id: str | int | None = None
    ) -> None:
        super().__init__(message)
        self.channel = channel
        self.request_id = request_id


class BadJson(GatewayError):
    code = "bad_json"


class BadField(GatewayError):
    code = "bad_request"


class UnknownAction(GatewayError):
    code = "unknown_action"


class BadChannel(GatewayError):
    code = "bad_channel"


class TooManyChannels(GatewayError):
    code = "too_many_channels"


class TooManyWildcards(GatewayError):
    code = "too_many_wildcards"


class NotSubscribed(GatewayError):
    code = "not_subscribed"


class Forbidden(GatewayError):
    code = "forbidden"


class Unauthorized(GatewayError):
    code = "unauthorized"


class RateLimited(GatewayError):
    code = "rate_limited"


ALL_ERRORS: tuple[type[GatewayError], ...] = (
    BadJson,
    BadField,
    UnknownAction,
    BadChannel,
    TooManyChannels,
    TooManyWildcards,
    NotSubscribed,
    Forbidden,
    Unauthorized,
    RateLimited,
)
