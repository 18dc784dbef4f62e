"""Publishing to the gateway's channels from Python code, with redis-py.

    import redis
    from redis_ws_gateway.publish import publish, publish_durable

    r = redis.Redis.from_url("redis://localhost:6379")
    publish(r, "market:tick:NIFTY", {"ltp": 22450.5})
    publish_durable(r, "engine:decision:NIFTY", {"side": "BUY", "qty": 50})

and the same with ``redis.asyncio`` through ``apublish`` / ``apublish_durable``.

The gateway forwards a payload that is valid JSON byte for byte, so what a
subscriber sees is exactly what ``encode`` wrote:

- ``bytes`` (and ``bytearray``/``memoryview``) are published untouched: pass
  them for JSON you encoded yourself, or for binary payloads (subscribers
  receive those base64-encoded).
- Everything else is JSON-encoded with orjson: dict, list, tuple, str (a JSON
  string: ``"hello"``, quotes included), int, float, bool, None, dataclasses,
  enums; ``datetime`` as ISO 8601 (``2024-11-26T09:15:00+05:30``; a naive
  datetime gets no offset), ``date`` as ``2024-11-26``, ``UUID`` as its
  canonical string.
- ``Decimal`` becomes a JSON **string** (``"22450.05"``): a JSON number would
  be read back as a binary float by most consumers and lose the precision the
  Decimal was chosen for.
- NaN and infinities become ``null`` (JSON has no such numbers); integers
  beyond 64 bits and ``bytes`` nested inside a structure are refused with
  ``TypeError`` (encode such values yourself).

Layouts, as the gateway reads them:

- plain channel: ``PUBLISH <channel> <payload>``;
- sharded channel (Redis Cluster, ``REDIS_SHARDED_CHANNELS``):
  ``SPUBLISH <channel> <payload>``;
- durable channel: ``XADD <prefix><channel> MAXLEN ~ <maxlen> * data <payload>``,
  one stream entry per message, the payload in the field ``data``. The
  returned entry ID is the message's ``offset``.
"""

from __future__ import annotations

import decimal
from typing import Any, Final

import orjson
import redis
import redis.asyncio as aioredis

STREAM_PREFIX: Final = "stream:"
"""Key prefix of durable channels' streams (the gateway's ``DURABLE_STREAM_PREFIX``)."""

DATA_FIELD: Final = "data"

DEFAULT_MAXLEN: Final = 100_000
"""Approximate cap on a stream's length, the gateway's default ``maxlen``."""


def _default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(
            "bytes inside a structure cannot be JSON-encoded: decode or base64 them first"
        )
    raise TypeError(f"cannot JSON-encode {type(value).__name__}")


def encode(data: Any) -> bytes:
    """The payload bytes for ``data`` (see the module docstring)."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    try:
        return orjson.dumps(data, default=_default)
    except orjson.JSONEncodeError as exc:
        # orjson replaces the message of an error raised by ``default``; the
        # cause says what to do about it.
        raise TypeError(f"cannot encode payload: {exc.__cause__ or exc}") from exc


def stream_key(channel: str, prefix: str = STREAM_PREFIX) -> str:
    """The stream that backs the durable channel ``channel``."""
    return prefix + channel


def _check_maxlen(maxlen: int) -> None:
    if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
        raise ValueError(f"maxlen must be a whole number >= 1, not {maxlen!r}")


def _entry_id(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def publish(client: redis.Redis, channel: str, data: Any, *, sharded: bool = False) -> int:
    """PUBLISH ``data`` on ``channel``; returns how many Redis subscribers
    (gateway pods, not WebSocket clients) received it. ``sharded``: SPUBLISH,
    for channels the gateway reads with sharded pub/sub on Redis Cluster
    (``REDIS_SHARDED_CHANNELS``; pass a ``RedisCluster`` client)."""
    if sharded:
        return client.spublish(channel, encode(data))
    return client.publish(channel, encode(data))


def publish_durable(
    client: redis.Redis,
    channel: str,
    data: Any,
    *,
    maxlen: int = DEFAULT_MAXLEN,
    prefix: str = STREAM_PREFIX,
) -> str:
    """Append ``data`` to the durable channel ``channel``; returns its offset."""
    _check_maxlen(maxlen)
    entry_id = client.xadd(
        stream_key(channel, prefix), {DATA_FIELD: encode(data)}, maxlen=maxlen, approximate=True
    )
    return _entry_id(entry_id)


async def apublish(
    client: aioredis.Redis, channel: str, data: Any, *, sharded: bool = False
) -> int:
    """``publish`` for ``redis.asyncio``."""
    if sharded:
        return await client.spublish(channel, encode(data))
    return await client.publish(channel, encode(data))


async def apublish_durable(
    client: aioredis.Redis,
    channel: str,
    data: Any,
    *,
    maxlen: int = DEFAULT_MAXLEN,
    prefix: str = STREAM_PREFIX,
) -> str:
    """``publish_durable`` for ``redis.asyncio``."""
    _check_maxlen(maxlen)
    entry_id = await client.xadd(
        stream_key(channel, prefix), {DATA_FIELD: encode(data)}, maxlen=maxlen, approximate=True
    )
    return _entry_id(entry_id)
