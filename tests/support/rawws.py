"""A WebSocket client at the byte level, for tests that must send what no
well-behaved client library would: floods, partial heads, bad frames."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True) -> bytes:
    """One client frame (masked, as RFC 6455 requires of clients)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text(data: str | bytes) -> bytes:
    return frame(0x1, data.encode() if isinstance(data, str) else data)


def deflated(data: bytes) -> bytes:
    """``data`` as a permessage-deflate message body (RFC 7692 7.2.1)."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(payload: bytes) -> bytes:
    """A compressed message's payload (RSV1 set) inflated."""
    d = zlib.decompressobj(-15)
    return d.decompress(payload + b"\x00\x00\xff\xff") + d.flush()


def compressed_text(data: bytes, compressed: bytes | None = None) -> bytes:
    """A masked text frame with RSV1 set: ``data`` deflated (or
    ``compressed``, the payload as it is)."""
    raw = frame(0x1, deflated(data) if compressed is None else compressed)
    return bytes([raw[0] | 0x40]) + raw[1:]


PING = 0x9
EMPTY_PING = frame(PING)


@dataclass
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True
    rsv1: bool = False  # a compressed message (permessage-deflate)

    @property
    def close_code(self) -> int | None:
        if self.opcode != 0x8 or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])


@dataclass
class RawClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    head: bytes
    body: bytes = b""
    frames: list[Frame] = field(default_factory=list)

    async def read_frame(self, timeout: float = 5.0) -> Frame:
        async with asyncio.timeout(timeout):
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(n)
        return Frame(b0 & 0x0F, payload, bool(b0 & 0x80), bool(b0 & 0x40))

    async def read_until_close(self, timeout: float = 5.0) -> Frame | None:
        """Frames until a close frame (returned) or EOF (None)."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    f = await self.read_frame(timeout)
                except asyncio.IncompleteReadError:
                    return None
                self.frames.append(f)
                if f.opcode == 0x8:
                    return f

    def close(self) -> None:
        self.writer.transport.abort()


def make_socket(
    port: int, *, source: str = "127.0.0.1", rcvbuf: int | None = None
) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        # Before connect: the window the client advertises is fixed then.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.setblocking(False)
    return sock


# Every connection made here, so that a test's fixture can reset them all
# whichever way the test ended (abort_all).
_OPEN: list[asyncio.StreamWriter] = []


async def connect_raw(
    port: int, *, source: str = "127.0.0.1", rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = make_socket(port, source=source, rcvbuf=rcvbuf)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    _OPEN.append(writer)
    return reader, writer


def abort_all() -> None:
    while _OPEN:
        writer = _OPEN.pop()
        writer.close()
        writer.transport.abort()


async def upgrade(
    port: int,
    *,
    path: str = "/ws",
    headers: dict[str, str] | None = None,
    source: str = "127.0.0.1",
    rcvbuf: int | None = None,
    timeout: float = 5.0,
) -> RawClient:
    """An upgrade request; the client whatever the answer (101 or not)."""
    reader, writer = await connect_raw(port, source=source, rcvbuf=rcvbuf)
    key = base64.b64encode(os.urandom(16)).decode()
    hdrs = {
        "Host": f"127.0.0.1:{port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
    }
    hdrs.update(headers or {})
    request = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    writer.write(request.encode() + b"\r\n")
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    client = RawClient(reader, writer, status, head)
    if status != 101:
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        async with asyncio.timeout(timeout):
            client.body = await reader.readexactly(length)
    return client


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def healthz_seconds(port: int, timeout: float = 5.0) -> float:
    """How long GET /healthz takes on a new connection."""
    started = time.monotonic()
    reader, writer = await connect_raw(port)
    try:
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        return time.monotonic() - started
    finally:
        writer.transport.abort()
