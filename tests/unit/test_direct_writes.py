"""Direct writes: a read's lone message goes from the hub to each client's
socket with one write, past the transport, and never out of order.

Pure logic on real sockets (socket pairs; no Redis). The transport is a
recording stand-in: what matters is which bytes reach the peer directly,
which go through the transport, and in what order.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from redis_ws_gateway.fanout.hub import Hub, Topic
from redis_ws_gateway.fanout.session import Session

CHANNEL = b"market:tick:X"


class _Transport:
    """Writes like uvloop's: at once while nothing is buffered, the rest kept
    until flush() (the event loop finding the socket writable)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.writes: list[bytes] = []
        self.pending = b""
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        if self.closing:
            return
        if not self.pending:
            try:
                data = data[os.write(self.fd, data) :]
            except BlockingIOError:
                pass
        self.pending += data

    def flush(self) -> None:
        if self.pending:
            with contextlib.suppress(BlockingIOError):
                self.pending = self.pending[os.write(self.fd, self.pending) :]

    def get_write_buffer_size(self) -> int:
        return len(self.pending)

    def is_closing(self) -> bool:
        return self.closing


class _Principal:
    def may_read(self, name: str) -> bool:
        return True


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A loopback TCP connection, like a client's: (gateway side, client side)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        b = socket.create_connection(server.getsockname())
        a, _ = server.accept()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """(read end, write end), non-blocking, 4 KB: unlike a loopback socket,
    where the kernel frees room as acknowledgements arrive, a pipe is full or
    partly written exactly when the test makes it so."""
    r, w = os.pipe2(os.O_NONBLOCK)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def _drain(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def _hub() -> tuple[Hub, Topic]:
    hub = Hub(linger_seconds=1, policies=(), default_policy="drop-oldest", slow_consumer_grace=1)
    topic = Topic("channel", CHANNEL.decode())
    hub.channels[CHANNEL] = topic
    return hub, topic


def _session(hub: Hub, topic: Topic, fd: int) -> tuple[Session, _Transport]:
    transport = _Transport(fd)
    session = Session(
        "s-1",
        transport,  # type: ignore[arg-type]
        _Principal(),  # type: ignore[arg-type]
        "127.0.0.1",
        buffer_limit=1 << 20,
        high_water=1 << 16,
        on_dirty=hub.mark_dirty,
        on_lagging=hub.mark_lagging,
        close=lambda s, code, reason: None,
        # The session owns and closes its descriptor, a duplicate (app.py).
        fd=os.dup(fd) if fd >= 0 else -1,
    )
    hub.attach(session, topic)
    session.check_direct()
    return session, transport


def _read(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def _route(hub: Hub, *payloads: bytes) -> None:
    """One read with these messages on CHANNEL, as PubSubProtocol hands it over."""
    _route_on(hub, *((CHANNEL, p) for p in payloads))


def _route_on(hub: Hub, *messages: tuple[bytes, bytes]) -> None:
    """One read with these (channel, payload) messages."""
    names = [c for c, _ in messages]
    hub.on_batch_start({c for c in names if names.count(c) > 1})
    for channel, payload in messages:
        hub.on_message(channel, None, payload)
    hub.on_batch_end()


def _record_writes(monkeypatch: pytest.MonkeyPatch, hub: Hub) -> list[tuple[int, bytes]]:
    """Every write from now on, as (fd, bytes), still performed: the hub's
    os.write calls and each descriptor of its write_each calls (once, whichever
    loop the hub has)."""
    calls: list[tuple[int, bytes]] = []
    real = os.write
    each = hub.write_each
    inside = False

    def recording(fd: int, data: bytes) -> int:
        if not inside:
            calls.append((fd, bytes(data)))
        return real(fd, data)

    def recording_each(
        frame: bytes, fds: list[int], transports: list[Any] | None = None
    ) -> list[tuple[int, int]] | None:
        nonlocal inside
        calls.extend((fd, frame) for fd in fds)
        inside = True
        try:
            return each(frame, fds, transports)
        finally:
            inside = False

    monkeypatch.setattr(os, "write", recording)
    hub.write_each = recording_each
    return calls


def _seqs(stream: bytes) -> list[int]:
    """The seq of each data frame in a stream of unmasked server text frames."""
    import orjson

    seqs, i = [], 0
    while i < len(stream):
        n = stream[i + 1] & 0x7F
        head = 2
        if n == 126:
            n, head = int.from_bytes(stream[i + 2 : i + 4], "big"), 4
        elif n == 127:
            n, head = int.from_bytes(stream[i + 2 : i + 10], "big"), 10
        msg: dict[str, Any] = orjson.loads(stream[i + head : i + head + n])
        seqs.append(msg["seq"] if msg["type"] == "data" else -1)
        i += head + n
    return seqs


def test_a_lone_message_goes_straight_to_the_socket(pair: Any) -> None:
    hub, topic = _hub()
    session, transport = _session(hub, topic, pair[0].fileno())
    assert session.direct
    _route(hub, b'{"p":1}')
    got = _read(pair[1])
    assert _seqs(got) == [1] and b'"data":{"p":1}' in got
    assert transport.writes == []
    assert session.sent() == (1, len(got))


def test_messages_of_one_read_are_joined_into_one_direct_write(
    pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub, topic = _hub()
    session, transport = _session(hub, topic, pair[0].fileno())
    calls = _record_writes(monkeypatch, hub)
    _route(hub, b"1", b"2", b"3")
    assert [fd for fd, _ in calls] == [session.fd]
    assert _seqs(_read(pair[1])) == [1, 2, 3]
    assert transport.writes == [] and session.sent()[0] == 3


def test_a_notice_queued_earlier_in_the_read_is_not_overtaken(pair: Any) -> None:
    hub, topic = _hub()
    session, _ = _session(hub, topic, pair[0].fileno())
    hub.on_batch_start(set())
    session.queue_control(b'{"type":"resubscribed"}')
    hub.on_message(CHANNEL, None, b"1")
    hub.on_batch_end()
    assert _seqs(_read(pair[1])) == [-1, 1]


def test_channels_once_in_a_read_go_direct_and_repeated_ones_are_joined(
    pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub, x = _hub()
    y = Topic("channel", "market:tick:Y")
    hub.channels[b"market:tick:Y"] = y
    session, transport = _session(hub, x, pair[0].fileno())
    hub.attach(session, y)
    calls = _record_writes(monkeypatch, hub)
    # X and Y once each (W4's reads): each frame written as it is routed.
    _route_on(hub, (CHANNEL, b"1"), (b"market:tick:Y", b"2"))
    assert [_seqs(data) for _, data in calls] == [[1], [1]]
    calls.clear()
    # X twice around Y: the first X waits in the batch, so Y (once in the
    # read) must wait behind it too; one write, in routing order.
    _route_on(hub, (CHANNEL, b"3"), (b"market:tick:Y", b"4"), (CHANNEL, b"5"))
    assert len(calls) == 1
    stream = _read(pair[1])
    assert [(f.split(b'"channel":"')[1][:13], s) for f, s in _frames(stream)] == [
        (b"market:tick:X", 1),
        (b"market:tick:Y", 1),
        (b"market:tick:X", 2),
        (b"market:tick:Y", 2),
        (b"market:tick:X", 3),
    ]
    assert transport.writes == []


def _frames(stream: bytes) -> list[tuple[bytes, int]]:
    """(frame body, seq) of each data frame in a stream."""
    out, i = [], 0
    while i < len(stream):
        n, head = stream[i + 1] & 0x7F, 2
        if n == 126:
            n, head = int.from_bytes(stream[i + 2 : i + 4], "big"), 4
        body = stream[i + head : i + head + n]
        out.append((body, _seqs(stream[i : i + head + n])[0]))
        i += head + n
    return out


def test_no_direct_write_once_the_transport_is_closing(pair: Any) -> None:
    # uvloop closes the descriptor on its own when a read fails and tells the
    # protocol a loop iteration later; its number may already belong to
    # another connection.
    hub, topic = _hub()
    session, transport = _session(hub, topic, pair[0].fileno())
    assert topic.targets() == [session.fd]
    transport.closing = True
    _route(hub, b"1")  # alone in its read: the topic's write_each
    assert not session.direct and session in topic.indirect and topic.targets() == []
    _route(hub, b"2", b"3")
    session.send_control(b'{"type":"pong"}')
    assert _read(pair[1]) == b""


def test_no_frame_after_the_session_stopped_writing(pair: Any) -> None:
    hub, topic = _hub()
    session, _ = _session(hub, topic, pair[0].fileno())
    session.stop_writing()
    _route(hub, b"1")
    _route(hub, b"2", b"3")
    session.send_control(b'{"type":"pong"}')
    assert _read(pair[1]) == b""
    assert topic.targets() == [] and session in topic.indirect


def test_what_the_kernel_refuses_goes_through_the_transport_in_order(
    pipe: tuple[int, int],
) -> None:
    hub, topic = _hub()
    r, w = pipe
    session, transport = _session(hub, topic, w)
    # A frame larger than the descriptor takes: the kernel accepts a part,
    # the transport keeps the rest.
    _route(hub, b'"' + b"x" * 10_000 + b'"')
    assert not session.direct and transport.get_write_buffer_size() > 0
    stream = _drain(r)
    assert 0 < len(stream) < 10_000
    # Later frames queue behind the rest, through the transport, even lone
    # ones, while the transport still holds bytes.
    _route(hub, b"2")
    _route(hub, b"3", b"4")
    assert not session.direct
    while transport.get_write_buffer_size():
        transport.flush()
        stream += _drain(r)
    # The transport drained: the next write through it finds it empty, and
    # the session writes directly again.
    _route(hub, b"5")
    assert session.direct
    _route(hub, b"6")
    stream += _drain(r)
    assert _seqs(stream) == [1, 2, 3, 4, 5, 6]
    assert len(transport.writes) == 4  # the rest of 1, then 2, 3+4 and 5


def test_a_full_descriptor_hands_the_whole_frame_to_the_transport(
    pipe: tuple[int, int],
) -> None:
    hub, topic = _hub()
    r, w = pipe
    session, transport = _session(hub, topic, w)
    os.write(w, b"\0" * 4096)
    with pytest.raises(BlockingIOError):
        os.write(w, b"\0")
    _route(hub, b"1")
    assert not session.direct
    assert _seqs(transport.writes[0]) == [1]
    assert len(_drain(r)) == 4096
    transport.flush()
    assert _seqs(_drain(r)) == [1]


def test_a_dead_peer_stops_direct_writes_without_an_exception(pipe: tuple[int, int]) -> None:
    hub, topic = _hub()
    r, w = pipe
    session, transport = _session(hub, topic, w)
    os.close(r)
    _route(hub, b"1")  # EPIPE
    assert not session.direct
    # The transport reports the failure on its own; nothing is retried here.
    assert transport.writes == []


def test_control_frames_take_the_direct_path_too(pair: Any) -> None:
    hub, topic = _hub()
    session, transport = _session(hub, topic, pair[0].fileno())
    session.send_control(b'{"type":"pong"}')
    assert _read(pair[1]).endswith(b'{"type":"pong"}') and transport.writes == []


async def test_lagging_held_and_closing_sessions_are_never_direct(pair: Any) -> None:
    hub, topic = _hub()
    session, _ = _session(hub, topic, pair[0].fileno())
    session.start_lagging()
    assert not session.direct
    session.check_direct()
    assert not session.direct
    other, _ = _session(hub, topic, pair[0].fileno())
    other.hold()
    assert not other.direct
    third, _ = _session(hub, topic, pair[0].fileno())
    third.close(4008, "x")
    assert not third.direct
    without_fd, _ = _session(hub, topic, -1)
    assert not without_fd.direct


async def test_clients_that_keep_up_are_written_before_lagging_ones_are_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lagging client's backlog work must not delay the others: its
    deliver() runs after the message's direct writes, whatever the
    subscription order."""
    hub, topic = _hub()
    socks = [socket.socketpair() for _ in range(2)]
    try:
        lagging, _ = _session(hub, topic, socks[0][0].fileno())
        lagging.start_lagging()
        fast, _ = _session(hub, topic, socks[1][0].fileno())
        assert fast.direct and next(iter(topic.sessions)) is lagging
        calls = _record_writes(monkeypatch, hub)
        seen_at_deliver: list[int] = []
        real_deliver = Session.deliver

        def deliver(self: Session, *args: Any) -> None:
            seen_at_deliver.append(len(calls))
            real_deliver(self, *args)

        monkeypatch.setattr(Session, "deliver", deliver)
        _route(hub, b'{"k":1}')
        assert seen_at_deliver == [1]  # the fast client's write came first
        assert calls[0][0] == fast.fd
    finally:
        for a, b in socks:
            a.close()
            b.close()


async def test_sent_counts_each_frame_once_whichever_path_wrote_it(pipe: tuple[int, int]) -> None:
    """A topic's write_each calls are counted once per message and settled
    into each session as it leaves the topic's direct side (hub.Topic)."""
    hub, x = _hub()
    y = Topic("channel", "market:tick:Y")
    hub.channels[b"market:tick:Y"] = y
    r, w = pipe
    session, transport = _session(hub, x, w)
    hub.attach(session, y)
    assert session in x.direct and session in y.direct
    _route(hub, b"1")  # alone in its read: the topic's write_each
    _route_on(hub, (CHANNEL, b"2"), (b"market:tick:Y", b"3"))
    _route(hub, b"4", b"5")  # joined: the session's own write
    stream = _drain(r)
    assert _seqs(stream) == [1, 2, 1, 3, 4]
    assert session.sent() == (5, len(stream))
    hub.attach(session, x)  # already there: nothing restarts
    assert session.sent() == (5, len(stream)) and len(x.sessions) == 1
    # Too big for the pipe: the rest goes through the transport, and the
    # session moves to each topic's other side until the transport is empty.
    _route(hub, b'"' + b"x" * 10_000 + b'"')
    assert not session.direct
    assert session in x.indirect and session in y.indirect and not x.direct and not y.direct
    assert x.targets() == [] and y.targets() == []
    while transport.get_write_buffer_size():
        transport.flush()
        stream += _drain(r)
    _route(hub, b"7")  # through the transport, which it finds empty: direct again
    assert session.direct and x.targets() == [session.fd] and y.targets() == [session.fd]
    _route(hub, b"8")
    _route_on(hub, (b"market:tick:Y", b"9"))
    stream += _drain(r)
    assert _seqs(stream) == [1, 2, 1, 3, 4, 5, 6, 7, 2]
    assert session.sent() == (9, len(stream))
    assert hub.unsubscribe(session, None) == [CHANNEL.decode(), "market:tick:Y"]
    assert (session.frames_sent, session.bytes_sent) == (9, len(stream)) == session.sent()
    assert not x.sessions and not x.direct and not x.indirect and not y.direct


async def test_a_closing_session_leaves_the_direct_side_of_every_topic(pair: Any) -> None:
    hub, x = _hub()
    y = Topic("channel", "market:tick:Y")
    hub.channels[b"market:tick:Y"] = y
    session, _ = _session(hub, x, pair[0].fileno())
    hub.attach(session, y)
    other, _ = _session(hub, x, pair[0].fileno())
    assert x.targets() == [session.fd, other.fd] and y.targets() == [session.fd]
    session.close(4008, "x")
    assert x.targets() == [other.fd] and y.targets() == []
    assert session in x.indirect and session in y.indirect


def _sessions(hub: Hub, topic: Topic, n: int) -> Iterator[tuple[Session, socket.socket]]:
    """n sessions on ``topic``, each on its own loopback pair: (session, client end)."""
    for _ in range(n):
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        _OPEN.extend((a, b))
        session, _ = _session(hub, topic, a.fileno())
        yield session, b


_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_open_sockets() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def test_a_run_of_one_channel_is_one_write_each_call_for_all_subscribers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub, topic = _hub()
    clients = list(_sessions(hub, topic, 3))
    calls = _record_writes(monkeypatch, hub)
    each_calls: list[int] = []
    recording = hub.write_each

    def counting(
        frame: bytes, fds: list[int], transports: list[Any] | None = None
    ) -> list[tuple[int, int]] | None:
        each_calls.append(len(fds))
        return recording(frame, fds, transports)

    hub.write_each = counting
    _route(hub, b"1", b"2", b"3", b"4")
    assert each_calls == [3]
    assert [fd for fd, _ in calls] == [s.fd for s, _ in clients]
    assert len({data for _, data in calls}) == 1
    for session, client in clients:
        stream = _read(client)
        assert _seqs(stream) == [1, 2, 3, 4]
        assert session.sent() == (4, len(stream))


def test_a_run_cut_by_another_channel_still_gives_one_write_per_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub, x = _hub()
    y = Topic("channel", "market:tick:Y")
    hub.channels[b"market:tick:Y"] = y
    (both, both_client), (only_x, only_x_client) = _sessions(hub, x, 2)
    hub.attach(both, y)
    calls = _record_writes(monkeypatch, hub)
    _route_on(
        hub,
        (CHANNEL, b"1"),
        (CHANNEL, b"2"),
        (b"market:tick:Y", b"3"),
        (b"market:tick:Y", b"4"),
    )
    assert sorted(fd for fd, _ in calls) == sorted([both.fd, only_x.fd])
    got = _frames(_read(both_client))
    assert [(f.split(b'"channel":"')[1][:13], s) for f, s in got] == [
        (CHANNEL, 1),
        (CHANNEL, 2),
        (b"market:tick:Y", 1),
        (b"market:tick:Y", 2),
    ]
    assert _seqs(_read(only_x_client)) == [1, 2]
    assert both.sent()[0] == 4 and only_x.sent()[0] == 2


async def test_a_lagging_subscriber_gets_each_frame_of_a_run_under_its_policy() -> None:
    hub = Hub(linger_seconds=1, policies=(), default_policy="conflate", slow_consumer_grace=1)
    topic = Topic("channel", CHANNEL.decode())
    hub.channels[CHANNEL] = topic
    (lagging, _), (_, fast_client) = _sessions(hub, topic, 2)
    lagging.start_lagging()
    _route(hub, b"1", b"2", b"3")
    assert _seqs(_read(fast_client)) == [1, 2, 3]
    # Conflated: only the newest frame of the channel waits.
    assert lagging.conflated == 2 and len(lagging.backlog) == 1
    ((frame, _),) = lagging.backlog.values()
    assert _seqs(frame) == [3]


def test_a_notice_after_a_run_comes_after_its_frames() -> None:
    hub, x = _hub()
    z = Topic("channel", "market:tick:Z")
    hub.channels[b"market:tick:Z"] = z
    ((session, client),) = _sessions(hub, x, 1)
    hub.attach(session, z)
    z.needs_notice = True  # Z was lost; its confirmation comes in this read
    hub.on_batch_start({CHANNEL})
    hub.on_message(CHANNEL, None, b"1")
    hub.on_message(CHANNEL, None, b"2")
    hub.on_confirmed("channel", b"market:tick:Z", None)
    hub.on_batch_end()
    stream = _read(client)
    assert _seqs(stream) == [1, 2, -1]
    assert b'"resubscribed"' in stream


def test_a_run_s_rest_goes_through_the_transport_when_the_kernel_refuses_it(
    pipe: tuple[int, int],
) -> None:
    hub, topic = _hub()
    r, w = pipe
    session, transport = _session(hub, topic, w)
    big = b'"' + b"x" * 3_000 + b'"'
    _route(hub, big, big)  # ~6 KB joined, into a 4 KB pipe
    assert not session.direct and transport.get_write_buffer_size() > 0
    stream = _drain(r)
    while transport.get_write_buffer_size():
        transport.flush()
        stream += _drain(r)
    assert _seqs(stream) == [1, 2]
    assert session.sent() == (2, len(stream))


async def test_a_topic_lets_go_of_a_session_that_left_its_direct_side(pair: Any) -> None:
    hub, topic = _hub()
    session, _ = _session(hub, topic, pair[0].fileno())
    assert topic.targets() == [session.fd] and topic.members == [session]
    session.close(4008, "x")
    hub.remove_session(session)
    assert topic.fds is None and topic.members == [] and topic.transports == []
