"""The browser console and client.js, served from the package."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).parent / "static"
# Only these files are served: no directory listing, no path from the request.
STATIC_ROUTES = {
    "/": "console.html",
    "/client.js": "client.js",
    "/console.js": "console.js",
    "/console.css": "console.css",
}
# What clients load on the public port; the rest is the operators' console.
PUBLIC_STATIC = frozenset({"/client.js"})


async def static_file(request: web.Request) -> web.StreamResponse:
    name = STATIC_ROUTES[request.path]
    return web.FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-cache"})
