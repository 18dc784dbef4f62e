"""The gateway serves /client.js built from the npm package's source
(clients/js): the committed file must be what a fresh build writes, and the
package's TypeScript must type-check."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.npm import JS_DIR, STATIC_CLIENT, ensure_node_modules, npm

pytestmark = pytest.mark.skipif(
    npm() is None, reason="npm not found: install Node.js and npm to build clients/js"
)


def test_committed_client_js_is_a_fresh_build(tmp_path: Path) -> None:
    ensure_node_modules()
    fresh = tmp_path / "client.js"
    subprocess.run(
        ["node", "scripts/build-static.mjs", "--outfile", str(fresh)],
        cwd=JS_DIR,
        check=True,
        timeout=120,
    )
    assert STATIC_CLIENT.read_text() == fresh.read_text(), (
        "service/src/redis_ws_gateway/web/static/client.js is not a build of clients/js/src: "
        "run `npm run build:static` in clients/js and commit the result"
    )


def test_the_package_type_checks() -> None:
    ensure_node_modules()
    proc = subprocess.run(
        [str(JS_DIR / "node_modules" / ".bin" / "tsc"), "--noEmit", "-p", "."],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
