"""Sharded pub/sub on Redis Cluster: SSUBSCRIBE on the master owning each
channel's slot.

Classic PUBLISH on a cluster is broadcast over the cluster bus to every node,
so its cost grows with the cluster; SPUBLISH stays on the shard that owns the
channel's slot. A subscriber must then be connected to that shard. This
module keeps one pub/sub connection (an ``Upstream``) per master that owns a
slot of a subscribed channel, and moves channels between them:

- Redis sends ``sunsubscribe`` on its own when a slot leaves a node (slot
  migration, or the node was demoted by a failover), and answers SSUBSCRIBE
  with ``MOVED`` when the slot lives elsewhere;
- a connection to a killed master goes down.

Each of these marks the affected channels lost (clients get
``upstream_lost``), re-reads the slot map with ``CLUSTER SLOTS`` and
subscribes the channels again on their current owner; the confirmation sends
``resubscribed`` with a new epoch. Channels of one slot share one SSUBSCRIBE.
"""

from __future__ import annotations

import asyncio
import bisect
import random
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from redis_ws_gateway.config import Settings
from redis_ws_gateway.upstream.pubsub import SubKind, Upstream
from redis_ws_gateway.upstream.redis_conn import connection_kwargs, tls_context

log = structlog.get_logger("redis_ws_gateway.upstream.sharded")

Node = tuple[str, int]


class ShardListener(Protocol):
    """Who the sharded channels' messages and events go to (fanout.hub.Hub)."""

    def on_read(self, replies: list[Any], control: Callable[[Any], None]) -> None: ...
    def on_confirmed(self, kind: SubKind, name: bytes, error: str | None) -> None: ...
    def expect_confirmation(self, channel: bytes) -> None:
        """``channel`` is being subscribed again: new subscribers wait for
        its confirmation."""

    def shard_channels_lost(self, names: Iterable[bytes]) -> None:
        """Their subscription is gone until they are subscribed again."""


# Errors that mean "this node does not serve that slot (now)": re-read the map.
_ROUTING_ERRORS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")


_SLOTS = 16384
_SETTLE_POLL = 0.5  # seconds, at most, between map reads while channels wait


def _parse_address(address: str) -> Node | None:
    """``host:port`` or ``host:port@cport`` of CLUSTER NODES."""
    host, _, port = address.partition("@")[0].rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


class SlotMap:
    """Slot ranges and the master serving each, from CLUSTER SLOTS."""

    def __init__(self, ranges: Iterable[tuple[int, int, Node]] = ()) -> None:
        self._ranges = sorted(ranges)
        self._starts = [r[0] for r in self._ranges]

    @classmethod
    def from_views(cls, views: Iterable[dict[str, Any]]) -> SlotMap:
        """Merge CLUSTER NODES replies of several nodes: each slot goes to the
        master claiming it with the highest config epoch, Redis's own rule.
        During a failover some nodes still name the old master; the promoted
        replica's claim carries a newer epoch, so one up-to-date view wins."""
        claims: list[tuple[int, int, int, Node]] = []
        for view in views:
            for address, node in view.items():
                # "fail?" (PFAIL) is one node's suspicion; "fail" is agreed.
                flags = set(str(node.get("flags", "")).split(","))
                if "master" not in flags or "fail" in flags:
                    continue
                where = _parse_address(str(address))
                if where is None:
                    continue
                epoch = int(node.get("epoch") or 0)
                for span in node.get("slots", []):
                    claims.append((epoch, int(span[0]), int(span[-1]), where))
        # Paint the claims oldest epoch first, so a newer claim overwrites.
        owner: list[Node | None] = [None] * _SLOTS
        for _, start, end, where in sorted(claims, key=lambda c: c[0]):
            owner[start : end + 1] = [where] * (end - start + 1)
        ranges: list[tuple[int, int, Node]] = []
        start = 0
        for slot in range(1, _SLOTS + 1):
            if slot == _SLOTS or owner[slot] != owner[start]:
                node_at = owner[start]
                if node_at is not None:
                    ranges.append((start, slot - 1, node_at))
                start = slot
        return cls(ranges)

    def owner(self, slot: int) -> Node | None:
        i = bisect.bisect_right(self._starts, slot) - 1
        if i < 0:
            return None
        start, end, node = self._ranges[i]
        return node if start <= slot <= end else None

    def nodes(self) -> set[Node]:
        return {r[2] for r in self._ranges}

    def __bool__(self) -> bool:
        return bool(self._ranges)


class _Link:
    """The pub/sub connection to one master, and the channels it should hold."""

    def __init__(self, owner: ShardedUpstream, node: Node) -> None:
        self.owner = owner
        self.node = node
        self.channels: set[bytes] = set()
        self.upstream = owner.make_upstream(node, self)

    # UpstreamListener: reads go straight to the hub, which hands the
    # confirmations back (through the connection) to on_confirmed here.
    def on_read(self, replies: list[Any], control: Callable[[Any], None]) -> None:
        self.owner.hub.on_read(replies, control)

    def on_upstream_up(self) -> None:
        self.owner.link_up(self)

    def on_upstream_down(self) -> None:
        self.owner.link_down(self)

    def on_confirmed(self, kind: SubKind, name: bytes, error: str | None) -> None:
        if error is not None and error.startswith(_ROUTING_ERRORS):
            self.owner.misrouted(self, name, error)
            return
        if name in self.channels:
            self.owner.hub.on_confirmed(kind, name, error)

    def on_shard_lost(self, name: bytes) -> None:
        self.owner.misrouted(self, name, "sunsubscribe from server")


class ShardedUpstream:
    def __init__(self, settings: Settings, hub: ShardListener) -> None:
        self.hub = hub
        self._settings = settings
        self._seeds: list[Node] = list(settings.redis_cluster_nodes)
        self._known: set[Node] = set()
        self._kwargs = connection_kwargs(settings)
        self._ssl = tls_context(settings)
        self._scheme = "rediss" if self._ssl is not None else "redis"
        self.map = SlotMap()
        self._links: dict[Node, _Link] = {}
        self._home: dict[bytes, Node | None] = {}  # wanted channel -> its link
        self._stale = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._retiring: set[asyncio.Task[None]] = set()
        self.moves = 0
        self.refreshes = 0

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._stale.set()
        self._task = asyncio.create_task(self._maintain(), name="sharded-upstream")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(
            *(link.upstream.stop() for link in self._links.values()),
            *self._retiring,
            return_exceptions=True,
        )
        self._links.clear()

    @property
    def ready(self) -> bool:
        return bool(self.map)

    def make_upstream(self, node: Node, link: _Link) -> Upstream:
        s = self._settings
        up = Upstream(
            f"{self._scheme}://{node[0]}:{node[1]}",
            link,
            connect_timeout=s.redis_connect_timeout_seconds,
            health_interval=s.redis_health_check_interval_seconds,
            health_timeout=s.redis_health_check_timeout_seconds,
            backoff_min=s.redis_reconnect_min_seconds,
            backoff_max=s.redis_reconnect_max_seconds,
            client_name="redis-ws-gateway-sharded",
            username=s.redis_username,
            password=s.redis_password,
            ssl_context=self._ssl,
        )
        up.start()
        return up

    # --- the hub's requests ------------------------------------------------------

    def subscribe(self, channel: bytes) -> bool:
        """True: an SSUBSCRIBE is on its way (or will be once the link is
        up); the hub's on_confirmed answers it."""
        self._home[channel] = None
        node = self.map.owner(key_slot(channel))
        if node is None:
            self._stale.set()
            return False
        self._place(channel, node)
        return True

    def unsubscribe(self, channel: bytes) -> None:
        node = self._home.pop(channel, None)
        link = self._links.get(node) if node is not None else None
        if link is not None:
            link.channels.discard(channel)
            link.upstream.unsubscribe("shard", channel)
            self._retire_if_idle(link)

    # --- placement ---------------------------------------------------------------

    def _place(self, channel: bytes, node: Node) -> None:
        link = self._links.get(node)
        if link is None:
            link = self._links[node] = _Link(self, node)
        link.channels.add(channel)
        self._home[channel] = node
        self.hub.expect_confirmation(channel)
        link.upstream.subscribe("shard", channel)  # else sent by link_up

    def _retire_if_idle(self, link: _Link) -> None:
        if not link.channels and self._links.get(link.node) is link:
            del self._links[link.node]
            task = asyncio.get_running_loop().create_task(link.upstream.stop())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def link_up(self, link: _Link) -> None:
        by_slot: dict[int, list[bytes]] = {}
        for channel in link.channels:
            by_slot.setdefault(key_slot(channel), []).append(channel)
        for channels in by_slot.values():
            for channel in channels:
                self.hub.expect_confirmation(channel)
            link.upstream.subscribe("shard", *channels)

    def link_down(self, link: _Link) -> None:
        if self._stopping:
            return
        self.hub.shard_channels_lost(link.channels)
        # The node may be dead for good (a failover promotes a replica):
        # its channels wait for the map to name their new owner.
        self._stale.set()

    def misrouted(self, link: _Link, channel: bytes, why: str) -> None:
        if channel not in link.channels:
            return
        log.info(
            "shard_channel_moving",
            channel=channel.decode("utf-8", "replace"),
            node=f"{link.node[0]}:{link.node[1]}",
            reason=why,
        )
        link.channels.discard(channel)
        self._home[channel] = None
        self.hub.shard_channels_lost((channel,))
        self._stale.set()
        self._retire_if_idle(link)

    # --- the slot map ------------------------------------------------------------

    async def _maintain(self) -> None:
        delay = self._settings.redis_reconnect_min_seconds
        while not self._stopping:
            await self._stale.wait()
            self._stale.clear()
            try:
                self.map = await self._read_map()
                self.refreshes += 1
                self._rehome()
            except Exception as exc:
                # This task is what moves channels back to life: it must
                # outlive any error and try again.
                log.warning("cluster_map_failed", error=str(exc) or type(exc).__name__)
                self._stale.set()
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self._settings.redis_reconnect_max_seconds)
                continue
            if self._unsettled():
                # A failover in progress: the map still names a dead master.
                # Look again soon, backing off, but never for long: the
                # moment a replica is promoted is what the clients wait for.
                self._stale.set()
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self._settings.redis_reconnect_max_seconds, _SETTLE_POLL)
            else:
                delay = self._settings.redis_reconnect_min_seconds

    def _unsettled(self) -> bool:
        for node in self._home.values():
            link = self._links.get(node) if node is not None else None
            if link is None or not link.upstream.is_up:
                return True
        return False

    def _rehome(self) -> None:
        for channel, node in list(self._home.items()):
            owner = self.map.owner(key_slot(channel))
            if owner is None or owner == node:
                continue
            if node is not None:
                old = self._links.get(node)
                if old is not None and channel in old.channels:
                    old.channels.discard(channel)
                    old.upstream.unsubscribe("shard", channel)
                    self.hub.shard_channels_lost((channel,))
                    self._retire_if_idle(old)
            self.moves += 1
            log.info(
                "shard_channel_moved",
                channel=channel.decode("utf-8", "replace"),
                to=f"{owner[0]}:{owner[1]}",
                **({"from": f"{node[0]}:{node[1]}"} if node is not None else {}),
            )
            self._place(channel, owner)

    async def _read_map(self) -> SlotMap:
        """CLUSTER NODES from every node known (the seeds and all nodes they
        named), merged by config epoch."""
        nodes = list(dict.fromkeys([*self._seeds, *self._known]))
        views = await asyncio.gather(*(self._view(node) for node in nodes))
        answered = [v for v in views if isinstance(v, dict)]
        if not answered:
            raise ConnectionError(
                "no cluster node answered CLUSTER NODES: "
                + "; ".join(f"{h}:{p}: {v}" for (h, p), v in zip(nodes, views, strict=True))
            )
        for view in answered:
            for address in view:
                node = _parse_address(str(address))
                if node is not None:
                    self._known.add(node)
        slots = SlotMap.from_views(answered)
        if not slots:
            raise ConnectionError("the cluster reports no slots")
        return slots

    async def _view(self, node: Node) -> dict[str, Any] | str:
        # One attempt: a dead node must not hold up the merge with retries.
        client = aioredis.Redis(
            host=node[0], port=node[1], retry=Retry(NoBackoff(), 0), **self._kwargs
        )
        try:
            view: dict[str, Any] = await asyncio.wait_for(
                client.cluster("NODES"), self._settings.redis_connect_timeout_seconds
            )
            return view
        except Exception as exc:
            return str(exc) or type(exc).__name__
        finally:
            await client.aclose()

    def connections(self) -> int:
        return sum(1 for link in self._links.values() if link.upstream.is_up)

    def stats(self) -> dict[str, Any]:
        return {
            "nodes": sorted(f"{h}:{p}" for h, p in self._links),
            "channels": len(self._home),
            "moves": self.moves,
            "map_refreshes": self.refreshes,
        }
