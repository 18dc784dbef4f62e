"""permessage-deflate without sockets to a gateway: the negotiation, the
frame encoding, the bounded inflate of client frames, and the hub's split of
each topic into plain and deflate subscribers (one compression per message
and topic, none for a topic without deflate subscribers)."""

from __future__ import annotations

import os
import socket
import zlib
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Ping, TextMessage

from redis_ws_gateway.fanout.hub import Hub, Topic
from redis_ws_gateway.fanout.session import Session
from redis_ws_gateway.ws import protocol
from redis_ws_gateway.ws.connection import Inflate
from tests.support.rawws import compressed_text, deflated, frame, inflate
from tests.unit.test_direct_writes import _Principal, _read, _Transport

ANSWER = protocol.DEFLATE_RESPONSE


@pytest.mark.parametrize(
    ("offers", "accepted"),
    [
        (None, False),
        ("", False),
        ("permessage-deflate", True),
        ("permessage-deflate; client_max_window_bits", True),
        ("permessage-deflate; client_max_window_bits=10", True),
        ('permessage-deflate; client_max_window_bits="12"', True),
        ("permessage-deflate; server_no_context_takeover; client_no_context_takeover", True),
        ("permessage-deflate; server_max_window_bits=15", True),
        ("Permessage-Deflate ;client_max_window_bits;", True),
        ("permessage-deflate; server_max_window_bits=12", False),
        ("permessage-deflate; server_max_window_bits", False),
        ("permessage-deflate; client_max_window_bits=16", False),
        ("permessage-deflate; server_no_context_takeover=1", False),
        ("permessage-deflate; mystery", False),
        ("permessage-deflate; client_max_window_bits; client_max_window_bits", False),
        ("x-webkit-deflate-frame", False),
        ("permessage-deflate; server_max_window_bits=9, permessage-deflate", True),
        # Digits str.isdigit() accepts and int() refuses: a refusal, not a 500.
        ("permessage-deflate; client_max_window_bits=\u00b2", False),
        ("permessage-deflate; server_max_window_bits=\u0661\u0665", False),
    ],
)
def test_offers(offers: str | None, accepted: bool) -> None:
    assert protocol.accept_deflate(offers) == (ANSWER if accepted else None)


@pytest.mark.parametrize("size", [100, 600, 5000, 70_000, 300_000])
def test_a_deflate_frame_inflates_to_the_message(size: int) -> None:
    body = orjson.dumps({"k": [{"bid": 1.5 + i, "ask": 2.5 + i} for i in range(size // 24)]})
    f = protocol.deflate_frame(body, 6)
    assert f[0] == 0xC1  # FIN, RSV1, text
    n, head = f[1] & 0x7F, 2
    if n == 126:
        n, head = int.from_bytes(f[2:4], "big"), 4
    elif n == 127:
        n, head = int.from_bytes(f[2:10], "big"), 10
    assert len(f) == head + n
    assert inflate(f[head:]) == body
    # What a client with the default 15-bit window inflates (RFC 7692 7.2.2).
    d = zlib.decompressobj(-15)
    assert d.decompress(f[head:] + b"\x00\x00\xff\xff") == body


def test_a_message_compression_does_not_shrink_goes_plain() -> None:
    body = os.urandom(300)
    assert protocol.deflate_frame(body, 6) == protocol.text_frame(body)


# --- client frames -------------------------------------------------------------


def _parser(limit: int) -> Connection:
    return Connection(ConnectionType.SERVER, [Inflate(limit)])


def test_compressed_and_plain_client_messages_are_both_read() -> None:
    p = _parser(1 << 16)
    p.receive_data(compressed_text(b'{"action":"ping"}') + frame(0x1, b'{"a":1}'))
    p.receive_data(compressed_text(b'{"action":"ping","requestId":2}'))
    texts = [e.data for e in p.events() if isinstance(e, TextMessage)]
    assert texts == ['{"action":"ping"}', '{"a":1}', '{"action":"ping","requestId":2}']


def test_a_ping_between_compressed_fragments_keeps_the_message() -> None:
    data = deflated(b'{"action":"ping","requestId":"fragmented"}')
    first = frame(0x1, data[:5], fin=False)
    p = _parser(1 << 16)
    p.receive_data(bytes([first[0] | 0x40]) + first[1:] + frame(0x9, b"x") + frame(0x0, data[5:]))
    events = list(p.events())
    assert any(isinstance(e, Ping) for e in events)
    text = "".join(e.data for e in events if isinstance(e, TextMessage))
    assert text == '{"action":"ping","requestId":"fragmented"}'


@pytest.mark.parametrize("opcode", [0x9, 0xA], ids=["ping", "pong"])
def test_a_control_frame_before_a_compressed_message_leaves_it_compressed(opcode: int) -> None:
    # A browser's pong and its next request often arrive in one read.
    p = _parser(1 << 16)
    p.receive_data(frame(opcode, b"x") + compressed_text(b'{"action":"ping"}'))
    events = list(p.events())
    assert not any(isinstance(e, CloseConnection) for e in events), events
    assert [e.data for e in events if isinstance(e, TextMessage)] == ['{"action":"ping"}']


def test_inflating_past_the_limit_is_1009_before_the_rest_is_inflated() -> None:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = (c.compress(b"a" * (64 << 20)) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
    ext = Inflate(1 << 16)
    p = Connection(ConnectionType.SERVER, [ext])
    p.receive_data(compressed_text(b"", compressed=bomb))
    events = list(p.events())
    closes = [e for e in events if isinstance(e, CloseConnection)]
    assert closes and closes[0].code == 1009
    assert ext.inflated <= (1 << 16) + 1


def test_a_message_exactly_at_the_limit_is_read() -> None:
    body = b'"' + b"a" * 998 + b'"'
    p = _parser(1000)
    p.receive_data(compressed_text(body))
    assert [e.data for e in p.events() if isinstance(e, TextMessage)] == [body.decode()]


def test_a_corrupt_compressed_frame_is_1007() -> None:
    p = _parser(1 << 16)
    p.receive_data(compressed_text(b"", compressed=b"\xff\xff\xff\xff"))
    closes = [e for e in p.events() if isinstance(e, CloseConnection)]
    assert closes and closes[0].code == 1007


# --- the hub ---------------------------------------------------------------------

CHANNEL = b"market:tick:Z"
_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_open_sockets() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def _hub(min_bytes: int = 64) -> tuple[Hub, Topic]:
    hub = Hub(
        linger_seconds=1,
        policies=(),
        default_policy="drop-oldest",
        slow_consumer_grace=1,
        compression_min_bytes=min_bytes,
    )
    topic = Topic("channel", CHANNEL.decode())
    hub.channels[CHANNEL] = topic
    return hub, topic


def _client(hub: Hub, topic: Topic, deflate: bool) -> tuple[Session, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    _OPEN.extend((a, b))
    session = Session(
        f"s-{len(_OPEN)}",
        _Transport(a.fileno()),  # type: ignore[arg-type]
        _Principal(),  # type: ignore[arg-type]
        "127.0.0.1",
        buffer_limit=1 << 20,
        high_water=1 << 16,
        on_dirty=hub.mark_dirty,
        on_lagging=hub.mark_lagging,
        close=lambda s, code, reason: None,
        fd=os.dup(a.fileno()),
        deflate=deflate,
    )
    hub.attach(session, topic)
    session.check_direct()
    return session, b


def _messages(stream: bytes) -> list[tuple[bool, bytes]]:
    """(compressed, the message as JSON text) of each frame in a stream."""
    out, i = [], 0
    while i < len(stream):
        first, n, head = stream[i], stream[i + 1] & 0x7F, 2
        if n == 126:
            n, head = int.from_bytes(stream[i + 2 : i + 4], "big"), 4
        payload = stream[i + head : i + head + n]
        out.append((bool(first & 0x40), inflate(payload) if first & 0x40 else payload))
        i += head + n
    return out


def _read_all(hub: Hub, *messages: tuple[bytes, bytes]) -> None:
    names = [c for c, _ in messages]
    hub.on_batch_start({c for c in names if names.count(c) > 1})
    for channel, payload in messages:
        hub.on_message(channel, None, payload)
    hub.on_batch_end()


def _big(i: int) -> bytes:
    return orjson.dumps({"i": i, "levels": [{"bid": 100 + j, "ask": 101 + j} for j in range(20)]})


def test_a_topic_without_deflate_subscribers_never_compresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub, topic = _hub()

    def refuse(body: bytes, level: int) -> bytes:
        raise AssertionError("compressed for nobody")

    monkeypatch.setattr(protocol, "deflate_frame", refuse)
    _, plain = _client(hub, topic, False)
    _read_all(hub, (CHANNEL, _big(1)), (CHANNEL, _big(2)), (b"other", b"1"))
    assert topic.zipped is None and hub.compressed == 0
    assert [m for _, m in _messages(_read(plain))][1].startswith(b'{"type":"data"')


@pytest.mark.parametrize(
    "read",
    [
        [(CHANNEL, 1)],  # a lone message: straight to the sockets
        [(CHANNEL, 1), (CHANNEL, 2), (CHANNEL, 3)],  # a run
        [(b"other", 1), (CHANNEL, 1), (b"other", 2), (CHANNEL, 2)],  # into batches
    ],
    ids=["lone", "run", "batches"],
)
def test_deflate_and_plain_subscribers_get_the_same_messages(read: list[Any]) -> None:
    hub, topic = _hub()
    other = Topic("channel", "other")
    hub.channels[b"other"] = other
    clients = [_client(hub, topic, d) for d in (True, False, True, False)]
    for session, _ in clients:
        hub.attach(session, other)
    _read_all(hub, *((c, _big(i)) for c, i in read))
    streams = [_read(sock) for _, sock in clients]
    got = [_messages(s) for s in streams]
    assert streams[0] == streams[2] and streams[1] == streams[3]
    assert [m for _, m in got[0]] == [m for _, m in got[1]]
    assert all(z for z, _ in got[0]) and not any(z for z, _ in got[1])
    assert hub.compressed == len(read)  # once per message, for both deflate clients
    for session, sock in clients:
        assert session.sent()[1] == len(streams[clients.index((session, sock))])


def test_short_messages_go_plain_to_deflate_subscribers() -> None:
    hub, topic = _hub(min_bytes=512)
    _, z = _client(hub, topic, True)
    _read_all(hub, (CHANNEL, b"1"), (CHANNEL, _big(2)))
    got = _messages(_read(z))
    assert [c for c, _ in got] == [False, True]
    assert hub.compressed == 1


async def test_the_deflate_side_goes_when_its_last_subscriber_leaves() -> None:
    hub, topic = _hub()
    a, _ = _client(hub, topic, True)
    b, _ = _client(hub, topic, True)
    assert topic.zipped is not None
    hub.unsubscribe(a, None)
    assert topic.zipped is not None
    hub.unsubscribe(b, None)
    assert topic.zipped is None
