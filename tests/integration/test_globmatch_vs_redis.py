"""The glob matcher must agree with a real redis-server on what PSUBSCRIBE delivers.

One pubsub connection PSUBSCRIBEs a corpus of patterns, every channel of a
corpus is PUBLISHed once, and the (pattern, channel) pairs Redis delivers are
compared with glob_match over the full cross product.
"""

from __future__ import annotations

import random

import redis

from redis_ws_gateway.security.globmatch import encode_name, glob_match_bytes, literal_prefix
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_until

SENTINEL = b"__globmatch_sentinel__"

HAND_PICKED_PATTERNS = [
    "*",
    "**",
    "?",
    "??",
    "a*",
    "*a",
    "a*b",
    "a*b*c",
    "*:*",
    "md:*",
    "md:tick:*",
    "md:?",
    "md:??",
    "md:[a-c]",
    "md:[c-a]",
    "md:[^a-c]",
    "md:[abc]*",
    "[]",
    "[]]",
    "[^]",
    "[^]]",
    "[a-]",
    "[a-",
    "[",
    "[^",
    "[ab",
    "[*]",
    "[?]",
    "[[]",
    "[-a]",
    "[a-c-e]",
    "[\\]]",
    "[\\]",
    "[\\",
    "[\\-a]",
    "[\\a-c]",
    "[a-\\]",
    "\\*",
    "\\?",
    "\\[a]",
    "\\a",
    "\\\\",
    "a\\",
    "\\",
    "a\\*b",
    "*\\*",
    "*é",
    "?é",
    "??é",
    "[é]",
    "[é][é]",
    "[^é]",
    "[a-\udcc3]",
    "[\udcc3-a]",
    "市場:*",
    "市?*",
    "caf?",
    "caf??",
    "",
    "a*" * 20 + "b",
    "*a" * 1000,
    "*a" * 1001,  # beyond Redis's star nesting limit: matches nothing
    "a*" * 1001,
]

HAND_PICKED_CHANNELS = [
    "",
    "a",
    "b",
    "ab",
    "abc",
    "aXbYc",
    "ba",
    "md:",
    "md:a",
    "md:b",
    "md:d",
    "md:ab",
    "md:tick:1",
    "md:x",
    "md:é",
    "md",
    "*",
    "?",
    "[",
    "]",
    "]]",
    "^",
    "-",
    "_",
    "\\",
    "a\\",
    "a*b",
    "[a]",
    "x]",
    "A",
    "é",
    "éé",
    "café",
    "cafe",
    "市場:tick",
    "市:tick",
    "\udcc3",
    "\udce9",
    "\udca9",
    "\udcff",
    "a" * 200,
    "a" * 1000,
    "a" * 1001,
]

PATTERN_PIECES = [
    "a", "b", "c", ":", "é", "中", "*", "*", "?", "[a-c]", "[c-a]", "[^a]", "[^é]", "[é]",
    "[]", "[^]", "[a-]", "[\\]]", "[*?]", "\\*", "\\?", "\\[", "\\\\", "\\a", "]", "^", "-",
]  # fmt: skip
CHANNEL_ALPHABET = "abc:*?[]^-\\é中x"


def _corpus() -> tuple[list[bytes], list[bytes]]:
    rng = random.Random(20240611)
    patterns = list(HAND_PICKED_PATTERNS)
    for _ in range(120):
        pieces = [rng.choice(PATTERN_PIECES) for _ in range(rng.randint(1, 5))]
        # A lone trailing backslash and an unterminated bracket only occur at the end.
        tail = rng.choice(["", "", "", "\\", "[", "[a", "[^"])
        patterns.append("".join(pieces) + tail)

    def random_text(max_len: int) -> str:
        return "".join(rng.choice(CHANNEL_ALPHABET) for _ in range(rng.randint(0, max_len)))

    channels = list(HAND_PICKED_CHANNELS)
    channels.extend(random_text(8) for _ in range(300))
    # Unrelated random names rarely get past a pattern's first literal byte.
    channels.extend(literal_prefix(p) + random_text(4) for p in rng.sample(patterns, 100))
    return (
        sorted({encode_name(p) for p in patterns}),
        sorted({encode_name(c) for c in channels} - {SENTINEL}),
    )


def _drain_until_sentinel(pubsub: redis.client.PubSub, timeout: float) -> set[tuple[bytes, bytes]]:
    delivered: set[tuple[bytes, bytes]] = set()

    def sentinel_read() -> bool:
        msg = pubsub.get_message(timeout=1.0)
        if msg is None:
            return False
        if msg["type"] == "message" and msg["channel"] == SENTINEL:
            # Redis writes to this connection in PUBLISH order, so every
            # pmessage for earlier channels has been read by now.
            return True
        if msg["type"] == "pmessage":
            delivered.add((msg["pattern"], msg["channel"]))
        return False

    wait_until(sentinel_read, timeout=timeout, interval=0, what="the sentinel message")
    return delivered


def _wait_for_confirmations(pubsub: redis.client.PubSub, expected: int, timeout: float) -> None:
    seen = 0

    def all_confirmed() -> bool:
        nonlocal seen
        msg = pubsub.get_message(timeout=1.0)
        if msg is not None and msg["type"] in ("psubscribe", "subscribe"):
            seen += 1
        assert seen >= expected, f"only {seen}/{expected} subscriptions confirmed"
        return True

    wait_until(all_confirmed, timeout=timeout, interval=0, what=f"{expected} confirmations")


def test_glob_match_agrees_with_redis_psubscribe(redis_server: RedisServer) -> None:
    # redis_server is the shared fixture from tests/conftest.py.
    patterns, channels = _corpus()
    assert len(patterns) > 150 and len(channels) > 350, (len(patterns), len(channels))

    client = redis.Redis.from_url(redis_server.url)
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    try:
        # Nothing is read until every PUBLISH is sent, so let the pubsub
        # output buffer grow instead of having Redis drop the connection.
        client.config_set("client-output-buffer-limit", "pubsub 0 0 0")
        pubsub.psubscribe(*patterns)
        pubsub.subscribe(SENTINEL)
        _wait_for_confirmations(pubsub, len(patterns) + 1, timeout=10)

        pipe = client.pipeline(transaction=False)
        for channel in channels:
            pipe.publish(channel, b"m")
        pipe.publish(SENTINEL, b"done")
        pipe.execute()

        delivered = _drain_until_sentinel(pubsub, timeout=30)
    finally:
        pubsub.close()
        client.close()

    expected = {(p, c) for p in patterns for c in channels if glob_match_bytes(p, c)}
    missing = sorted(expected - delivered)[:20]
    extra = sorted(delivered - expected)[:20]
    assert not missing and not extra, (
        f"we match but Redis did not deliver: {missing!r}; "
        f"Redis delivered but we do not match: {extra!r}"
    )
    # Guard against a vacuous pass, such as nearly every pattern matching nothing.
    assert len(delivered) > 1000
    assert len({p for p, _ in delivered}) > len(patterns) // 2
