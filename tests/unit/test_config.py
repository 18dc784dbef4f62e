from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from redis_ws_gateway.config import ENV_SETTINGS, ConfigError, Settings, load_settings


def test_defaults_match_the_seed() -> None:
    s = load_settings({})
    assert s.port == 8889
    assert s.require_auth is False
    assert s.default_role == "user"
    assert s.max_channels_per_client == 50
    assert s.max_wildcard_subscriptions == 5
    assert s.redis_url == "redis://127.0.0.1:6379"
    assert s == Settings()


def test_env_values_are_parsed() -> None:
    s = load_settings(
        {
            "REDIS_WS_GATEWAY_PORT": "9000",
            "REQUIRE_AUTH": "true",
            "GATEWAY_API_KEY": "k",
            "MAX_CHANNELS_PER_CLIENT": "7",
            "LOG_FORMAT": "JSON",
            "UNSUBSCRIBE_LINGER_SECONDS": "0.5",
        }
    )
    assert (s.port, s.require_auth, s.api_key, s.max_channels_per_client) == (9000, True, "k", 7)
    assert s.log_format == "json" and s.unsubscribe_linger_seconds == 0.5


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDIS_WS_GATEWAY_PORT", "eighty"),
        ("REDIS_WS_GATEWAY_PORT", "70000"),
        ("REQUIRE_AUTH", "maybe"),
        ("MAX_CHANNELS_PER_CLIENT", "0"),
        ("MAX_WILDCARD_SUBSCRIPTIONS", "-1"),
        ("REDIS_URL", "http://x"),
        ("LOG_LEVEL", "loud"),
        ("DRAIN_WINDOW_SECONDS", "soon"),
        ("DEFAULT_ROLE", "nobody"),
        ("DEFAULT_CHANNEL_POLICY", "ignore"),
        ("PAYLOAD_VALIDATION", "none"),
    ],
)
def test_invalid_value_names_setting_and_value(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({name: value})
    assert name in str(err.value) and value in str(err.value)


def test_payload_validation_is_json_unless_turned_off() -> None:
    assert load_settings({}).payload_validation == "json"
    assert load_settings({"PAYLOAD_VALIDATION": "OFF"}).payload_validation == "off"


def test_every_env_setting_is_documented() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "CONFIG.md").read_text()
    missing = [name for name in ENV_SETTINGS if f"`{name}`" not in doc]
    assert not missing, f"settings missing from docs/CONFIG.md: {missing}"


def test_secret_values_never_appear_in_errors() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"GATEWAY_API_KEY": "   "})
    assert "<secret>" in str(err.value)


def test_require_auth_without_any_credential_source_is_refused() -> None:
    with pytest.raises(ConfigError, match="REQUIRE_AUTH"):
        load_settings({"REQUIRE_AUTH": "true"})


def test_config_file_roles_and_policies(tmp_path: Path) -> None:
    f = tmp_path / "gw.yaml"
    f.write_text(
        "roles:\n"
        "  user: {allow: ['market:*', 'indicators:*'], deny: ['market:secret:*']}\n"
        "  admin: {allow: ['*']}\n"
        "channel_policies:\n"
        "  - {pattern: 'market:*', policy: conflate}\n"
    )
    s = load_settings({"REDIS_WS_GATEWAY_CONFIG": str(f)})
    assert s.roles["user"].allow == ("market:*", "indicators:*")
    assert s.roles["user"].deny == ("market:secret:*",)
    assert [(p.pattern, p.policy) for p in s.channel_policies] == [("market:*", "conflate")]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("roles: [1]", "roles"),
        ("roles:\n  user: {allow: 'market:*'}", "roles.user.allow"),
        ("roles:\n  user: {allow: ['*'], extra: 1}", "unknown keys"),
        ("channel_policies:\n  - {pattern: 'x', policy: explode}", "policy"),
        ("surprise: 1", "unknown sections"),
        ("roles: [", "not valid YAML"),
        ("- 1", "mapping at top level"),
    ],
)
def test_bad_config_file_is_refused(tmp_path: Path, text: str, fragment: str) -> None:
    f = tmp_path / "gw.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings({"REDIS_WS_GATEWAY_CONFIG": str(f)})
    assert fragment in str(err.value)


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings({"REDIS_WS_GATEWAY_CONFIG": str(tmp_path / "nope.yaml")})


def test_serve_exits_with_message_on_bad_setting() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "redis_ws_gateway", "serve"],
        env={"REDIS_WS_GATEWAY_PORT": "abc", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "REDIS_WS_GATEWAY_PORT='abc'" in proc.stderr


def test_demo_config_is_valid(tmp_path: Path) -> None:
    from redis_ws_gateway.demo import DEMO_CONFIG

    f = tmp_path / "demo.yaml"
    f.write_text(DEMO_CONFIG)
    s = load_settings({"REDIS_WS_GATEWAY_CONFIG": str(f)})
    assert [r.pattern for r in s.durable] == ["engine:decision:*"]
    assert s.snapshots[0].key == "market:last:{suffix}"
