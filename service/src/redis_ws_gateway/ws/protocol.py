"""The JSON wire format, both directions, and WebSocket frame encoding.

docs/PROTOCOL.md is the specification; this module is its only implementation.
Nothing here knows about sockets or Redis.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from redis_ws_gateway.errors import BadChannel, BadField, BadJson, GatewayError, UnknownAction

ACTIONS: Final = frozenset({"subscribe", "unsubscribe", "ping", "auth"})
MAX_REQUEST_ID_LENGTH: Final = 128
MAX_CHANNEL_LENGTH_DEFAULT: Final = 256

RequestId = str | int | None


MAX_SNAPSHOT_ENTRIES: Final = 1000
_OFFSET_RE: Final = re.compile(r"0|[0-9]{1,20}-[0-9]{1,20}")
_MAX_ID_PART: Final = (1 << 64) - 1


def is_stream_id(text: str, *, zero: bool = True) -> bool:
    """A Redis stream entry ID (``ms-seq``, each part a 64-bit unsigned
    number), or with ``zero`` the ``0`` that means "from the start". Whole
    string only: ``$`` would let a trailing newline through to XRANGE."""
    if not _OFFSET_RE.fullmatch(text):
        return False
    if text == "0":
        return zero
    ms, _, seq = text.partition("-")
    return int(ms) <= _MAX_ID_PART and int(seq) <= _MAX_ID_PART


@dataclass(frozen=True, slots=True)
class ChannelOptions:
    """Per-channel subscribe options: resume after an offset, or a snapshot."""

    since: str | None = None
    snapshot: int | None = None


@dataclass(frozen=True, slots=True)
class Request:
    action: str
    request_id: RequestId
    channels: tuple[str, ...] | None = None
    token: str | None = None
    options: Mapping[str, ChannelOptions] = field(default_factory=dict)


def _request_id(obj: dict[str, Any]) -> RequestId:
    rid = obj.get("requestId")
    if rid is None:
        return None
    # bool is an int subclass; a boolean id is almost certainly a client bug.
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise BadField("requestId must be a string or an integer")
    if isinstance(rid, str) and len(rid) > MAX_REQUEST_ID_LENGTH:
        raise BadField(f"requestId longer than {MAX_REQUEST_ID_LENGTH} characters")
    return rid


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def validate_channel(name: str, max_length: int) -> None:
    if not name:
        raise BadChannel("channel name is empty", channel=name)
    if len(name) > max_length:
        raise BadChannel(
            f"channel name longer than {max_length} characters", channel=name[:64] + "..."
        )
    if _CONTROL.search(name) is not None:
        raise BadChannel("channel name contains control characters", channel=name)


def decode_request(
    text: str | bytes, max_channel_length: int = MAX_CHANNEL_LENGTH_DEFAULT
) -> Request:
    """Parse one client frame. Raises a GatewayError subclass on any bad input.

    The request id is recovered before anything else is validated so that
    error replies can echo it whenever the frame was at least a JSON object.
    """
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise BadJson("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadJson("frame must be a JSON object")
    rid = _request_id(obj)
    try:
        return _decode_fields(obj, rid, max_channel_length)
    except GatewayError as exc:
        exc.request_id = rid
        raise


def peek_request_id(text: object) -> RequestId:
    """The requestId of a frame that will not be handled (rate limited), so
    the client can match the refusal; None when there is none to find."""
    if not isinstance(text, (str, bytes)):
        return None
    try:
        obj = orjson.loads(text)
        return _request_id(obj) if isinstance(obj, dict) else None
    except (orjson.JSONDecodeError, GatewayError):
        return None


def _decode_fields(obj: dict[str, Any], rid: RequestId, max_channel_length: int) -> Request:
    action = obj.get("action")
    if not isinstance(action, str):
        raise BadField("action must be a string")
    if action not in ACTIONS:
        raise UnknownAction(f"unknown action {action[:32]!r}")
    if action == "ping":
        return Request(action, rid)
    if action == "auth":
        token = obj.get("token")
        if not isinstance(token, str) or not token:
            raise BadField("token must be a non-empty string")
        return Request(action, rid, token=token)
    raw = obj.get("channels")
    if raw is None and action == "unsubscribe":
        return Request(action, rid, channels=None)
    if not isinstance(raw, list) or not raw:
        raise BadField("channels must be a non-empty list of strings")
    channels: list[str] = []
    options: dict[str, ChannelOptions] = {}
    for item in raw:
        if isinstance(item, dict) and action == "subscribe":
            name, opts = _channel_object(item)
            validate_channel(name, max_channel_length)
            options[name] = opts
            channels.append(name)
            continue
        if not isinstance(item, str):
            raise BadField("channels must be a non-empty list of strings")
        validate_channel(item, max_channel_length)
        channels.append(item)
    # Order kept, duplicates folded: subscribing to the same name twice in one
    # request is the same as once.
    return Request(action, rid, channels=tuple(dict.fromkeys(channels)), options=options)


def _channel_object(item: dict[str, Any]) -> tuple[str, ChannelOptions]:
    unknown = set(item) - {"channel", "since", "snapshot"}
    if unknown:
        raise BadField(f"unknown channel option {sorted(unknown)[0]!r}")
    name = item.get("channel")
    if not isinstance(name, str):
        raise BadField("channel object needs a channel string")
    since = item.get("since")
    snapshot = item.get("snapshot")
    if since is not None and (not isinstance(since, str) or not is_stream_id(since)):
        raise BadField("since must be an offset like 1732610000000-0", channel=name)
    if snapshot is not None and (
        isinstance(snapshot, bool)
        or not isinstance(snapshot, int)
        or not 1 <= snapshot <= MAX_SNAPSHOT_ENTRIES
    ):
        raise BadField(f"snapshot must be a number from 1 to {MAX_SNAPSHOT_ENTRIES}", channel=name)
    if since is not None and snapshot is not None:
        raise BadField("use either since or snapshot, not both", channel=name)
    return name, ChannelOptions(since=since, snapshot=snapshot)


# --- server -> client -------------------------------------------------------


def _with_rid(msg: dict[str, Any], rid: RequestId) -> dict[str, Any]:
    if rid is not None:
        msg["requestId"] = rid
    return msg


def error_message(exc: GatewayError) -> bytes:
    msg: dict[str, Any] = {"type": "error", "code": exc.code, "message": str(exc)}
    if exc.channel is not None:
        msg["channel"] = exc.channel
    return orjson.dumps(_with_rid(msg, exc.request_id))


def pong_message(rid: RequestId, now_ms: int) -> bytes:
    return orjson.dumps(_with_rid({"type": "pong", "time": now_ms}, rid))


def subscribed_message(
    rid: RequestId, channels: Sequence[str], subscriptions: Sequence[dict[str, Any]]
) -> bytes:
    return orjson.dumps(
        _with_rid(
            {
                "type": "subscribed",
                "channels": list(channels),
                "subscriptions": list(subscriptions),
            },
            rid,
        )
    )


def unsubscribed_message(
    rid: RequestId, channels: Sequence[str], reason: str | None = None
) -> bytes:
    msg: dict[str, Any] = {"type": "unsubscribed", "channels": list(channels)}
    if reason is not None:
        msg["reason"] = reason
    return orjson.dumps(_with_rid(msg, rid))


def authenticated_message(
    rid: RequestId, user: str, roles: Sequence[str], expires_at: float | None
) -> bytes:
    msg: dict[str, Any] = {"type": "authenticated", "user": user, "roles": list(roles)}
    if expires_at is not None:
        msg["expiresAt"] = int(expires_at * 1000)
    return orjson.dumps(_with_rid(msg, rid))


def upstream_lost_message(subscriptions: Iterable[dict[str, Any]]) -> bytes:
    return orjson.dumps({"type": "upstream_lost", "subscriptions": list(subscriptions)})


def resubscribed_message(subscriptions: Iterable[dict[str, Any]]) -> bytes:
    return orjson.dumps({"type": "resubscribed", "subscriptions": list(subscriptions)})


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def payload_json(raw: bytes) -> tuple[bytes, bool]:
    """The JSON text that stands for a Redis payload, and whether it is base64.

    Valid JSON is embedded untouched (the publisher's bytes), so it is parsed
    once per message only to validate it. orjson refuses a few texts that JSON
    allows (escaped lone surrogates such as "\\ud800"), so its refusals get a
    second opinion from the standard parser before the payload is treated as
    text.
    """
    try:
        orjson.loads(raw)
        return raw, False
    except orjson.JSONDecodeError:
        pass
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return b'"' + base64.b64encode(raw) + b'"', True
    try:
        json.loads(text, parse_constant=_reject_constant)
        if text.strip():
            return raw, False
    except ValueError:
        pass
    return orjson.dumps(text), False


def payload_json_trusted(raw: bytes) -> tuple[bytes, bool]:
    """``payload_json`` for PAYLOAD_VALIDATION=off: a payload that starts
    with ``{`` and ends with ``}`` (or ``[`` and ``]``) is taken to be the
    JSON object (array) it looks like and embedded unparsed; the publisher
    answers for it. Anything else is decided by ``payload_json``, so text and
    binary payloads are still encoded safely."""
    # Slices, not startswith/endswith: a third cheaper per message.
    first = raw[:1]
    if ((first == b"{" and raw[-1:] == b"}") or (first == b"[" and raw[-1:] == b"]")) and (
        raw.isascii() or _is_utf8(raw)
    ):
        # UTF-8 is checked even so: a text frame that is not UTF-8 makes
        # every client fail its connection (RFC 6455 8.1, close 1007).
        return raw, False
    return payload_json(raw)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def channel_json(name: bytes) -> bytes:
    """A channel name as a JSON string. Non-UTF-8 bytes become U+FFFD."""
    return orjson.dumps(name.decode("utf-8", "replace"))


def data_prefix(channel: bytes, pattern: bytes | None) -> bytes:
    """Everything of a data message before the seq number."""
    if pattern is None:
        return b'{"type":"data","channel":' + channel_json(channel) + b',"seq":'
    return (
        b'{"type":"data","channel":'
        + channel_json(channel)
        + b',"pattern":'
        + channel_json(pattern)
        + b',"seq":'
    )


def data_message(
    prefix: bytes, seq: int, payload: bytes, is_base64: bool, offset: bytes | None = None
) -> bytes:
    head = prefix + str(seq).encode()
    if offset is not None:
        head += b',"offset":"' + offset + b'"'
    if is_base64:
        return head + b',"encoding":"base64","data":' + payload + b"}"
    return head + b',"data":' + payload + b"}"


def replay_message(channel: bytes, offset: bytes, payload: bytes, is_base64: bool) -> bytes:
    """A history entry sent before the subscription goes live: no seq, since
    seq counts live messages shared by all subscribers."""
    head = b'{"type":"data","channel":' + channel_json(channel) + b',"replay":true,"offset":"'
    enc = b'","encoding":"base64","data":' if is_base64 else b'","data":'
    return head + offset + enc + payload + b"}"


def snapshot_message(channel: str, data: bytes) -> bytes:
    return b'{"type":"snapshot","channel":' + orjson.dumps(channel) + b',"data":' + data + b"}"


_LEN1: Final = struct.Struct("!BB").pack
_LEN2: Final = struct.Struct("!BBH").pack
_LEN8: Final = struct.Struct("!BBQ").pack
_FIN_TEXT: Final = 0x81


_FIN_TEXT_RSV1: Final = 0xC1  # FIN, RSV1 (a compressed message), opcode 1


def text_frame(body: bytes) -> bytes:
    """One complete unmasked server-to-client text frame (RFC 6455 section 5.2).

    aiohttp can only write a frame to one socket; a message going to many
    clients needs its frame as bytes, built once and written to each transport.
    RSV1 is clear: the message is not compressed, which RFC 7692 allows on a
    connection that negotiated permessage-deflate too, so this frame suits
    every client.
    """
    n = len(body)
    if n < 126:
        return _LEN1(_FIN_TEXT, n) + body
    if n < 65536:
        return _LEN2(_FIN_TEXT, 126, n) + body
    return _LEN8(_FIN_TEXT, 127, n) + body


# --- permessage-deflate (RFC 7692) --------------------------------------------

# The gateway's answer to every offer it accepts. No context takeover on
# either side: each message is compressed on its own, so one compressed frame
# serves every client of a topic (text_frame's reason, for deflate clients),
# and a client's messages are inflated with no window kept per connection.
DEFLATE_RESPONSE: Final = (
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
)
_DEFLATE_FLAGS: Final = frozenset({"server_no_context_takeover", "client_no_context_takeover"})


def accept_deflate(offers: str | None) -> str | None:
    """The Sec-WebSocket-Extensions answer to a client's offers (the header's
    value): DEFLATE_RESPONSE when one of them is a permessage-deflate offer
    the gateway can honour, else None (no extension).

    Declined: unknown or repeated parameters, and server_max_window_bits
    below 15. A compressed frame is shared by every client of a topic, so a
    client cannot have a window of its own; a smaller window would have to
    hold for all of them. client_max_window_bits is accepted with any value
    and not answered: the gateway inflates with the largest window.
    """
    if not offers:
        return None
    for offer in offers.split(","):
        name, *params = offer.split(";")
        if name.strip().lower() == "permessage-deflate" and _deflate_params_ok(params):
            return DEFLATE_RESPONSE
    return None


def _deflate_params_ok(params: Sequence[str]) -> bool:
    seen: set[str] = set()
    for param in params:
        key, eq, raw = param.partition("=")
        key = key.strip().lower()
        value = raw.strip().strip('"')
        if not key and not eq:
            continue  # a stray ";"
        if key in seen:
            return False
        seen.add(key)
        if key in _DEFLATE_FLAGS:
            if eq:
                return False
        elif key == "client_max_window_bits":
            # isascii: str.isdigit() is true of digits int() refuses ("²").
            if eq and not (value.isascii() and value.isdigit() and 8 <= int(value) <= 15):
                return False
        elif key == "server_max_window_bits":
            if not (value.isascii() and value.isdigit() and int(value) == 15):
                return False
        else:
            return False
    return True


def deflate(body: bytes, level: int) -> bytes:
    """``body`` compressed as one permessage-deflate message: raw DEFLATE,
    flushed with Z_SYNC_FLUSH, less the 00 00 ff ff that flush ends with
    (RFC 7692 section 7.2.1).

    A fresh compressor per message (no context takeover), with a window no
    larger than the message needs: a smaller window and hash table are
    quicker to set up, produce the same output for messages that fit, and
    any window up to 15 bits inflates with the client's 15-bit one.
    """
    wbits = max(9, min(15, (len(body) - 1).bit_length()))
    compressor = zlib.compressobj(level, zlib.DEFLATED, -wbits, max(1, min(8, wbits - 6)))
    data = compressor.compress(body) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4]


def deflate_frame(body: bytes, level: int) -> bytes:
    """``body`` as one compressed text frame (RSV1 set), or as text_frame's
    uncompressed one when compressing does not make it smaller."""
    data = deflate(body, level)
    n = len(data)
    if n >= len(body):
        return text_frame(body)
    if n < 126:
        return _LEN1(_FIN_TEXT_RSV1, n) + data
    if n < 65536:
        return _LEN2(_FIN_TEXT_RSV1, 126, n) + data
    return _LEN8(_FIN_TEXT_RSV1, 127, n) + data
