"""Role-based access control for channels. Pure logic, no I/O.

Each role has ``allow`` and ``deny`` lists of Redis glob patterns (see
:mod:`redis_ws_gateway.security.globmatch`). A principal holds one or more roles and
may carry a ``narrow`` list of patterns (from a JWT claim) that can only take
rights away.

Reading a channel (:meth:`Acl.may_read_channel`)
    allowed iff some role's allow pattern matches the channel, no deny pattern
    of any of the principal's roles matches it (deny wins), and, when a narrow
    list is present, some narrow pattern matches it. Unknown roles grant
    nothing; an empty narrow list grants nothing.

Subscribing to a wildcard pattern P (:meth:`Acl.may_subscribe_pattern`)
    General glob containment is never attempted. P is accepted only when all
    three hold, all byte comparisons being on the UTF-8 encoding
    (:func:`~redis_ws_gateway.security.globmatch.encode_name`):

    1. Contained in an allow pattern A of one of the roles, where "P is
       contained in A" means either

       a. ``P == A`` verbatim (the rule Redis's own ACLs use for PSUBSCRIBE), or
       b. ``A`` is the bare ``*`` (it matches every non-empty channel, and
          no pattern but the empty one delivers the empty channel), or
       c. ``P = L + "*"`` and ``A = L' + "*"``, where neither ``L`` nor ``L'``
          contains ``*``, ``?``, ``[`` or ``\\``, and ``L'`` is a prefix of
          ``L``. Spelled as a grammar::

              prefix-pattern = literal "*"
              literal        = *( any character except "*" / "?" / "[" / "\\" )

          So ``market:tick:*`` is contained in ``market:*`` and ``*``, while
          ``market*``, ``market:**``, ``market:[*]``, ``md?x`` and ``md\\:*``
          are contained only in a verbatim-equal pattern. Excluding ``\\``
          and ``[`` is what makes the textual test meaningful: in ``md:\\*``
          the star is escaped and in ``md:[a*`` an unterminated bracket
          swallows it, so neither is a prefix pattern at all.

    2. If a narrow list is present, contained in one of its patterns by the
       same rule.
    3. No deny pattern D of any of the principal's roles is *compatible* with
       P: D is compatible when ``literal_prefix(D)`` and ``literal_prefix(P)``
       are prefixes of one another (either way round). Every channel a pattern
       matches starts with its literal prefix, so a channel matched by both D
       and P would make the two prefixes compatible; refusing on compatibility
       is therefore conservative. For a deny of the form ``literal`` or
       ``literal*`` the literal prefix is that literal; for any other deny it is
       the text, escapes resolved, before its first unescaped metacharacter
       (so a deny of ``*`` or ``?x`` refuses every pattern subscription).

Why this is sound: under (a) P matches exactly the channels A matches; (b)
is the definition of ``*``; under (c) every channel P matches starts with
``L``, hence with ``L'``, and is not empty, which is all ``L' + "*"`` asks.
Together with 3, every channel P can deliver passes
:meth:`Acl.may_read_channel`. The router still checks each message
with :meth:`Acl.may_read_channel` as a second wall.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from redis_ws_gateway.security.globmatch import encode_name, glob_match, literal_prefix

__all__ = ["Acl", "RolePolicy"]

# The memo sits on the per-message path; clearing it wholesale keeps the bound
# trivial and a refill costs one glob evaluation per distinct key.
_MEMO_MAX_ENTRIES: Final = 10_000
# Keys hold the channel name; very long names would let 10k entries pin a lot of
# memory, and they are rare enough not to need the memo.
_MEMO_MAX_CHANNEL_CHARS: Final = 1024
_PREFIX_PATTERN_FORBIDDEN: Final = frozenset("*?[\\")


def _as_pattern_tuple(value: object, what: str) -> tuple[str, ...]:
    # A bare string is a sequence too; iterating "md:*" would yield the pattern
    # "*" and silently grant everything.
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{what} must be a sequence of pattern strings, not {type(value).__name__}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{what} entries must be str, not {type(item).__name__}")
    return items


@dataclass(frozen=True)
class RolePolicy:
    """Glob patterns a role may read (``allow``) and may never read (``deny``)."""

    allow: tuple[str, ...]
    deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Configuration loaders hand over lists; store tuples so the policy stays
        # hashable and immutable.
        object.__setattr__(self, "allow", _as_pattern_tuple(self.allow, "allow"))
        object.__setattr__(self, "deny", _as_pattern_tuple(self.deny, "deny"))


def _prefix_pattern_literal(pattern: str) -> bytes | None:
    """``L`` (encoded) when ``pattern`` is ``L + "*"`` in the restricted grammar."""
    if not pattern.endswith("*"):
        return None
    literal = pattern[:-1]
    if any(ch in _PREFIX_PATTERN_FORBIDDEN for ch in literal):
        return None
    return encode_name(literal)


def _compatible(a: bytes, b: bytes) -> bool:
    return a.startswith(b) or b.startswith(a)


@dataclass(frozen=True, slots=True)
class _Containers:
    """Patterns a subscription may be contained in, pre-classified."""

    verbatim: frozenset[str]
    prefix_literals: tuple[bytes, ...]

    @classmethod
    def of(cls, patterns: Iterable[str]) -> _Containers:
        verbatim = frozenset(patterns)
        literals = (_prefix_pattern_literal(p) for p in verbatim)
        return cls(verbatim, tuple(sorted({lit for lit in literals if lit is not None})))

    def contain(self, pattern: str, prefix_literal: bytes | None) -> bool:
        if pattern in self.verbatim:
            return True
        # A bare "*" matches every non-empty channel, and no pattern other than
        # the empty one (never accepted as a name) delivers the empty channel.
        if "*" in self.verbatim and pattern:
            return True
        if prefix_literal is None:
            return False
        return any(prefix_literal.startswith(lit) for lit in self.prefix_literals)


@dataclass(frozen=True, slots=True)
class _Role:
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    allow_containers: _Containers
    deny_prefixes: tuple[bytes, ...]

    @classmethod
    def of(cls, policy: RolePolicy) -> _Role:
        return cls(
            allow=policy.allow,
            deny=policy.deny,
            allow_containers=_Containers.of(policy.allow),
            deny_prefixes=tuple(sorted({encode_name(literal_prefix(d)) for d in policy.deny})),
        )


_MemoKey = tuple[tuple[str, ...], tuple[str, ...] | None, str]


class Acl:
    """Channel access decisions for principals holding one or more roles."""

    def __init__(self, policies: Mapping[str, RolePolicy]) -> None:
        for name, policy in policies.items():
            if not isinstance(policy, RolePolicy):
                raise TypeError(f"policy for role {name!r} must be a RolePolicy")
        self._roles: dict[str, _Role] = {
            name: _Role.of(policy) for name, policy in policies.items()
        }
        self._memo: dict[_MemoKey, bool] = {}

    def _known_roles(self, roles: Sequence[str]) -> list[_Role]:
        if isinstance(roles, str):
            raise TypeError("roles must be a sequence of role names, not a str")
        return [self._roles[r] for r in roles if r in self._roles]

    def may_read_channel(
        self, roles: Sequence[str], channel: str, narrow: Sequence[str] | None
    ) -> bool:
        """Whether a principal with ``roles`` and optional ``narrow`` list may read ``channel``."""
        narrow_key = None if narrow is None else _as_pattern_tuple(narrow, "narrow")
        key: _MemoKey = (tuple(roles), narrow_key, channel)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        result = self._may_read(self._known_roles(roles), channel, narrow_key)
        if len(channel) <= _MEMO_MAX_CHANNEL_CHARS:
            if len(self._memo) >= _MEMO_MAX_ENTRIES:
                self._memo.clear()
            self._memo[key] = result
        return result

    @staticmethod
    def _may_read(roles: list[_Role], channel: str, narrow: tuple[str, ...] | None) -> bool:
        if not any(glob_match(p, channel) for role in roles for p in role.allow):
            return False
        if any(glob_match(p, channel) for role in roles for p in role.deny):
            return False
        return narrow is None or any(glob_match(p, channel) for p in narrow)

    def may_subscribe_pattern(
        self, roles: Sequence[str], pattern: str, narrow: Sequence[str] | None
    ) -> bool:
        """Whether PSUBSCRIBE ``pattern`` provably delivers only readable channels.

        See the module docstring for the exact rule; anything it cannot prove
        is refused.
        """
        known = self._known_roles(roles)
        prefix_literal = _prefix_pattern_literal(pattern)
        if not any(role.allow_containers.contain(pattern, prefix_literal) for role in known):
            return False
        if narrow is not None:
            narrow_containers = _Containers.of(_as_pattern_tuple(narrow, "narrow"))
            if not narrow_containers.contain(pattern, prefix_literal):
                return False
        sub_prefix = encode_name(literal_prefix(pattern))
        return not any(_compatible(sub_prefix, d) for role in known for d in role.deny_prefixes)
