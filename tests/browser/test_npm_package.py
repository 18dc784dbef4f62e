"""The npm package as an application gets it: `npm pack` in clients/js, the
tarball installed with react and react-dom into a throwaway app, a small
React page (GatewayProvider + useGatewayChannel) type-checked against the
package's types and bundled with esbuild, served from its own origin, and
driven in Debian's chromium against a live gateway with JWT roles and a
durable channel.

npm's own cache keeps repeated runs quick; the first run on a machine
downloads the packages (about a minute)."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis
from playwright.async_api import Page, expect

from redis_ws_gateway.config import DurableRule, RoleConfig
from redis_ws_gateway.publish import apublish_durable
from tests.browser.conftest import ARTIFACTS
from tests.support.gateway import RunningGateway, gateway_settings
from tests.support.npm import JS_DIR, ensure_node_modules, npm
from tests.support.redis_server import RedisServer, free_port

APP_SOURCE = Path(__file__).resolve().parent / "npm_app"
# The app's own dependencies, pinned like the package's.
REACT_VERSION = "19.3.1"
TYPES_REACT_VERSION = "19.3.3"
TYPES_REACT_DOM_VERSION = "19.3.0"
SECRET = "npm-app-test-secret-" + "0123456789abcdef" * 2
ROLES = {"user": RoleConfig(allow=("market:*", "engine:decision:*"), deny=("secret:*",))}
TICK = "market:tick:NIFTY"
DECISION = "engine:decision:NIFTY"
SECRET_CHANNEL = "secret:plans"


def _run(args: list[str], cwd: Path, timeout: float = 600) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def react_app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built app's directory (index.html, app.js)."""
    exe = npm()
    if exe is None:
        pytest.skip("npm not found: install Node.js and npm to test the npm package")
    ensure_node_modules()
    work = tmp_path_factory.mktemp("npm-app")
    timings: dict[str, float] = {}

    started = time.monotonic()
    out = _run([exe, "pack", "--json", "--pack-destination", str(work)], JS_DIR, timeout=300)
    # prepack's build may print before npm's JSON; the JSON is the rest.
    packed = json.loads(out[out.index("[\n") :] if not out.startswith("[") else out)
    tarball = work / packed[0]["filename"]
    files = {f["path"] for f in packed[0]["files"]}
    timings["pack"] = time.monotonic() - started
    for needed in ("dist/index.js", "dist/index.cjs", "dist/index.d.ts", "dist/react.js"):
        assert needed in files, (needed, sorted(files))
    assert not any(f.startswith(("src/", "node_modules/")) for f in files), sorted(files)

    app = work / "app"
    app.mkdir()
    manifest = {
        "name": "npm-package-test-app",
        "private": True,
        "type": "module",
        "dependencies": {
            "@redis-ws-gateway/client": f"file:{tarball}",
            "react": REACT_VERSION,
            "react-dom": REACT_VERSION,
        },
        "devDependencies": {
            "@types/react": TYPES_REACT_VERSION,
            "@types/react-dom": TYPES_REACT_DOM_VERSION,
        },
    }
    (app / "package.json").write_text(json.dumps(manifest, indent=2))
    for name in ("main.tsx", "index.html", "tsconfig.json"):
        shutil.copy(APP_SOURCE / name, app / name)
    started = time.monotonic()
    _run(
        [exe, "install", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"],
        app,
    )
    timings["install"] = time.monotonic() - started

    tools = JS_DIR / "node_modules" / ".bin"
    # The package's types as an application's compiler sees them.
    _run([str(tools / "tsc"), "-p", "."], app, timeout=300)
    # Both module formats load in Node, and the React entry shares the main
    # entry's classes (one chunk), so instanceof holds across them.
    probe = (
        "const c = require('@redis-ws-gateway/client');"
        "if (typeof c.GatewayClient !== 'function' || c.Close.SERVICE_RESTART !== 1012)"
        " throw new Error('cjs exports');"
    )
    _run(["node", "-e", probe], app)
    _run(
        [
            "node",
            "--input-type=module",
            "-e",
            "import * as m from '@redis-ws-gateway/client';"
            "import * as r from '@redis-ws-gateway/client/react';"
            "if (typeof r.useGatewayChannel !== 'function' || !m.isPattern('a:*'))"
            " throw new Error('esm exports');",
        ],
        app,
    )
    dist = app / "dist"
    _run(
        [
            str(tools / "esbuild"),
            "main.tsx",
            "--bundle",
            "--format=esm",
            "--jsx=automatic",
            "--define:process.env.NODE_ENV='development'".replace("'", '"'),
            f"--outfile={dist / 'app.js'}",
            "--log-level=warning",
        ],
        app,
    )
    shutil.copy(app / "index.html", dist / "index.html")
    (work / "timings.json").write_text(json.dumps(timings))
    return dist


@pytest.fixture(scope="module")
def app_origin(react_app: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(react_app))
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _settings(redis_url: str, origin: str, port: int | None = None) -> Any:
    overrides: dict[str, Any] = {} if port is None else {"port": port}
    return gateway_settings(
        redis_url,
        require_auth=True,
        jwt_secret=SECRET,
        jwt_algorithms=("HS256",),
        roles=ROLES,
        # Only the app's origin may open a socket: the check a deployment has.
        allowed_origins=(origin,),
        durable=(DurableRule("engine:decision:*"),),
        **overrides,
    )


def _token(roles: list[str]) -> str:
    claims = {"sub": "alice", "roles": roles, "exp": int(time.time()) + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
async def app_gateway(redis_server: RedisServer, app_origin: str) -> AsyncIterator[RunningGateway]:
    gw = await RunningGateway(_settings(redis_server.url, app_origin)).start()
    await gw.server.upstream.connected.wait()
    yield gw
    await gw.stop()


def _channel(page: Page, name: str) -> Any:
    return page.locator(f'section.channel[data-channel="{name}"]')


async def _open_app(page: Page, origin: str, gateway: RunningGateway, *channels: str) -> None:
    query = f"?gw={gateway.url}&token={_token(['user'])}&channels={','.join(channels)}"
    await page.goto(origin + "/index.html" + query)
    await expect(page.locator("#state")).to_have_attribute("data-state", "open")


@pytest.mark.browser
async def test_the_react_app_shows_live_data_and_a_typed_forbidden_error(
    app_gateway: RunningGateway,
    app_origin: str,
    redis_client: aioredis.Redis,
    page: Page,
) -> None:
    await _open_app(page, app_origin, app_gateway, TICK, SECRET_CHANNEL)
    tick = _channel(page, TICK)
    await expect(tick).to_have_attribute("data-status", "live")
    assert await redis_client.publish(TICK, '{"ltp": 24310.5}') == 1
    await expect(tick.locator(".latest")).to_have_text('{"ltp":24310.5}')
    await expect(tick).to_have_attribute("data-count", "1")

    # The role may not read secret:*: the page gets a GatewayError with the
    # server's code, and the rest of the app keeps working.
    secret = _channel(page, SECRET_CHANNEL)
    await expect(secret).to_have_attribute("data-status", "failed")
    await expect(secret).to_have_attribute("data-error", "forbidden")
    await expect(secret).to_have_attribute("data-typed", "true")
    await expect(secret.locator(".error")).to_have_text("forbidden")
    assert await page.evaluate("() => window.errors") == [["forbidden", SECRET_CHANNEL]]
    assert await redis_client.publish(TICK, '{"ltp": 24311}') == 1
    await expect(tick).to_have_attribute("data-count", "2")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "npm-react-app.png"))


@pytest.mark.browser
async def test_the_react_app_survives_a_gateway_restart(
    redis_server: RedisServer,
    app_origin: str,
    redis_client: aioredis.Redis,
    page: Page,
) -> None:
    """The durable channel resumes after its last offset (nothing lost, nothing
    twice, entries published while no gateway ran included); the plain one
    comes back in a new epoch, which tells the app that it may have missed
    messages meanwhile."""
    first = await RunningGateway(_settings(redis_server.url, app_origin)).start()
    await first.server.upstream.connected.wait()
    port = first.settings.port
    running = [first]
    try:
        for i in range(3):
            await apublish_durable(redis_client, DECISION, {"i": i})
        await _open_app(page, app_origin, first, TICK, DECISION)
        tick, decision = _channel(page, TICK), _channel(page, DECISION)
        await expect(tick).to_have_attribute("data-status", "live")
        await expect(decision).to_have_attribute("data-status", "live")
        # A first subscribe without `since` starts live: history is not replayed.
        await apublish_durable(redis_client, DECISION, {"i": 3})
        await expect(decision.locator(".seen li")).to_have_count(1)
        epoch_before = await tick.get_attribute("data-epoch")
        assert epoch_before

        await first.stop()
        running.remove(first)
        await expect(page.locator("#state")).to_have_attribute("data-state", "reconnecting")
        offsets = [await apublish_durable(redis_client, DECISION, {"i": i}) for i in (4, 5)]

        second = await RunningGateway(_settings(redis_server.url, app_origin, port=port)).start()
        running.append(second)
        await second.server.upstream.connected.wait()
        await expect(page.locator("#state")).to_have_attribute("data-state", "open")
        await expect(decision).to_have_attribute("data-status", "live")
        await expect(tick).to_have_attribute("data-status", "live")
        await expect(decision.locator(".seen li")).to_have_count(3)
        await expect(decision).to_have_attribute("data-offset", offsets[-1])
        await apublish_durable(redis_client, DECISION, {"i": 6})
        await expect(decision.locator(".seen li")).to_have_text(
            ['{"i":3}', '{"i":4}', '{"i":5}', '{"i":6}']
        )
        replayed = await decision.locator(".seen li").evaluate_all(
            "(items) => items.map((li) => li.dataset.replay)"
        )
        assert replayed == ["false", "true", "true", "false"]

        assert await redis_client.publish(TICK, '{"ltp": 1}') == 1
        await expect(tick.locator(".latest")).to_have_text('{"ltp":1}')
        epoch_after = await tick.get_attribute("data-epoch")
        assert epoch_after and epoch_after != epoch_before, "a new gateway starts a new epoch"
        assert await page.evaluate("() => window.errors") == []
    finally:
        for gw in running:
            await gw.stop()
