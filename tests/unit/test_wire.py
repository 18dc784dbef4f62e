"""The wire module against docs/PROTOCOL.md, the gateway and the Python client.

Every code a client can see is defined once, in redis_ws_wire. These tests
fail when the prose, the gateway's error classes, the client's error classes
or the close metric's labels drift from it. Each comparison is a function
returning what is out of place, and each is also run on a broken input, so
none of them can pass by comparing nothing.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import redis_ws_gateway
from redis_ws_client.client import ServerError
from redis_ws_gateway.errors import GatewayError
from redis_ws_gateway.observability.metrics import close_reason
from redis_ws_wire import (
    CLOSE_NAMES,
    ERROR_CODES,
    FATAL_CLOSE_CODES,
    HTTP_ERROR_CODES,
    REFUSAL_HEADER,
    TRANSIENT_ERROR_CODES,
    Close,
)

PROTOCOL = Path(__file__).parents[2] / "docs" / "PROTOCOL.md"
ERROR_TABLE = "| code | when | message (example) |"
CLOSE_TABLE = "| code | meaning | what the client should do |"
HTTP_TABLE = "| status | error | when |"


def table_column(doc: str, header: str, column: int) -> list[str]:
    """The cells of ``column`` in the markdown table whose header row is
    ``header``, backticks stripped."""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == header)
    except StopIteration:
        raise AssertionError(f"no table headed {header!r} in docs/PROTOCOL.md") from None
    cells = []
    for line in lines[start + 2 :]:  # past the header and its |---| row
        if not line.startswith("|"):
            break
        cells.append(line.split("|")[column + 1].strip().strip("`"))
    return cells


def mismatch(documented: Iterable[object], defined: Iterable[object]) -> dict[str, list[str]]:
    """What only one side has; empty when the two agree."""
    doc, wire = {str(c) for c in documented}, {str(c) for c in defined}
    out = {"only in the docs": sorted(doc - wire), "only in the wire module": sorted(wire - doc)}
    return {k: v for k, v in out.items() if v}


def close_codes() -> set[int]:
    return {v for k, v in vars(Close).items() if k.isupper() and isinstance(v, int)}


def gateway_error_classes() -> list[type[GatewayError]]:
    """Every GatewayError subclass in the gateway, wherever it is defined."""
    for module in pkgutil.walk_packages(redis_ws_gateway.__path__, "redis_ws_gateway."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: list[type[GatewayError]] = []
    todo = list(GatewayError.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def codes_without(codes: Iterable[str], known: Mapping[str, object]) -> list[str]:
    return sorted(c for c in codes if c not in known)


def unlabelled(codes: Iterable[int]) -> list[int]:
    """Close codes the close metric would count as ``other``, or under
    another name than the wire's."""
    return sorted(
        c
        for c in codes
        if close_reason(c) != CLOSE_NAMES.get(c, "other") or close_reason(c) == "other"
    )


# --- (a) docs/PROTOCOL.md and the wire module ------------------------------------


def test_error_code_table_is_the_wire_modules_error_codes() -> None:
    documented = table_column(PROTOCOL.read_text(), ERROR_TABLE, 0)
    assert len(documented) >= 10
    assert not mismatch(documented, ERROR_CODES)


def test_close_code_table_is_the_wire_modules_close_codes() -> None:
    documented = table_column(PROTOCOL.read_text(), CLOSE_TABLE, 0)
    assert len(documented) >= 10
    assert not mismatch(documented, close_codes())
    assert set(CLOSE_NAMES) == close_codes()


def test_http_error_table_codes_are_http_error_codes() -> None:
    documented = table_column(PROTOCOL.read_text(), HTTP_TABLE, 1)
    assert documented
    assert not set(documented) - HTTP_ERROR_CODES
    assert f"`{REFUSAL_HEADER}`" in PROTOCOL.read_text()


def test_the_wire_modules_subsets_name_known_codes() -> None:
    assert set(ERROR_CODES) >= TRANSIENT_ERROR_CODES
    assert close_codes() >= FATAL_CLOSE_CODES


def test_a_doc_that_drifted_is_caught() -> None:
    doc = PROTOCOL.read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `rate_limited` |"))
    without = doc.replace(row + "\n", "")
    assert mismatch(table_column(without, ERROR_TABLE, 0), ERROR_CODES) == {
        "only in the wire module": ["rate_limited"]
    }
    extra = doc.replace(
        CLOSE_TABLE + "\n|---|---|---|\n", CLOSE_TABLE + "\n|---|---|---|\n| 4999 | x | y |\n"
    )
    assert mismatch(table_column(extra, CLOSE_TABLE, 0), close_codes()) == {
        "only in the docs": ["4999"]
    }
    with pytest.raises(AssertionError):
        table_column(doc.replace(ERROR_TABLE, "| code | when |"), ERROR_TABLE, 0)


# --- (b) the gateway's error classes ---------------------------------------------


def test_every_gateway_error_class_has_a_wire_error_code() -> None:
    classes = gateway_error_classes()
    assert len(classes) >= len(ERROR_CODES)
    assert not codes_without((cls.code for cls in classes), ERROR_CODES)
    # One class per code: a second class for a code would be a second meaning.
    assert sorted(cls.code for cls in classes) == sorted(ERROR_CODES)


def test_an_error_class_with_an_unknown_code_is_caught() -> None:
    codes = [cls.code for cls in gateway_error_classes()]
    assert codes_without([*codes, "teapot"], ERROR_CODES) == ["teapot"]


# --- (c) the client's error classes ----------------------------------------------


def test_every_error_code_has_a_client_error_class() -> None:
    by_code = {code: ServerError.from_frame({"code": code}) for code in ERROR_CODES}
    assert not [code for code, exc in by_code.items() if type(exc) is ServerError]
    assert all(type(exc).code_name == code for code, exc in by_code.items())


def test_a_code_without_a_client_class_is_caught() -> None:
    assert type(ServerError.from_frame({"code": "teapot"})) is ServerError


# --- (d) the close metric's labels -------------------------------------------------


def test_close_metric_labels_every_close_code_by_its_wire_name() -> None:
    assert not unlabelled(close_codes())
    assert close_reason(Close.ADMIN) == "admin"


def test_an_unlabelled_close_code_is_caught() -> None:
    assert unlabelled([4999]) == [4999]
