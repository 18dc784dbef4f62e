"""The repository builds four distributions (docs/ARCHITECTURE.md, "Layout"):
what each wheel carries is checked here, from the wheel itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _wheel(tmp_path_factory: pytest.TempPathFactory, project: str) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp(project.replace("/", "-"))
    # Built from a copy: setuptools leaves build/ in the tree it builds,
    # and mypy would then find every gateway module twice.
    src = out / "src"
    shutil.copytree(
        ROOT / project, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [wheel] = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


def _modules(wheel: zipfile.ZipFile) -> set[str]:
    return {
        name.split(".")[0].replace("/", ".")
        for name in wheel.namelist()
        if name.endswith((".py", ".so", ".c")) and ".dist-info/" not in name
    }


def test_the_gateway_wheel_carries_no_client_and_no_bench(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    wheel = _wheel(tmp_path_factory, "service")
    modules = _modules(wheel)
    assert "redis_ws_gateway.server" in modules and "redis_ws_gateway.fanout.hub" in modules
    tops = {m.split(".")[0] for m in modules}
    assert tops == {"redis_ws_gateway"}, tops
    strays = [m for m in modules if any(w in m for w in ("bench", "recvloop", "client", "sdk"))]
    assert strays == []
    # The console and client.js are package data, not modules: served from
    # the installed package, they are missing unless package-data names them.
    static = {
        f"redis_ws_gateway/web/static/{name}"
        for name in ("client.js", "console.html", "console.js", "console.css")
    }
    assert static <= set(wheel.namelist())
    metadata = wheel.read(
        next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    ).decode()
    assert "Requires-Dist: redis-ws-wire" in metadata


def test_the_client_wheel_needs_only_aiohttp_orjson_and_the_wire_module(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    wheel = _wheel(tmp_path_factory, "clients/python")
    assert {m.split(".")[0] for m in _modules(wheel)} == {"redis_ws_client"}
    metadata = wheel.read(
        next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    ).decode()
    requires = sorted(
        line.split(":", 1)[1].strip().split(">")[0].split("=")[0].split("<")[0].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    )
    assert requires == ["aiohttp", "orjson", "redis-ws-wire"]


def test_the_client_imports_nothing_of_the_gateway() -> None:
    # In a fresh interpreter: what importing the client pulls in.
    code = (
        "import sys, redis_ws_client.sdk, redis_ws_client.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    for forbidden in ("redis_ws_gateway", "redis", "hiredis", "jwt", "prometheus_client"):
        assert f"'{forbidden}'" not in out, out
