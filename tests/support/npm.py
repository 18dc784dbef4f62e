"""The npm package under clients/js: its node_modules, installed from the
committed package-lock.json by `scripts/setup.sh test` and, when missing or
stale, by the tests themselves (a fresh checkout, a changed lock file)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JS_DIR = REPO / "clients" / "js"
STATIC_CLIENT = REPO / "service" / "src" / "redis_ws_gateway" / "web" / "static" / "client.js"
# Written by setup.sh and by ensure_node_modules after `npm ci` succeeded, so
# an interrupted install is not mistaken for a finished one.
_STAMP_PREFIX = ".installed-"


def npm() -> str | None:
    return shutil.which("npm")


def lock_hash() -> str:
    return hashlib.sha256((JS_DIR / "package-lock.json").read_bytes()).hexdigest()[:16]


def ensure_node_modules(timeout: float = 600) -> None:
    """`npm ci` in clients/js unless the current lock file is installed.
    npm's own cache makes a repeated install quick and offline."""
    stamp = JS_DIR / "node_modules" / (_STAMP_PREFIX + lock_hash())
    if stamp.exists():
        return
    exe = npm()
    assert exe is not None, "npm not found"
    subprocess.run(
        [exe, "ci", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=JS_DIR,
        check=True,
        timeout=timeout,
        capture_output=True,
    )
    stamp.touch()
