"""Unit tests for role-based channel access control."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redis_ws_gateway.security.acl import Acl, RolePolicy
from redis_ws_gateway.security.globmatch import glob_match, literal_prefix


@pytest.fixture
def acl() -> Acl:
    return Acl(
        {
            "admin": RolePolicy(allow=("*",), deny=()),
            "trader": RolePolicy(
                allow=("market:*", "md:[a-z]*", "news"), deny=("market:secret:*",)
            ),
            "engine": RolePolicy(allow=("engine:*",), deny=("engine:decision:*",)),
            "auditor": RolePolicy(allow=("engine:decision:*", "audit:*"), deny=()),
            "blocked": RolePolicy(allow=(), deny=("market:*",)),
            "nothing": RolePolicy(allow=(), deny=()),
        }
    )


# --- reading channels -------------------------------------------------------


@pytest.mark.parametrize(
    ("roles", "channel", "expected"),
    [
        (["trader"], "market:tick", True),
        (["trader"], "market:", True),
        (["trader"], "market", False),
        (["trader"], "news", True),
        (["trader"], "news:x", False),
        (["trader"], "md:abc", True),
        (["trader"], "md:Abc", False),
        (["trader"], "market:secret:x", False),  # deny wins
        (["trader"], "engine:x", False),
        (["admin"], "anything:at:all", True),
        (["admin"], "", False),  # Redis's `*` does not match the empty name either
        (["engine"], "engine:tick", True),
        (["engine"], "engine:decision:1", False),
        # deny of one role wins over allow of another
        (["engine", "auditor"], "engine:decision:1", False),
        (["auditor"], "engine:decision:1", True),
        (["admin", "blocked"], "market:tick", False),
        (["admin", "blocked"], "news", True),
        (["nothing"], "news", False),
        (["unknown-role"], "news", False),
        ([], "news", False),
    ],
)
def test_may_read_channel(acl: Acl, roles: list[str], channel: str, expected: bool) -> None:
    assert acl.may_read_channel(roles, channel, None) is expected
    # Second call is served by the memo and must give the same answer.
    assert acl.may_read_channel(roles, channel, None) is expected


@pytest.mark.parametrize(
    ("narrow", "channel", "expected"),
    [
        (["market:tick:*"], "market:tick:BTC", True),
        (["market:tick:*"], "market:book:BTC", False),
        (["market:tick:*", "news"], "news", True),
        ([], "market:tick:BTC", False),  # an empty narrow list grants nothing
        (["engine:*"], "engine:x", False),  # narrowing never adds rights
        (["*"], "market:secret:x", False),  # nor lifts a deny
    ],
)
def test_narrow_only_takes_rights_away(
    acl: Acl, narrow: list[str], channel: str, expected: bool
) -> None:
    assert acl.may_read_channel(["trader"], channel, narrow) is expected


def test_bare_strings_are_rejected_instead_of_iterated(acl: Acl) -> None:
    # Iterating "md:*" would yield the pattern "*".
    with pytest.raises(TypeError):
        RolePolicy(allow="md:*", deny=())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        acl.may_read_channel("admin", "news", None)
    with pytest.raises(TypeError):
        acl.may_read_channel(["trader"], "news", "news")
    with pytest.raises(TypeError):
        acl.may_subscribe_pattern("admin", "news:*", None)
    with pytest.raises(TypeError):
        acl.may_subscribe_pattern(["trader"], "market:*", "market:*")


def test_role_policy_accepts_lists_from_config() -> None:
    policy = RolePolicy(allow=["a:*"], deny=["a:b"])  # type: ignore[arg-type]
    assert policy.allow == ("a:*",) and policy.deny == ("a:b",)
    assert hash(policy) == hash(RolePolicy(allow=("a:*",), deny=("a:b",)))


def test_memo_is_bounded(acl: Acl) -> None:
    for i in range(25_000):
        assert acl.may_read_channel(["trader"], f"market:{i}", None)
    assert len(acl._memo) <= 10_000
    assert acl.may_read_channel(["trader"], "market:secret:1", None) is False


def test_long_channels_are_answered_but_not_memoised(acl: Acl) -> None:
    channel = "market:" + "x" * 5000
    assert acl.may_read_channel(["trader"], channel, None)
    assert all(key[2] != channel for key in acl._memo)


# --- subscribing to patterns ---------------------------------------------------


@pytest.mark.parametrize(
    ("roles", "pattern", "expected"),
    [
        # verbatim equality with an allowed pattern (Redis ACL's rule)
        (["trader"], "market:*", False),  # refused: deny market:secret:* overlaps
        (["trader"], "md:[a-z]*", True),
        (["engine"], "engine:*", False),  # deny engine:decision:* overlaps
        (["engine"], "engine:tick:*", True),
        (["engine"], "engine:decision:*", False),
        (["engine"], "engine:deci*", False),
        (["auditor"], "engine:decision:*", True),
        (["auditor"], "engine:decision:x:*", True),
        (["auditor"], "engine:*", False),
        # literal* inside literal*
        (["trader"], "market:tick:*", True),
        (["trader"], "market:secret:*", False),
        (["trader"], "market:secret*", False),  # compatible with the deny prefix
        (["trader"], "market:s*", False),
        (["trader"], "market:t*", True),
        (["trader"], "market*", False),  # would also match "marketing"
        (["trader"], "*", False),
        (["trader"], "market:**", False),  # only a single trailing star
        (["trader"], "market:[*]", False),
        (["trader"], "market:?", False),
        (["trader"], "market:tick:?*", False),
        (["trader"], "md:*", False),  # broader than md:[a-z]*
        (["trader"], "md:a*", False),  # no general containment reasoning
        (["trader"], "md?x", False),
        (["trader"], "md:\\*", False),
        (["trader"], "market:\\**", False),
        (["trader"], "\\*", False),
        (["trader"], "news*", False),  # allow "news" is a single channel
        (["trader"], "engine:*", False),
        (["admin"], "*", True),
        (["admin"], "engine:*", True),
        (["admin"], "md?x", True),  # a bare "*" allow contains every pattern
        (["admin"], "[a-z]*", True),
        (["admin", "blocked"], "*", False),
        (["admin", "blocked"], "news:*", True),
        (["admin", "blocked"], "mark*", False),  # "mark" is a prefix of "market:"
        (["blocked"], "news:*", False),
        (["nothing"], "*", False),
        (["unknown-role"], "*", False),
        ([], "*", False),
    ],
)
def test_may_subscribe_pattern(acl: Acl, roles: list[str], pattern: str, expected: bool) -> None:
    assert acl.may_subscribe_pattern(roles, pattern, None) is expected


@pytest.mark.parametrize(
    ("allow", "pattern"),
    [
        ("md:\\*", "md:\\x*"),  # the allow's star is escaped: it is the channel "md:*"
        ("md:\\*", "md:\\**"),
        ("md:[a*", "md:[ab]*"),  # unterminated bracket: the allow is the set {a, *}
        ("md:[a*", "md:[a*b*"),
        ("md:[a-*", "md:[a-*]*"),
    ],
)
def test_textual_prefix_of_a_non_prefix_pattern_is_refused(allow: str, pattern: str) -> None:
    acl = Acl({"r": RolePolicy(allow=(allow,), deny=())})
    assert acl.may_subscribe_pattern(["r"], allow, None)
    assert not acl.may_subscribe_pattern(["r"], pattern, None)
    assert not acl.may_subscribe_pattern(["r"], "md:*", [allow])


def test_escaped_star_is_not_a_prefix_pattern() -> None:
    acl = Acl({"r": RolePolicy(allow=("md:\\**",), deny=())})
    assert acl.may_subscribe_pattern(["r"], "md:\\**", None)  # verbatim
    assert not acl.may_subscribe_pattern(["r"], "md:\\*x*", None)
    assert acl.may_read_channel(["r"], "md:*x", None)
    assert not acl.may_read_channel(["r"], "md:x", None)


@pytest.mark.parametrize(
    ("narrow", "pattern", "expected"),
    [
        (None, "market:tick:*", True),
        (["market:tick:*"], "market:tick:*", True),
        (["market:tick:*"], "market:tick:BTC:*", True),
        (["market:tick:*"], "market:book:*", False),
        (["market:tick:*"], "market:*", False),
        (["market:tick:?"], "market:tick:*", False),
        (["market:tick:?"], "market:tick:?", False),  # not contained in the role's allows
        ([], "market:tick:*", False),
        (["*"], "market:tick:*", True),
    ],
)
def test_narrow_applies_to_pattern_subscriptions(
    acl: Acl, narrow: list[str] | None, pattern: str, expected: bool
) -> None:
    assert acl.may_subscribe_pattern(["trader"], pattern, narrow) is expected


def test_narrow_verbatim_equality() -> None:
    acl = Acl({"r": RolePolicy(allow=("md:?x",), deny=())})
    assert acl.may_subscribe_pattern(["r"], "md:?x", ["md:?x"])
    assert not acl.may_subscribe_pattern(["r"], "md:?x", ["md:*"])


@pytest.mark.parametrize(
    ("deny", "pattern", "expected"),
    [
        ("a:b", "a:*", False),  # literal deny under the subscription
        ("a:b", "a:b:*", False),  # literal deny is a prefix: refused, conservatively
        ("a:b", "a:c*", True),
        ("a:[bc]*", "a:x*", False),  # other metacharacters: literal prefix a: is compatible
        ("a:b?", "a:c*", True),
        ("*:b", "a:*", False),
        ("?", "a:*", False),
        ("\\*", "a:*", True),  # a literal "*" channel, incompatible with "a:"
        ("a\\*", "a*", False),
    ],
)
def test_deny_compatibility(deny: str, pattern: str, expected: bool) -> None:
    acl = Acl({"r": RolePolicy(allow=("*",), deny=(deny,))})
    assert acl.may_subscribe_pattern(["r"], pattern, None) is expected


def test_prefix_comparison_is_on_bytes() -> None:
    # "\udcc3" is the byte 0xC3 (surrogateescape), the first byte of "é".
    acl = Acl({"r": RolePolicy(allow=("*",), deny=("x\udcc3*",))})
    assert acl.may_read_channel(["r"], "xé", None) is False
    assert acl.may_subscribe_pattern(["r"], "xé*", None) is False
    acl = Acl({"r": RolePolicy(allow=("xé*",), deny=())})
    assert acl.may_subscribe_pattern(["r"], "x\udcc3\udca9:*", None)


def test_huge_patterns_are_answered_quickly() -> None:
    acl = Acl(
        {
            "admin": RolePolicy(allow=("*",), deny=()),
            "md": RolePolicy(allow=("md:*",), deny=("md:secret*",)),
        }
    )
    long_literal = "md:" + "a" * 9_996 + "*"
    assert len(long_literal) == 10_000
    assert acl.may_subscribe_pattern(["md"], long_literal, None)
    assert acl.may_subscribe_pattern(["admin"], long_literal, None)
    hostile = "*a" * 5_000
    # Allowed by the bare "*"; length and metacharacter caps are the gateway's job.
    assert acl.may_subscribe_pattern(["admin"], hostile, None)
    assert not acl.may_subscribe_pattern(["md"], "md:" + "[a]" * 3_332 + "*", None)
    assert acl.may_read_channel(["md"], "md:" + "a" * 10_000, None)
    assert not acl.may_read_channel(["md"], "md:secret" + "a" * 10_000, None)
    assert not acl.may_read_channel(["admin"], "x", ["a*" * 5_000 + "b"])


# --- property: an accepted subscription never delivers an unreadable channel ----

ALPHABET = "ab:*?[]^\\"
LITERAL = st.text(alphabet="ab:", max_size=4)
ANY_PATTERN = st.text(alphabet=ALPHABET, max_size=6)
# Backslashes and brackets make "prefix-looking" patterns whose final star is
# escaped or swallowed by an unterminated bracket.
RAW_PREFIX = st.tuples(
    st.text(alphabet="ab:\\[", max_size=3), st.sampled_from(["", "", "\\", "\\\\", "[", "[a"])
).map("".join)
PREFIX_PATTERN = RAW_PREFIX.map(lambda s: s + "*")
PATTERN = st.one_of(PREFIX_PATTERN, ANY_PATTERN, LITERAL)
# Denies with an empty literal prefix refuse every subscription; keep them rare.
DENY_PATTERN = st.one_of(
    st.text(alphabet="ab:", min_size=1, max_size=4).flatmap(
        lambda s: st.sampled_from([s, s + "*", s + "?", s + "[ab]*"])
    ),
    ANY_PATTERN,
)
POLICY = st.builds(
    RolePolicy,
    allow=st.lists(PATTERN, max_size=3).map(tuple),
    deny=st.lists(DENY_PATTERN, max_size=2).map(tuple),
)
Scenario = tuple[Acl, list[str], str, list[str] | None, list[str]]
SUFFIXES = st.lists(st.text(alphabet="ab:*?[", max_size=3), min_size=1, max_size=4)


def _channels_around(patterns: set[str], suffixes: list[str]) -> list[str]:
    # Channels near every pattern in play, so that those a deny or a narrow
    # pattern is about get generated, not just those near the subscription.
    return [literal_prefix(p) + s for p in sorted(patterns) for s in suffixes]


def _derived_subscriptions(draw: st.DrawFn, base: str) -> str:
    extension = draw(RAW_PREFIX)
    cut = draw(st.integers(0, len(base)))
    return draw(
        st.sampled_from(
            [
                base,
                literal_prefix(base) + extension + "*",
                base[:-1] + extension + "*",  # textual extension, escapes and all
                literal_prefix(base)[:cut] + "*",
            ]
        )
    )


def _assert_sound(scenario: Scenario) -> None:
    acl, roles, pattern, narrow, channels = scenario
    if not acl.may_subscribe_pattern(roles, pattern, narrow):
        return
    for channel in channels:
        if glob_match(pattern, channel):
            assert acl.may_read_channel(roles, channel, narrow), (pattern, channel)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """Several roles, denies and narrowing together."""
    policies = draw(
        st.dictionaries(st.sampled_from(["r1", "r2", "r3"]), POLICY, min_size=1, max_size=3)
    )
    roles = draw(st.lists(st.sampled_from([*sorted(policies), "ghost"]), min_size=1, max_size=3))
    narrow = draw(st.one_of(st.none(), st.none(), st.lists(PATTERN, max_size=2)))
    # Build the subscription from the principal's own patterns most of the
    # time, otherwise nearly everything is refused and the property is idle.
    own = [p for r in roles if r in policies for p in policies[r].allow] + (narrow or [])
    if own and draw(st.integers(0, 3)) > 0:
        pattern = _derived_subscriptions(draw, draw(st.sampled_from(own)))
    else:
        pattern = draw(PATTERN)
    in_play = {pattern, *(narrow or [])}
    for policy in policies.values():
        in_play.update(policy.allow)
        in_play.update(policy.deny)
    channels = _channels_around(in_play, draw(SUFFIXES))
    return Acl(policies), roles, pattern, narrow, channels


@st.composite
def containment_scenarios(draw: st.DrawFn) -> Scenario:
    """One role without denies: exercises allow and narrow containment only."""
    allow = draw(st.lists(st.one_of(PREFIX_PATTERN, PATTERN), min_size=1, max_size=3))
    narrow = draw(st.one_of(st.none(), st.lists(PATTERN, min_size=1, max_size=2)))
    pattern = _derived_subscriptions(draw, draw(st.sampled_from(allow + (narrow or []))))
    channels = _channels_around({pattern, *allow, *(narrow or [])}, draw(SUFFIXES))
    return Acl({"r": RolePolicy(allow=tuple(allow), deny=())}), ["r"], pattern, narrow, channels


@st.composite
def deny_scenarios(draw: st.DrawFn) -> Scenario:
    """Everything allowed except the denies: exercises the deny rule only."""
    deny = draw(st.lists(DENY_PATTERN, min_size=1, max_size=3))
    pattern = draw(
        st.one_of(
            PATTERN,
            st.sampled_from(deny)
            .map(literal_prefix)
            .flatmap(
                lambda lit: st.sampled_from([lit + "*", lit[:-1] + "*", lit + "a*", lit + "?"])
            ),
        )
    )
    policy = RolePolicy(allow=("*", pattern), deny=tuple(deny))
    channels = _channels_around({pattern, *deny}, draw(SUFFIXES))
    return Acl({"r": policy}), ["r"], pattern, None, channels


@settings(max_examples=500, deadline=None)
@given(scenarios())
def test_accepted_subscription_stays_inside_readable_channels(scenario: Scenario) -> None:
    _assert_sound(scenario)


@settings(max_examples=800, deadline=None)
@given(containment_scenarios())
def test_accepted_subscription_is_contained_in_allow_and_narrow(scenario: Scenario) -> None:
    _assert_sound(scenario)


@settings(max_examples=500, deadline=None)
@given(deny_scenarios())
def test_accepted_subscription_avoids_denied_channels(scenario: Scenario) -> None:
    _assert_sound(scenario)


@settings(max_examples=300, deadline=None)
@given(PATTERN)
def test_pattern_equal_to_an_allow_without_denies_is_accepted(pattern: str) -> None:
    acl = Acl({"r": RolePolicy(allow=(pattern,), deny=())})
    assert acl.may_subscribe_pattern(["r"], pattern, None)
    assert acl.may_subscribe_pattern(["r"], pattern, [pattern])


@pytest.mark.parametrize("pattern", ["md:?x", "md:[a-z]*", "*", "engine:*", "md:\\*", "[^a]?*"])
def test_bare_star_allow_contains_every_pattern(pattern: str) -> None:
    acl = Acl({"admin": RolePolicy(allow=("*",))})
    assert acl.may_subscribe_pattern(["admin"], pattern, None)


def test_bare_star_allow_still_yields_to_deny() -> None:
    acl = Acl({"user": RolePolicy(allow=("*",), deny=("engine:decision:*",))})
    assert not acl.may_subscribe_pattern(["user"], "engine:*", None)
    assert not acl.may_subscribe_pattern(["user"], "e?gine:*", None)
    assert acl.may_subscribe_pattern(["user"], "market:?x", None)
