"""Unit tests for the Redis-compatible glob matcher.

The integration test checks the matcher against a real redis-server; here an
independent, deliberately naive restatement of Redis's recursive algorithm
serves as the oracle for property tests on small inputs.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redis_ws_gateway.security.globmatch import (
    encode_name,
    glob_match,
    glob_match_bytes,
    literal_prefix,
)
from redis_ws_wire import is_pattern

STAR, QMARK, OPEN, CLOSE, CARET, DASH, BACKSLASH = b"*?[]^-\\"


def _c_char(b: int) -> int:
    return b - 256 if b >= 0x80 else b


def redis_reference(p: bytes, s: bytes, nesting: int = 0) -> bool:
    """Cursor-by-cursor restatement of Redis's matcher, without its pruning.

    Exponential on purpose (it tries every split for every star), so it is an
    oracle for small inputs only.
    """
    if nesting > 1000:
        return False
    pi = si = 0
    plen, slen = len(p), len(s)
    while pi < plen and si < slen:
        c = p[pi]
        if c == STAR:
            while pi + 1 < plen and p[pi + 1] == STAR:
                pi += 1
            if pi + 1 == plen:
                return True
            return any(redis_reference(p[pi + 1 :], s[k:], nesting + 1) for k in range(si, slen))
        if c == QMARK:
            si += 1
        elif c == OPEN:
            pi += 1
            negated = pi < plen and p[pi] == CARET
            if negated:
                pi += 1
            hit = False
            while True:
                if plen - pi >= 2 and p[pi] == BACKSLASH:
                    pi += 1
                    hit = hit or p[pi] == s[si]
                elif pi == plen:
                    pi -= 1
                    break
                elif p[pi] == CLOSE:
                    break
                elif plen - pi >= 3 and p[pi + 1] == DASH:
                    lo, hi = sorted((_c_char(p[pi]), _c_char(p[pi + 2])))
                    hit = hit or lo <= _c_char(s[si]) <= hi
                    pi += 2
                else:
                    hit = hit or p[pi] == s[si]
                pi += 1
            if hit == negated:
                return False
            si += 1
        else:
            if c == BACKSLASH and plen - pi >= 2:
                pi += 1
            if p[pi] != s[si]:
                return False
            si += 1
        pi += 1
        if si == slen:
            while pi < plen and p[pi] == STAR:
                pi += 1
            break
    return pi == plen and si == slen


def escape(s: str) -> str:
    return "".join("\\" + ch if ch in "*?[\\" else ch for ch in s)


CASES: list[tuple[str, str, bool]] = [
    # literals and case sensitivity
    ("abc", "abc", True),
    ("abc", "abd", False),
    ("abc", "ab", False),
    ("abc", "abcd", False),
    ("abc", "ABC", False),
    ("", "", True),
    ("", "a", False),
    # star
    ("*", "anything", True),
    ("*", "", False),  # Redis never enters its loop for an empty name
    ("**", "", False),
    ("a*", "a", True),
    ("a*", "", False),
    ("a*", "abc", True),
    ("a*", "ba", False),
    ("*c", "abc", True),
    ("*c", "abd", False),
    ("a*c", "ac", True),
    ("a*c", "abbbc", True),
    ("a*c", "abcb", False),
    ("a*b*c", "aXbYc", True),
    ("a*b*c", "acb", False),
    ("a**b", "ab", True),
    ("*a*", "bab", True),
    ("*:*", "md:x", True),
    ("*:*", "mdx", False),
    # question mark: one byte, not one character
    ("?", "a", True),
    ("?", "", False),
    ("?", "ab", False),
    ("a?c", "abc", True),
    ("a?c", "ac", False),
    ("?", "é", False),
    ("??", "é", True),
    ("?*", "x", True),
    # brackets
    ("[abc]", "b", True),
    ("[abc]", "d", False),
    ("[abc]", "", False),
    ("[a-c]", "b", True),
    ("[a-c]", "d", False),
    ("[c-a]", "b", True),  # reversed range is swapped
    ("[^a-c]", "b", False),
    ("[^a-c]", "d", True),
    ("[^abc]x", "dx", True),
    ("[]", "a", False),  # empty set
    ("[]", "]", False),
    ("[]]", "]", False),  # `[]` then a literal `]`
    ("[]]", "]]", False),
    ("[^]", "x", True),  # negated empty set: any byte
    ("[^]]", "x]", True),
    ("[a-]", "]", True),  # range a..] swallows the closing bracket
    ("[a-]", "_", True),
    ("[a-]", "-", False),
    ("[a-", "-", True),  # unterminated, too short for a range: set {a, -}
    ("[a-", "a", True),
    ("[a-", "b", False),
    ("[", "[", False),  # unterminated empty set
    ("[", "a", False),
    ("[^", "a", True),  # unterminated negated empty set
    ("[ab", "b", True),  # unterminated: set {a, b} ends the pattern
    ("[ab", "bb", False),
    ("[ab*", "*", True),
    ("[*]", "*", True),
    ("[*]", "a", False),
    ("[?]", "?", True),
    ("[?]", "a", False),
    ("[[]", "[", True),
    ("[-a]", "-", True),
    ("[a-c-e]", "-", True),
    ("[a-c-e]", "d", False),
    ("[é]", "é", False),  # two bytes in the set, one byte consumed
    ("[é][é]", "é", True),
    ("[a-\udcc3]", "A", True),  # signed C char: 0xC3 sorts below 'a'
    ("[a-\udcc3]", "b", False),
    ("[a-\udcc3]", "\udce9", True),
    ("[a-\udcc3]", "\udca9", False),
    # escapes outside brackets
    ("\\*", "*", True),
    ("\\*", "a", False),
    ("\\?", "?", True),
    ("\\?", "a", False),
    ("\\[a]", "[a]", True),
    ("\\[a]", "a", False),
    ("\\a", "a", True),
    ("\\\\", "\\", True),
    ("a\\", "a\\", True),  # trailing backslash is literal
    ("a\\", "a", False),
    ("\\", "\\", True),
    ("a\\*b", "a*b", True),
    ("a\\*b", "axb", False),
    ("*\\*", "abc*", True),
    ("*\\*", "abc", False),
    # escapes inside brackets
    ("[\\]]", "]", True),
    ("[\\]", "]", True),  # escape eats the `]`: unterminated set {]}
    ("[\\]", "\\", False),
    ("[\\", "\\", True),  # backslash too close to the end is literal
    ("[\\-a]", "-", True),
    ("[\\-a]", "a", True),
    ("[\\-a]", "b", False),
    ("[\\^a]", "^", True),
    ("[\\a-c]", "b", False),  # `\a` is escaped, so `-` and `c` are plain
    ("[\\a-c]", "-", True),
    ("[a-\\]", "\\", True),  # range a..\ (swapped)
    ("[a-\\]", "]", True),
    ("[a-\\]", "b", False),
    # non-ASCII
    ("市場:*", "市場:tick", True),
    ("市場:*", "市:tick", False),
    ("md:*", "md:é", True),
    ("*é", "café", True),
    ("caf?", "café", False),
    ("caf??", "café", True),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), CASES)
def test_explicit_cases(pattern: str, name: str, expected: bool) -> None:
    assert glob_match(pattern, name) is expected
    assert redis_reference(encode_name(pattern), encode_name(name)) is expected


def test_bytes_api_handles_invalid_utf8() -> None:
    assert glob_match_bytes(b"md:\xff*", b"md:\xff\xfe")
    assert glob_match("md:\udcff*", b"md:\xff\xfe".decode("utf-8", "surrogateescape"))
    assert not glob_match_bytes(b"md:?", b"md:\xc3\xa9")


def test_encode_name_round_trips_surrogateescape() -> None:
    raw = b"a\xff\xc3\xa9\x80"
    assert encode_name(raw.decode("utf-8", "surrogateescape")) == raw
    # Not obtainable from bytes, but must not raise.
    assert encode_name("\ud800x") == b"\xed\xa0\x80x"
    assert glob_match("*x", "\ud800x")


def test_star_nesting_limit_matches_redis() -> None:
    assert glob_match("*a" * 1000, "a" * 1000)
    assert not glob_match("*a" * 1001, "a" * 1001)
    # A trailing star run costs Redis no recursion.
    assert glob_match("a*" * 1001, "a" * 1001)


def test_hostile_patterns_are_not_exponential() -> None:
    assert not glob_match("a*" * 30 + "b", "a" * 3000)
    assert not glob_match("*a" * 30 + "*b", "a" * 3000)
    assert not glob_match("[a]*" * 30 + "b", "a" * 3000)
    assert not glob_match("*?" * 20 + "x", "y" * 2000)
    assert glob_match("*a" * 200, "a" * 200)


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ("md:tick", False),
        ("", False),
        ("md:*", True),
        ("md:?", True),
        ("md:[ab]", True),
        ("md:]", False),
        ("md:^-", False),
        ("md:\\*", True),  # escaped, still a pattern: PSUBSCRIBE gives it Redis's meaning
        ("md:\\?\\[", True),
        ("md:\\\\*", True),  # escaped backslash, then a real star
        ("md:\\", False),
        ("\\**", True),
    ],
)
def test_is_pattern(s: str, expected: bool) -> None:
    assert is_pattern(s) is expected


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("md:tick:*", "md:tick:"),
        ("md:?x", "md:"),
        ("md:[ab]", "md:"),
        ("*", ""),
        ("", ""),
        ("plain", "plain"),
        ("a\\*b*", "a*b"),
        ("a\\", "a\\"),
        ("a\\\\*", "a\\"),
        ("市場:*", "市場:"),
    ],
)
def test_literal_prefix(pattern: str, expected: str) -> None:
    assert literal_prefix(pattern) == expected


PATTERN_BYTES = st.lists(
    st.sampled_from([b"a", b"b", b"*", b"?", b"[", b"]", b"^", b"-", b"\\", b"\xc3", b"\xa9"]),
    max_size=9,
).map(b"".join)
NAME_BYTES = st.lists(
    st.sampled_from([b"a", b"b", b"c", b"]", b"^", b"-", b"\\", b"*", b"\xc3", b"\xa9", b"\xff"]),
    max_size=8,
).map(b"".join)
TEXT = st.text(alphabet="ab:*?[]^-\\é中", max_size=8)


@settings(max_examples=1500, deadline=None)
@given(PATTERN_BYTES, NAME_BYTES)
def test_agrees_with_reference_on_bytes(pattern: bytes, name: bytes) -> None:
    assert glob_match_bytes(pattern, name) == redis_reference(pattern, name)


@settings(max_examples=300, deadline=None)
@given(PATTERN_BYTES, st.lists(NAME_BYTES, max_size=4))
def test_agrees_with_reference_on_pattern_derived_names(
    pattern: bytes, suffixes: list[bytes]
) -> None:
    # Names built from the pattern's own bytes hit the interesting paths more
    # often than unrelated random names.
    for suffix in suffixes:
        name = pattern.replace(b"*", b"").replace(b"\\", b"")[:4] + suffix
        assert glob_match_bytes(pattern, name) == redis_reference(pattern, name)


@settings(max_examples=300, deadline=None)
@given(TEXT, TEXT)
def test_str_api_agrees_with_reference(pattern: str, name: str) -> None:
    expected = redis_reference(encode_name(pattern), encode_name(name))
    assert glob_match(pattern, name) == expected


@settings(max_examples=300, deadline=None)
@given(TEXT, TEXT)
def test_escaped_text_matches_only_itself(s: str, other: str) -> None:
    pattern = escape(s)
    assert literal_prefix(pattern) == s
    assert glob_match(pattern, s)
    assert glob_match(pattern, other) == (other == s)


@settings(max_examples=300, deadline=None)
@given(TEXT, TEXT)
def test_non_pattern_matches_exactly_its_literal(pattern: str, name: str) -> None:
    if is_pattern(pattern):
        return
    literal = literal_prefix(pattern)
    assert glob_match(pattern, literal)
    assert glob_match(pattern, name) == (name == literal)


@settings(max_examples=300, deadline=None)
@given(TEXT, TEXT)
def test_matched_names_start_with_literal_prefix(pattern: str, name: str) -> None:
    prefixed = literal_prefix(pattern) + name
    for candidate in (name, prefixed):
        if glob_match(pattern, candidate):
            assert encode_name(candidate).startswith(encode_name(literal_prefix(pattern)))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab:é", max_size=6), TEXT)
def test_literal_star_is_startswith(literal: str, name: str) -> None:
    assert glob_match(literal + "*", name) == (name != "" and name.startswith(literal))
