"""What can go wrong because of a client, one class per protocol error code.

Each class maps to exactly one ``code`` in the ``error`` frame, taken from
the wire module so the gateway and its clients cannot disagree on a name;
the table in docs/PROTOCOL.md lists them all.
"""

from __future__ import annotations

from typing import ClassVar

from redis_ws_wire import ErrorCode


class GatewayError(Exception):
    code: ClassVar[str] = "internal_error"

    def __init__(
        self, message: str, *, channel: str | None = None, request_id: str | int | None = None
    ) -> None:
        super().__init__(message)
        self.channel = channel
        self.request_id = request_id


class BadJson(GatewayError):
    code = ErrorCode.BAD_JSON


class BadField(GatewayError):
    code = ErrorCode.BAD_REQUEST


class UnknownAction(GatewayError):
    code = ErrorCode.UNKNOWN_ACTION


class BadChannel(GatewayError):
    code = ErrorCode.BAD_CHANNEL


class TooManyChannels(GatewayError):
    code = ErrorCode.TOO_MANY_CHANNELS


class TooManyWildcards(GatewayError):
    code = ErrorCode.TOO_MANY_WILDCARDS


class NotSubscribed(GatewayError):
    code = ErrorCode.NOT_SUBSCRIBED


class Forbidden(GatewayError):
    code = ErrorCode.FORBIDDEN


class Unauthorized(GatewayError):
    code = ErrorCode.UNAUTHORIZED


class RateLimited(GatewayError):
    code = ErrorCode.RATE_LIMITED


class UpstreamUnavailable(GatewayError):
    """Redis did not answer in time for a request that needs it now (a
    durable channel's history); the client keeps the subscription and retries."""

    code = ErrorCode.UPSTREAM_UNAVAILABLE


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
    UpstreamUnavailable,
)
