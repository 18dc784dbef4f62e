"""SseSession's framing: the hub's WebSocket frames (every header length)
become SSE events with the same JSON, in HTTP chunks, with event ids that
only move durable offsets forward."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from redis_ws_gateway.errors import BadField
from redis_ws_gateway.security.auth import Principal
from redis_ws_gateway.web.sse import SseSession, decode_id, encode_id
from redis_ws_gateway.ws.protocol import text_frame


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def _session(chunked: bool = True) -> tuple[SseSession, FakeTransport]:
    transport = FakeTransport()
    session = SseSession(
        "t-1",
        transport,  # type: ignore[arg-type]
        Principal("anonymous", (), None),  # type: ignore[arg-type]
        "127.0.0.1",
        buffer_limit=1 << 20,
        high_water=0,
        on_dirty=lambda s: None,
        on_lagging=lambda s: None,
        close=lambda s, c, r: None,
        chunked=chunked,
    )
    return session, transport


def _events(text: bytes) -> list[tuple[str | None, Any]]:
    out = []
    for block in text.decode().split("\n\n"):
        if not block:
            continue
        event_id = None
        data = []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "id":
                event_id = value
            elif field == "data":
                data.append(value)
        out.append((event_id, orjson.loads("\n".join(data))))
    return out


@pytest.mark.parametrize("size", [10, 200, 70_000], ids=["7-bit", "16-bit", "64-bit"])
def test_frames_of_every_header_length_become_the_same_json(size: int) -> None:
    session, transport = _session()
    bodies = [
        orjson.dumps({"type": "data", "channel": "c", "seq": i, "data": "x" * size}) for i in (1, 2)
    ]
    session.write(b"".join(text_frame(b) for b in bodies))
    (chunk,) = transport.written
    head, _, rest = chunk.partition(b"\r\n")
    assert rest.endswith(b"\r\n") and int(head, 16) == len(rest) - 2
    assert [obj for _, obj in _events(rest[:-2])] == [orjson.loads(b) for b in bodies]


def test_line_breaks_of_a_payload_become_data_lines() -> None:
    session, transport = _session(chunked=False)
    session.write(text_frame(b'{"type":"data","channel":"c","seq":1,"data":{"a":\r\n [1,\r 2]\n}}'))
    text = transport.written[0]
    assert text.count(b"data: ") == 4
    assert _events(text) == [
        (None, {"type": "data", "channel": "c", "seq": 1, "data": {"a": [1, 2]}})
    ]


def test_event_ids_carry_durable_offsets_forward_only() -> None:
    session, transport = _session(chunked=False)
    reply = {
        "type": "subscribed",
        "channels": ["d:a", "p"],
        "subscriptions": [
            {"channel": "d:a", "durable": True, "offset": "5-0"},
            {"channel": "p", "seq": 0},
        ],
    }
    session.write(text_frame(orjson.dumps(reply)))
    session.write(text_frame(b'{"type":"data","channel":"d:a","seq":1,"offset":"6-0","data":1}'))
    # An older offset (a reply built before a live entry went out) never moves it back.
    session.write(text_frame(b'{"type":"data","channel":"d:a","offset":"4-0","data":0}'))
    session.write(text_frame(b'{"type":"data","channel":"p","seq":1,"data":{"offset":"9-9"}}'))
    ids = [event_id for chunk in transport.written for event_id, _ in _events(chunk)]
    assert ids[2:] == [None, None]
    assert decode_id(ids[0] or "") == {"d:a": "5-0"}
    assert decode_id(ids[1] or "") == {"d:a": "6-0"}


def test_an_event_id_never_comes_from_a_publishers_payload() -> None:
    """Under PAYLOAD_VALIDATION=off a plain channel's payload is embedded
    unparsed, so it can hold top-level keys of its own; the id is read only
    from what precedes the payload."""
    session, transport = _session(chunked=False)
    injected = b'{"px":1},"type":"data","channel":"d:a","offset":"99999999999-0","z":{}'
    session.write(text_frame(b'{"type":"data","channel":"ticks","seq":1,"data":' + injected + b"}"))
    session.write(text_frame(b'{"type":"data","channel":"d:a","seq":1,"offset":"6-0","data":1}'))
    ids = [event_id for chunk in transport.written for event_id, _ in _events(chunk)]
    assert ids[0] is None
    assert decode_id(ids[1] or "") == {"d:a": "6-0"}


def test_ids_round_trip_and_foreign_ids_are_refused() -> None:
    offsets = {"engine:decision:A": "1732610000123-0", "ünïcode,@:x": "0-0"}
    assert decode_id(encode_id(offsets)) == offsets
    for bad in ("", "42", "d1.!!!", encode_id({"a": "yesterday"}), "d1.W10"):
        with pytest.raises(BadField):
            decode_id(bad)
    assert decode_id("d1.e30") == {}  # {}: a stream with no durable offset yet


@pytest.mark.parametrize(
    "offset", ["1-1\n", "1-1 ", "18446744073709551616-0", "0-18446744073709551616", "0", "1"]
)
def test_an_event_id_with_an_offset_xrange_would_refuse_is_not_ours(offset: str) -> None:
    with pytest.raises(BadField):
        decode_id(encode_id({"a": offset}))


def test_the_largest_stream_id_is_accepted() -> None:
    top = "18446744073709551615-18446744073709551615"
    assert decode_id(encode_id({"a": top})) == {"a": top}
