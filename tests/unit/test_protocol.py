from __future__ import annotations

import base64
import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redis_ws_gateway.errors import BadChannel, BadField, BadJson, GatewayError, UnknownAction
from redis_ws_gateway.ws import protocol


def test_subscribe_request_is_decoded_with_duplicates_folded() -> None:
    req = protocol.decode_request(
        '{"action":"subscribe","channels":["a","b*","a"],"requestId":"req-1"}'
    )
    assert req == protocol.Request("subscribe", "req-1", channels=("a", "b*"))


@pytest.mark.parametrize(
    ("text", "exc"),
    [
        ("nope", BadJson),
        ('"str"', BadJson),
        ('{"action":"x"}', UnknownAction),
        ('{"channels":["a"]}', BadField),
        ('{"action":"subscribe","channels":[' + '"' + "a" * 300 + '"]}', BadChannel),
        ('{"action":"ping","requestId":"' + "r" * 200 + '"}', BadField),
    ],
)
def test_bad_requests_raise_typed_errors(text: str, exc: type[GatewayError]) -> None:
    with pytest.raises(exc):
        protocol.decode_request(text)


def test_request_id_is_kept_on_errors_after_it_was_read() -> None:
    with pytest.raises(UnknownAction) as err:
        protocol.decode_request('{"action":"x","requestId":"r9"}')
    assert err.value.request_id == "r9"
    body = orjson.loads(protocol.error_message(err.value))
    assert body == {
        "type": "error",
        "code": "unknown_action",
        "message": str(err.value),
        "requestId": "r9",
    }


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_payload_json_always_yields_json_that_round_trips(raw: bytes) -> None:
    body, is_b64 = protocol.payload_json(raw)
    value = orjson.loads(b'{"d":' + body + b"}")["d"] if not is_b64 else None
    if is_b64:
        assert base64.b64decode(orjson.loads(body)) == raw
    elif body == raw:
        assert raw.strip()  # embedded untouched only when it is real JSON
    else:
        assert value == raw.decode("utf-8")


# What a Python publisher sends when it PUBLISHes str(a_dict): JSON-shaped,
# not JSON (single quotes, True).
PY_REPR = str({"a": 1, "ok": True}).encode()


def _data(body: bytes, is_b64: bool) -> object:
    frame = protocol.data_message(protocol.data_prefix(b"ch", None), 1, body, is_b64)
    return orjson.loads(frame)["data"]


def test_python_repr_becomes_a_json_string_when_validated() -> None:
    body, is_b64 = protocol.payload_json(PY_REPR)
    assert _data(body, is_b64) == PY_REPR.decode()


def test_trusted_payloads_embed_json_shapes_unparsed() -> None:
    book = b'{"bids":[[22450.05,10],[22450.00,7]],"asks":[]}'
    assert protocol.payload_json_trusted(book) == (book, False)
    assert protocol.payload_json_trusted(b"[1,2]") == (b"[1,2]", False)
    # The documented consequence of PAYLOAD_VALIDATION=off: a JSON-shaped
    # payload that is not JSON is embedded as it is, and the frame around it
    # is no longer JSON.
    body, is_b64 = protocol.payload_json_trusted(PY_REPR)
    assert (body, is_b64) == (PY_REPR, False)
    frame = protocol.data_message(protocol.data_prefix(b"ch", None), 1, body, is_b64)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(frame)


@pytest.mark.parametrize(
    "raw", [b'{"name":"Caf\xe9"}', b"[\xff]", b'{"a":"\xed\xa0\x80"}'], ids=repr
)
def test_trusted_payloads_that_are_not_utf8_are_encoded_as_before(raw: bytes) -> None:
    """A text frame that is not UTF-8 makes every client fail its
    connection (1007): under PAYLOAD_VALIDATION=off too, such a payload
    goes out as base64, as under json."""
    body, is_b64 = protocol.payload_json_trusted(raw)
    assert is_b64 and (body, is_b64) == protocol.payload_json(raw)
    assert base64.b64decode(orjson.loads(body)) == raw
    assert protocol.payload_json_trusted('{"name":"Café"}'.encode()) == (
        '{"name":"Café"}'.encode(),
        False,
    )


@pytest.mark.parametrize(
    "raw", [b"plain text", b"", b"\xff\xfe\x00raw", b" {}", b"{} ", b"{]", b"[}", b"{", b"42"]
)
def test_trusted_payloads_other_than_json_shapes_are_validated(raw: bytes) -> None:
    assert protocol.payload_json_trusted(raw) == protocol.payload_json(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_trusted_payload_json_differs_only_on_json_shapes(raw: bytes) -> None:
    shaped = raw[:1] + raw[-1:] in (b"{}", b"[]") and len(raw) >= 2
    trusted = protocol.payload_json_trusted(raw)
    assert trusted == ((raw, False) if shaped else protocol.payload_json(raw))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80), st.one_of(st.none(), st.text(max_size=20)), st.integers(0, 2**40))
def test_data_message_is_valid_json_with_fields(
    channel: str, pattern: str | None, seq: int
) -> None:
    prefix = protocol.data_prefix(
        channel.encode("utf-8", "replace"),
        pattern.encode("utf-8", "replace") if pattern is not None else None,
    )
    msg = orjson.loads(protocol.data_message(prefix, seq, b'{"x":1}', False))
    assert msg["type"] == "data" and msg["seq"] == seq and msg["data"] == {"x": 1}
    assert ("pattern" in msg) == (pattern is not None)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_header_lengths(size: int) -> None:
    frame = protocol.text_frame(b"x" * size)
    assert frame[0] == 0x81
    if size < 126:
        assert frame[1] == size and len(frame) == size + 2
    elif size < 65536:
        assert frame[1] == 126 and int.from_bytes(frame[2:4], "big") == size
    else:
        assert frame[1] == 127 and int.from_bytes(frame[2:10], "big") == size


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False)
            | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=12), inner, max_size=4)
            ),
            max_leaves=12,
        ).map(json.dumps),
        st.fixed_dictionaries(
            {"action": st.sampled_from(["subscribe", "unsubscribe", "ping", "auth", "x"])},
            optional={
                "channels": st.lists(st.text(max_size=300), max_size=5) | st.integers(),
                "requestId": st.text(max_size=200) | st.integers() | st.booleans(),
                "token": st.text(max_size=10) | st.none(),
            },
        ).map(json.dumps),
    )
)
def test_decoder_never_fails_other_than_with_a_protocol_error(text: str) -> None:
    try:
        req = protocol.decode_request(text)
    except GatewayError as exc:
        assert exc.code in {"bad_json", "bad_request", "unknown_action", "bad_channel"}
        body = orjson.loads(protocol.error_message(exc))
        assert body["type"] == "error" and body["message"]
        return
    assert req.action in protocol.ACTIONS
    if req.channels is not None:
        assert all(0 < len(c) <= protocol.MAX_CHANNEL_LENGTH_DEFAULT for c in req.channels)


def test_every_error_code_and_close_code_is_documented() -> None:
    from pathlib import Path

    from redis_ws_gateway.errors import ALL_ERRORS
    from redis_ws_wire import Close

    doc = (Path(__file__).parents[2] / "docs" / "PROTOCOL.md").read_text()
    codes = {cls.code for cls in ALL_ERRORS}
    missing = [code for code in sorted(codes) if f"| `{code}` |" not in doc]
    assert not missing, f"error codes missing from docs/PROTOCOL.md: {missing}"
    close_codes = {
        value for name, value in vars(Close).items() if name.isupper() and isinstance(value, int)
    }
    assert close_codes >= {1008, 1012, 4000, 4001, 4008, 4029}
    undocumented = [c for c in sorted(close_codes) if f"| {c} |" not in doc]
    assert not undocumented, f"close codes missing from docs/PROTOCOL.md: {undocumented}"


@pytest.mark.parametrize("code", range(0x00, 0xA1))
def test_channel_names_with_c0_controls_or_delete_are_refused(code: int) -> None:
    """C0 controls and DEL, anywhere in the name, are refused; every other
    character (C1 controls and non-ASCII included) is a channel's own."""
    validate_channel = protocol.validate_channel
    for name in (chr(code), f"market:{chr(code)}", f"{chr(code)}:tick", f"a{chr(code)}b"):
        if code < 0x20 or code == 0x7F:
            with pytest.raises(BadChannel, match="control characters"):
                validate_channel(name, 256)
        else:
            validate_channel(name, 256)
    validate_channel("indicators:{NIFTY}:ψ", 256)
