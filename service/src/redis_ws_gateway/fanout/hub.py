"""Who is subscribed to what, and the fan-out of each Redis message.

A ``Topic`` is one upstream subscription (an exact channel or a pattern) with
every session subscribed to it. Its ``seq`` counts messages per topic, so the
frame of a message is the same bytes for every recipient and is built once.
The first session makes the upstream (P)SUBSCRIBE; the last one leaving
starts a linger timer, and only when it runs out is the upstream
subscription released, so a UI flapping between screens does not churn Redis.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Container, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from opentelemetry.trace import Tracer

from redis_ws_gateway.config import ChannelPolicy, PayloadValidation, Policy
from redis_ws_gateway.fanout import writer
from redis_ws_gateway.fanout.session import Session
from redis_ws_gateway.fanout.writer import Recipients
from redis_ws_gateway.observability.tracing import link_from_traceparent
from redis_ws_gateway.security.auth import Principal
from redis_ws_gateway.security.globmatch import glob_match
from redis_ws_gateway.upstream.pubsub import EXACT_MESSAGES, Kind, SubKind, Upstream, route
from redis_ws_gateway.ws import protocol
from redis_ws_wire import is_pattern

if TYPE_CHECKING:
    from redis_ws_gateway.upstream.sharded import ShardedUpstream

log = structlog.get_logger("redis_ws_gateway.fanout.hub")

_POLICY_CACHE_MAX = 10_000
# A pattern topic's routes, one per channel it matched (Topic.routes). A
# pattern such as market:* may match channels without end, so the dict is
# emptied when it reaches this size rather than grow with them; a refill
# costs one data_prefix and one policy lookup per channel.
_ROUTES_MAX = 1024

# What a message on a channel needs of its topic besides the payload: its
# frame's prefix, its conflation key and its slow-consumer policy.
Route = tuple[bytes, tuple["Topic", bytes], Policy]
# A pattern topic's sessions whose principals have the same rights: one read
# decision holds for all of them (Topic.groups).
Group = dict[Session, None]


def rights(principal: Any) -> object:
    """What a principal's read decisions depend on: its ACL, roles and
    narrow list (security/auth.py: Principal.may_read), so principals that
    share them share every decision. Any other kind of principal stands for
    itself."""
    if type(principal) is Principal:
        return (principal.acl, principal.roles, principal.narrow)
    return principal


class _EveryChannel:
    """Every channel counts as repeated: nothing is written ahead of the
    batch (reads that did not say which channels repeat, e.g. streams)."""

    def __contains__(self, name: object) -> bool:
        return True


EVERY_CHANNEL: Container[bytes] = _EveryChannel()


class Topic(Recipients[Session]):
    __slots__ = (
        "cursor",
        "durable",
        "epoch",
        "groups",
        "key",
        "kind",
        "lingering",
        "live",
        "name",
        "needs_notice",
        "policy",
        "prefix",
        "readers",
        "ready",
        "routes",
        "seq",
        "sessions",
        "sharded",
        "waiters",
        "zipped",
    )

    def __init__(self, kind: Kind, name: str) -> None:
        super().__init__()
        self.kind: Kind = kind
        self.name = name
        self.sessions: dict[Session, None] = {}
        self.seq = 0
        self.epoch = ""
        self.live = False
        self.needs_notice = False
        self.waiters = 0
        self.lingering: asyncio.TimerHandle | None = None
        self.ready: asyncio.Future[bool] | None = None
        # Durable topics: fed by the stream reader, not by Redis pub/sub.
        self.durable = False
        self.cursor = b""
        # Sharded: an exact channel read with SSUBSCRIBE from its slot's master.
        self.sharded = False
        # The data-frame prefix of an exact channel never changes: encode once.
        self.prefix = protocol.data_prefix(name.encode(), None) if kind == "channel" else b""
        # An exact channel's conflation key and policy are the same for each
        # message: made once (the policy when the hub first needs it; the
        # policies are settings, fixed while the gateway runs).
        self.key = (self, name.encode())  # a cycle, freed by the collector
        self.policy: Policy | None = None
        # A pattern's per-channel prefix, key and policy, bounded (_ROUTES_MAX).
        self.routes: dict[bytes, Route] = {}
        # A pattern's sessions by their principals' rights, and per channel
        # the groups that may read it (Hub._readers), bounded like routes.
        # A group's decision holds while it exists, so sessions come and go
        # from groups without a new decision; only a new group (rights not
        # yet decided) or a gone one empties ``readers``.
        self.groups: dict[object, Group] = {}
        self.readers: dict[bytes, tuple[Group, ...]] = {}
        # The subscribers that negotiated permessage-deflate, apart: they get
        # the compressed frame (built once for all of them), the others (this
        # Recipients itself) the plain one. None while there are none, so a
        # topic without them costs one check per message.
        self.zipped: Recipients[Session] | None = None

    # Recipients, split once more: deflate clients go to ``zipped``.

    def add(self, client: Session) -> None:
        if not client.deflate:
            super().add(client)
            return
        zipped = self.zipped
        if zipped is None:
            zipped = self.zipped = Recipients()
        zipped.add(client)

    def remove(self, client: Session) -> None:
        if not client.deflate:
            super().remove(client)
            return
        zipped = self.zipped
        if zipped is not None:
            zipped.remove(client)
            if not zipped.direct and not zipped.indirect:
                self.zipped = None

    def set_direct(self, client: Session, on: bool) -> None:
        if not client.deflate:
            super().set_direct(client, on)
        elif self.zipped is not None:
            self.zipped.set_direct(client, on)

    def unsettled(self, client: Session) -> tuple[int, int]:
        if not client.deflate:
            return super().unsettled(client)
        return (0, 0) if self.zipped is None else self.zipped.unsettled(client)

    def join(self, session: Session) -> None:
        if session in self.sessions:
            return  # a second join must not restart its counters
        self.sessions[session] = None
        self.add(session)
        if self.kind == "pattern":
            self._group(session, session.principal)

    def leave(self, session: Session) -> None:
        if session in self.sessions:
            del self.sessions[session]
            self.remove(session)
            if self.kind == "pattern":
                self._ungroup(session, session.principal)

    def rights_changed(self, client: Session, old: Any) -> None:
        if self.kind == "pattern" and client in self.sessions:
            self._ungroup(client, old)
            self._group(client, client.principal)

    def _group(self, session: Session, principal: Any) -> None:
        key = rights(principal)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = {}
            self.readers.clear()
        group[session] = None

    def _ungroup(self, session: Session, principal: Any) -> None:
        key = rights(principal)
        group = self.groups.get(key)
        if group is None or session not in group:
            # Not where its principal says: drop it from whichever group
            # holds it, and every decision with it.
            found = next(((k, g) for k, g in self.groups.items() if session in g), None)
            if found is None:
                return
            key, group = found
            self.readers.clear()
        del group[session]
        if not group:
            del self.groups[key]
            self.readers.clear()

    def describe(self, with_state: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {self.kind: self.name}
        if with_state:
            out["epoch"] = self.epoch
            out["seq"] = self.seq
            out["live"] = self.live
        return out


class Hub:
    def __init__(
        self,
        *,
        linger_seconds: float,
        policies: Iterable[ChannelPolicy],
        default_policy: Policy,
        slow_consumer_grace: float,
        compression_min_bytes: int = 512,
        compression_level: int = 1,
        payload_validation: PayloadValidation = "json",
        sharded_patterns: tuple[str, ...] = (),
        tracer: Tracer | None = None,
        trace_sample_rate: float = 0.01,
        observe_processing: Callable[[float], None] | None = None,
    ) -> None:
        # An attribute: the hot path looks it up on self, and tests count calls.
        self.write_each = writer.write_each
        # Data messages this long or longer are compressed (once per topic)
        # for deflate clients; shorter ones go to them uncompressed.
        self.compression_min_bytes = compression_min_bytes
        self.compression_level = compression_level
        self.compressed = 0  # messages compressed (once each, for all)
        # How a payload becomes the frame's "data" (PAYLOAD_VALIDATION).
        self.payload_json = (
            protocol.payload_json_trusted if payload_validation == "off" else protocol.payload_json
        )
        # Bound by connect_upstreams(): the upstreams take the hub in their constructors.
        self.upstream: Upstream | None = None
        self.sharded: ShardedUpstream | None = None
        self.sharded_patterns = sharded_patterns
        self.channels: dict[bytes, Topic] = {}
        self.patterns: dict[bytes, Topic] = {}
        self.streams: dict[bytes, Topic] = {}
        self.on_stream_released: Callable[[Topic], None] | None = None
        self._linger = linger_seconds
        self._policies = tuple(policies)
        self._default_policy = default_policy
        self._policy_cache: dict[bytes, Policy] = {}
        self._grace = slow_consumer_grace
        self._dirty: list[Session] = []
        self._repeated: Container[bytes] = EVERY_CHANNEL
        self._routed = False
        self._lagging: set[Session] = set()
        self._drain_task: asyncio.Task[None] | None = None
        self._boot = os.urandom(3).hex()
        self._epochs = 0
        self.messages_in = 0
        self.last_message_at = time.monotonic()
        self.observe_processing = observe_processing
        self.tracer = tracer
        self.trace_sample_rate = trace_sample_rate
        self._batch_started = time.perf_counter()
        # A run: consecutive messages of one repeated channel in a read, held
        # here instead of in each subscriber's batch (_end_run).
        self._run: Topic | None = None
        self._run_frames: list[bytes] = []
        # The same run's frames for its deflate subscribers, if it has any.
        self._run_zframes: list[bytes] = []

    def connect_upstreams(self, upstream: Upstream, sharded: ShardedUpstream | None = None) -> None:
        """The hub subscribes through its upstreams and they deliver to it, so
        one side is bound after both exist: this is that binding, made once
        before anything runs."""
        self.upstream = upstream
        self.sharded = sharded

    # --- bookkeeping ----------------------------------------------------------

    def _next_epoch(self) -> str:
        self._epochs += 1
        return f"{self._boot}-{self._epochs}"

    def _table(self, kind: Kind) -> dict[bytes, Topic]:
        return self.channels if kind == "channel" else self.patterns

    def topic_key(self, name: str) -> tuple[Kind, str]:
        return ("pattern" if is_pattern(name) else "channel"), name

    def policy_for(self, channel: bytes) -> Policy:
        cached = self._policy_cache.get(channel)
        if cached is not None:
            return cached
        name = channel.decode("utf-8", "surrogateescape")
        policy: Policy = next(
            (p.policy for p in self._policies if glob_match(p.pattern, name)),
            self._default_policy,
        )
        if len(self._policy_cache) >= _POLICY_CACHE_MAX:
            self._policy_cache.clear()
        self._policy_cache[channel] = policy
        return policy

    def is_sharded(self, channel: str) -> bool:
        """Read with SSUBSCRIBE (and published with SPUBLISH) on the cluster."""
        return self.sharded is not None and any(
            glob_match(p, channel) for p in self.sharded_patterns
        )

    def upstream_counts(self) -> tuple[int, int]:
        return len(self.channels), len(self.patterns)

    # --- control path -----------------------------------------------------------

    async def subscribe(
        self, session: Session, names: Iterable[str], timeout: float
    ) -> list[dict[str, Any]]:
        """Subscribe ``session`` to every name; returns the subscription states.

        Returns once each upstream subscription is confirmed by Redis (or the
        timeout passes, or Redis is unreachable: then ``live`` is false and the
        session gets a ``resubscribed`` notice once it is live).
        """
        keys = [self.topic_key(n) for n in names]
        fresh: list[Topic] = []
        for kind, name in keys:
            if (kind, name) in session.subscriptions:
                continue
            topic = self._get_or_create(kind, name)
            topic.waiters += 1
            fresh.append(topic)
        pending = [t.ready for t in fresh if not t.live and t.ready is not None]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        out: list[dict[str, Any]] = []
        for topic in fresh:
            topic.waiters -= 1
        if session.closing:
            for topic in fresh:
                self._maybe_linger(topic)
            return out
        for topic in fresh:
            self._attach(session, topic)
            if not topic.live:
                topic.needs_notice = True
        for key in keys:
            held = self._subscribed(session, key)
            if held is not None:
                out.append(held.describe())
        return out

    @staticmethod
    def _subscribed(session: Session, key: tuple[str, str]) -> Topic | None:
        # The session keeps its topics as what it asks of them (Recipients);
        # the hub is the one that puts them there, always as Topics.
        topic = session.subscriptions.get(key)
        return topic if isinstance(topic, Topic) else None

    def _get_or_create(self, kind: Kind, name: str) -> Topic:
        table = self._table(kind)
        raw = name.encode()
        topic = table.get(raw)
        if topic is None:
            topic = Topic(kind, name)
            topic.sharded = kind == "channel" and self.is_sharded(name)
            table[raw] = topic
            self._request_upstream(topic)
        elif topic.lingering is not None:
            topic.lingering.cancel()
            topic.lingering = None
        return topic

    def _request_upstream(self, topic: Topic) -> None:
        topic.ready = asyncio.get_running_loop().create_future()
        raw = topic.name.encode()
        if topic.sharded:
            assert self.sharded is not None
            sent = self.sharded.subscribe(raw)
        else:
            sent = self.upstream is not None and self.upstream.subscribe(topic.kind, raw)
        if not sent:
            topic.ready.set_result(False)

    def expect_confirmation(self, channel: bytes) -> None:
        """A sharded channel is being subscribed again: new subscribers wait
        for the confirmation instead of starting out not live."""
        topic = self.channels.get(channel)
        if topic is not None and (topic.ready is None or topic.ready.done()):
            topic.ready = asyncio.get_running_loop().create_future()

    def durable_topic(self, channel: str) -> Topic:
        raw = channel.encode()
        topic = self.streams.get(raw)
        if topic is None:
            topic = Topic("channel", channel)
            topic.durable = True
            topic.live = True
            topic.epoch = self._next_epoch()
            self.streams[raw] = topic
        elif topic.lingering is not None:
            topic.lingering.cancel()
            topic.lingering = None
        return topic

    def attach(self, session: Session, topic: Topic) -> None:
        self._attach(session, topic)

    def release_waiter(self, topic: Topic) -> None:
        self._maybe_linger(topic)

    def on_stream_entry(self, topic: Topic, entry_id: bytes, payload: bytes) -> None:
        """One live stream entry, routed like a pub/sub message plus its offset."""
        if self._run is not None:
            self._end_run(write=False)
        topic.cursor = entry_id
        self.messages_in += 1
        self.last_message_at = time.monotonic()
        if not topic.sessions:
            return
        topic.seq += 1
        self._routed = True
        # Always validated, as their replays are: an entry's frame carries
        # the offset a client resumes from, and an unparsed payload could
        # add keys that a parser takes for the gateway's (PAYLOAD_VALIDATION).
        body, is_b64 = protocol.payload_json(payload)
        message = protocol.data_message(topic.prefix, topic.seq, body, is_b64, offset=entry_id)
        frame = protocol.text_frame(message)
        policy: Policy = "disconnect"  # durable entries are never dropped silently
        key = (topic, b"")
        if topic.zipped is None:
            for session in topic.sessions:
                session.deliver(frame, key, policy)
            return
        zframe = self._zframe(message, frame)
        for session in topic.sessions:
            session.deliver(zframe if session.deflate else frame, key, policy)

    def _attach(self, session: Session, topic: Topic) -> None:
        topic.join(session)
        session.subscriptions[(topic.kind, topic.name)] = topic
        if topic.kind == "pattern":
            session.wildcards += 1

    def unsubscribe(self, session: Session, names: Iterable[str] | None) -> list[str]:
        keys = list(session.subscriptions) if names is None else [self.topic_key(n) for n in names]
        removed: list[str] = []
        for key in keys:
            topic = self._subscribed(session, key)
            if topic is None:
                continue
            del session.subscriptions[key]
            if topic.kind == "pattern":
                session.wildcards -= 1
            topic.leave(session)
            self._maybe_linger(topic)
            removed.append(topic.name)
        return removed

    def remove_session(self, session: Session) -> None:
        self.unsubscribe(session, None)
        self._lagging.discard(session)

    def _maybe_linger(self, topic: Topic) -> None:
        if topic.sessions or topic.waiters or topic.lingering is not None:
            return
        loop = asyncio.get_running_loop()
        if self._linger <= 0:
            self._release(topic)
        else:
            topic.lingering = loop.call_later(self._linger, self._release, topic)

    def _release(self, topic: Topic) -> None:
        topic.lingering = None
        if topic.sessions or topic.waiters:
            return
        if topic.durable:
            raw = topic.name.encode()
            if self.streams.get(raw) is topic:
                del self.streams[raw]
                if self.on_stream_released is not None:
                    self.on_stream_released(topic)
            return
        table = self._table(topic.kind)
        raw = topic.name.encode()
        if table.get(raw) is topic:
            del table[raw]
            if topic.sharded:
                if self.sharded is not None:
                    self.sharded.unsubscribe(raw)
            elif self.upstream is not None:
                self.upstream.unsubscribe(topic.kind, raw)
            log.debug("upstream_released", **{topic.kind: topic.name})

    # --- upstream events (called synchronously from the Redis protocol) -------

    def on_confirmed(self, kind: SubKind, name: bytes, error: str | None) -> None:
        if self._run is not None:
            self._end_run(write=False)  # its frames precede any notice queued here
        topic = (self.patterns if kind == "pattern" else self.channels).get(name)
        if topic is None or topic.sharded != (kind == "shard"):
            return
        if error is not None:
            log.error("upstream_subscribe_refused", **{kind: topic.name}, error=error)
            if topic.ready is not None and not topic.ready.done():
                topic.ready.set_result(False)
            return
        if topic.live:
            return
        topic.live = True
        topic.epoch = self._next_epoch()
        topic.seq = 0
        if topic.ready is not None and not topic.ready.done():
            topic.ready.set_result(True)
        if topic.needs_notice:
            topic.needs_notice = False
            # Queued now, in line with the data of this read: the notice must
            # precede the new epoch's first frames, which follow in the read.
            notice = protocol.resubscribed_message([topic.describe()])
            for session in topic.sessions:
                session.queue_control(notice)

    def on_upstream_up(self) -> None:
        assert self.upstream is not None
        for table in (self.channels, self.patterns):
            for topic in table.values():
                if topic.sharded:
                    continue
                if topic.ready is None or topic.ready.done():
                    topic.ready = asyncio.get_running_loop().create_future()
                self.upstream.subscribe(topic.kind, topic.name.encode())

    def on_upstream_down(self) -> None:
        self.topics_lost(
            t for table in (self.channels, self.patterns) for t in table.values() if not t.sharded
        )

    def on_shard_lost(self, name: bytes) -> None:
        """Not for this connection: the classic one never holds shard channels."""

    def shard_channels_lost(self, names: Iterable[bytes]) -> None:
        topics = (self.channels.get(n) for n in names)
        self.topics_lost(t for t in topics if t is not None and t.sharded and t.live)

    def topics_lost(self, topics: Iterable[Topic]) -> None:
        """Their upstream subscription is gone: tell every subscriber, once."""
        if self._run is not None:
            self._end_run(write=False)
        lost: dict[Session, list[dict[str, Any]]] = {}
        for topic in topics:
            topic.live = False
            if topic.ready is not None and not topic.ready.done():
                topic.ready.set_result(False)
            if topic.sessions:
                topic.needs_notice = True
                brief = topic.describe(with_state=False)
                for session in topic.sessions:
                    lost.setdefault(session, []).append(brief)
        for session, subs in lost.items():
            session.send_control(protocol.upstream_lost_message(subs))
        if lost:
            log.warning("clients_notified_upstream_lost", sessions=len(lost))

    def on_read(self, replies: list[Any], control: Callable[[Any], None]) -> None:
        """The replies of one upstream read (UpstreamListener.on_read)."""
        repeated: set[bytes] = set()
        if len(replies) > 1:
            # Which exact channels come more than once in the read, before
            # the first is routed: a channel's only message of the read is
            # written at once, a repeated channel's messages are joined
            # into one write per client (a run).
            seen: set[bytes] = set()
            for reply in replies:
                if type(reply) is list and len(reply) >= 3 and reply[0] in EXACT_MESSAGES:
                    name = reply[1]
                    if name in seen:
                        repeated.add(name)
                    else:
                        seen.add(name)
        self.on_batch_start(repeated)
        before = self.messages_in
        try:
            route(replies, self.on_message, control)
        finally:
            # Once per read, not per message: only the seconds-since gauge
            # (metrics.py) reads it.
            if self.messages_in != before:
                self.last_message_at = time.monotonic()
            try:
                self.on_batch_end()
            except Exception:
                log.exception("upstream_batch_not_written")

    def on_batch_start(self, repeated: Container[bytes] = EVERY_CHANNEL) -> None:
        """Before the messages of one read (or of one stream read) are
        routed; ``repeated``: the exact channels with more than one of them."""
        self._batch_started = time.perf_counter()
        # A channel with one message in this read can have it written to
        # each direct session at once: there is nothing to join it with.
        self._repeated = repeated

    def on_message(self, channel: bytes, pattern: bytes | None, payload: bytes) -> None:
        self.messages_in += 1
        if pattern is None:
            topic = self.channels.get(channel)
            if topic is None or not topic.sessions:
                return
            prefix = topic.prefix
            key = topic.key
            policy = topic.policy
            if policy is None:
                policy = topic.policy = self.policy_for(channel)
        else:
            topic = self.patterns.get(pattern)
            if topic is None or not topic.sessions:
                return
            entry = topic.routes.get(channel)
            if entry is None:
                entry = self._route(topic, channel, pattern)
            prefix, key, policy = entry
        topic.seq += 1
        self._routed = True
        body, is_b64 = self.payload_json(payload)
        message = protocol.data_message(prefix, topic.seq, body, is_b64)
        frame = protocol.text_frame(message)
        zipped = topic.zipped
        # For deflate subscribers: compressed once here, for all of them.
        zframe = frame if zipped is None else self._zframe(message, frame)
        if self.tracer is not None and b'"traceparent"' in payload:
            self._trace_delivery(channel, pattern, payload, len(topic.sessions))
        run = self._run
        if run is not None:
            if run is topic and pattern is None:
                self._run_frames.append(frame)
                if zipped is not None:
                    self._run_zframes.append(zframe)
                return
            self._end_run(write=False)
        if pattern is None and channel in self._repeated:
            # The first of this channel's messages in the read: the run it
            # starts ends at the next other message or notice, or with the
            # read.
            self._run = topic
            self._run_frames = [frame]
            # Reset either way: a run's compressed frames must never be an
            # earlier run's.
            self._run_zframes = [zframe] if zipped is not None else []
            return
        if pattern is None:
            if not self._dirty:
                # No subscriber holds a frame routed earlier in this read
                # and no later message of the read joins this one: every
                # direct subscriber gets it now, from one write_each call,
                # with no Python per recipient (writer.Recipients).
                topic.write(self.write_each, frame, (frame,), key, policy)
                if zipped is not None:
                    zipped.write(self.write_each, zframe, (zframe,), key, policy)
            else:
                # Some session holds a frame routed earlier in this read:
                # this one goes behind it, into every subscriber's batch.
                self._to_batches(
                    topic, (frame,), key, policy, None if zipped is None else (zframe,)
                )
        else:
            readers = topic.readers.get(channel)
            if readers is None:
                readers = self._readers(topic, channel)
            if zipped is None:
                for group in readers:
                    for session in group:
                        session.deliver(frame, key, policy)
                return
            for group in readers:
                for session in group:
                    session.deliver(zframe if session.deflate else frame, key, policy)

    def _route(self, topic: Topic, channel: bytes, pattern: bytes) -> Route:
        routes = topic.routes
        if len(routes) >= _ROUTES_MAX:
            routes.clear()
        entry = routes[channel] = (
            protocol.data_prefix(channel, pattern),
            (topic, channel),
            self.policy_for(channel),
        )
        return entry

    @staticmethod
    def _readers(topic: Topic, channel: bytes) -> tuple[Group, ...]:
        """The groups of ``topic``'s sessions that may read ``channel``,
        decided once per group (Topic.groups) and kept until the groups
        change. Second wall: a pattern may match channels the role may not
        read (security/acl.py)."""
        name = channel.decode("utf-8", "surrogateescape")
        readers = topic.readers
        if len(readers) >= _ROUTES_MAX:
            readers.clear()
        allowed = readers[channel] = tuple(
            group for group in topic.groups.values() if next(iter(group)).principal.may_read(name)
        )
        return allowed

    def _zframe(self, message: bytes, frame: bytes) -> bytes:
        """The frame of ``message`` for deflate clients: compressed when it
        is long enough to be worth it, else ``frame`` (uncompressed)."""
        if len(message) < self.compression_min_bytes:
            return frame
        self.compressed += 1
        return protocol.deflate_frame(message, self.compression_level)

    def _trace_delivery(
        self, channel: bytes, pattern: bytes | None, payload: bytes, recipients: int
    ) -> None:
        """A span linked to the publisher's trace, for a sample of messages."""
        if random.random() >= self.trace_sample_rate or self.tracer is None:
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        link = link_from_traceparent(obj.get("traceparent") if isinstance(obj, dict) else None)
        if link is None:
            return
        attrs: dict[str, str | int] = {
            "messaging.system": "redis",
            "messaging.destination.name": channel.decode("utf-8", "replace"),
            "redis_ws_gateway.recipients": recipients,
        }
        if pattern is not None:
            attrs["redis_ws_gateway.pattern"] = pattern.decode("utf-8", "replace")
        self.tracer.start_span("deliver", links=[link], attributes=attrs).end()

    def _end_run(self, write: bool) -> None:
        """The run's frames to its topic's subscribers. ``write`` (the end of
        the read, with no session holding a frame from earlier in it): joined
        into one write_each call for the direct ones. Else into each
        subscriber's batch, so a client still gets one write per read."""
        topic = self._run
        assert topic is not None
        frames = self._run_frames
        self._run = None
        self._run_frames = []
        key = topic.key
        # A run starts in on_message, which has looked the policy up by then.
        policy = topic.policy
        assert policy is not None
        zipped = topic.zipped
        zframes: list[bytes] | None = None
        if zipped is not None:
            zframes = self._run_zframes
            self._run_zframes = []
            if len(zframes) != len(frames):
                zframes = frames  # deflate clients joined mid-run: plain frames suit them
        if write:
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            topic.write(self.write_each, data, frames, key, policy)
            if zipped is not None and zframes is not None:
                zdata = zframes[0] if len(zframes) == 1 else b"".join(zframes)
                zipped.write(self.write_each, zdata, zframes, key, policy)
        else:
            self._to_batches(topic, frames, key, policy, zframes)

    def _to_batches(
        self,
        topic: Topic,
        frames: Sequence[bytes],
        key: tuple[Topic, bytes],
        policy: Policy,
        zframes: Sequence[bytes] | None = None,
    ) -> None:
        """``frames`` into each subscriber's batch, behind what it holds from
        earlier in the read (on_batch_end writes each batch at once);
        Session.deliver inlined but for lagging subscribers, which get each
        frame through their policy after the others. ``zframes``: the same
        for deflate subscribers, when the topic has any."""
        dirty = self._dirty
        lagging: list[Session] = []
        if zframes is None:
            for session in topic.sessions:
                if session.lagging:
                    lagging.append(session)
                    continue
                batch = session.batch
                if not batch:
                    dirty.append(session)
                batch.extend(frames)
        else:
            for session in topic.sessions:
                if session.lagging:
                    lagging.append(session)
                    continue
                batch = session.batch
                if not batch:
                    dirty.append(session)
                batch.extend(zframes if session.deflate else frames)
        for session in lagging:
            for frame in zframes if zframes is not None and session.deflate else frames:
                session.deliver(frame, key, policy)

    def on_batch_end(self) -> None:
        if self._run is not None:
            self._end_run(write=not self._dirty)
        dirty = self._dirty
        if dirty:
            # Through the session's own flush and write, the one path with
            # the checks that keep a closed client's socket from raising
            # into the Redis reader (W2 showed no cost for the calls:
            # docs/BENCHMARKS.md, "A/B").
            for session in dirty:
                session.flush()
            dirty.clear()
        if self._routed:
            self._routed = False
            if self.observe_processing is not None:
                self.observe_processing(time.perf_counter() - self._batch_started)

    # --- session callbacks -------------------------------------------------------

    def mark_dirty(self, session: Session) -> None:
        self._dirty.append(session)

    def mark_lagging(self, session: Session) -> None:
        self._lagging.add(session)
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.get_running_loop().create_task(self._drain_loop())

    def writable(self, session: Session) -> None:
        """The transport's buffer fell to half the high-water mark
        (resume_writing): write the backlog out now, chunk by chunk, until it
        is empty or the transport pushes back again."""
        if session not in self._lagging:
            return
        now = time.monotonic()
        while True:
            if session.drain(now, self._grace):
                self._lagging.discard(session)
                return
            if session.held or session.closing or not session.backlog:
                return
            if session.transport.get_write_buffer_size() > session.high_water // 2:
                return

    async def _drain_loop(self) -> None:
        # resume_writing() (writable above) drains a session as soon as its
        # socket takes bytes again. This loop is the fallback: held sessions
        # (snapshots), the lagging-too-long check, and backlogs left without
        # the transport pausing.
        while self._lagging:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            for session in list(self._lagging):
                if session.drain(now, self._grace):
                    self._lagging.discard(session)

    def lagging_count(self) -> int:
        return len(self._lagging)

    def stats(self) -> dict[str, Any]:
        channels, patterns = self.upstream_counts()
        return {
            "upstream_channels": channels,
            "upstream_patterns": patterns,
            "lagging_sessions": len(self._lagging),
            "messages_in": self.messages_in,
        }
