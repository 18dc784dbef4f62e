"""The bench's C receive loop (_recvloop) on real socket pairs: frame scan,
latency histogram, frames split across reads, what it hands to Python, and
pausing and pacing. Run in a thread as bench.NativeReceive runs it."""

from __future__ import annotations

import queue
import socket
import threading
import time
import zlib
from collections.abc import Iterator

import pytest

# Not importorskip: make setup builds the extension, and a checkout where it
# is missing must fail here (the bench would quietly fall back to its asyncio
# receivers, which its report names).
from redis_ws_bench import _recvloop as recvloop
from redis_ws_bench import bench
from tests.support.wait import wait_until

OFFSET = bench.OFFSET


def server_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def tick(age_ns: int, pad: int = 180) -> bytes:
    """A data frame as the gateway sends it, stamped ``age_ns`` ago."""
    ts = time.monotonic_ns() + OFFSET - age_ns
    return server_frame(1, b'{"seq":1,"data":{"t":%d,"k":0,"p":"%s"}}' % (ts, b"x" * pad))


class Harness:
    def __init__(self, groups: int = 1) -> None:
        self.events: queue.Queue[tuple[int, int, int, bytes]] = queue.Queue()
        self.loop = recvloop.Loop(groups, OFFSET, bench.NEEDLE, bench.TS_DIGITS, self._event)
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.thread: threading.Thread | None = None
        self.frames: list[int] = []
        self.counts = [[0] * bench.NBUCKETS for _ in range(groups)]

    def _event(self, slot: int, kind: int, value: int, payload: bytes) -> None:
        self.events.put((slot, kind, value, payload))

    def add(self, group: int = 0, paced: bool = False, carry: bytes = b"") -> socket.socket:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        slot = self.loop.add(ours.fileno(), group, len(bench.NEEDLE), paced, carry)
        assert slot == len(self.pairs)
        self.pairs.append((ours, theirs))
        self.frames.append(0)
        return theirs

    def start(self) -> None:
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def take(self) -> None:
        frames, hists = self.loop.take()
        for i, n in enumerate(frames):
            self.frames[i] += n
        for g, pairs in enumerate(hists):
            for idx, n in pairs:
                self.counts[g][idx] += n

    def wait_frames(self, slot: int, want: int, timeout: float = 5.0) -> None:
        def reached() -> bool:
            self.take()
            assert self.frames[slot] >= want, f"slot {slot}: {self.frames[slot]} < {want}"
            return True

        wait_until(reached, timeout=timeout, interval=0.001, what=f"{want} frames on slot {slot}")

    def event(self, timeout: float = 5.0) -> tuple[int, int, int, bytes]:
        return self.events.get(timeout=timeout)

    def close(self) -> None:
        self.loop.stop()
        if self.thread is not None:
            self.thread.join(5)
            assert not self.thread.is_alive()
        for a, b in self.pairs:
            a.close()
            b.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(groups=2)
    yield h
    h.close()


@pytest.mark.parametrize(
    "units",
    [-5, 0, 1, 4095, 4096, 4097, 8191, 8192, 10**6, 2**40, 2**52, 2**62],
)
def test_bucket_of_matches_the_python_histogram(units: int) -> None:
    assert recvloop.NBUCKETS == bench.NBUCKETS
    assert recvloop.LINEAR == bench.LINEAR
    assert recvloop.UNIT_SHIFT == bench.UNIT_SHIFT
    assert recvloop.bucket_of(units) == bench.bucket_of(units)


def test_counts_frames_and_times_them_like_the_python_receiver(harness: Harness) -> None:
    peer = harness.add()
    harness.start()
    # Three fresh ticks in one write and one 50 ms old, past the linear
    # range: the histogram holds each at its age.
    peer.sendall(tick(0) + tick(0) + tick(0) + tick(50_000_000))
    harness.wait_frames(0, 4)
    hist = harness.counts[0]
    assert sum(hist) == 4
    aged = [i for i, c in enumerate(hist) if c and bench.bucket_upper_ns(i) >= 50_000_000]
    assert len(aged) == 1 and hist[aged[0]] == 1
    assert bench.bucket_upper_ns(aged[0]) < 60_000_000
    assert harness.counts[1] == [0] * bench.NBUCKETS  # the other group
    # Taken means zeroed: a second take adds nothing.
    before = list(harness.frames)
    harness.take()
    assert harness.frames == before


def test_frames_split_across_reads_and_long_headers(harness: Harness) -> None:
    peer = harness.add()
    harness.start()
    big = tick(0, pad=70_000)  # 8-byte length
    mid = tick(0, pad=1_000)  # 2-byte length
    stream = mid + big + tick(0)
    for cut in (1, 3, 200, 1500, 40_000):
        peer.sendall(stream[:cut])
        stream = stream[cut:]
    peer.sendall(stream)
    harness.wait_frames(0, 3)
    assert harness.frames[0] == 3


def test_carry_from_python_is_scanned_first(harness: Harness) -> None:
    whole = tick(0)
    peer = harness.add(carry=whole + whole[:10])
    harness.start()
    harness.wait_frames(0, 1)
    peer.sendall(whole[10:])
    harness.wait_frames(0, 2)
    assert harness.frames[0] == 2


def test_untimed_frames_and_close_go_to_python(harness: Harness) -> None:
    peer = harness.add(group=1)
    harness.start()
    peer.sendall(server_frame(9, b"hi") + server_frame(1, b'{"type":"error"}') + tick(0))
    assert harness.event() == (0, 0, 0x89, b"hi")
    assert harness.event() == (0, 0, 0x81, b'{"type":"error"}')
    harness.wait_frames(0, 1)
    assert sum(harness.counts[1]) == 1
    peer.sendall(server_frame(8, (4008).to_bytes(2, "big")))
    assert harness.event() == (0, 0, 0x88, (4008).to_bytes(2, "big"))
    peer.close()
    assert harness.event() == (0, 1, 0, b"")
    assert harness.loop.closed(0)
    harness.loop.reading(0, True)  # a no-op on a closed slot, not an error


def test_a_paused_socket_is_not_read(harness: Harness) -> None:
    paused = harness.add()
    live = harness.add()
    harness.start()
    harness.loop.reading(0, False)
    paused.sendall(tick(0))
    live.sendall(tick(0))
    # Level-triggered epoll reports every ready socket in one wait: once the
    # frame written later was read, the earlier one would have been too.
    harness.wait_frames(1, 1)
    harness.take()
    assert harness.frames[0] == 0
    harness.loop.reading(0, True)
    harness.wait_frames(0, 1)


def test_paced_sockets_read_once_per_resume(harness: Harness) -> None:
    paced = harness.add(paced=True)
    live = harness.add()
    harness.start()
    harness.loop.pacing(0, True)
    paced.sendall(tick(0))
    harness.wait_frames(0, 1)  # armed: the first read happens
    paced.sendall(tick(0))
    live.sendall(tick(0))
    harness.wait_frames(1, 1)
    harness.take()
    assert harness.frames[0] == 1  # disarmed after its read
    harness.loop.reading(0, True)
    harness.wait_frames(0, 2)
    harness.loop.pacing(0, False)
    paced.sendall(tick(0))
    paced.sendall(tick(0))
    harness.wait_frames(0, 4)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        recvloop.Loop(0, OFFSET, bench.NEEDLE, bench.TS_DIGITS, print)
    with pytest.raises(ValueError):
        recvloop.Loop(1, OFFSET, b"", bench.TS_DIGITS, print)
    loop = recvloop.Loop(1, OFFSET, bench.NEEDLE, bench.TS_DIGITS, print)
    with pytest.raises(ValueError):
        loop.add(3, 1, 0, False, b"")  # no group 1
    with pytest.raises(IndexError):
        loop.reading(0, True)
    with pytest.raises(OSError):
        loop.add(10**6, 0, 0, False, b"")  # not an open descriptor


def compressed_tick(age_ns: int, pad: int = 2000) -> bytes:
    """A data frame as the gateway sends it to a permessage-deflate client:
    RSV1 set, the message deflated (no context takeover, trailer stripped)."""
    ts = time.monotonic_ns() + OFFSET - age_ns
    body = b'{"seq":1,"data":{"t":%d,"k":0,"p":"%s"}}' % (ts, b"x" * pad)
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    frame = server_frame(1, (c.compress(body) + c.flush(zlib.Z_SYNC_FLUSH))[:-4])
    return bytes([frame[0] | 0x40]) + frame[1:]


def test_compressed_frames_are_inflated_far_enough_to_time_them(harness: Harness) -> None:
    peer = harness.add()
    harness.start()
    peer.sendall(compressed_tick(0) + tick(0) + compressed_tick(50_000_000, pad=10))
    harness.wait_frames(0, 3)
    hist = harness.counts[0]
    assert sum(hist) == 3
    aged = [i for i, c in enumerate(hist) if c and bench.bucket_upper_ns(i) >= 50_000_000]
    assert len(aged) == 1 and bench.bucket_upper_ns(aged[0]) < 60_000_000
    # A compressed frame that does not inflate is handed to Python, untimed.
    peer.sendall(bytes([0xC1, 4]) + b"\xff\xff\xff\xff")
    slot, kind, first, payload = harness.event()
    assert (slot, kind, first, payload) == (0, 0, 0xC1, b"\xff\xff\xff\xff")


def test_the_python_receiver_times_compressed_frames_too() -> None:
    frame = compressed_tick(0)
    assert frame[1] < 126  # a short header: the payload follows two bytes
    head = bench.inflate_head(frame[2:])
    assert head.startswith(b'{"seq":1,"data":{"t":') and len(head) == bench.INFLATE_HEAD
