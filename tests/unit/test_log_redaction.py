"""A credential passed to a log call by mistake never reaches the log line."""

from __future__ import annotations

import dataclasses
import io
import sys

import orjson
import pytest
import structlog

from redis_ws_gateway.config import Settings
from redis_ws_gateway.observability.logs import configure_logging


@pytest.fixture
def lines(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    configure_logging(dataclasses.replace(Settings(), log_level="info", log_format="json"))
    yield out
    structlog.reset_defaults()


def test_sensitive_fields_are_redacted_every_time(lines: io.StringIO) -> None:
    log = structlog.get_logger("test")
    # Twice: the second line is judged from the remembered verdicts.
    for _ in range(2):
        log.info(
            "event",
            token="t0k3n",
            Authorization="Bearer x",
            jwt_secret="s",
            user_api_key="k",
            conn="c-1",
            user="alice",
        )
    parsed = [orjson.loads(line) for line in lines.getvalue().splitlines()]
    assert len(parsed) == 2
    for line in parsed:
        for key in ("token", "Authorization", "jwt_secret", "user_api_key"):
            assert line[key] == "<redacted>", key
        assert line["conn"] == "c-1"
        assert line["user"] == "alice"
    assert "t0k3n" not in lines.getvalue()
