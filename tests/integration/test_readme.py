"""The README's snippets run as pasted against `make demo` (issue 20), and the
demo's banner promises only what works: it appears once the gateway listens,
its console link subscribes, its API key opens /publish, /admin and selftest.

Only the port differs from the README: the demo runs on a free one here.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.cli import run_cli
from tests.support.demo import Demo, running_demo

README = Path(__file__).resolve().parents[2] / "README.md"
WAIT_S = 60.0


def snippets(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.DOTALL)


def js_snippet(port: int) -> str:
    [code] = snippets("javascript")
    assert "localhost:8889" in code
    return code.replace("localhost:8889", f"localhost:{port}")


@pytest.fixture
async def demo() -> AsyncIterator[Demo]:
    async with running_demo() as d:
        yield d


async def _first_lines(proc: asyncio.subprocess.Process, wanted: str) -> list[str]:
    """stdout lines until one contains ``wanted``; then the process is stopped."""
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                raw = await proc.stdout.readline()
                if not raw:
                    assert proc.stderr is not None
                    err = (await proc.stderr.read()).decode()
                    raise AssertionError(f"ended before {wanted!r}: {lines} {err}")
                lines.append(raw.decode().rstrip("\n"))
                if wanted in lines[-1]:
                    return lines
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_the_banner_comes_once_the_gateway_listens_and_its_promises_hold(
    demo: Demo,
) -> None:
    assert demo.listening_at_banner, "the banner was printed before the gateway listened"
    console = demo.line_with("console in a browser")
    assert f"http://localhost:{demo.port}/?channels=market:tick:*" in console
    key = demo.api_key
    auth = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            demo.http + "/publish", json={"channel": "engine:signal:NIFTY", "data": 1}, headers=auth
        ) as resp:
            assert resp.status == 200
        async with http.get(demo.http + "/admin/stats", headers=auth) as resp:
            assert resp.status == 200
    code, out, err = await run_cli(
        "selftest", "--url", f"ws://localhost:{demo.port}/ws", "--token", key
    )
    assert code == 0, err
    assert "received the published message" in out


async def test_the_readme_javascript_runs_in_node(demo: Demo, tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not found (the machine's Node.js 20)")
    script = tmp_path / "ui.js"
    script.write_text(js_snippet(demo.port))
    # The flag the README names for Node 20; later versions accept and ignore it.
    proc = await asyncio.create_subprocess_exec(
        node, "--experimental-websocket", str(script),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    lines = await _first_lines(proc, "market:tick:BANKNIFTY")
    channel, seq, data = lines[-1].split(" ", 2)
    assert channel == "market:tick:BANKNIFTY" and int(seq) >= 1 and '"ltp"' in data


async def test_the_readme_python_runs_against_the_demo(demo: Demo, tmp_path: Path) -> None:
    subscribe, publish = snippets("python")
    sub_file = tmp_path / "subscribe.py"
    sub_file.write_text(subscribe.replace("localhost:8889", f"localhost:{demo.port}"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(sub_file), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    lines = await _first_lines(proc, "market:tick:")
    assert lines[-1].startswith("market:tick:")

    pub_file = tmp_path / "publish.py"
    pub_file.write_text(publish)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(pub_file), env=dict(env, REDIS_URL=demo.redis_url),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 0, err.decode()
    published, offset = out.decode().splitlines()
    assert published.endswith("gateways got it") and re.fullmatch(r"\d+-\d+", offset)
