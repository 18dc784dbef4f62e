"""The gateway's wire protocol as data: what a client sends and receives.

The one place the gateway (``redis_ws_gateway``) and its clients
(``redis_ws_client``, the npm package under clients/js) take their codes
from, so a code cannot mean one thing on the server and another in a
client. No dependencies and no I/O: encoding for the hot path stays in the
gateway (redis_ws_gateway/ws/protocol.py). docs/PROTOCOL.md is the prose for
every value here; tests/unit/test_wire.py holds the two together.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

# The WebSocket subprotocol a client may offer; a second offered protocol
# of the form "bearer.<token>" carries the credential where a browser cannot
# set headers.
SUBPROTOCOL: Final = "rwg.v1"
TOKEN_PROTOCOL_PREFIX: Final = "bearer."

# --- client -> gateway --------------------------------------------------------

ACTIONS: Final = frozenset({"subscribe", "unsubscribe", "ping", "auth"})
MAX_REQUEST_ID_LENGTH: Final = 128
# The `since` offset that asks a durable channel for its whole history.
FROM_START: Final = "0"

# --- gateway -> client --------------------------------------------------------

FRAME_TYPES: Final = frozenset(
    {
        "data",
        "error",
        "pong",
        "subscribed",
        "unsubscribed",
        "authenticated",
        "upstream_lost",
        "resubscribed",
    }
)


class ErrorCode:
    """The ``code`` of an ``error`` frame (and of an HTTP error body)."""

    BAD_JSON: Final = "bad_json"
    BAD_REQUEST: Final = "bad_request"
    UNKNOWN_ACTION: Final = "unknown_action"
    BAD_CHANNEL: Final = "bad_channel"
    FORBIDDEN: Final = "forbidden"
    TOO_MANY_CHANNELS: Final = "too_many_channels"
    TOO_MANY_WILDCARDS: Final = "too_many_wildcards"
    NOT_SUBSCRIBED: Final = "not_subscribed"
    UNAUTHORIZED: Final = "unauthorized"
    UPSTREAM_UNAVAILABLE: Final = "upstream_unavailable"
    RATE_LIMITED: Final = "rate_limited"
    # HTTP only (POST /publish, the admin API, a refused GET /sse).
    TOO_LARGE: Final = "too_large"
    NOT_FOUND: Final = "not_found"
    UNAVAILABLE: Final = "unavailable"


# Every error code a WebSocket client can receive, with what it means.
ERROR_CODES: Final[dict[str, str]] = {
    ErrorCode.BAD_JSON: "the frame is not JSON, or not a JSON object",
    ErrorCode.BAD_REQUEST: "a field has the wrong type or is missing",
    ErrorCode.UNKNOWN_ACTION: "action is not subscribe, unsubscribe, ping or auth",
    ErrorCode.BAD_CHANNEL: "a channel name or pattern is not acceptable",
    ErrorCode.FORBIDDEN: "the connection's roles may not read that channel",
    ErrorCode.TOO_MANY_CHANNELS: "the request would exceed the subscriptions per connection",
    ErrorCode.TOO_MANY_WILDCARDS: "the request would exceed the patterns per connection",
    ErrorCode.NOT_SUBSCRIBED: "unsubscribe names something not subscribed",
    ErrorCode.UNAUTHORIZED: "authenticate first, or the credential is not valid",
    ErrorCode.UPSTREAM_UNAVAILABLE: "Redis could not be reached in time; retry",
    ErrorCode.RATE_LIMITED: "too many messages; the frame was ignored",
}
# Codes that say "not now" rather than "never": a client keeps the
# subscription and asks again after a backoff.
TRANSIENT_ERROR_CODES: Final = frozenset({ErrorCode.UPSTREAM_UNAVAILABLE, ErrorCode.RATE_LIMITED})
HTTP_ERROR_CODES: Final = frozenset(
    {
        ErrorCode.BAD_JSON,
        ErrorCode.BAD_REQUEST,
        ErrorCode.BAD_CHANNEL,
        ErrorCode.UNAUTHORIZED,
        ErrorCode.FORBIDDEN,
        ErrorCode.TOO_LARGE,
        ErrorCode.NOT_FOUND,
        ErrorCode.UPSTREAM_UNAVAILABLE,
        ErrorCode.RATE_LIMITED,
        ErrorCode.UNAVAILABLE,
    }
)


class Close:
    """WebSocket close codes the gateway sends (1006 is what a peer sees
    when no close frame came; it is never sent). A client's own close is
    always answered with 1000, so 1001 (a browser leaving the page) is a
    code the gateway receives, never one it sends."""

    NORMAL: Final = 1000
    PROTOCOL_ERROR: Final = 1002
    ABNORMAL: Final = 1006
    INVALID_DATA: Final = 1007
    POLICY: Final = 1008
    TOO_BIG: Final = 1009
    SERVER_ERROR: Final = 1011
    SERVICE_RESTART: Final = 1012
    ADMIN: Final = 4000
    UNAUTHORIZED: Final = 4001
    SLOW_CONSUMER: Final = 4008
    RATE_LIMITED: Final = 4029


# Each close code's short name: the `reason` label of the gateway's
# close metric, and what clients log.
CLOSE_NAMES: Final[dict[int, str]] = {
    Close.NORMAL: "normal",
    Close.PROTOCOL_ERROR: "protocol_error",
    Close.ABNORMAL: "abnormal",
    Close.INVALID_DATA: "invalid_data",
    Close.POLICY: "policy",
    Close.TOO_BIG: "too_big",
    Close.SERVER_ERROR: "server_error",
    Close.SERVICE_RESTART: "service_restart",
    Close.ADMIN: "admin",
    Close.UNAUTHORIZED: "unauthorized",
    Close.SLOW_CONSUMER: "slow_consumer",
    Close.RATE_LIMITED: "rate_limited",
}
# Reconnecting cannot help: the client has to change (fewer connections for
# its user, smaller messages).
FATAL_CLOSE_CODES: Final = frozenset({Close.POLICY, Close.TOO_BIG})

# --- the HTTP upgrade -----------------------------------------------------------

# Header of a refused upgrade (429/503) that says which limit refused it.
REFUSAL_HEADER: Final = "X-Refusal-Reason"

PATTERN_CHARS: Final = "*?["
_PATTERN_SET: Final = frozenset(PATTERN_CHARS)


def is_pattern(name: str) -> bool:
    """True when the gateway treats ``name`` as a pattern (PSUBSCRIBE):
    it contains ``*``, ``?`` or ``[`` anywhere, escaped or not.

    Escaped metacharacters count too, so ``md:\\*`` is the pattern that
    matches only the channel ``md:*`` (Redis's meaning of the escape) rather
    than an exact channel whose name holds a backslash."""
    # isdisjoint walks the string in C: this runs for every channel of every
    # subscribe (a Python generator over its characters was 1% of the
    # gateway's CPU in a reconnect storm).
    return not _PATTERN_SET.isdisjoint(name)


def ws_url_error(url: str) -> str | None:
    """Why ``url`` cannot be a gateway WebSocket URL, or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        return f"not a valid URL: {url} ({exc})"
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        return f"not a WebSocket URL: {url} (expected ws://HOST:PORT/ws or wss://...)"
    return None
