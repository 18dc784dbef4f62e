"""A pattern topic's per-channel state on the hub: the frame prefix, key
and policy kept per matched channel (bounded), and who may read each
channel, kept per channel and never out of date with the topic's sessions
or their principals (the second wall, docs/SECURITY.md).

Pure logic: sessions that write through a recording transport, no sockets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from redis_ws_gateway.config import ChannelPolicy
from redis_ws_gateway.fanout import hub as hub_module
from redis_ws_gateway.fanout.hub import Hub, Topic, rights
from redis_ws_gateway.fanout.session import Session
from redis_ws_gateway.security.acl import Acl, RolePolicy
from redis_ws_gateway.security.auth import Principal

PATTERN = b"market:*"
ACL = Acl(
    {
        "trader": RolePolicy(allow=("market:*",)),
        # A role whose subscribe-time check would refuse market:* (its deny
        # is compatible): the tests attach it anyway, as a check that let
        # too much through would, and the router must still hold the line.
        "public": RolePolicy(allow=("market:*",), deny=("market:secret:*",)),
    }
)


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


def _principal(role: str, narrow: tuple[str, ...] | None = None) -> Principal:
    return Principal("u", (role,), ACL, narrow=narrow, via="jwt")


def _hub() -> tuple[Hub, Topic]:
    hub = Hub(linger_seconds=1, policies=(), default_policy="drop-oldest", slow_consumer_grace=1)
    topic = Topic("pattern", PATTERN.decode())
    hub.patterns[PATTERN] = topic
    return hub, topic


def _join(hub: Hub, topic: Topic, principal: Principal) -> tuple[Session, _Transport]:
    transport = _Transport()
    session = Session(
        "s",
        transport,  # type: ignore[arg-type]
        principal,
        "127.0.0.1",
        buffer_limit=1 << 20,
        high_water=1 << 16,
        on_dirty=hub.mark_dirty,
        on_lagging=hub.mark_lagging,
        close=lambda s, code, reason: None,
    )
    hub.attach(session, topic)
    return session, transport


def _publish(hub: Hub, *channels: bytes) -> None:
    """One read of a message per channel, through Hub.on_read."""
    replies = [[b"pmessage", PATTERN, ch, b'{"p":1}'] for ch in channels]
    hub.on_read(replies, lambda reply: None)


def _channels(transport: _Transport) -> list[str]:
    """The channel of each data frame the session was sent, in order."""
    out = []
    for data in transport.writes:
        while data:
            n = data[1] & 0x7F
            start = 2 if n < 126 else 4
            if n == 126:
                n = int.from_bytes(data[2:4], "big")
            out.append(orjson.loads(data[start : start + n])["channel"])
            data = data[start + n :]
    transport.writes.clear()
    return out


SECRET = b"market:secret:X"
TICK = b"market:tick:X"


def test_each_matched_channel_gets_its_own_prefix_and_key() -> None:
    hub, topic = _hub()
    _, t = _join(hub, topic, _principal("trader"))
    _publish(hub, TICK, b"market:tick:Y", TICK)
    assert _channels(t) == ["market:tick:X", "market:tick:Y", "market:tick:X"]
    assert topic.routes[TICK][1] == (topic, TICK)
    assert topic.routes[TICK][1] != topic.routes[b"market:tick:Y"][1]


def test_a_pattern_keeps_a_bounded_number_of_routes(monkeypatch: Any) -> None:
    monkeypatch.setattr(hub_module, "_ROUTES_MAX", 8)
    hub, topic = _hub()
    _, t = _join(hub, topic, _principal("trader"))
    names = [f"market:tick:{i}".encode() for i in range(30)]
    for name in names:
        _publish(hub, name)
        assert len(topic.routes) <= 8
        assert len(topic.readers) <= 8
    # Past the bound the routes are made again, and stay right.
    _publish(hub, *names)
    assert _channels(t) == [n.decode() for n in names + names]


def test_a_pattern_message_takes_its_channels_policy() -> None:
    hub = Hub(
        linger_seconds=1,
        policies=(ChannelPolicy("market:secret:*", "disconnect"),),
        default_policy="conflate",
        slow_consumer_grace=1,
    )
    topic = Topic("pattern", PATTERN.decode())
    hub.patterns[PATTERN] = topic
    _join(hub, topic, _principal("trader"))
    _publish(hub, TICK, SECRET)
    assert topic.routes[TICK][2] == "conflate"
    assert topic.routes[SECRET][2] == "disconnect"


def test_a_role_never_gets_a_channel_it_may_not_read_through_a_pattern() -> None:
    hub, topic = _hub()
    _, trader = _join(hub, topic, _principal("trader"))
    _, public = _join(hub, topic, _principal("public"))
    for _ in range(3):  # the first read decides, the others reuse it
        _publish(hub, SECRET, TICK)
        _publish(hub, SECRET)
    assert _channels(public) == ["market:tick:X"] * 3
    assert _channels(trader) == ["market:secret:X", "market:tick:X", "market:secret:X"] * 3


def test_a_refreshed_principal_is_routed_by_its_new_rights() -> None:
    hub, topic = _hub()
    a, ta = _join(hub, topic, _principal("trader"))
    b, tb = _join(hub, topic, _principal("public"))
    _publish(hub, SECRET, TICK)
    assert _channels(ta) == ["market:secret:X", "market:tick:X"]
    assert _channels(tb) == ["market:tick:X"]
    # A token refresh narrows a's rights (the auth action assigns the new
    # principal), the decisions for SECRET and TICK being warm.
    a.principal = _principal("trader", narrow=("market:tick:*",))
    b.principal = _principal("trader")  # and widens b's
    _publish(hub, SECRET, TICK)
    assert _channels(ta) == ["market:tick:X"]
    assert _channels(tb) == ["market:secret:X", "market:tick:X"]


def test_sessions_joining_and_leaving_a_warm_pattern() -> None:
    hub, topic = _hub()
    a, ta = _join(hub, topic, _principal("trader"))
    _publish(hub, SECRET, TICK)
    assert _channels(ta) == ["market:secret:X", "market:tick:X"]
    _, tb = _join(hub, topic, _principal("public"))  # rights not decided yet
    _, tc = _join(hub, topic, _principal("trader"))  # a's rights, decided
    _publish(hub, SECRET, TICK)
    assert _channels(tb) == ["market:tick:X"]
    assert _channels(tc) == _channels(ta) == ["market:secret:X", "market:tick:X"]
    hub.unsubscribe(a, None)
    _publish(hub, SECRET, TICK)
    assert _channels(ta) == []
    assert _channels(tc) == ["market:secret:X", "market:tick:X"]


def test_a_warm_channel_costs_no_read_decision(monkeypatch: Any) -> None:
    calls: list[str] = []
    may_read = Principal.may_read

    def counted(self: Principal, channel: str) -> bool:
        calls.append(channel)
        return may_read(self, channel)

    monkeypatch.setattr(Principal, "may_read", counted)
    hub, topic = _hub()
    for role in ("trader", "public") * 20:
        _join(hub, topic, _principal(role))
    _publish(hub, SECRET, TICK)
    # One decision per channel and rights, not per recipient...
    assert sorted(calls) == sorted([SECRET.decode(), TICK.decode()] * 2)
    calls.clear()
    # ...and none once made.
    _publish(hub, SECRET, TICK, SECRET)
    assert calls == []


def test_rights_cover_everything_a_read_decision_may_depend_on() -> None:
    # hub.rights groups principals by ACL, roles and narrow list, which is
    # all Principal.may_read consults today. A field added to Principal may
    # be one a decision depends on: then rights() must take it in, or two
    # principals that differ in it would share a decision.
    names = {f.name for f in dataclasses.fields(Principal)}
    assert names == {"user", "roles", "acl", "narrow", "via", "expires_at"}
    a = Principal("a", ("public",), ACL, narrow=None, via="jwt", expires_at=1.0)
    b = Principal("b", ("public",), ACL, narrow=None, via="api_key", expires_at=None)
    assert rights(a) == rights(b)
    assert rights(a) != rights(_principal("public", narrow=("market:tick:*",)))
    assert rights(a) != rights(_principal("trader"))


def test_durable_entries_are_validated_whatever_the_setting() -> None:
    """A durable frame carries the offset clients resume from: its payload
    is parsed even with PAYLOAD_VALIDATION=off, so it cannot add keys that
    shadow the gateway's own, while a plain channel's is embedded as sent."""
    hub = Hub(
        linger_seconds=1,
        policies=(),
        default_policy="drop-oldest",
        slow_consumer_grace=1,
        payload_validation="off",
    )
    forged = b'{"p":1},"offset":"99999999999-0","z":{}'
    durable = hub.durable_topic("orders")
    _, transport = _join(hub, durable, _principal("public"))
    hub.on_batch_start()
    hub.on_stream_entry(durable, b"7-0", forged)
    hub.on_batch_end()
    (frame,) = transport.writes
    message = orjson.loads(frame[4:] if frame[1] & 0x7F == 126 else frame[2:])
    assert message["offset"] == "7-0"
    assert message["data"] == forged.decode()
    plain = Topic("channel", "ticks")
    hub.channels[b"ticks"] = plain
    _, plain_transport = _join(hub, plain, _principal("public"))
    hub.on_read([[b"message", b"ticks", b'{"p":1}']], lambda reply: None)
    assert plain_transport.writes[0].endswith(b',"data":{"p":1}}')
