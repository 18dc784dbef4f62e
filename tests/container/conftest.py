"""The gateway's image, built with the repository's Dockerfile and run by a
Docker engine that this harness starts and stops itself (scripts/dockerd.sh),
the way the integration tests run their own redis-server.

No skip: an engine that cannot be started, or an image that does not build,
fails the run with the scripts' own message. scripts/setup.sh installs
Debian's docker.io and debootstrap.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("RWG_TEST_IMAGE", "redis-ws-gateway:dev")


@dataclass(frozen=True)
class Docker:
    host: str

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0"}

    def result(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        proc = self.result(*args, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} ({proc.returncode}): {proc.stderr}")
        return proc.stdout


def _script(*args: str, timeout: float) -> str:
    proc = subprocess.run(
        [str(REPO / "scripts" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"scripts/{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}",
            pytrace=False,
        )
    return proc.stdout.strip()


@pytest.fixture(scope="session")
def docker() -> Iterator[Docker]:
    state = _script("dockerd.sh", "start", timeout=120)
    host = _script("dockerd.sh", "host", timeout=10)
    try:
        yield Docker(host)
    finally:
        # An engine that was already running (a `make e2e` in progress, a
        # developer's) is left as it was.
        if state == "started":
            _script("dockerd.sh", "stop", timeout=180)


@pytest.fixture(scope="session")
def gateway_image(docker: Docker) -> str:
    """The image of the working tree. The build reuses the engine's layer
    cache and the cached stand-in base, so it is seconds when nothing under
    service/ changed, and a few minutes the first time on a machine."""
    if os.environ.get("RWG_TEST_IMAGE"):
        docker.run("image", "inspect", IMAGE)
    else:
        _script("build-image.sh", IMAGE, timeout=1500)
    return IMAGE
