"""Current state for a channel, read from a key that publishers maintain
(e.g. ``market:last:BANKNIFTY``), so a UI shows prices at once."""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis

from redis_ws_gateway.config import Settings, SnapshotRule
from redis_ws_gateway.security.globmatch import glob_match, literal_prefix
from redis_ws_gateway.ws import protocol


class Snapshots:
    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self._rules = settings.snapshots
        self._redis = redis

    def rule(self, channel: str) -> SnapshotRule | None:
        return next((r for r in self._rules if glob_match(r.pattern, channel)), None)

    @staticmethod
    def key_for(rule: SnapshotRule, channel: str) -> str:
        suffix = channel[len(literal_prefix(rule.pattern)) :]
        return rule.key.replace("{channel}", channel).replace("{suffix}", suffix)

    async def read(self, channel: str, rule: SnapshotRule) -> bytes | None:
        """The state as JSON text, or None when the key does not exist."""
        key = self.key_for(rule, channel)
        if rule.type == "hash":
            fields: Any = await self._redis.hgetall(key)
            if not fields:
                return None
            obj = {}
            for k, v in fields.items():
                # Non-UTF-8 values arrive as base64 strings here (no per-field marker).
                body, _ = protocol.payload_json(v)
                obj[k.decode("utf-8", "replace")] = orjson.Fragment(body)
            return orjson.dumps(obj)
        value: Any = await self._redis.get(key)
        if value is None:
            return None
        body, _ = protocol.payload_json(value)
        return body
