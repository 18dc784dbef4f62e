"""Run the ``redis-ws-gateway`` command line as a child process."""

from __future__ import annotations

import asyncio
import sys


async def run_cli(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``python -m redis_ws_gateway ARGS``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "redis_ws_gateway",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
