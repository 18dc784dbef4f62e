"""POST /publish: publishing over HTTP for services that do not speak Redis."""

from __future__ import annotations

import orjson
import structlog
from aiohttp import web
from opentelemetry import trace
from redis.exceptions import RedisError

from redis_ws_gateway.config import Settings
from redis_ws_gateway.errors import BadChannel, GatewayError
from redis_ws_gateway.fanout.hub import Hub
from redis_ws_gateway.upstream.durable import Durable
from redis_ws_gateway.web.access import HttpAuth, http_error
from redis_ws_gateway.ws import protocol
from redis_ws_wire import ErrorCode

log = structlog.get_logger("redis_ws_gateway.web.publish")


class Publish:
    def __init__(self, settings: Settings, http_auth: HttpAuth, hub: Hub, durable: Durable) -> None:
        self._settings = settings
        self._http_auth = http_auth
        self._hub = hub
        self._durable = durable

    async def publish(self, request: web.Request) -> web.Response:
        """POST /publish {"channel": ..., "data": <JSON>}. Durable channels
        get one XADD (the reply carries the offset); others a PUBLISH (the
        reply carries the receiver count)."""
        refusal = await self._http_auth.refusal(
            request, "publisher", "needs the API key or the publisher role"
        )
        if refusal is not None:
            return refusal
        limit = self._settings.publish_max_bytes
        if (request.content_length or 0) > limit:
            return http_error(413, ErrorCode.TOO_LARGE, f"body over {limit} bytes")
        raw = await request.content.read(limit + 1)
        if len(raw) > limit:
            return http_error(413, ErrorCode.TOO_LARGE, f"body over {limit} bytes")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return http_error(400, ErrorCode.BAD_JSON, "body is not valid JSON")
        if not isinstance(body, dict) or set(body) != {"channel", "data"}:
            return http_error(
                400, ErrorCode.BAD_REQUEST, 'body must be {"channel": ..., "data": ...}'
            )
        channel = body["channel"]
        try:
            if not isinstance(channel, str):
                raise BadChannel("channel must be a string")
            protocol.validate_channel(channel, self._settings.max_channel_name_length)
            if self._hub.topic_key(channel)[0] == "pattern":
                raise BadChannel("cannot publish to a pattern", channel=channel)
        except GatewayError as exc:
            return http_error(400, exc.code, str(exc))
        payload = orjson.dumps(body["data"])
        durable = self._durable
        spec = durable.spec(channel)
        trace.get_current_span().set_attribute("messaging.destination.name", channel)
        try:
            if spec is not None:
                offset = await durable.publish(spec, payload)
                return web.json_response({"channel": channel, "offset": offset.decode()})
            if self._hub.is_sharded(channel):
                # SPUBLISH: routed by the cluster client to the slot's master.
                receivers = await durable.redis.spublish(channel, payload)
            else:
                receivers = await durable.redis.publish(channel, payload)
        except (OSError, RedisError) as exc:
            log.warning("publish_failed", channel=channel, error=str(exc) or type(exc).__name__)
            return http_error(503, ErrorCode.UPSTREAM_UNAVAILABLE, "Redis is unreachable; retry")
        return web.json_response({"channel": channel, "receivers": receivers})
