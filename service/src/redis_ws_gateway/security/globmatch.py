"""Glob matching with exactly the semantics Redis applies to PSUBSCRIBE patterns.

Redis matches pattern and channel byte by byte (``stringmatchlen`` in ``util.c``).
The gateway handles channel names as ``str``; they are UTF-8 on the wire, and a
name that is not valid UTF-8 must be decoded with ``errors="surrogateescape"``
so that :func:`encode_name` gives back the original bytes. Matching happens on
those bytes, not on code points, because that is what Redis does: ``?`` and
``[...]`` consume one *byte*, so ``?`` does not match ``"é"`` (two bytes) while
``??`` does.

Pattern syntax, as Redis interprets it:

``*``
    Any run of bytes, including none. Consecutive stars act as one.
``?``
    Exactly one byte.
``[...]``
    One byte from a set. ``[^...]`` negates the set. An item followed by ``-``
    and one more byte is an inclusive range, swapped if reversed (``z-a``),
    and that byte may even be ``]``: ``[a-]`` is the range ``a``..``]``, left
    open. Any other ``-`` is literal. ``\\x`` adds ``x`` literally and never
    starts a range. ``]`` right after ``[`` or ``[^`` closes an empty set,
    which matches nothing (``[^]`` matches any byte). A ``[`` that is never
    closed takes the rest of the pattern as its set.
``\\x``
    The byte ``x`` literally. A backslash that ends the pattern is itself a
    literal backslash.
anything else
    That byte, case-sensitively.

Quirks reproduced on purpose, because the gateway must predict what Redis will
deliver:

* An empty channel name is matched only by the empty pattern: Redis's loop
  never runs when the name is empty, so even ``*`` does not match ``""``.
* Range ends and the byte are compared as C ``char``, which is signed on
  x86-64: bytes 0x80..0xFF sort *below* ASCII, so ``[a-\\xc3]`` means
  0xC3..0xFF plus 0x00..``a``. This only matters for ranges with one ASCII
  and one non-ASCII end (on arm64, where ``char`` is unsigned, Redis differs).
* Redis gives up (no match) once matching would recurse through more than 1000
  stars, i.e. for a pattern with more than 1000 runs of ``*`` that are
  followed by something other than ``*``. Debian's 7.0.15 package has this
  limit (a backported fix against unbounded pattern recursion), as do current
  upstream releases.

Complexity: a pattern is compiled once (cached) into one-byte tokens and stars;
matching is the classic two-pointer scan that, on a mismatch, backtracks only
to the most recent star. That is sufficient when every non-star token consumes
exactly one byte, and costs O(len(pattern) * len(name)) in the worst case
(O(len(name)) for the usual ``literal`` and ``literal*`` patterns), never
exponential, whatever the pattern. Nothing is rejected here; limits on pattern
size live with the callers.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

__all__ = [
    "encode_name",
    "glob_match",
    "glob_match_bytes",
    "is_pattern",
    "literal_prefix",
]

_STAR: Final = ord("*")
_QUESTION: Final = ord("?")
_OPEN: Final = ord("[")
_CLOSE: Final = ord("]")
_CARET: Final = ord("^")
_DASH: Final = ord("-")
_BACKSLASH: Final = ord("\\")

_ALL_BYTES: Final = frozenset(range(256))
_SINGLE_BYTE: Final = tuple(frozenset((b,)) for b in range(256))
# Redis returns "no match" when its recursion depth exceeds this many stars.
_MAX_STAR_NESTING: Final = 1000
_METACHARS: Final = frozenset("*?[")

# A token is the set of bytes it accepts, or None for a star.
_Token = frozenset[int] | None


class _Kind(enum.Enum):
    EXACT = enum.auto()  # only single-byte tokens: equality with `literal`
    PREFIX = enum.auto()  # single-byte tokens then stars: startswith(`literal`)
    GENERAL = enum.auto()
    NEVER = enum.auto()  # beyond Redis's nesting limit


@dataclass(frozen=True, slots=True)
class _Compiled:
    kind: _Kind
    literal: bytes
    tokens: tuple[_Token, ...]


def encode_name(s: str) -> bytes:
    """The bytes Redis sees for the channel name or pattern ``s``.

    UTF-8, with lone surrogates U+DC80..U+DCFF turned back into the bytes
    ``surrogateescape`` decoding made them from. Any other lone surrogate can
    not come from decoding bytes; it is encoded with ``surrogatepass`` only so
    that this function (and matching) is total.
    """
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        out = bytearray()
        for ch in s:
            try:
                out += ch.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                out += ch.encode("utf-8", "surrogatepass")
        return bytes(out)


def _as_c_char(b: int) -> int:
    # Redis compares range ends as (signed) C chars.
    return b - 256 if b >= 0x80 else b


def _compile_class(p: bytes, i: int) -> tuple[frozenset[int], int]:
    """Parse a bracket expression whose body starts at ``p[i]``.

    Returns the accepted bytes and the index just past the expression. The
    order of the checks mirrors Redis, which is what decides the odd cases
    (``[\\]`` escapes the bracket, ``[a-]`` is a range ending at ``]``).
    """
    n = len(p)
    negated = i < n and p[i] == _CARET
    if negated:
        i += 1
    members: set[int] = set()
    while True:
        if n - i >= 2 and p[i] == _BACKSLASH:
            members.add(p[i + 1])
            i += 2
        elif i >= n:
            break
        elif p[i] == _CLOSE:
            i += 1
            break
        elif n - i >= 3 and p[i + 1] == _DASH:
            lo, hi = sorted((_as_c_char(p[i]), _as_c_char(p[i + 2])))
            members.update(c & 0xFF for c in range(lo, hi + 1))
            i += 3
        else:
            members.add(p[i])
            i += 1
    if negated:
        return _ALL_BYTES - members, i
    return frozenset(members), i


@lru_cache(maxsize=4096)
def _compile(pattern: bytes) -> _Compiled:
    tokens: list[_Token] = []
    i, n = 0, len(pattern)
    while i < n:
        b = pattern[i]
        if b == _STAR:
            tokens.append(None)
            i += 1
        elif b == _QUESTION:
            tokens.append(_ALL_BYTES)
            i += 1
        elif b == _OPEN:
            accepted, i = _compile_class(pattern, i + 1)
            tokens.append(accepted)
        else:
            if b == _BACKSLASH and n - i >= 2:
                i += 1
                b = pattern[i]
            tokens.append(_SINGLE_BYTE[b])
            i += 1

    # Each star run followed by more pattern costs Redis one level of recursion
    # on every successful path; a trailing run is answered without recursing.
    nested_runs = 0
    for prev, tok in itertools.pairwise(tokens):
        if prev is None and tok is not None:
            nested_runs += 1
    if nested_runs > _MAX_STAR_NESTING:
        return _Compiled(_Kind.NEVER, b"", ())

    head_len = len(tokens)
    while head_len and tokens[head_len - 1] is None:
        head_len -= 1
    head = tokens[:head_len]
    # A one-element set behaves exactly like a literal byte, whatever its spelling.
    if all(tok is not None and len(tok) == 1 for tok in head):
        literal = bytes(next(iter(tok)) for tok in head if tok is not None)
        kind = _Kind.PREFIX if head_len < len(tokens) else _Kind.EXACT
        return _Compiled(kind, literal, ())
    return _Compiled(_Kind.GENERAL, b"", tuple(tokens))


def _match_tokens(tokens: tuple[_Token, ...], name: bytes) -> bool:
    n, m = len(name), len(tokens)
    ti = si = 0
    star_ti = -1  # token index of the most recent star
    star_si = 0  # name index where that star's current match ends
    while si < n:
        if ti < m:
            tok = tokens[ti]
            if tok is None:
                star_ti, star_si = ti, si
                ti += 1
                continue
            if name[si] in tok:
                ti += 1
                si += 1
                continue
        if star_ti < 0:
            return False
        # Growing only the latest star is enough: the tokens before it already
        # matched at their leftmost possible place, and since every non-star
        # token is one byte wide, any match that moves them further right can
        # be redrawn with the latest star absorbing the difference instead.
        star_si += 1
        si = star_si
        ti = star_ti + 1
    while ti < m and tokens[ti] is None:
        ti += 1
    return ti == m


def glob_match_bytes(pattern: bytes, name: bytes) -> bool:
    """Whether Redis would deliver a message on channel ``name`` to PSUBSCRIBE ``pattern``."""
    if not name:
        return not pattern
    compiled = _compile(pattern)
    if compiled.kind is _Kind.EXACT:
        return name == compiled.literal
    if compiled.kind is _Kind.PREFIX:
        return name.startswith(compiled.literal)
    if compiled.kind is _Kind.NEVER:
        return False
    return _match_tokens(compiled.tokens, name)


def glob_match(pattern: str, name: str) -> bool:
    """Whether Redis would deliver a message on channel ``name`` to PSUBSCRIBE ``pattern``.

    Both are compared as the bytes :func:`encode_name` gives, see the module
    docstring.
    """
    return glob_match_bytes(encode_name(pattern), encode_name(name))


def is_pattern(s: str) -> bool:
    """True when ``s`` contains ``*``, ``?`` or ``[`` anywhere, escaped or not.

    This decides PSUBSCRIBE versus SUBSCRIBE for a client's name. Escaped
    metacharacters count too, so ``md:\\*`` is the pattern that matches only
    the channel ``md:*`` (Redis's meaning of the escape) rather than an exact
    channel whose name holds a backslash.
    """
    # isdisjoint walks the string in C: this runs for every channel of every
    # subscribe (a Python generator over its characters was 1% of the
    # gateway's CPU in a W7 reconnect storm).
    return not _METACHARS.isdisjoint(s)


def literal_prefix(pattern: str) -> str:
    """The text every channel matched by ``pattern`` starts with.

    Escapes are resolved; it stops at the first unescaped ``*``, ``?`` or ``[``.
    For a pattern without any of those it is the single channel the pattern
    matches. Metacharacters and the backslash are ASCII, so working on code
    points gives the same result as working on the UTF-8 bytes.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch in _METACHARS:
            break
        if ch == "\\" and i + 1 < n:
            i += 1
            ch = pattern[i]
        out.append(ch)
        i += 1
    return "".join(out)
