"""The e2e topology: E2E_TARGET=local (default) builds one on this machine,
E2E_TARGET=kind uses the release `make e2e` deployed."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from .topology import KindTopology, LocalTopology, Topology, haproxy_binary, kind_tools_missing

TARGET = os.environ.get("E2E_TARGET", "local")


@pytest.fixture(scope="module")
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    failed_before = request.session.testsfailed
    if TARGET == "local":
        if haproxy_binary() is None:
            pytest.skip("haproxy not found (Debian package haproxy): run scripts/setup.sh")
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server not found: run scripts/setup.sh")
        local = LocalTopology(replicas=2)
        try:
            local.start()
            yield local
        finally:
            local.stop()
        if request.session.testsfailed == failed_before:
            local.cleanup()
        else:
            print(f"\ne2e: {local.diagnostics()}")
    elif TARGET == "kind":
        missing = kind_tools_missing()
        if missing is not None:
            pytest.skip(missing)
        kind = KindTopology()
        # An explicit kind run with no release behind it is an error, not a skip.
        kind.check()
        try:
            yield kind
        finally:
            kind.restore()
    else:
        pytest.fail(f"E2E_TARGET must be local or kind, not {TARGET!r}")
