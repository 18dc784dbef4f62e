#!/usr/bin/env python3
"""Where an idle subscribed connection's memory goes (docs/BENCHMARKS.md, W3).

An in-process gateway (tests/support) on uvloop with tracemalloc; N clients
in a child process connect with aiohttp and subscribe. Prints the heap growth
per connection and the biggest allocation sites.

    .venv/bin/python scripts/w3_tracemalloc.py            # N=2000, by traceback
    N=2000 KEY=lineno DEPTH=1 SHOW=1 .venv/bin/python scripts/w3_tracemalloc.py

Environment: N (connections), KEY (tracemalloc grouping: traceback or
lineno), DEPTH (frames recorded), SHOW (frames printed per site), TOP (sites).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import tracemalloc
from pathlib import Path

import aiohttp
import uvloop

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "service" / "src"))

from tests.support.gateway import RunningGateway, gateway_settings  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402


async def _client_process(port: int, n: int) -> None:
    """Child: open ``n`` subscribed connections, say "ready", hold them until
    stdin gets a line."""
    url = f"ws://127.0.0.1:{port}/ws"
    # limit=0: each WebSocket holds a connector slot for its whole life.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        sockets: list[aiohttp.ClientWebSocketResponse] = []

        async def one() -> None:
            ws = await http.ws_connect(url, autoping=True)
            await ws.send_str('{"action":"subscribe","channels":["market:tick:W3"]}')
            reply = await asyncio.wait_for(ws.receive_json(), 20)
            if reply.get("type") != "subscribed":
                raise RuntimeError(f"subscribe refused: {reply}")
            sockets.append(ws)

        for start in range(0, n, 100):
            await asyncio.gather(*(one() for _ in range(min(100, n - start))))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for ws in sockets:
            await ws.close()


async def _spawn_clients(port: int, n: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--clients",
        str(port),
        str(n),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    if not line.startswith(b"ready"):
        raise RuntimeError(f"clients did not start: {line!r}")
    return proc


async def _release(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"\n")
    await proc.stdin.drain()
    await proc.wait()


async def main() -> None:
    n = int(os.environ.get("N", "2000"))
    key = os.environ.get("KEY", "traceback")
    depth = int(os.environ.get("DEPTH", "12"))
    show = int(os.environ.get("SHOW", "6"))
    top = int(os.environ.get("TOP", "20"))
    redis = RedisServer()
    redis.start()
    # Every client is the same anonymous user: lift the per-user cap as the bench does.
    settings = gateway_settings(
        redis.url,
        log_level="warning",
        max_connections_per_user=0,
        max_connections_per_ip=0,
        max_pending_handshakes_per_ip=0,
    )
    gw = await RunningGateway(settings).start()
    try:
        # One connection first, so one-off allocations are not counted per connection.
        warm = await _spawn_clients(gw.settings.port, 1)
        gc.collect()
        tracemalloc.start(depth)
        before = tracemalloc.take_snapshot()
        clients = await _spawn_clients(gw.settings.port, n)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
        stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), key)
        growth = sum(st.size_diff for st in stats)
        print(f"heap growth: {growth / n:.0f} B per connection over {n} connections")
        for st in sorted(stats, key=lambda s: -s.size_diff)[:top]:
            if st.size_diff <= 0:
                break
            frames = list(st.traceback)[-show:]
            where = "\n".join(
                f"    {f.filename.split('site-packages/')[-1].split('/src/')[-1]}:{f.lineno}"
                for f in frames
            )
            print(f"{st.size_diff / n:8.1f} B/conn {st.count_diff / n:6.2f} obj/conn\n{where}")
        await _release(clients)
        await _release(warm)
    finally:
        await gw.stop()
        redis.stop()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--clients":
        uvloop.run(_client_process(int(sys.argv[2]), int(sys.argv[3])))
    else:
        uvloop.run(main())
