"""Pure logic of sharded pub/sub: the slot map merge, how the pub/sub
protocol tells its own SUNSUBSCRIBE replies from the server's, and how the
hub takes a read's replies from it."""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import hiredis

from redis_ws_gateway.fanout.hub import EVERY_CHANNEL, Hub
from redis_ws_gateway.upstream.pubsub import PubSubProtocol, SubKind
from redis_ws_gateway.upstream.sharded import SlotMap


def _node(flags: str, epoch: int, *spans: list[str]) -> dict[str, Any]:
    return {"flags": flags, "epoch": str(epoch), "slots": list(spans)}


def test_slot_map_takes_each_slots_newest_claim() -> None:
    stale = {  # a node that has not heard of the failover yet
        "10.0.0.1:7000": _node("master", 1, ["0", "8191"]),
        "10.0.0.2:7000@17000": _node("myself,master", 2, ["8192", "16383"]),
    }
    fresh = {
        "10.0.0.1:7000": _node("master,fail", 1, ["0", "8191"]),
        "10.0.0.3:7000": _node("myself,master", 7, ["0", "8191"]),
        "10.0.0.2:7000": _node("master,fail?", 2, ["8192", "16383"]),
        "10.0.0.4:7000": _node("slave", 7),
    }
    for views in ([stale, fresh], [fresh, stale]):
        m = SlotMap.from_views(views)
        assert m.owner(0) == ("10.0.0.3", 7000)
        assert m.owner(8191) == ("10.0.0.3", 7000)
        # PFAIL is one node's suspicion: the claim still counts.
        assert m.owner(8192) == ("10.0.0.2", 7000)
        assert m.owner(16383) == ("10.0.0.2", 7000)
        assert m.nodes() == {("10.0.0.3", 7000), ("10.0.0.2", 7000)}


def test_slot_map_single_slots_and_holes() -> None:
    view = {
        "a:1": _node("master", 3, ["0", "99"], ["12182"]),
        "b:2": _node("master", 4, ["100", "12181"], ["12183", "16383"]),
    }
    m = SlotMap.from_views([view])
    assert m.owner(12182) == ("a", 1)
    assert m.owner(12181) == ("b", 2) and m.owner(12183) == ("b", 2)
    assert m.owner(99) == ("a", 1) and m.owner(100) == ("b", 2)
    partial = SlotMap.from_views([{"a:1": _node("master", 1, ["10", "20"])}])
    assert partial.owner(9) is None and partial.owner(21) is None
    assert partial.owner(15) == ("a", 1)
    assert not SlotMap.from_views([{"a:1": _node("master", 1)}])


class _Listener(Hub):
    """The hub's handling of a read (on_read), recording what it routes."""

    def __init__(self) -> None:
        super().__init__(
            linger_seconds=1, policies=(), default_policy="drop-oldest", slow_consumer_grace=1
        )
        self.confirmed: list[tuple[SubKind, bytes, str | None]] = []
        self.lost: list[bytes] = []
        self.messages: list[tuple[bytes, bytes]] = []
        self.reads: list[set[bytes]] = []

    def on_message(self, channel: bytes, pattern: bytes | None, payload: bytes) -> None:
        self.messages.append((channel, payload))

    def on_batch_start(self, repeated: Container[bytes] = EVERY_CHANNEL) -> None:
        self.reads.append(set(repeated))

    def on_batch_end(self) -> None:
        pass

    def on_upstream_up(self) -> None:
        pass

    def on_upstream_down(self) -> None:
        pass

    def on_confirmed(self, kind: SubKind, name: bytes, error: str | None) -> None:
        self.confirmed.append((kind, name, error))

    def on_shard_lost(self, name: bytes) -> None:
        self.lost.append(name)


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


def _resp(*items: bytes | int) -> bytes:
    out = [f"*{len(items)}\r\n".encode()]
    for item in items:
        if isinstance(item, int):
            out.append(f":{item}\r\n".encode())
        else:
            out.append(f"${len(item)}\r\n".encode() + item + b"\r\n")
    return b"".join(out)


async def test_ssubscribe_per_slot_and_sunsubscribe_from_the_server() -> None:
    listener = _Listener()
    proto = PubSubProtocol(listener)
    transport = _Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.send(b"SSUBSCRIBE", b"{t}a", b"{t}b", kind="shard", names=(b"{t}a", b"{t}b"))
    proto.send(b"SSUBSCRIBE", b"x", kind="shard", names=(b"x",))
    assert transport.written[0] == hiredis.pack_command((b"SSUBSCRIBE", b"{t}a", b"{t}b"))  # type: ignore[arg-type]
    proto.data_received(
        _resp(b"ssubscribe", b"{t}a", 1)
        + _resp(b"ssubscribe", b"{t}b", 2)
        + _resp(b"smessage", b"{t}a", b"hello")
        + b"-MOVED 16287 10.0.0.9:7000\r\n"
    )
    assert listener.confirmed == [
        ("shard", b"{t}a", None),
        ("shard", b"{t}b", None),
        ("shard", b"x", "MOVED 16287 10.0.0.9:7000"),
    ]
    assert listener.messages == [(b"{t}a", b"hello")]
    # Our own SUNSUBSCRIBE is answered by name, the server's is a loss; a
    # PING queued behind it still gets its own reply.
    proto.send(b"SUNSUBSCRIBE", b"{t}a", kind="shard", names=(b"{t}a",), want_reply=False)
    pong = proto.send(b"PING")
    proto.data_received(
        _resp(b"sunsubscribe", b"{t}b", 1) + _resp(b"sunsubscribe", b"{t}a", 0) + b"+PONG\r\n"
    )
    assert listener.lost == [b"{t}b"]
    assert pong is not None and pong.result() == b"PONG"


async def test_the_hub_finds_which_channels_a_read_carries_more_than_once() -> None:
    # The hub writes a channel's only message of a read at once and joins a
    # repeated channel's messages per client: it needs this before the first.
    listener = _Listener()
    proto = PubSubProtocol(listener)
    proto.connection_made(_Transport())  # type: ignore[arg-type]
    proto.data_received(_resp(b"message", b"x", b"1"))
    proto.data_received(
        _resp(b"message", b"x", b"2")
        + _resp(b"smessage", b"y", b"3")
        + _resp(b"pmessage", b"x*", b"x", b"4")
        + _resp(b"message", b"x", b"5")
    )
    proto.data_received(_resp(b"message", b"x", b"6") + _resp(b"message", b"y", b"7"))
    assert listener.reads == [set(), {b"x"}, set()]
    assert [p for _, p in listener.messages] == [b"1", b"2", b"3", b"4", b"5", b"6", b"7"]


class _OneByOne:
    """A listener with no on_read (the bench's floor): messages one by one."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def on_batch_start(self, repeated: Container[bytes]) -> None:
        self.events.append("start")

    def on_message(self, channel: bytes, pattern: bytes | None, payload: bytes) -> None:
        self.events.append((channel, pattern, payload))

    def on_batch_end(self) -> None:
        self.events.append("end")

    def on_confirmed(self, kind: SubKind, name: bytes, error: str | None) -> None:
        self.events.append((kind, name, error))


async def test_a_listener_that_takes_messages_one_by_one_gets_each_read_in_order() -> None:
    listener = _OneByOne()
    proto = PubSubProtocol(listener)  # type: ignore[arg-type]
    proto.connection_made(_Transport())  # type: ignore[arg-type]
    proto.send(b"SUBSCRIBE", b"x", kind="channel", names=(b"x",), want_reply=False)
    proto.data_received(
        _resp(b"message", b"y", b"0")
        + _resp(b"subscribe", b"x", 1)
        + _resp(b"message", b"x", b"1")
        + _resp(b"pmessage", b"x*", b"x", b"2")
    )
    assert listener.events == [
        "start",
        (b"y", None, b"0"),
        ("channel", b"x", None),
        (b"x", None, b"1"),
        (b"x", b"x*", b"2"),
        "end",
    ]
