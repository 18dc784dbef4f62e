"""The admin API (docs/openapi.yaml): list connections, close them, stats.

Every route needs the gateway's API key; with an internal port it is served
only there.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from redis_ws_gateway.fanout.hub import Hub
from redis_ws_gateway.fanout.session import Session
from redis_ws_gateway.upstream.durable import Durable
from redis_ws_gateway.upstream.pubsub import Upstream
from redis_ws_gateway.upstream.sharded import ShardedUpstream
from redis_ws_gateway.web.access import HttpAuth, http_error
from redis_ws_gateway.ws.handler import WsHandler
from redis_ws_wire import Close, ErrorCode


class Admin:
    def __init__(
        self,
        http_auth: HttpAuth,
        ws: WsHandler,
        hub: Hub,
        upstream: Upstream,
        sharded: ShardedUpstream | None,
        durable: Durable,
        draining: asyncio.Event,
    ) -> None:
        self._http_auth = http_auth
        self._ws = ws
        self._hub = hub
        self._upstream = upstream
        self._sharded = sharded
        self._durable = durable
        self._draining = draining
        self.started_at = time.time()

    async def _refusal(self, request: web.Request) -> web.Response | None:
        return await self._http_auth.refusal(
            request, None, "the admin API needs the gateway API key"
        )

    async def connections(self, request: web.Request) -> web.Response:
        if (refusal := await self._refusal(request)) is not None:
            return refusal
        user = request.query.get("user")
        sessions = [s for s in self._ws.sessions if user is None or s.principal.user == user]
        return web.json_response({"connections": [_describe(s) for s in sessions]})

    async def disconnect(self, request: web.Request) -> web.Response:
        if (refusal := await self._refusal(request)) is not None:
            return refusal
        conn_id = request.match_info["conn_id"]
        session = next((s for s in self._ws.sessions if s.id == conn_id), None)
        if session is None:
            return http_error(404, ErrorCode.NOT_FOUND, f"no connection {conn_id}")
        self._ws.disconnect(session, Close.ADMIN, "closed by an administrator")
        return web.json_response({"closed": [conn_id]})

    async def disconnect_user(self, request: web.Request) -> web.Response:
        if (refusal := await self._refusal(request)) is not None:
            return refusal
        user = request.match_info["user"]
        victims = [s for s in self._ws.sessions if s.principal.user == user]
        for s in victims:
            self._ws.disconnect(s, Close.ADMIN, "closed by an administrator")
        return web.json_response({"closed": [s.id for s in victims]})

    async def stats(self, request: web.Request) -> web.Response:
        if (refusal := await self._refusal(request)) is not None:
            return refusal
        sessions = list(self._ws.sessions)
        hub, upstream, sharded, durable = self._hub, self._upstream, self._sharded, self._durable
        return web.json_response(
            {
                "uptimeSeconds": round(time.time() - self.started_at, 3),
                "draining": self._draining.is_set(),
                "connections": len(sessions),
                "clientSubscriptions": sum(len(s.subscriptions) for s in sessions),
                "upstream": {
                    "up": upstream.is_up,
                    "redis": upstream.address.describe(),
                    "reconnects": upstream.reconnects,
                    "channels": len(hub.channels),
                    "patterns": len(hub.patterns),
                    "streams": len(hub.streams),
                    "messagesIn": hub.messages_in,
                    "sharded": sharded.stats() if sharded is not None else None,
                },
                "durable": {
                    "readerUp": durable.reader_up,
                    "replays": durable.replays,
                    "replayedEntries": durable.replayed_entries,
                },
                "laggingSessions": hub.lagging_count(),
                "bufferedBytes": sum(s.buffered_bytes() for s in sessions),
            }
        )


def _describe(session: Session) -> dict[str, Any]:
    frames, size = session.sent()
    return {
        "id": session.id,
        "user": session.principal.user,
        "auth": session.principal.via,
        "roles": list(session.principal.roles),
        "remote": session.remote,
        "openedAt": int(session.opened_at * 1000),
        "subscriptions": [{kind: name} for kind, name in session.subscriptions],
        "bufferedBytes": session.buffered_bytes(),
        "lagging": session.lagging,
        "framesSent": frames,
        "bytesSent": size,
        "dropped": session.dropped,
        "conflated": session.conflated,
    }
