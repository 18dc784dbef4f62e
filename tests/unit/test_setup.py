"""`make demo` installs only what the demo runs and needs no Go; `make test`
installs the rest (issue 20). Checked through the setup script's dry run,
which prints every step of a set without changing anything."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _path_without_go() -> str:
    """PATH with every directory that holds a `go` binary left out."""
    dirs = [d for d in os.environ["PATH"].split(os.pathsep) if d]
    return os.pathsep.join(d for d in dirs if not (Path(d) / "go").exists())


def _make_recipe(target: str) -> str:
    out = subprocess.run(
        ["make", "-n", "-C", str(REPO), target],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout


def _dry_run(mode: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, SETUP_DRY_RUN="1", PATH=_path_without_go(), **env)
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "setup.sh"), mode],
        capture_output=True,
        text=True,
        timeout=60,
        env=full,
        check=False,
    )


def test_make_demo_runs_the_demo_set_and_make_test_the_full_one() -> None:
    demo = _make_recipe("demo")
    assert "scripts/setup.sh demo" in demo, demo
    assert "scripts/setup.sh test" in _make_recipe("test")


def test_the_demo_set_needs_no_go_and_installs_no_test_tools() -> None:
    assert shutil.which("go", path=_path_without_go()) is None
    proc = _dry_run("demo")
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stderr.splitlines() if line.startswith("setup: [")]
    assert len(steps) == 2, proc.stderr
    text = proc.stderr.lower()
    for absent in ("helm", "chromium", "haproxy", "sentinel", "dev tools", "go ", "npm"):
        assert absent not in text, (absent, proc.stderr)
    assert "ready for `make demo`" in proc.stderr


def test_the_test_set_lists_helm_the_dev_tools_and_the_node_modules() -> None:
    proc = _dry_run("test")
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stderr.splitlines() if line.startswith("setup: [")]
    assert len(steps) == 4 and "helm" in steps[2], proc.stderr
    assert "dev tools" in steps[1]
    assert "clients/js node modules" in steps[3]
    skipped = _dry_run("test", SETUP_HELM="0")
    assert "helm: skipped (SETUP_HELM=0" in skipped.stderr


def test_an_unknown_set_is_refused() -> None:
    proc = _dry_run("everything")
    assert proc.returncode == 2 and "usage: scripts/setup.sh [demo|test]" in proc.stderr
