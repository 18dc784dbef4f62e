"""Run the command lines (``redis-ws-gateway``, ``redis-ws-client``) as child
processes."""

from __future__ import annotations

import asyncio
import sys


async def run_cli(
    *args: str, stdin: bytes | None = None, module: str = "redis_ws_gateway"
) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``python -m MODULE ARGS``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_client_cli(*args: str) -> tuple[int, str, str]:
    """``redis-ws-client ARGS``: tail and ping."""
    return await run_cli(*args, module="redis_ws_client")
