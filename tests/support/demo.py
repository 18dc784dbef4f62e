"""`redis-ws-gateway demo` as a child process, as `make demo` runs it, with
what its banner printed (URLs, API key, its private Redis)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .redis_server import free_port

REPO = Path(__file__).resolve().parents[2]
# A cold start on a loaded machine (imports, a fresh redis-server) takes
# seconds; the wait ends as soon as the banner's last line arrives.
BANNER_TIMEOUT = 90.0


@dataclass
class Demo:
    port: int
    proc: asyncio.subprocess.Process
    banner: list[str] = field(default_factory=list)
    # Whether /healthz answered at the moment the banner's first line arrived.
    listening_at_banner: bool = False

    @property
    def http(self) -> str:
        return f"http://localhost:{self.port}"

    def line_with(self, text: str) -> str:
        matches = [line for line in self.banner if text in line]
        assert matches, f"{text!r} not in the demo's banner: {self.banner}"
        return matches[0]

    @property
    def api_key(self) -> str:
        m = re.search(r"this run only\): (\S+)", self.line_with("API key"))
        assert m is not None
        return m.group(1)

    @property
    def redis_url(self) -> str:
        m = re.search(r"(redis://\S+)", self.line_with("private redis-server"))
        assert m is not None
        return m.group(1)


async def _answers(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
    status = await reader.readline()
    writer.close()
    return b" 200 " in status


@asynccontextmanager
async def running_demo() -> AsyncIterator[Demo]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "GATEWAY_API_KEY")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "redis_ws_gateway", "demo", "--port", str(port),
        env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    demo = Demo(port, proc)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(BANNER_TIMEOUT):
            while True:
                raw = await proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"demo exited before its banner: {demo.banner}")
                line = raw.decode().rstrip("\n")
                if "demo: gateway on" in line:
                    demo.listening_at_banner = await _answers(port)
                demo.banner.append(line)
                if "Ctrl-C stops" in line:
                    break
        yield demo
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
