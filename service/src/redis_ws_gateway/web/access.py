"""Who is asking, read from an HTTP request: the credential, the client's
address, and the JSON error body every HTTP route answers with.

Shared by the WebSocket upgrade (ws/handler.py) and the plain HTTP routes
(publish, admin), so a credential is found the same way on each.
"""

from __future__ import annotations

from aiohttp import web

from redis_ws_gateway.errors import Forbidden, Unauthorized
from redis_ws_gateway.security.auth import Authenticator
from redis_ws_wire import SUBPROTOCOL, TOKEN_PROTOCOL_PREFIX, ErrorCode


def credential(request: web.Request) -> tuple[str | None, bool]:
    """The credential a client presented, and whether it offered our subprotocol.

    Browsers cannot set headers on a WebSocket, so besides ``?token=`` they
    may offer ``["rwg.v1", "bearer.<token>"]`` as subprotocols.
    """
    offered = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    token: str | None = None
    for p in offered:
        if p.startswith(TOKEN_PROTOCOL_PREFIX) and len(p) > len(TOKEN_PROTOCOL_PREFIX):
            token = p[len(TOKEN_PROTOCOL_PREFIX) :]
    query = request.query.get("token")
    if query:
        token = query
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer ") and header[7:].strip():
        token = header[7:].strip()
    return token, SUBPROTOCOL in offered


def client_ip(request: web.Request, trusted_hops: int) -> str:
    """The client's address; behind N trusted proxies, the Nth from the right
    of X-Forwarded-For (entries further left are whatever the client sent)."""
    if trusted_hops:
        hops = [
            h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()
        ]
        if len(hops) >= trusted_hops:
            return hops[-trusted_hops]
    return request.remote or "?"


def http_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


class HttpAuth:
    """The credential check of the HTTP routes: the API key, or a token
    with the role a route asks for."""

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth

    async def refusal(
        self, request: web.Request, role: str | None, refusal: str
    ) -> web.Response | None:
        """None when the request carries the API key (or a token with
        ``role``), else the HTTP refusal to send."""
        token, _ = credential(request)
        if token is None:
            return http_error(401, ErrorCode.UNAUTHORIZED, "credential required")
        try:
            principal = await self._auth.authenticate(token)
        except (Unauthorized, Forbidden) as exc:
            return http_error(401, ErrorCode.UNAUTHORIZED, str(exc))
        if principal.via != "api_key" and (role is None or role not in principal.roles):
            return http_error(403, ErrorCode.FORBIDDEN, refusal)
        return None
