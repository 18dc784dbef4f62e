"""How to reach the user's Redis: plain, TLS with ACL users, or through
Sentinel. One place builds every connection, so the pub/sub upstream, the
stream reader, snapshots and the publish endpoint all agree."""

from __future__ import annotations

import random
import ssl
from typing import Any, cast
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from redis_ws_gateway.config import Settings


def uses_tls(settings: Settings) -> bool:
    return urlparse(settings.redis_url).scheme == "rediss"


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The client TLS context for ``rediss://``: the CA to trust, an optional
    client certificate (for Redis's ``tls-auth-clients``), hostname checks."""
    if not uses_tls(settings):
        return None
    ctx = ssl.create_default_context(cafile=settings.redis_tls_ca_file)
    if settings.redis_tls_cert_file:
        ctx.load_cert_chain(settings.redis_tls_cert_file, settings.redis_tls_key_file)
    if not settings.redis_tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": settings.redis_connect_timeout_seconds,
    }
    u = urlparse(settings.redis_url)
    username = settings.redis_username or u.username
    password = settings.redis_password or u.password
    if username:
        kwargs["username"] = username
    if password:
        kwargs["password"] = password
    if uses_tls(settings):
        kwargs.update(
            ssl=True,
            ssl_ca_certs=settings.redis_tls_ca_file,
            ssl_certfile=settings.redis_tls_cert_file,
            ssl_keyfile=settings.redis_tls_key_file,
            ssl_cert_reqs="required" if settings.redis_tls_verify else "none",
            ssl_check_hostname=settings.redis_tls_verify,
        )
    return kwargs


def sentinel(settings: Settings) -> Sentinel | None:
    if not settings.redis_sentinels:
        return None
    sentinel_kwargs: dict[str, Any] = {
        "socket_connect_timeout": settings.redis_connect_timeout_seconds,
        "socket_timeout": settings.redis_connect_timeout_seconds,
    }
    if settings.redis_sentinel_password:
        sentinel_kwargs["password"] = settings.redis_sentinel_password
    return Sentinel(  # type: ignore[no-untyped-call]
        list(settings.redis_sentinels),
        sentinel_kwargs=sentinel_kwargs,
        **connection_kwargs(settings),
    )


def make_client(settings: Settings, *, single_connection: bool = False) -> aioredis.Redis:
    """A request/response client (streams, snapshots, publish)."""
    if settings.redis_cluster_nodes:
        # Routes each key to the node owning its slot and follows MOVED/ASK.
        nodes = [ClusterNode(host, port) for host, port in settings.redis_cluster_nodes]
        cluster: Any = RedisCluster(startup_nodes=nodes, **connection_kwargs(settings))
        return cast(aioredis.Redis, cluster)
    s = sentinel(settings)
    if s is not None:
        # Re-discovers the master through the sentinels after a failover. Its
        # pool hands a blocking XREAD a connection of its own anyway.
        client: aioredis.Redis = s.master_for(settings.redis_sentinel_master)
        return client
    u = urlparse(settings.redis_url)
    if u.scheme == "unix":
        return aioredis.Redis(
            unix_socket_path=u.path,
            single_connection_client=single_connection,
            **{k: v for k, v in connection_kwargs(settings).items() if not k.startswith("ssl")},
        )
    return aioredis.Redis(
        host=u.hostname or "127.0.0.1",
        port=u.port or 6379,
        single_connection_client=single_connection,
        **connection_kwargs(settings),
    )


class MasterLocator:
    """Where the pub/sub connection should go: the URL's host, the master the
    sentinels name right now, or the next node of a Redis Cluster (classic
    PUBLISH reaches every node of a cluster, so any node serves SUBSCRIBE and
    PSUBSCRIBE; a dead node just means trying the next one)."""

    def __init__(self, settings: Settings) -> None:
        self._sentinel = sentinel(settings)
        self._name = settings.redis_sentinel_master
        self._nodes = list(settings.redis_cluster_nodes)
        # Pods start at different nodes, so a fleet spreads over the cluster.
        self._next = random.randrange(len(self._nodes)) if self._nodes else 0

    @property
    def via_sentinel(self) -> bool:
        return self._sentinel is not None

    @property
    def dynamic(self) -> bool:
        return self._sentinel is not None or bool(self._nodes)

    async def master(self) -> tuple[str, int]:
        if self._nodes:
            node = self._nodes[self._next % len(self._nodes)]
            self._next += 1
            return node
        assert self._sentinel is not None
        host, port = await self._sentinel.discover_master(self._name)
        return str(host), int(port)

    async def close(self) -> None:
        if self._sentinel is not None:
            for s in self._sentinel.sentinels:
                await s.aclose(close_connection_pool=True)


async def close_client(client: aioredis.Redis) -> None:
    """Close a client from make_client with every connection it opened,
    including a Sentinel-managed pool and its connections to the sentinels."""
    if isinstance(client, RedisCluster):
        await client.aclose()
        return
    pool = client.connection_pool
    await client.aclose(close_connection_pool=True)
    manager = getattr(pool, "sentinel_manager", None)
    if manager is not None:
        for s in manager.sentinels:
            await s.aclose(close_connection_pool=True)
