"""Where the e2e suite runs: gateways behind a load balancer, driven through
one small interface so the same tests run on both targets.

- ``LocalTopology``: one redis-server, gateway processes and HAProxy, all on
  loopback ports of this machine. HAProxy stands in for the Service and the
  ingress: it health-checks ``/readyz`` and only routes to ready gateways, and
  its runtime API adds and removes gateways the way endpoints come and go.
- ``KindTopology``: the chart deployed into kind (``make e2e``), reached
  through the ingress; topology changes are kubectl operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from redis_ws_client.client import BadRequestError, GatewayClient
from tests.support.redis_server import RedisServer, free_port
from tests.support.wait import eventually, wait_until

DURABLE_PATTERN = "engine:decision:*"
CHART = Path(__file__).resolve().parents[2] / "chart"
LOCAL_API_KEY = "e2e-local-api-key"
# The gateways' own shutdown timeline, short so restarts take seconds.
DRAIN_WINDOW_SECONDS = 1.0
SHUTDOWN_TIMEOUT_SECONDS = 5.0


class PublishError(Exception):
    def __init__(self, status: int | None, body: str) -> None:
        super().__init__(f"/publish failed: {status} {body}".strip())
        self.status = status


@dataclass
class Connections:
    """WebSocket connections a replica serves now, and has served in all."""

    current: int
    total: int


class Topology(ABC):
    """Gateways behind a load balancer. Replicas are named by the target
    (HAProxy server slots locally, pod names on kind)."""

    ws_url: str
    http_url: str
    api_key: str

    async def publish(
        self, channel: str, data: Any, *, session: aiohttp.ClientSession | None = None
    ) -> dict[str, Any]:
        """POST /publish through the load balancer; both targets publish the
        same way so the tests do not depend on reaching Redis directly."""
        own = session is None
        http = session or aiohttp.ClientSession()
        try:
            async with http.post(
                f"{self.http_url}/publish",
                json={"channel": channel, "data": data},
                headers={"Authorization": f"Bearer {self.api_key}"},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                body = await resp.text()
                if resp.status != 200:
                    raise PublishError(resp.status, body)
                result: dict[str, Any] = json.loads(body)
                return result
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PublishError(None, repr(exc)) from exc
        finally:
            if own:
                await http.close()

    @abstractmethod
    async def ready_replicas(self) -> list[str]:
        """Replicas the load balancer currently routes new clients to."""

    @abstractmethod
    async def connections(self) -> dict[str, Connections]:
        """WebSocket connections per replica (ready or not)."""

    @abstractmethod
    async def rolling_restart(self) -> None:
        """Replace every replica, one at a time; returns once the load balancer
        routes only to the new ones."""

    @abstractmethod
    async def delete_replica(self, name: str) -> str:
        """Stops one replica the way a deleted pod stops (SIGTERM, drain) and
        returns its replacement's name once the replacement is ready."""

    @abstractmethod
    async def upgrade(self) -> None:
        """Rolls every replica to a new release (a new image tag on kind);
        returns once only new replicas serve."""

    # Fewest replicas that may be ready during ``upgrade``: kind's rollout
    # surges (maxUnavailable 0), the local one replaces in place.
    min_ready_during_upgrade = 1

    @abstractmethod
    async def scale(self, replicas: int) -> tuple[list[str], list[str]]:
        """Returns (added, removed) replica names once the change is complete:
        added ones are ready, removed ones have drained and exited."""

    @abstractmethod
    async def make_unready(self) -> str:
        """Adds a replica whose Redis is unreachable, so its ``/readyz`` fails;
        returns its name once the readiness check has actually run and failed."""

    @abstractmethod
    async def remove_unready(self, name: str) -> None: ...

    @abstractmethod
    async def set_max_connection_age(self, seconds: float | None) -> None:
        """Applies ``MAX_CONNECTION_AGE_SECONDS`` to every replica (a rollout),
        or restores the deployed setting with None."""

    @contextlib.asynccontextmanager
    async def max_connection_age(self, seconds: float) -> AsyncIterator[None]:
        await self.set_max_connection_age(seconds)
        try:
            yield
        finally:
            await self.set_max_connection_age(None)

    async def disruption_budget(self) -> tuple[int, int] | None:
        """(currently healthy, desired healthy) of the PodDisruptionBudget, on
        a target that has one; None otherwise."""
        return None

    async def stream_entries(self, channel: str) -> list[str] | None:
        """The durable channel's offsets as Redis holds them, when the target
        gives the tests direct access to Redis; None otherwise."""
        return None

    def diagnostics(self) -> str:
        """Where to look when a test fails."""
        return ""


# --- local: redis-server + gateway processes + HAProxy ------------------------------


def haproxy_binary() -> str | None:
    # Debian installs it in /usr/sbin, which a normal user's PATH lacks.
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None
    )


def _gateway_env(**settings: str) -> dict[str, str]:
    # A clean environment: a developer's own REDIS_URL or REQUIRE_AUTH must not
    # leak into the topology.
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(settings)
    return env


@dataclass
class _Gateway:
    slot: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    redis_url: str


class LocalTopology(Topology):
    """Server slots gw1..gw4 are declared in HAProxy up front; slots without a
    gateway sit in maintenance until ``scale`` or ``make_unready`` fills them,
    so nothing ever reloads HAProxy."""

    SLOTS = ("gw1", "gw2", "gw3", "gw4")
    CHECK = "inter 200ms fastinter 100ms downinter 200ms fall 1 rise 1"

    def __init__(self, replicas: int = 2) -> None:
        self.initial = replicas
        self.api_key = LOCAL_API_KEY
        self.dir = Path(tempfile.mkdtemp(prefix="rwg-e2e-"))
        self.redis = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
        self.lb_port = free_port()
        self.ws_url = f"ws://127.0.0.1:{self.lb_port}/ws"
        self.http_url = f"http://127.0.0.1:{self.lb_port}"
        self.admin_socket = self.dir / "admin.sock"
        self.config = self.dir / "gateway.yaml"
        self.gateways: dict[str, _Gateway] = {}
        self.max_age: float | None = None
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.exit_codes: list[tuple[str, int]] = []
        self._starts = 0

    # --- lifecycle (synchronous: runs in the fixture, outside the tests' loops)

    def start(self) -> None:
        haproxy = haproxy_binary()
        if haproxy is None:
            raise RuntimeError("haproxy not found: run scripts/setup.sh")
        self.redis.start()
        self.config.write_text(f"durable:\n  - {{pattern: '{DURABLE_PATTERN}'}}\n")
        for slot in self.SLOTS[: self.initial]:
            self._spawn(slot, free_port(), self.redis.url)
        for g in self.gateways.values():
            self._wait_ready_sync(g)
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(self._haproxy_config())
        check = subprocess.run(
            [haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy config rejected:\n{check.stdout}{check.stderr}")
        with (self.dir / "haproxy.log").open("wb") as log:
            self.haproxy = subprocess.Popen(
                [haproxy, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT
            )
        asyncio.run(self._wait_all_up())

    async def _wait_all_up(self) -> None:
        async def admin_answers() -> bool:
            assert self.haproxy is not None
            if self.haproxy.poll() is not None:
                log = (self.dir / "haproxy.log").read_text(errors="replace")
                raise RuntimeError(f"haproxy exited ({self.haproxy.returncode}):\n{log}")
            await self._admin("show info")
            return True

        await eventually(
            admin_answers,
            timeout=15,
            interval=0.05,
            what="haproxy's admin socket",
            ignoring=(OSError,),
        )
        for slot in self.gateways:
            await self._wait_status(slot, lambda row: row["status"] == "UP", "UP")

    def stop(self) -> None:
        for g in self.gateways.values():
            if g.proc.poll() is None:
                g.proc.kill()
            g.proc.wait(timeout=10)
        self.gateways.clear()
        if self.haproxy is not None:
            self.haproxy.terminate()
            try:
                self.haproxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait(timeout=10)
            self.haproxy = None
        self.redis.stop()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def diagnostics(self) -> str:
        return f"gateway and haproxy logs in {self.dir}"

    def _haproxy_config(self) -> str:
        ws_servers, http_servers = [], []
        for slot in self.SLOTS:
            g = self.gateways.get(slot)
            # Empty slots point at a port nothing listens on until filled.
            port = g.port if g is not None else 1
            disabled = "" if g is not None else " disabled"
            ws_servers.append(f"    server {slot} 127.0.0.1:{port} check{disabled}")
            # The HTTP backend follows the WebSocket backend's health and
            # maintenance state, so every slot has one state to manage.
            http_servers.append(f"    server {slot} 127.0.0.1:{port} track ws/{slot}")
        return "\n".join(
            [
                "global",
                f"    stats socket {self.admin_socket} mode 600 level admin",
                "    maxconn 4000",
                "",
                "defaults",
                "    mode http",
                "    timeout connect 1s",
                "    timeout client 30s",
                "    timeout server 30s",
                # Upgraded WebSockets are tunnels that outlive any test.
                "    timeout tunnel 1h",
                "    timeout http-keep-alive 2s",
                # A gateway that has just closed its listener refuses the
                # connection; the request is retried on another one.
                "    retries 3",
                "    option redispatch 1",
                # One server connection per request: pooled idle connections
                # to a gateway would blur the per-server session counts.
                "    option http-server-close",
                f"    default-server {self.CHECK}",
                "",
                "frontend fe",
                f"    bind 127.0.0.1:{self.lb_port}",
                # WebSockets get their own backend so its per-server session
                # counts are exactly the open WebSockets.
                "    use_backend ws if { path /ws }",
                "    default_backend http",
                "",
                "backend ws",
                "    balance roundrobin",
                "    option httpchk",
                "    http-check send meth GET uri /readyz",
                "    http-check expect status 200",
                *ws_servers,
                "",
                "backend http",
                "    balance roundrobin",
                *http_servers,
                "",
            ]
        )

    # --- gateway processes ------------------------------------------------------

    def _spawn(self, slot: str, port: int, redis_url: str) -> _Gateway:
        self._starts += 1
        log = self.dir / f"{slot}-{self._starts}.log"
        settings = {
            "REDIS_URL": redis_url,
            "REDIS_WS_GATEWAY_HOST": "127.0.0.1",
            "REDIS_WS_GATEWAY_PORT": str(port),
            "REDIS_WS_GATEWAY_CONFIG": str(self.config),
            "GATEWAY_API_KEY": self.api_key,
            "DRAIN_WINDOW_SECONDS": str(DRAIN_WINDOW_SECONDS),
            "SHUTDOWN_TIMEOUT_SECONDS": str(SHUTDOWN_TIMEOUT_SECONDS),
            "LOG_FORMAT": "json",
        }
        if self.max_age is not None:
            settings["MAX_CONNECTION_AGE_SECONDS"] = str(self.max_age)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "redis_ws_gateway", "serve"],
                env=_gateway_env(**settings),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        g = _Gateway(slot, port, proc, log, redis_url)
        self.gateways[slot] = g
        return g

    def _log_tail(self, g: _Gateway, lines: int = 20) -> str:
        try:
            return "\n".join(g.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _wait_ready_sync(self, g: _Gateway, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if g.proc.poll() is not None:
                raise RuntimeError(f"{g.slot} exited ({g.proc.returncode}):\n{self._log_tail(g)}")
            with urllib.request.urlopen(f"http://127.0.0.1:{g.port}/readyz", timeout=1):
                return True

        try:
            # OSError: refused, or HTTPError 503 while Redis connects.
            wait_until(ready, timeout=timeout, interval=0.05, what="ready", ignoring=(OSError,))
        except AssertionError as exc:
            raise AssertionError(f"{g.slot} on {g.port}: {exc}\n{self._log_tail(g)}") from None

    async def _wait_readyz(self, g: _Gateway, expect: int, timeout: float = 20.0) -> None:
        """Until the gateway answers /readyz with ``expect`` (200 or 503)."""
        async with aiohttp.ClientSession() as http:

            async def answers() -> bool:
                if g.proc.poll() is not None:
                    raise RuntimeError(
                        f"{g.slot} exited ({g.proc.returncode}):\n{self._log_tail(g)}"
                    )
                async with http.get(
                    f"http://127.0.0.1:{g.port}/readyz", timeout=aiohttp.ClientTimeout(total=1)
                ) as resp:
                    return resp.status == expect

            await eventually(
                answers,
                timeout=timeout,
                interval=0.05,
                what=f"{g.slot} on {g.port} to answer /readyz with {expect}",
                ignoring=(aiohttp.ClientError, TimeoutError),
            )

    async def _terminate(self, g: _Gateway) -> int:
        """SIGTERM, as the kubelet sends it; the gateway drains and exits."""
        g.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(g.proc.wait, SHUTDOWN_TIMEOUT_SECONDS + 10)
        self.exit_codes.append((g.slot, code))
        return code

    # --- HAProxy runtime API --------------------------------------------------------

    async def _admin(self, command: str) -> str:
        reader, writer = await asyncio.open_unix_connection(str(self.admin_socket))
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            # Without "prompt" mode HAProxy answers one command and closes.
            out = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
            await writer.wait_closed()
        return out.decode()

    async def _command(self, command: str) -> None:
        out = (await self._admin(command)).strip()
        # Successful commands answer nothing, or a notice about what changed.
        if out and not out.startswith(("no need to change", "IP changed", "port changed")):
            raise RuntimeError(f"haproxy refused {command!r}: {out}")

    async def stats(self, backend: str = "ws") -> dict[str, dict[str, str]]:
        text = await self._admin("show stat")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        header = lines[0].lstrip("# ").split(",")
        rows = (dict(zip(header, ln.split(","), strict=False)) for ln in lines[1:])
        return {
            r["svname"]: r
            for r in rows
            if r.get("pxname") == backend and r["svname"] not in ("FRONTEND", "BACKEND")
        }

    async def _wait_status(
        self, slot: str, predicate: Any, what: str, timeout: float = 15.0
    ) -> dict[str, str]:

        async def reported() -> dict[str, str]:
            row = (await self.stats())[slot]
            assert predicate(row), f"status={row.get('status')} check={row.get('check_status')}"
            return row

        return await eventually(
            reported, timeout=timeout, interval=0.05, what=f"haproxy to report ws/{slot} {what}"
        )

    async def _point_slot(self, slot: str, port: int) -> None:
        for backend in ("ws", "http"):
            await self._command(f"set server {backend}/{slot} addr 127.0.0.1 port {port}")

    async def _enable_slot(self, slot: str, port: int, *, healthy: bool) -> None:
        """Fill an empty slot the way an endpoint joins a Service: no client
        is routed to it before its readiness check has passed.

        Leaving maintenance straight to "ready" would count the server as up
        before its first check; "drain" runs the checks with weight 0 (no new
        clients), and only then is the slot opened.
        """
        await self._point_slot(slot, port)
        await self._command(f"set server ws/{slot} state drain")
        if healthy:
            await self._wait_status(
                slot,
                lambda r: r["status"] == "DRAIN" and r["check_status"] == "L7OK",
                "passing its check",
            )
        else:
            await self._wait_status(
                slot,
                lambda r: r["status"] == "DOWN" and r["check_status"] == "L7STS",
                "failing its check with an HTTP status",
            )
        await self._command(f"set server ws/{slot} state ready")
        if healthy:
            await self._wait_status(slot, lambda r: r["status"] == "UP", "UP")

    async def _disable_slot(self, slot: str) -> None:
        await self._command(f"set server ws/{slot} state maint")
        await self._point_slot(slot, 1)

    def _free_slot(self) -> str:
        for slot in self.SLOTS:
            if slot not in self.gateways:
                return slot
        raise RuntimeError(f"all {len(self.SLOTS)} haproxy slots are in use")

    # --- Topology ---------------------------------------------------------------------

    async def ready_replicas(self) -> list[str]:
        rows = await self.stats()
        return [s for s, r in rows.items() if r["status"] == "UP"]

    async def connections(self) -> dict[str, Connections]:
        rows = await self.stats()
        return {
            s: Connections(int(r["scur"] or 0), int(r["stot"] or 0))
            for s, r in rows.items()
            if s in self.gateways
        }

    async def rolling_restart(self) -> None:
        for slot in sorted(self.gateways):
            old = self.gateways[slot]
            if old.redis_url != self.redis.url:
                continue  # the deliberately unready one is not part of the rollout
            await self._terminate(old)
            new = self._spawn(slot, old.port, self.redis.url)
            await self._wait_readyz(new, 200)
            # The slot keeps its address; HAProxy saw it fail while the port
            # was closed (or not, if the restart was quicker than a check
            # interval) and admits it again once a check passes.
            await self._wait_status(
                slot, lambda r: r["status"] == "UP" and r["check_status"] == "L7OK", "UP"
            )

    async def delete_replica(self, name: str) -> str:
        old = self.gateways[name]
        await self._terminate(old)
        new = self._spawn(name, old.port, self.redis.url)
        await self._wait_readyz(new, 200)
        await self._wait_status(
            name, lambda r: r["status"] == "UP" and r["check_status"] == "L7OK", "UP"
        )
        return name

    async def upgrade(self) -> None:
        # One package on one machine: a new release is a restart of each
        # process, one at a time.
        await self.rolling_restart()

    async def scale(self, replicas: int) -> tuple[list[str], list[str]]:
        serving = sorted(s for s, g in self.gateways.items() if g.redis_url == self.redis.url)
        added: list[str] = []
        removed: list[str] = []
        while len(serving) + len(added) < replicas:
            slot = self._free_slot()
            g = self._spawn(slot, free_port(), self.redis.url)
            await self._wait_readyz(g, 200)
            await self._enable_slot(slot, g.port, healthy=True)
            added.append(slot)
        for slot in serving[replicas:]:
            # Kubernetes picks the victim; here it is the last slot.
            await self._terminate(self.gateways[slot])
            await self._disable_slot(slot)
            del self.gateways[slot]
            removed.append(slot)
        return added, removed

    async def make_unready(self) -> str:
        slot = self._free_slot()
        # Nothing listens on a port that was free a moment ago.
        dead = f"redis://127.0.0.1:{free_port()}"
        g = self._spawn(slot, free_port(), dead)
        await self._wait_readyz(g, 503)
        await self._enable_slot(slot, g.port, healthy=False)
        return slot

    async def remove_unready(self, name: str) -> None:
        g = self.gateways.pop(name)
        await self._terminate(g)
        await self._disable_slot(name)

    def direct_ws_url(self, name: str) -> str:
        return f"ws://127.0.0.1:{self.gateways[name].port}/ws"

    async def set_max_connection_age(self, seconds: float | None) -> None:
        if seconds == self.max_age:
            return
        self.max_age = seconds
        await self.rolling_restart()

    async def stream_entries(self, channel: str) -> list[str] | None:
        r = aioredis.from_url(self.redis.url, decode_responses=True)
        try:
            entries: Any = await r.xrange(f"stream:{channel}")
        finally:
            await r.aclose()
        return [str(entry_id) for entry_id, _ in entries]


# --- kind: the chart in a local cluster, reached through the ingress --------------------


class KindTopology(Topology):
    """The release ``make e2e`` deploys (k8s/values-kind.yaml). Replicas are
    pods; connection counts come from the pods' JSON logs, the only per-pod
    view the gateway offers without a metrics endpoint."""

    def __init__(self) -> None:
        self.ws_url = os.environ.get("E2E_URL", "ws://gateway.localtest.me/ws")
        default_http = self.ws_url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
        default_http = default_http.removesuffix("/ws")
        self.http_url = os.environ.get("E2E_HTTP_URL", default_http).rstrip("/")
        # What k8s/values-kind.yaml sets as auth.apiKey.
        self.api_key = os.environ.get("E2E_API_KEY", "kind-dev-api-key")
        self.context = os.environ.get("E2E_KUBE_CONTEXT", "kind-redis-ws-gateway")
        self.namespace = os.environ.get("E2E_NAMESPACE", "default")
        release = os.environ.get("E2E_RELEASE", "gw")
        self.release = release
        self.deployment = os.environ.get("E2E_DEPLOYMENT", f"{release}-redis-ws-gateway")
        self.selector = ",".join(
            [f"app.kubernetes.io/instance={release}", "app.kubernetes.io/component=gateway"]
        )
        self.initial_replicas: int | None = None
        self.original_env: dict[str, Any] | None = None
        self.env_index: int | None = None

    async def kubectl(self, *args: str, stdin: bytes | None = None, timeout: float = 360) -> str:
        proc = await asyncio.create_subprocess_exec(
            "kubectl",
            "--context",
            self.context,
            "--namespace",
            self.namespace,
            *args,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {err.decode().strip()}")
        return out.decode()

    async def _json(self, *args: str) -> Any:
        return json.loads(await self.kubectl(*args, "-o", "json"))

    def check(self) -> None:
        """Fails fast, with kubectl's own message, when the release is not there."""

        async def probe() -> None:
            dep = await self._json("get", "deployment", self.deployment)
            self.initial_replicas = int(dep["spec"].get("replicas", 1))
            # Every durable test would time out otherwise; say why up front.
            async with GatewayClient(self.ws_url) as c:
                try:
                    spec = {"channel": "engine:decision:e2e-probe", "since": "0"}
                    reply = await c.request("subscribe", channels=[spec])
                except BadRequestError as exc:
                    raise RuntimeError(
                        f"{DURABLE_PATTERN} is not a durable channel on this release ({exc}); "
                        "apply tests/e2e/values-kind-e2e.yaml as `make e2e` does"
                    ) from None
            if reply["subscriptions"][0].get("durable") is not True:
                raise RuntimeError(f"{DURABLE_PATTERN} is not durable on this release")

        asyncio.run(probe())

    def restore(self) -> None:
        async def back() -> None:
            if self.original_env is not None:
                await self.set_max_connection_age(None)
            if self.initial_replicas is not None:
                await self.scale(self.initial_replicas)

        asyncio.run(back())

    async def _pods(self) -> list[dict[str, Any]]:
        listing = await self._json("get", "pods", "-l", self.selector)
        pods: list[dict[str, Any]] = listing["items"]
        return pods

    @staticmethod
    def _owned_by_replicaset(pod: dict[str, Any]) -> bool:
        return any(
            o.get("kind") == "ReplicaSet" for o in pod["metadata"].get("ownerReferences", [])
        )

    @staticmethod
    def _ready(pod: dict[str, Any]) -> bool:
        if pod["metadata"].get("deletionTimestamp"):
            return False
        conditions = pod.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    async def _settle(self, replicas: int, timeout: float = 300) -> list[str]:
        """Until exactly ``replicas`` pods of the Deployment exist, all ready:
        ``rollout status`` returns while old pods are still draining."""

        names: list[str] = []

        async def settled() -> bool:
            nonlocal names
            pods = [p for p in await self._pods() if self._owned_by_replicaset(p)]
            names = sorted(p["metadata"]["name"] for p in pods)
            assert len(pods) == replicas and all(self._ready(p) for p in pods), f"pods: {names}"
            return True

        await eventually(
            settled, timeout=timeout, interval=1, what=f"the deployment at {replicas} ready pods"
        )
        return names

    async def _replicas(self) -> int:
        dep = await self._json("get", "deployment", self.deployment)
        return int(dep["spec"].get("replicas", 1))

    async def _rollout(self) -> list[str]:
        await self.kubectl("rollout", "status", f"deployment/{self.deployment}", "--timeout=300s")
        return await self._settle(await self._replicas())

    async def ready_replicas(self) -> list[str]:
        return sorted(p["metadata"]["name"] for p in await self._pods() if self._ready(p))

    async def connections(self) -> dict[str, Connections]:
        out: dict[str, Connections] = {}
        for pod in await self._pods():
            name = pod["metadata"]["name"]
            if pod["metadata"].get("deletionTimestamp"):
                continue
            opened: set[str] = set()
            closed: set[str] = set()
            for line in (await self.kubectl("logs", name, "-c", "gateway")).splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "connection_open":
                    opened.add(str(event.get("conn")))
                elif event.get("event") == "connection_closed":
                    closed.add(str(event.get("conn")))
            out[name] = Connections(len(opened - closed), len(opened))
        return out

    async def rolling_restart(self) -> None:
        await self.kubectl("rollout", "restart", f"deployment/{self.deployment}")
        await self._rollout()

    async def delete_replica(self, name: str) -> str:
        replicas = await self._replicas()
        before = set(await self._settle(replicas))
        # --wait=false: the pod drains for its grace period while the
        # ReplicaSet starts its replacement.
        await self.kubectl("delete", "pod", name, "--wait=false")

        async def replaced() -> set[str] | None:
            after = set(await self._settle(replicas))
            return after if name not in after else None

        after = await eventually(replaced, timeout=300, interval=1, what=f"{name} to be replaced")
        added = sorted(after - before)
        assert len(added) == 1, (before, after)
        return added[0]

    min_ready_during_upgrade = 2

    async def disruption_budget(self) -> tuple[int, int] | None:
        pdb = await self._json("get", "poddisruptionbudget", self.deployment)
        status = pdb.get("status", {})
        return int(status.get("currentHealthy", 0)), int(status.get("desiredHealthy", 0))

    async def helm_upgrade(self, *settings: str) -> None:
        """``helm upgrade --reuse-values --wait`` of the release with ``--set``
        for each setting."""
        args = [
            "upgrade",
            self.release,
            str(CHART),
            "--kube-context",
            self.context,
            "--namespace",
            self.namespace,
            "--reuse-values",
            "--wait",
            "--timeout",
            "5m",
        ]
        for setting in settings:
            args += ["--set", setting]
        proc = await asyncio.create_subprocess_exec(
            os.environ.get("HELM", "helm"),
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 360)
        if proc.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)}: {err.decode().strip()}")

    async def upgrade(self) -> None:
        """``helm upgrade`` to the other of two tags of the image (``make e2e``
        loads both), keeping every other value of the release."""
        dep = await self._json("get", "deployment", self.deployment)
        containers = dep["spec"]["template"]["spec"]["containers"]
        image = next(c["image"] for c in containers if c["name"] == "gateway")
        repository, _, tag = image.rpartition(":")
        other = os.environ.get("E2E_UPGRADE_TAG", "dev-upgrade")
        base = os.environ.get("E2E_BASE_TAG", "dev")
        new_tag = base if tag == other else other
        await self.helm_upgrade(f"image.repository={repository}", f"image.tag={new_tag}")
        await self._rollout()
        for pod in await self._pods():
            if self._owned_by_replicaset(pod) and not pod["metadata"].get("deletionTimestamp"):
                images = [c["image"] for c in pod["spec"]["containers"] if c["name"] == "gateway"]
                assert images == [f"{repository}:{new_tag}"], images

    async def scale(self, replicas: int) -> tuple[list[str], list[str]]:
        before = set(await self._settle(await self._replicas()))
        await self.kubectl("scale", f"deployment/{self.deployment}", f"--replicas={replicas}")
        after = set(await self._rollout())
        return sorted(after - before), sorted(before - after)

    def _unready_name(self) -> str:
        return f"{self.deployment}-e2e-unready"[:63]

    async def make_unready(self) -> str:
        """A bare pod from the Deployment's template, carrying the Service's
        labels but pointed at a Redis that does not exist: the Service and the
        ingress see it, and must not use it while its readiness probe fails."""
        dep = await self._json("get", "deployment", self.deployment)
        template = copy.deepcopy(dep["spec"]["template"])
        labels = dict(template["metadata"].get("labels", {}))
        # Without pod-template-hash no ReplicaSet adopts it.
        labels.pop("pod-template-hash", None)
        labels["e2e.redis-ws-gateway/role"] = "unready"
        for container in template["spec"]["containers"]:
            if container["name"] != "gateway":
                continue
            env = [e for e in container.get("env", []) if e["name"] != "REDIS_URL"]
            # Nothing listens on port 1 of the pod's own loopback.
            env.append({"name": "REDIS_URL", "value": "redis://127.0.0.1:1"})
            container["env"] = env
        name = self._unready_name()
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": template["spec"],
        }
        await self.kubectl("apply", "-f", "-", stdin=json.dumps(pod).encode())
        await self._wait_unhealthy_event(name)
        return name

    async def _wait_unhealthy_event(self, name: str, timeout: float = 120) -> None:

        async def probe_failed() -> bool:
            events = await self._json(
                "get",
                "events",
                "--field-selector",
                f"involvedObject.name={name},reason=Unhealthy",
            )
            return any("Readiness" in e.get("message", "") for e in events["items"])

        await eventually(
            probe_failed, timeout=timeout, interval=1, what=f"a failed readiness probe of {name}"
        )

    async def remove_unready(self, name: str) -> None:
        await self.kubectl("delete", "pod", name, "--wait=true", "--timeout=120s")

    async def set_max_connection_age(self, seconds: float | None) -> None:
        """Patches the one env entry (a rollout, as a values change would be)
        and puts the chart's own entry back afterwards, so a later
        ``helm upgrade`` finds the Deployment as it rendered it."""
        dep = await self._json("get", "deployment", self.deployment)
        containers = dep["spec"]["template"]["spec"]["containers"]
        ci = next(i for i, c in enumerate(containers) if c["name"] == "gateway")
        env = containers[ci].get("env", [])
        idx = next(
            (i for i, e in enumerate(env) if e["name"] == "MAX_CONNECTION_AGE_SECONDS"), None
        )
        if seconds is None:
            if self.original_env is None or self.env_index is None:
                return
            value: dict[str, Any] = self.original_env
            idx = self.env_index
            self.original_env = self.env_index = None
        else:
            if idx is None:
                raise RuntimeError("the Deployment has no MAX_CONNECTION_AGE_SECONDS entry")
            if self.original_env is None:
                self.original_env, self.env_index = env[idx], idx
            value = {"name": "MAX_CONNECTION_AGE_SECONDS", "value": f"{seconds:g}"}
        patch = [
            {
                "op": "replace",
                "path": f"/spec/template/spec/containers/{ci}/env/{idx}",
                "value": value,
            }
        ]
        await self.kubectl(
            "patch", "deployment", self.deployment, "--type=json", "-p", json.dumps(patch)
        )
        await self._rollout()

    def diagnostics(self) -> str:
        return f"kubectl --context {self.context} -n {self.namespace} logs -l {self.selector}"


def kind_tools_missing() -> str | None:
    if shutil.which("kubectl") is None:
        return "E2E_TARGET=kind needs kubectl on PATH"
    return None
