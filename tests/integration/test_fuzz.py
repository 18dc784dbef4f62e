"""Random frames and random JSON at the byte level, against a live gateway
process and a real Redis: no input a client can send makes the gateway close
with 1011, log a traceback, or grow without bound (docs/SECURITY.md)."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.rawws import frame
from tests.support.redis_server import RedisServer, free_port
from tests.support.wait import wait_until

MIB = 1 << 20
API_KEY = "k" * 32


@dataclass
class Live:
    port: int
    proc: subprocess.Popen[bytes]
    log: IO[bytes]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    with RedisServer() as redis, tempfile.TemporaryFile() as log:
        port = free_port()
        env = dict(
            os.environ,
            REDIS_URL=redis.url,
            REDIS_WS_GATEWAY_HOST="127.0.0.1",
            REDIS_WS_GATEWAY_PORT=str(port),
            LOG_FORMAT="json",
            GATEWAY_API_KEY=API_KEY,
            MAX_WILDCARD_SUBSCRIPTIONS="3",
            # Each example is a new connection from the same address, faster
            # than any real client reconnects.
            MAX_PENDING_HANDSHAKES_PER_IP="0",
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "redis_ws_gateway", "serve"], env=env, stderr=log
        )

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited: {proc.returncode}")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return True

        try:
            wait_until(
                ready, timeout=15, interval=0.05, what="the gateway's /readyz", ignoring=(OSError,)
            )
        except BaseException:
            proc.kill()
            raise
        yield Live(port, proc, log)
        proc.terminate()
        proc.wait(timeout=30)


def _upgrade(port: int, query: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    try:
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, "closed during the handshake"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
    except BaseException:
        sock.close()
        raise
    return sock


def _read_frames(sock: socket.socket, until_pong: bytes) -> list[tuple[int, bytes]]:
    """Server frames until the pong that answers ``until_pong``, a close
    frame, or EOF."""
    buf = b""
    frames: list[tuple[int, bytes]] = []
    while True:
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            at = 2
            if n == 126:
                if len(buf) < 4:
                    break
                (n,) = struct.unpack("!H", buf[2:4])
                at = 4
            elif n == 127:
                if len(buf) < 10:
                    break
                (n,) = struct.unpack("!Q", buf[2:10])
                at = 10
            if len(buf) < at + n:
                break
            opcode, payload = buf[0] & 0x0F, buf[at : at + n]
            buf = buf[at + n :]
            frames.append((opcode, payload))
            if opcode == 0x8 or (opcode == 0x1 and until_pong in payload):
                return frames
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return frames
        if not chunk:
            return frames
        buf += chunk


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
channel_names = st.sampled_from(["market:tick:X", "a*", "[", "\\", "", "x" * 300, "*:*:*", "a?b"])
requests = st.fixed_dictionaries(
    {"action": st.sampled_from(["subscribe", "unsubscribe", "ping", "auth", "publish", "", "x"])},
    optional={
        "channels": st.lists(channel_names | st.text(max_size=10), max_size=5) | json_values,
        "requestId": json_values,
        "token": st.sampled_from([API_KEY, "bad", "", "a.b.c"]) | json_values,
        "since": json_values,
    },
).map(lambda d: json.dumps(d).encode())  # big integers and NaN too, unlike orjson

frames_ = st.one_of(
    requests.map(lambda body: frame(0x1, body)),
    st.binary(max_size=40).map(lambda b: frame(0x1, b)),  # text that may not be UTF-8
    st.tuples(st.integers(0, 15), st.binary(max_size=130), st.booleans(), st.booleans()).map(
        lambda t: frame(t[0], t[1], fin=t[2], mask=t[3])
    ),
    st.binary(min_size=1, max_size=30),  # bytes that are no frame at all
)


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    query=st.sampled_from(["", f"?token={API_KEY}", "?token=bad"]),
    sequence=st.lists(frames_, min_size=1, max_size=12),
)
def test_no_client_input_reaches_1011(live: Live, query: str, sequence: list[bytes]) -> None:
    try:
        sock = _upgrade(live.port, query)
    except AssertionError:
        if query == "?token=bad":
            return  # refused with 401, as it should be
        raise
    try:
        sock.sendall(b"".join(sequence) + frame(0x1, b'{"action":"ping","requestId":"end"}'))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the gateway closed on an early frame: its close frame is read below
    try:
        frames = _read_frames(sock, b'"end"')
    finally:
        sock.close()
    for opcode, payload in frames:
        if opcode == 0x8 and len(payload) >= 2:
            code = struct.unpack("!H", payload[:2])[0]
            assert code != 1011, f"closed with 1011 after {sequence!r}"


def test_after_the_fuzzing_no_traceback_and_bounded_memory(live: Live) -> None:
    """Runs after the fuzz test (same module, in order): what it left."""
    assert live.proc.poll() is None, "the gateway died"
    before = _rss(live.proc.pid)
    # More of the same: the memory the fuzz examples left must not grow.
    for i in range(200):
        sock = _upgrade(live.port, "")
        sock.sendall(frame(0x1, b'{"action":"subscribe","channels":["f:%d"]}' % i))
        sock.sendall(
            frame(0x9, b"x" * 125) * 20 + frame(0x1, b'{"action":"ping","requestId":"end"}')
        )
        _read_frames(sock, b'"end"')
        sock.close()
    assert _rss(live.proc.pid) - before < 20 * MIB
    # The gateway shares this file's offset (it inherited the descriptor):
    # a seek here would make its next line overwrite the start of the log.
    # pread leaves the offset alone; a last line still being written is cut.
    fd = live.log.fileno()
    text = os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")
    bad = []
    for line in text[: text.rfind("\n") + 1].split("\n")[:-1]:
        try:
            event = json.loads(line)
        except ValueError:
            bad.append(line)  # not the gateway's JSON: a traceback printed raw
            continue
        if event.get("level") in ("error", "critical") or "exception" in event:
            bad.append(line)
    assert not bad, "\n".join(bad[:5])
