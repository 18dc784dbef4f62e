"""The wsproto internals that WsConnection reads to drop an idle parser."""

from __future__ import annotations

import os

from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from redis_ws_gateway.ws.connection import PING_FRAME, close_frame, parser_idle, pong_frame


def _masked(payload: bytes, first: int = 0x81) -> bytes:
    key = os.urandom(4)
    return (
        bytes([first, 0x80 | len(payload)])
        + key
        + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    )


def test_parser_is_idle_only_between_whole_messages() -> None:
    """Fails if a wsproto upgrade moves the attributes parser_idle() reads."""
    parser = Connection(ConnectionType.SERVER)
    assert parser_idle(parser)
    frame = _masked(b"hello")
    parser.receive_data(frame[:1])  # half a header
    assert list(parser.events()) == []
    assert not parser_idle(parser)
    parser.receive_data(frame[1:7])  # header and key, part of the payload
    list(parser.events())
    assert not parser_idle(parser)
    parser.receive_data(frame[7:])
    events = list(parser.events())
    assert isinstance(events[-1], TextMessage) and events[-1].message_finished
    assert parser_idle(parser)
    parser.receive_data(_masked(b"frag", first=0x01))  # text, not final
    list(parser.events())
    assert not parser_idle(parser), "a message in progress is not idle"
    parser.receive_data(_masked(b"ment", first=0x80))  # continuation, final
    assert "".join(e.data for e in parser.events() if isinstance(e, TextMessage)) == "ment"
    assert parser_idle(parser)


def test_control_frames() -> None:
    assert PING_FRAME == b"\x89\x00"
    assert pong_frame(b"ab") == b"\x8a\x02ab"
    assert close_frame(4001, "token expired") == b"\x88\x0f\x0f\xa1token expired"
