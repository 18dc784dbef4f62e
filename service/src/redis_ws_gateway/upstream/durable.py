"""Durable channels on Redis Streams: live tailing, replay and resume.

A durable channel ``C`` is the stream ``<prefix>C`` (``stream:C`` by
default), one entry per message with the payload in the field ``data``
(``XADD stream:C MAXLEN ~ N * data <payload>``). Its offsets are the stream
entry IDs, which are the same on every pod.

One reader task per pod tails every durable topic that has subscribers with a
single blocking XREAD, and routes entries like pub/sub messages (one frame
per entry, shared by all subscribers). On Redis Cluster a multi-key XREAD
must stay inside one hash slot, so there is one reader per slot in use, each
on a connection to the master that owns the slot (the cluster client follows
MOVED after a failover or a slot migration). A subscriber that resumes from an
offset is first served from history by XRANGE in bounded batches, then
attached to the live topic at the exact moment its replay has reached the
reader's cursor, with no await between that check and the attach: every entry
up to the cursor came from history, every entry after it comes live, so there
is no gap and no duplicate at the switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from redis_ws_gateway.config import DurableRule, ExposedStream, Settings
from redis_ws_gateway.errors import UpstreamUnavailable
from redis_ws_gateway.fanout.hub import Hub, Topic
from redis_ws_gateway.fanout.session import Session
from redis_ws_gateway.security.globmatch import glob_match
from redis_ws_gateway.upstream.redis_conn import close_client, make_client
from redis_ws_gateway.ws import protocol

log = structlog.get_logger("redis_ws_gateway.upstream.durable")

# ClusterError: CLUSTERDOWN, TRYAGAIN, a slot no master covers during a
# failover; RedisClusterException: no startup node answered.
_REDIS_DOWN = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterError,
    RedisClusterException,
    TryAgainError,
    AskError,
)
_BLOCK_MS = 250
# Consecutive failed XREADs of one reader group before the readers' client is
# replaced by a fresh one (about 6 s with the default backoff).
RENEW_READER_AFTER = 6


def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class StreamSpec:
    channel: str
    key: str
    field: str | None  # None: the whole entry as a JSON object
    maxlen: int
    max_age_seconds: float


def id_before(entry: tuple[int, int]) -> tuple[int, int]:
    """The greatest stream ID below ``entry`` (an exclusive lower bound)."""
    ms, seq = entry
    if seq > 0:
        return ms, seq - 1
    return (ms - 1, 2**64 - 1) if ms > 0 else (0, 0)


class ReplayCache:
    """The newest entries of one durable topic, as ready replay frames.

    Invariant: it holds every stream entry with an ID in (floor, cursor],
    where cursor is the topic's live cursor, because the reader appends each
    entry it routes. Clients resuming inside that range are served from
    memory with frames built once, instead of each one reading Redis and
    encoding every entry again (1,000 clients resuming after a pod drain).
    """

    def __init__(self, floor: tuple[int, int], capacity: int) -> None:
        self.floor = floor
        self.capacity = capacity
        self.ids: deque[tuple[int, int]] = deque()
        self.frames: deque[bytes] = deque()
        self.filling = asyncio.Lock()

    def append(self, entry: tuple[int, int], frame: bytes) -> None:
        self.ids.append(entry)
        self.frames.append(frame)
        if len(self.ids) > self.capacity:
            self.floor = self.ids.popleft()
            self.frames.popleft()

    def prepend(self, entries: list[tuple[tuple[int, int], bytes]], floor: tuple[int, int]) -> None:
        """Older entries, oldest first, that end exactly at the current floor."""
        for entry, frame in reversed(entries):
            self.ids.appendleft(entry)
            self.frames.appendleft(frame)
        self.floor = floor

    def after(self, last: tuple[int, int], limit: int) -> list[tuple[tuple[int, int], bytes]]:
        """Up to ``limit`` entries with an ID greater than ``last``."""
        ids = self.ids
        i = len(ids)
        while i > 0 and ids[i - 1] > last:
            i -= 1
        end = min(len(ids), i + limit)
        return [(ids[k], self.frames[k]) for k in range(i, end)]


class Durable:
    def __init__(self, settings: Settings, hub: Hub) -> None:
        self._settings = settings
        self._hub = hub
        self._rules: tuple[DurableRule, ...] = settings.durable
        self._exposed: dict[str, ExposedStream] = {s.channel: s for s in settings.streams}
        self.redis = make_client(settings)
        # XREAD BLOCK holds its connection: it gets one of its own.
        self._reader = make_client(settings, single_connection=True)
        self._closing_readers: set[asyncio.Task[None]] = set()
        self._topics: dict[bytes, tuple[Topic, StreamSpec]] = {}
        self._caches: dict[bytes, ReplayCache] = {}
        self._creating: dict[str, asyncio.Future[Topic]] = {}
        self._cluster = bool(settings.redis_cluster_nodes)
        self._groups: dict[int | None, _ReaderGroup] = {}
        self._started = False
        self._replays = asyncio.Semaphore(settings.replay_concurrency)
        self._stopping = False
        self.replays = 0
        self.replayed_entries = 0
        self.replayed_from_cache = 0
        hub.on_stream_released = self._released

    @property
    def enabled(self) -> bool:
        return bool(self._rules or self._exposed)

    def spec(self, channel: str) -> StreamSpec | None:
        exposed = self._exposed.get(channel)
        if exposed is not None:
            return StreamSpec(channel, exposed.key, exposed.field, 0, 0.0)
        for rule in self._rules:
            if glob_match(rule.pattern, channel):
                return StreamSpec(
                    channel,
                    self._settings.stream_prefix + channel,
                    "data",
                    rule.maxlen,
                    rule.max_age_seconds,
                )
        return None

    @property
    def reader_up(self) -> bool:
        """Every reader reads (true with nothing to read)."""
        return all(group.up for group in self._groups.values())

    def start(self) -> None:
        self._started = True
        for group in list(self._groups.values()):
            for topic, spec in list(group.topics.values()):
                self._watch(topic, spec)

    async def stop(self) -> None:
        self._stopping = True
        tasks = [g.task for g in self._groups.values() if g.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            # redis-py can turn a cancellation inside a read into a connection
            # error, which the loop would survive; the flag and the bound make
            # sure stopping never hangs.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        await close_client(self._reader)
        await close_client(self.redis)
        for task in list(self._closing_readers):
            with contextlib.suppress(Exception):
                await task

    # --- publishing --------------------------------------------------------------

    async def publish(self, spec: StreamSpec, payload: bytes) -> bytes:
        """One XADD with the configured retention; returns the offset."""
        kwargs: dict[str, Any] = {}
        if spec.max_age_seconds:
            # MINID trims by age; the ID is the entry's creation time in ms.
            kwargs["minid"] = str(int((time.time() - spec.max_age_seconds) * 1000))
        elif spec.maxlen:
            kwargs["maxlen"] = spec.maxlen
        entry_id: Any = await self.redis.xadd(
            spec.key, {spec.field or "data": payload}, approximate=True, **kwargs
        )
        return bytes(entry_id)

    # --- subscribing ---------------------------------------------------------------

    async def _topic(self, spec: StreamSpec) -> Topic:
        raw = spec.channel.encode()
        existing = self._hub.streams.get(raw)
        if existing is not None and raw in self._topics:
            return self._hub.durable_topic(spec.channel)
        pending = self._creating.get(spec.channel)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Topic] = asyncio.get_running_loop().create_future()
        self._creating[spec.channel] = fut
        try:
            # The live cursor starts at the newest entry: everything after it
            # will come from the reader, everything up to it from history.
            latest: Any = await self.redis.xrevrange(spec.key, count=1)
            topic = self._hub.durable_topic(spec.channel)
            topic.cursor = latest[0][0] if latest else b"0-0"
            self._topics[raw] = (topic, spec)
            self._watch(topic, spec)
            if self._settings.replay_cache_entries:
                self._caches[raw] = ReplayCache(
                    parse_id(topic.cursor), self._settings.replay_cache_entries
                )
            fut.set_result(topic)
            return topic
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: concurrent waiters re-raise it themselves
            raise
        finally:
            del self._creating[spec.channel]

    def _released(self, topic: Topic) -> None:
        pair = self._topics.pop(topic.name.encode(), None)
        group = self._groups.get(self._slot(pair[1])) if pair is not None else None
        if group is not None:
            group.topics.pop(topic.name.encode(), None)
        self._caches.pop(topic.name.encode(), None)

    async def subscribe(
        self, session: Session, spec: StreamSpec, options: protocol.ChannelOptions | None
    ) -> dict[str, Any]:
        """Replay what the client asked for, then attach it live. Returns the
        subscription state for the ``subscribed`` reply."""
        try:
            topic = await self._topic(spec)
        except _REDIS_DOWN:
            raise UpstreamUnavailable("Redis is unreachable; retry", channel=spec.channel) from None
        if (topic.kind, topic.name) in session.subscriptions:
            return self._describe(topic, 0, True)
        topic.waiters += 1
        try:
            since = options.since if options else None
            snapshot = options.snapshot if options else None
            complete = True
            start: bytes | None = None
            if since is not None:
                complete = await self._retry(lambda: self._history_complete(spec, since))
                start = since.encode() if since != "0" else b"0-0"
            elif snapshot:
                start = await self._retry(
                    lambda: self._snapshot_start(spec, topic.cursor, snapshot)
                )
            replayed = 0
            if start is not None:
                cache = self._caches.get(spec.channel.encode())
                if cache is not None and parse_id(start) >= cache.floor:
                    # All of it is in memory: no Redis read to bound, so no
                    # slot to wait for. Waiting would only make the client
                    # replay more (what is published meanwhile) later.
                    replayed = await self._catch_up(session, topic, spec, start)
                else:
                    async with self._replays:
                        replayed = await self._catch_up(session, topic, spec, start)
                self.replays += 1
                self.replayed_entries += replayed
            else:
                self._hub.attach(session, topic)
            return self._describe(topic, replayed, complete)
        finally:
            topic.waiters -= 1
            if session.closing and (topic.kind, topic.name) not in session.subscriptions:
                self._hub.release_waiter(topic)

    async def _retry(self, call: Any) -> Any:
        """Rides out a short Redis outage (a restart during a replay)."""
        deadline = time.monotonic() + self._settings.subscribe_timeout_seconds * 4
        delay = self._settings.redis_reconnect_min_seconds
        while True:
            try:
                return await call()
            except _REDIS_DOWN:
                if time.monotonic() > deadline:
                    raise UpstreamUnavailable("Redis is unreachable; retry") from None
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self._settings.redis_reconnect_max_seconds)

    async def _history_complete(self, spec: StreamSpec, since: str) -> bool:
        """False when entries after ``since`` may have been trimmed or deleted.

        Trimming only removes the oldest entries, so an offset at or after the
        first entry lost nothing to trims; XDEL is covered by
        ``max-deleted-entry-id``. Before the first entry we can only tell that
        nothing was lost when nothing was ever removed (conservative).
        """
        wanted = parse_id("0-0" if since == "0" else since)
        try:
            info: Any = await self.redis.xinfo_stream(spec.key)
        except ResponseError as exc:
            if isinstance(exc, _REDIS_DOWN):
                raise  # TRYAGAIN/MOVED mid-failover: retried, not "no stream"
            # No such stream: fine for "from the beginning", otherwise the
            # client holds an offset of a stream that is gone.
            return wanted == (0, 0)
        last = parse_id(info.get("last-generated-id") or b"0-0")
        if wanted > last:
            return False  # an offset this stream never issued
        if parse_id(info.get("max-deleted-entry-id") or b"0-0") > wanted:
            return False
        first = info.get("first-entry")
        if first is None:
            return wanted == last  # empty now: complete only if it saw the last one
        if wanted >= parse_id(first[0]):
            return True
        return int(info.get("entries-added", 0)) == int(info.get("length", 0))

    async def _snapshot_start(self, spec: StreamSpec, cursor: bytes, count: int) -> bytes:
        newest: Any = await self.redis.xrevrange(spec.key, max=cursor or "+", count=count)
        if not newest:
            return cursor or b"0-0"
        oldest = parse_id(newest[-1][0])
        # Exclusive start just before the oldest entry of the snapshot.
        if oldest[1] > 0:
            return f"{oldest[0]}-{oldest[1] - 1}".encode()
        return f"{oldest[0] - 1}-{2**64 - 1}".encode() if oldest[0] > 0 else b"0-0"

    async def _catch_up(
        self, session: Session, topic: Topic, spec: StreamSpec, start: bytes
    ) -> int:
        last = start
        replayed = 0
        batch = self._settings.replay_batch
        channel = spec.channel.encode()
        deadline = time.monotonic() + self._settings.subscribe_timeout_seconds
        while parse_id(last) > parse_id(topic.cursor) and time.monotonic() < deadline:
            # The client has seen entries this pod's reader has not read yet
            # (it resumed from another pod): attaching now would deliver them
            # a second time. The reader catches up within one read.
            await asyncio.sleep(0.005)
            if session.closing:
                return replayed
        while True:
            if session.closing:
                return replayed
            target = topic.cursor
            if parse_id(last) >= parse_id(target):
                # No await between this check and the attach: the reader
                # cannot move the cursor in between.
                self._hub.attach(session, topic)
                return replayed
            cache = self._caches.get(channel)
            if cache is not None and parse_id(last) < cache.floor:
                await self._backfill(cache, spec)
            if cache is not None and parse_id(last) >= cache.floor:
                # Served from memory: the frames were built once for everybody.
                cached = cache.after(parse_id(last), batch)
                session.send_replays([frame for _, frame in cached])
                if cached:
                    replayed += len(cached)
                    self.replayed_from_cache += len(cached)
                    newest = cached[-1][0]
                    last = f"{newest[0]}-{newest[1]}".encode()
                await session.wait_writable()
                await asyncio.sleep(0)  # a turn for live traffic between batches
                continue
            hi = target
            if cache is not None:
                # Only what the cache cannot serve comes from Redis.
                floor = cache.floor
                hi = f"{floor[0]}-{floor[1]}".encode()
            entries: Any = await self._retry(
                lambda lo=b"(" + last, hi=hi: self.redis.xrange(
                    spec.key, min=lo, max=hi, count=batch
                )
            )
            if not entries:
                last = hi
                continue
            session.send_replays(
                [
                    _replay_frame(channel, entry_id, _payload(fields, spec.field))
                    for entry_id, fields in entries
                ]
            )
            replayed += len(entries)
            last = entries[-1][0]
            # Let the socket drain before reading more history, so a large
            # replay neither fills the buffer nor starves live traffic.
            await session.wait_writable()

    async def _backfill(self, cache: ReplayCache, spec: StreamSpec) -> None:
        """Extend the cache backwards from its floor, as far as it has room,
        so that the clients resuming after a drain share one read."""
        async with cache.filling:
            room = cache.capacity - len(cache.ids)
            floor = cache.floor
            if room <= 0 or floor == (0, 0):
                return
            older: Any = await self._retry(
                lambda: self.redis.xrevrange(spec.key, max=f"{floor[0]}-{floor[1]}", count=room)
            )
            if cache.floor != floor:
                return  # the reader filled the cache meanwhile: the range moved
            channel = spec.channel.encode()
            entries = [
                (parse_id(entry_id), _replay_frame(channel, entry_id, _payload(fields, spec.field)))
                for entry_id, fields in reversed(older)
            ]
            # Fewer than asked: the stream starts there, the cache holds all of it.
            new_floor = id_before(entries[0][0]) if len(entries) == room else (0, 0)
            if not entries:
                new_floor = (0, 0)
            cache.prepend(entries, new_floor)

    def _describe(self, topic: Topic, replayed: int, complete: bool) -> dict[str, Any]:
        out = topic.describe()
        out["durable"] = True
        out["offset"] = topic.cursor.decode()
        out["replayed"] = replayed
        out["complete"] = complete
        return out

    # --- the live reader -------------------------------------------------------------

    def _slot(self, spec: StreamSpec) -> int | None:
        return key_slot(spec.key.encode()) if self._cluster else None

    def _group(self, spec: StreamSpec) -> _ReaderGroup:
        slot = self._slot(spec)
        group = self._groups.get(slot)
        if group is None:
            group = self._groups[slot] = _ReaderGroup(slot)
        return group

    def _watch(self, topic: Topic, spec: StreamSpec) -> None:
        group = self._group(spec)
        group.topics[topic.name.encode()] = (topic, spec)
        if self._started and (group.task is None or group.task.done()):
            name = "durable-reader" if group.slot is None else f"durable-reader-{group.slot}"
            group.task = asyncio.create_task(self._read_group(group), name=name)

    def _renew_reader(self, failed: aioredis.Redis, exc: Exception, failures: int) -> None:
        """A fresh client for the readers, from the configured addresses.

        A cluster client's view of the nodes can stay broken after a node
        dies (a fresh-clone test run once saw every XREAD fail for 30 s after
        the replica had taken over); a new client starts from the seeds. Other
        groups still blocked on the old one fail once and retry on the new.
        """
        if failed is not self._reader or self._stopping:
            return  # another group renewed it already
        log.warning(
            "durable_reader_renewed", failures=failures, error=str(exc) or type(exc).__name__
        )
        self._reader = make_client(self._settings, single_connection=True)
        task = asyncio.get_running_loop().create_task(close_client(failed))
        self._closing_readers.add(task)
        task.add_done_callback(self._closing_readers.discard)

    async def _read_group(self, group: _ReaderGroup) -> None:
        delay = self._settings.redis_reconnect_min_seconds
        where = {} if group.slot is None else {"slot": group.slot}
        while not self._stopping:
            streams: Any = {spec.key: topic.cursor for topic, spec in group.topics.values()}
            if not streams:
                # Nobody reads this slot any more. No await since the check,
                # so a topic added from now on finds no group and starts one.
                if self._groups.get(group.slot) is group:
                    del self._groups[group.slot]
                return
            reader = self._reader
            try:
                reply: Any = await reader.xread(streams, count=1000, block=_BLOCK_MS)
            except Exception as exc:
                # Anything: a failover ends a blocked XREAD with "UNBLOCKED
                # ... master -> replica", a migration with MOVED. The reader
                # must outlive every error; the next XREAD goes where the
                # cluster client now routes it.
                if group.up:
                    log.warning(
                        "durable_reader_down", error=str(exc) or type(exc).__name__, **where
                    )
                group.up = False
                group.failures += 1
                if group.failures % RENEW_READER_AFTER == 0:
                    self._renew_reader(reader, exc, group.failures)
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self._settings.redis_reconnect_max_seconds)
                continue
            if not group.up:
                log.info("durable_reader_up", streams=len(streams), **where)
            group.up = True
            group.failures = 0
            delay = self._settings.redis_reconnect_min_seconds
            if not reply:
                continue
            self._hub.on_batch_start()
            by_key = {spec.key.encode(): (topic, spec) for topic, spec in group.topics.values()}
            for key, entries in reply:
                pair = by_key.get(key)
                if pair is None:
                    continue
                topic, spec = pair
                cache = self._caches.get(spec.channel.encode())
                channel = spec.channel.encode()
                for entry_id, fields in entries:
                    # Entries at or before the cursor were already routed (a
                    # topic re-created while this read was in flight).
                    entry = parse_id(entry_id)
                    if entry <= parse_id(topic.cursor):
                        continue
                    payload = _payload(fields, spec.field)
                    self._hub.on_stream_entry(topic, entry_id, payload)
                    if cache is not None:
                        cache.append(entry, _replay_frame(channel, entry_id, payload))
            self._hub.on_batch_end()


class _ReaderGroup:
    """The durable topics one blocking XREAD tails: all of them, or on a
    Redis Cluster those whose stream key is in ``slot``."""

    __slots__ = ("failures", "slot", "task", "topics", "up")

    def __init__(self, slot: int | None) -> None:
        self.slot = slot
        self.topics: dict[bytes, tuple[Topic, StreamSpec]] = {}
        self.task: asyncio.Task[None] | None = None
        self.up = False
        self.failures = 0  # consecutive failed XREADs


def _replay_frame(channel: bytes, entry_id: bytes, payload: bytes) -> bytes:
    body, is_b64 = protocol.payload_json(payload)
    return protocol.text_frame(protocol.replay_message(channel, entry_id, body, is_b64))


def _payload(fields: dict[bytes, bytes], field: str | None) -> bytes:
    if field is not None:
        value = fields.get(field.encode())
        if value is not None:
            return value
    # An exposed stream without a payload field: the entry as a JSON object.
    return orjson.dumps(
        {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in fields.items()}
    )
