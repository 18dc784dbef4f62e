"""structlog set-up: JSON lines for machines, readable lines for people."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

from redis_ws_gateway.config import Settings

_REDACT = ("token", "password", "api_key", "authorization", "secret")


# Field names seen, and whether each is redacted. Names come from call
# sites, so there are few; the scan of every name on every line was half of
# what an info line cost (docs/BENCHMARKS.md, W7).
_VERDICTS: dict[str, bool] = {}
_VERDICTS_MAX = 4096


def _sensitive(key: str) -> bool:
    verdict = _VERDICTS.get(key)
    if verdict is None:
        verdict = any(word in key.lower() for word in _REDACT)
        if len(_VERDICTS) < _VERDICTS_MAX:
            _VERDICTS[key] = verdict
    return verdict


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Belt and braces: no call site logs a credential, but a future one that
    # passes one by mistake must not leak it.
    for key in [k for k in event if _sensitive(k)]:
        event[key] = "<redacted>"
    return event


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


class _ToStructlog(logging.Handler):
    """Routes the standard library's log records (OpenTelemetry's exporter,
    aiohttp, asyncio) through structlog, so a JSON log stream stays JSON."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                fields["error"] = repr(record.exc_info[1])
            level = record.levelname.lower()
            method = level if level in ("debug", "info", "warning", "error", "critical") else "info"
            getattr(structlog.get_logger(record.name), method)(record.getMessage(), **fields)
        except Exception:
            self.handleError(record)


def configure_logging(settings: Settings) -> None:
    level = getattr(logging, settings.log_level.upper())
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            # log.exception's stack as text in the line (JSON too), not just
            # "exc_info": true.
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ToStructlog):
            root.removeHandler(handler)
    root.addHandler(_ToStructlog())
    root.setLevel(max(level, logging.INFO))
    # aiohttp's access log would log query strings, and ?token= is a credential.
    logging.getLogger("aiohttp.access").disabled = True
