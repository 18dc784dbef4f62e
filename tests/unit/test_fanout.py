"""The fan-out write loop: the gateway's (Python, fanout/writer.py) and the
bench floor's C twin (redis_ws_bench._writeloop) give the same answers on
real descriptors."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator

import pytest

from redis_ws_gateway.fanout import writer as fanout
from redis_ws_gateway.fanout.writer import WriteEach

FRAME = b"\x81\x7e\x00\xfa" + b"t" * 250


try:
    from redis_ws_bench._writeloop import write_each as write_each_c
except ImportError:  # the bench built without a C compiler
    write_each_c = None


def test_the_floors_c_loop_is_built() -> None:
    # make setup builds it (pip install -e ./bench needs a C compiler): the
    # floor stands for the least a forwarder can do, so it writes in C.
    assert write_each_c is not None, "redis_ws_bench._writeloop is missing: reinstall the bench"


def _loops() -> list[WriteEach]:
    loops: list[WriteEach] = [fanout.write_each]
    if write_each_c is not None:
        loops.append(write_each_c)
    return loops


@pytest.fixture(params=_loops(), ids=lambda f: "c" if f is write_each_c else "python")
def write_each(request: pytest.FixtureRequest) -> WriteEach:
    loop: WriteEach = request.param
    return loop


@pytest.fixture
def pipes() -> Iterator[list[tuple[int, int]]]:
    """Three non-blocking 4 KB pipes: full or partly written exactly when a
    test makes them so."""
    made = []
    for _ in range(3):
        r, w = os.pipe2(os.O_NONBLOCK)
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
        made.append((r, w))
    yield made
    for pair in made:
        for fd in pair:
            with contextlib.suppress(OSError):
                os.close(fd)


def _fill(w: int, leave: int = 0) -> None:
    os.write(w, b"\0" * (4096 - leave))


def test_every_descriptor_gets_the_whole_frame(write_each: WriteEach) -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d:
        assert write_each(FRAME, [a.fileno(), c.fileno(), a.fileno()]) is None
        assert b.recv(4096) == FRAME * 2
        assert d.recv(4096) == FRAME


def test_an_empty_list_writes_nothing(write_each: WriteEach) -> None:
    assert write_each(FRAME, []) is None


def test_full_partial_and_dead_descriptors_are_reported_by_index(
    write_each: WriteEach, pipes: list[tuple[int, int]]
) -> None:
    (r0, w0), (_, w1), (r2, w2) = pipes
    _fill(w1)  # full: EAGAIN
    os.close(r2)  # no reader: EPIPE
    big = b"x" * 6000  # more than the pipe holds: a partial write
    assert write_each(big, [w0, w1, w2]) == [(0, 4096), (1, 0), (2, -1)]
    assert os.read(r0, 8192) == big[:4096]


def test_the_descriptors_after_a_failure_are_still_written(
    write_each: WriteEach, pipes: list[tuple[int, int]]
) -> None:
    (_, w0), (r1, w1), (r2, w2) = pipes
    _fill(w0)
    assert write_each(FRAME, [w0, w1, w2]) == [(0, 0)]
    assert os.read(r1, 4096) == FRAME
    assert os.read(r2, 4096) == FRAME


def test_a_closed_descriptor_is_an_error_not_an_exception(write_each: WriteEach) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert write_each(FRAME, [w]) == [(0, -1)]


@pytest.mark.skipif(write_each_c is None, reason="the C loop is not built")
def test_the_c_loop_rejects_what_is_not_a_list_of_descriptors() -> None:
    assert write_each_c is not None
    loop = write_each_c
    with pytest.raises(TypeError):
        loop(FRAME, (1, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        loop(bytearray(FRAME), [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        loop(FRAME, ["1"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        loop(FRAME, [-1])
    with pytest.raises(ValueError):
        loop(FRAME, [1 << 40])


class _Transport:
    def __init__(self, closing: bool) -> None:
        self.closing = closing
        self.asked = 0

    def is_closing(self) -> bool:
        self.asked += 1
        return self.closing


def test_a_closing_transport_s_descriptor_is_not_written(
    write_each: WriteEach, pipes: list[tuple[int, int]]
) -> None:
    """uvloop may have closed the descriptor already, and its number may be
    another connection's by now (session.py)."""
    (r0, w0), (r1, w1), (r2, w2) = pipes
    transports = [_Transport(False), _Transport(True), _Transport(False)]
    assert write_each(FRAME, [w0, w1, w2], transports) == [(1, -1)]
    assert [t.asked for t in transports] == [1, 1, 1]
    assert os.read(r0, 4096) == FRAME and os.read(r2, 4096) == FRAME
    with pytest.raises(BlockingIOError):
        os.read(r1, 4096)
    assert write_each(FRAME, [w0, w1], None) is None


def test_transports_must_match_the_descriptors(write_each: WriteEach) -> None:
    with pytest.raises(TypeError):
        write_each(FRAME, [1, 2], [_Transport(False)])


def test_an_exception_from_is_closing_is_raised(
    write_each: WriteEach, pipes: list[tuple[int, int]]
) -> None:
    class Broken:
        def is_closing(self) -> bool:
            raise RuntimeError("boom")

    (r0, w0), _, _ = pipes
    with pytest.raises(RuntimeError, match="boom"):
        write_each(FRAME, [w0], [Broken()])
    with pytest.raises(BlockingIOError):
        os.read(r0, 4096)
