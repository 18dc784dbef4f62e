"""clients/js/src/wire.ts is generated from the Python wire module: the npm
client's codes cannot drift from the gateway's."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import redis_ws_wire as wire
from tests.support.npm import JS_DIR

GENERATOR = JS_DIR / "scripts" / "gen_wire.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_wire", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_wire_ts_is_what_the_generator_writes() -> None:
    committed = (JS_DIR / "src" / "wire.ts").read_text()
    assert committed == _generator().render(), (
        "clients/js/src/wire.ts is out of date: run "
        ".venv/bin/python clients/js/scripts/gen_wire.py (then npm run build in clients/js)"
    )


def test_every_code_of_the_wire_module_is_in_wire_ts() -> None:
    text = (JS_DIR / "src" / "wire.ts").read_text()
    for code in wire.ERROR_CODES:
        assert f'"{code}"' in text
    for close, name in wire.CLOSE_NAMES.items():
        assert f'{close}: "{name}"' in text
    for frame_type in wire.FRAME_TYPES:
        assert f'"{frame_type}"' in text
    assert f'SUBPROTOCOL = "{wire.SUBPROTOCOL}"' in text
    assert f'TOKEN_PROTOCOL_PREFIX = "{wire.TOKEN_PROTOCOL_PREFIX}"' in text
    assert f'PATTERN_CHARS = "{wire.PATTERN_CHARS}"' in text
    fatal = ", ".join(str(c) for c in sorted(wire.FATAL_CLOSE_CODES))
    assert f"new Set<number>([{fatal}])" in text
