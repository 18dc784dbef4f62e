"""Every setting of the gateway, read once at start and validated.

Environment variables keep the seed's names and meanings. What environment
variables express badly (roles, channel policies) lives in an optional YAML
file named by ``REDIS_WS_GATEWAY_CONFIG``. Any invalid value raises
``ConfigError`` naming the setting and the value, and the process stops.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml

Policy = Literal["conflate", "drop-oldest", "disconnect"]
POLICIES: tuple[Policy, ...] = ("conflate", "drop-oldest", "disconnect")
LogFormat = Literal["json", "console", "auto"]
PayloadValidation = Literal["json", "off"]


class ConfigError(ValueError):
    """A setting has a value the gateway cannot run with."""

    def __init__(self, setting: str, value: object, reason: str) -> None:
        shown = "<secret>" if _is_secret(setting) else repr(value)
        super().__init__(f"invalid setting {setting}={shown}: {reason}")
        self.setting = setting


def _is_secret(name: str) -> bool:
    return any(word in name.upper() for word in ("KEY", "SECRET", "PASSWORD", "TOKEN"))


@dataclass(frozen=True)
class RoleConfig:
    allow: tuple[str, ...]
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChannelPolicy:
    """Slow-consumer policy for channels matching ``pattern`` (first match wins)."""

    pattern: str
    policy: Policy


@dataclass(frozen=True)
class DurableRule:
    """Channels matching ``pattern`` are backed by a Redis Stream."""

    pattern: str
    maxlen: int = 100_000
    max_age_seconds: float = 0.0


@dataclass(frozen=True)
class ExposedStream:
    """An existing stream, written by a module that knows nothing of us,
    served as the durable channel ``channel``."""

    channel: str
    key: str
    field: str | None = None


@dataclass(frozen=True)
class SnapshotRule:
    """Channels matching ``pattern`` (``literal*``) may ask for the current
    state kept at ``key`` ({channel} and {suffix} are filled in)."""

    pattern: str
    key: str
    type: Literal["string", "hash"] = "string"


DEFAULT_ROLES: Mapping[str, RoleConfig] = {
    "admin": RoleConfig(allow=("*",)),
    "user": RoleConfig(allow=("*",)),
}

# Ticks and indicators are superseded by the next value, so keeping only the
# latest is what a lagging screen wants; decisions and signals must never
# vanish silently, so a consumer that cannot keep up is disconnected instead.
DEFAULT_CHANNEL_POLICIES: tuple[ChannelPolicy, ...] = (
    ChannelPolicy("market:*", "conflate"),
    ChannelPolicy("indicators:*", "conflate"),
    ChannelPolicy("engine:signal*", "disconnect"),
    ChannelPolicy("engine:decision*", "disconnect"),
)


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 8889
    # 0: /metrics, /admin/* and the console share the public port.
    internal_port: int = 0
    redis_url: str = "redis://127.0.0.1:6379"
    require_auth: bool = False
    api_key: str | None = None
    default_role: str = "user"
    max_channels_per_client: int = 50
    max_wildcard_subscriptions: int = 5
    log_level: str = "info"
    log_format: LogFormat = "auto"
    config_file: str | None = None
    unsubscribe_linger_seconds: float = 2.0
    subscribe_timeout_seconds: float = 5.0
    ws_ping_interval_seconds: float = 20.0
    ws_max_message_bytes: int = 65536
    # permessage-deflate (RFC 7692) for clients that offer it: each data
    # message of at least ws_compression_min_bytes is compressed once per
    # topic and shared by the topic's deflate clients (docs/PROTOCOL.md).
    ws_compression: bool = True
    ws_compression_min_bytes: int = 512
    ws_compression_level: int = 1
    # "json": each payload is parsed to decide whether it is embedded as JSON
    # or as a string; "off": an object- or array-shaped payload is embedded
    # unparsed (docs/CONFIG.md says what that trusts publishers with).
    payload_validation: PayloadValidation = "json"
    redis_connect_timeout_seconds: float = 3.0
    redis_health_check_interval_seconds: float = 1.0
    redis_health_check_timeout_seconds: float = 3.0
    redis_reconnect_min_seconds: float = 0.1
    redis_reconnect_max_seconds: float = 5.0
    drain_window_seconds: float = 10.0
    shutdown_timeout_seconds: float = 25.0
    outbound_buffer_bytes: int = 1_048_576
    # 0: a client lags as soon as the kernel refuses bytes, so what it misses
    # meanwhile is conflated or dropped by policy rather than queued stale in
    # the transport (docs/ARCHITECTURE.md, "Slow consumers").
    outbound_high_water_bytes: int = 0
    slow_consumer_grace_seconds: float = 10.0
    default_policy: Policy = "drop-oldest"
    redis_username: str | None = None
    redis_password: str | None = None
    jwt_secret: str | None = None
    jwt_public_key_file: str | None = None
    jwks_url: str | None = None
    jwks_file: str | None = None
    jwt_algorithms: tuple[str, ...] = ()
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: float = 10.0
    jwks_refetch_cooldown_seconds: float = 30.0
    # Verified tokens kept by their string (security/tokens.py TokenCache); 0: off.
    jwt_cache_size: int = 10_000
    allowed_origins: tuple[str, ...] = ()
    auth_timeout_seconds: float = 10.0
    rate_limit_per_second: float = 20.0
    rate_limit_burst: int = 40
    rate_limit_close_after: int = 100
    max_connections: int = 50_000
    max_connections_per_ip: int = 0
    max_connections_per_user: int = 100
    # The hostile-client limits (docs/SECURITY.md).
    handshake_timeout_seconds: float = 5.0
    # Longer than common proxies' upstream keep-alive (nginx: 60 s), so the
    # gateway never closes a connection a proxy is about to reuse.
    http_keepalive_timeout_seconds: float = 75.0
    max_pending_handshakes: int = 256
    # Connections the kernel queues before the gateway accepts them. A pod's
    # drain hands its clients to the others within a second; past a full
    # queue a SYN is dropped and retried 1, 3 and 7 s later.
    listen_backlog: int = 4096
    max_pending_handshakes_per_ip: int = 64
    ws_max_frames_per_second: float = 100.0
    ws_frame_burst: int = 200
    ws_max_bytes_per_second: int = 262_144
    ws_max_fragments: int = 64
    allow_same_host_origin: bool = False
    max_channel_name_length: int = 256
    max_pattern_metachars: int = 8
    trusted_proxy_hops: int = 0
    max_connection_age_seconds: float = 0.0
    durable: tuple[DurableRule, ...] = ()
    streams: tuple[ExposedStream, ...] = ()
    snapshots: tuple[SnapshotRule, ...] = ()
    stream_prefix: str = "stream:"
    replay_batch: int = 100
    replay_concurrency: int = 8
    replay_cache_entries: int = 1000
    publish_max_bytes: int = 1_048_576
    socket_send_buffer_bytes: int = 0
    trace_delivery_sample_rate: float = 0.01
    redis_tls_ca_file: str | None = None
    redis_tls_cert_file: str | None = None
    redis_tls_key_file: str | None = None
    redis_tls_verify: bool = True
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: str | None = None
    redis_sentinel_check_seconds: float = 1.0
    redis_cluster_nodes: tuple[tuple[str, int], ...] = ()
    redis_sharded_channels: tuple[str, ...] = ()
    roles: Mapping[str, RoleConfig] = field(default_factory=lambda: dict(DEFAULT_ROLES))
    channel_policies: tuple[ChannelPolicy, ...] = DEFAULT_CHANNEL_POLICIES


T = TypeVar("T")


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, raw, "expected true or false")


def _int_range(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(name, raw, "expected a whole number") from None
        if not lo <= value <= hi:
            raise ConfigError(name, raw, f"expected a number from {lo} to {hi}")
        return value

    return parse


def _float_range(lo: float, hi: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(name, raw, "expected a number") from None
        if not lo <= value <= hi:
            raise ConfigError(name, raw, f"expected a number from {lo} to {hi}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ConfigError(name, raw, f"expected one of {', '.join(choices)}")
        return value

    return parse


def _redis_url(name: str, raw: str) -> str:
    value = raw.strip()
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(name, raw, "expected a redis://, rediss:// or unix:// URL")
    if not value.startswith("unix://"):
        # Found here rather than by the Redis client, whose ValueError would
        # surface as a traceback from inside the event loop.
        try:
            port = urlsplit(value).port
        except ValueError:
            raise ConfigError(name, raw, "the port must be a number from 1 to 65535") from None
        if port == 0:
            raise ConfigError(name, raw, "the port must be a number from 1 to 65535")
    return value


def _csv(name: str, raw: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in raw.split(",") if x.strip())
    if not items:
        raise ConfigError(name, raw, "expected a comma-separated list")
    return items


def _algorithms(name: str, raw: str) -> tuple[str, ...]:
    from redis_ws_gateway.security.tokens import SUPPORTED_ALGORITHMS

    algs = _csv(name, raw)
    bad = [a for a in algs if a not in SUPPORTED_ALGORITHMS]
    if bad:
        raise ConfigError(
            name, raw, f"unsupported {bad} (supported: {', '.join(sorted(SUPPORTED_ALGORITHMS))})"
        )
    return algs


def _origins(name: str, raw: str) -> tuple[str, ...]:
    origins = _csv(name, raw)
    for origin in origins:
        if origin == "*":
            continue
        if origin_key(origin) is None or "/" in origin.partition("://")[2]:
            raise ConfigError(name, origin, "expected scheme://host[:port] with no path, or *")
    return origins


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a serialised origin, the port spelled out;
    None if it is not one. What ALLOWED_ORIGINS entries and a browser's
    Origin header are compared by."""
    try:
        url = urlsplit(origin.strip())
        scheme = url.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not url.hostname or url.path not in ("", "/"):
            return None
        if url.query or url.fragment or url.username is not None:
            return None
        port = url.port if url.port is not None else _DEFAULT_PORTS[scheme]
    except ValueError:  # a port out of range or not a number
        return None
    return scheme, url.hostname, port


def _host_ports(name: str, raw: str) -> tuple[tuple[str, int], ...]:
    out = []
    for item in _csv(name, raw):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(name, item, "expected host:port")
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


def _nonempty(name: str, raw: str) -> str:
    if not raw.strip():
        raise ConfigError(name, raw, "must not be empty")
    return raw.strip()


# env name -> (field name, parser). One table so CONFIG.md and the code cannot
# disagree about which variable sets what.
ENV_SETTINGS: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "REDIS_WS_GATEWAY_HOST": ("host", _nonempty),
    "REDIS_WS_GATEWAY_PORT": ("port", _int_range(0, 65535)),
    "REDIS_WS_GATEWAY_INTERNAL_PORT": ("internal_port", _int_range(0, 65535)),
    "REDIS_URL": ("redis_url", _redis_url),
    "REQUIRE_AUTH": ("require_auth", _parse_bool),
    "GATEWAY_API_KEY": ("api_key", _nonempty),
    "DEFAULT_ROLE": ("default_role", _nonempty),
    "MAX_CHANNELS_PER_CLIENT": ("max_channels_per_client", _int_range(1, 100_000)),
    "MAX_WILDCARD_SUBSCRIPTIONS": ("max_wildcard_subscriptions", _int_range(0, 10_000)),
    "LOG_LEVEL": ("log_level", _choice("debug", "info", "warning", "error")),
    "LOG_FORMAT": ("log_format", _choice("json", "console", "auto")),
    "REDIS_WS_GATEWAY_CONFIG": ("config_file", _nonempty),
    "UNSUBSCRIBE_LINGER_SECONDS": ("unsubscribe_linger_seconds", _float_range(0, 3600)),
    "SUBSCRIBE_TIMEOUT_SECONDS": ("subscribe_timeout_seconds", _float_range(0.01, 600)),
    "WS_PING_INTERVAL_SECONDS": ("ws_ping_interval_seconds", _float_range(0.05, 3600)),
    "WS_MAX_MESSAGE_BYTES": ("ws_max_message_bytes", _int_range(256, 16 * 1024 * 1024)),
    "WS_COMPRESSION": ("ws_compression", _parse_bool),
    "WS_COMPRESSION_MIN_BYTES": ("ws_compression_min_bytes", _int_range(0, 16 * 1024 * 1024)),
    "WS_COMPRESSION_LEVEL": ("ws_compression_level", _int_range(1, 9)),
    "PAYLOAD_VALIDATION": ("payload_validation", _choice("json", "off")),
    "REDIS_CONNECT_TIMEOUT_SECONDS": ("redis_connect_timeout_seconds", _float_range(0.05, 600)),
    "REDIS_HEALTH_CHECK_INTERVAL_SECONDS": (
        "redis_health_check_interval_seconds",
        _float_range(0.05, 600),
    ),
    "REDIS_HEALTH_CHECK_TIMEOUT_SECONDS": (
        "redis_health_check_timeout_seconds",
        _float_range(0.05, 600),
    ),
    "REDIS_RECONNECT_MIN_SECONDS": ("redis_reconnect_min_seconds", _float_range(0.001, 60)),
    "REDIS_RECONNECT_MAX_SECONDS": ("redis_reconnect_max_seconds", _float_range(0.001, 600)),
    "DRAIN_WINDOW_SECONDS": ("drain_window_seconds", _float_range(0, 3600)),
    "SHUTDOWN_TIMEOUT_SECONDS": ("shutdown_timeout_seconds", _float_range(0.1, 3600)),
    "OUTBOUND_BUFFER_BYTES": ("outbound_buffer_bytes", _int_range(4096, 1 << 30)),
    "OUTBOUND_HIGH_WATER_BYTES": ("outbound_high_water_bytes", _int_range(0, 1 << 30)),
    "SLOW_CONSUMER_GRACE_SECONDS": ("slow_consumer_grace_seconds", _float_range(0, 3600)),
    "DEFAULT_CHANNEL_POLICY": ("default_policy", _choice(*POLICIES)),
    "REDIS_USERNAME": ("redis_username", _nonempty),
    "REDIS_PASSWORD": ("redis_password", _nonempty),
    "JWT_SECRET": ("jwt_secret", _nonempty),
    "JWT_PUBLIC_KEY_FILE": ("jwt_public_key_file", _nonempty),
    "JWKS_URL": ("jwks_url", _nonempty),
    "JWKS_FILE": ("jwks_file", _nonempty),
    "JWT_ALGORITHMS": ("jwt_algorithms", _algorithms),
    "JWT_ISSUER": ("jwt_issuer", _nonempty),
    "JWT_AUDIENCE": ("jwt_audience", _nonempty),
    "JWT_LEEWAY_SECONDS": ("jwt_leeway_seconds", _float_range(0, 3600)),
    "JWKS_REFETCH_COOLDOWN_SECONDS": ("jwks_refetch_cooldown_seconds", _float_range(0, 86400)),
    "JWT_CACHE_SIZE": ("jwt_cache_size", _int_range(0, 1_000_000)),
    "ALLOWED_ORIGINS": ("allowed_origins", _origins),
    "AUTH_TIMEOUT_SECONDS": ("auth_timeout_seconds", _float_range(0.1, 600)),
    "RATE_LIMIT_MESSAGES_PER_SECOND": ("rate_limit_per_second", _float_range(0.1, 1_000_000)),
    "RATE_LIMIT_BURST": ("rate_limit_burst", _int_range(1, 1_000_000)),
    "RATE_LIMIT_CLOSE_AFTER": ("rate_limit_close_after", _int_range(1, 1_000_000)),
    "MAX_CONNECTIONS": ("max_connections", _int_range(1, 10_000_000)),
    "MAX_CONNECTIONS_PER_IP": ("max_connections_per_ip", _int_range(0, 10_000_000)),
    "MAX_CONNECTIONS_PER_USER": ("max_connections_per_user", _int_range(0, 10_000_000)),
    "HANDSHAKE_TIMEOUT_SECONDS": ("handshake_timeout_seconds", _float_range(0.1, 600)),
    "HTTP_KEEPALIVE_TIMEOUT_SECONDS": ("http_keepalive_timeout_seconds", _float_range(1, 3600)),
    "MAX_PENDING_HANDSHAKES": ("max_pending_handshakes", _int_range(1, 1_000_000)),
    "LISTEN_BACKLOG": ("listen_backlog", _int_range(1, 1_000_000)),
    "MAX_PENDING_HANDSHAKES_PER_IP": ("max_pending_handshakes_per_ip", _int_range(0, 1_000_000)),
    "WS_MAX_FRAMES_PER_SECOND": ("ws_max_frames_per_second", _float_range(1, 1_000_000)),
    "WS_FRAME_BURST": ("ws_frame_burst", _int_range(1, 1_000_000)),
    "WS_MAX_BYTES_PER_SECOND": ("ws_max_bytes_per_second", _int_range(1024, 1 << 30)),
    "WS_MAX_FRAGMENTS": ("ws_max_fragments", _int_range(1, 1_000_000)),
    "ALLOW_SAME_HOST_ORIGIN": ("allow_same_host_origin", _parse_bool),
    "MAX_CHANNEL_NAME_LENGTH": ("max_channel_name_length", _int_range(1, 4096)),
    "MAX_PATTERN_METACHARS": ("max_pattern_metachars", _int_range(1, 64)),
    "TRUSTED_PROXY_HOPS": ("trusted_proxy_hops", _int_range(0, 10)),
    "MAX_CONNECTION_AGE_SECONDS": ("max_connection_age_seconds", _float_range(0, 30 * 86400)),
    "DURABLE_STREAM_PREFIX": ("stream_prefix", _nonempty),
    "DURABLE_REPLAY_BATCH": ("replay_batch", _int_range(1, 100_000)),
    "DURABLE_REPLAY_CONCURRENCY": ("replay_concurrency", _int_range(1, 10_000)),
    "DURABLE_REPLAY_CACHE_ENTRIES": ("replay_cache_entries", _int_range(0, 1_000_000)),
    "PUBLISH_MAX_BYTES": ("publish_max_bytes", _int_range(1, 64 * 1024 * 1024)),
    "SOCKET_SEND_BUFFER_BYTES": ("socket_send_buffer_bytes", _int_range(0, 64 * 1024 * 1024)),
    "TRACE_DELIVERY_SAMPLE_RATE": ("trace_delivery_sample_rate", _float_range(0, 1)),
    "REDIS_TLS_CA_FILE": ("redis_tls_ca_file", _nonempty),
    "REDIS_TLS_CERT_FILE": ("redis_tls_cert_file", _nonempty),
    "REDIS_TLS_KEY_FILE": ("redis_tls_key_file", _nonempty),
    "REDIS_TLS_VERIFY": ("redis_tls_verify", _parse_bool),
    "REDIS_SENTINELS": ("redis_sentinels", _host_ports),
    "REDIS_SENTINEL_MASTER": ("redis_sentinel_master", _nonempty),
    "REDIS_SENTINEL_PASSWORD": ("redis_sentinel_password", _nonempty),
    "REDIS_SENTINEL_CHECK_SECONDS": ("redis_sentinel_check_seconds", _float_range(0.05, 600)),
    "REDIS_CLUSTER_NODES": ("redis_cluster_nodes", _host_ports),
    "REDIS_SHARDED_CHANNELS": ("redis_sharded_channels", _csv),
}

# Settings whose empty value means "unset" (e.g. an empty Secret key).
_OPTIONAL_STRINGS = frozenset(
    {
        "api_key",
        "config_file",
        "redis_username",
        "redis_password",
        "jwt_secret",
        "jwt_public_key_file",
        "jwks_url",
        "jwks_file",
        "jwt_issuer",
        "jwt_audience",
        "redis_tls_ca_file",
        "redis_tls_cert_file",
        "redis_tls_key_file",
        "redis_sentinel_password",
    }
)


def _roles_from_file(path: str, raw: object) -> dict[str, RoleConfig]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: roles", raw, "expected a mapping of role name to allow/deny")
    roles: dict[str, RoleConfig] = {}
    for name, spec in raw.items():
        where = f"{path}: roles.{name}"
        if not isinstance(name, str) or not isinstance(spec, dict):
            raise ConfigError(where, spec, "expected a mapping with allow and deny lists")
        unknown = set(spec) - {"allow", "deny"}
        if unknown:
            raise ConfigError(where, sorted(unknown), "unknown keys (allowed: allow, deny)")
        allow = spec.get("allow", [])
        deny = spec.get("deny", [])
        for key, patterns in (("allow", allow), ("deny", deny)):
            if not isinstance(patterns, list) or not all(
                isinstance(p, str) and p for p in patterns
            ):
                raise ConfigError(f"{where}.{key}", patterns, "expected a list of glob patterns")
        roles[name] = RoleConfig(allow=tuple(allow), deny=tuple(deny))
    return roles


def _policies_from_file(path: str, raw: object) -> tuple[ChannelPolicy, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: channel_policies", raw, "expected a list")
    out: list[ChannelPolicy] = []
    for i, item in enumerate(raw):
        where = f"{path}: channel_policies[{i}]"
        if not isinstance(item, dict) or set(item) != {"pattern", "policy"}:
            raise ConfigError(where, item, "expected {pattern: <glob>, policy: <policy>}")
        pattern, policy = item["pattern"], item["policy"]
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{where}.pattern", pattern, "expected a glob pattern")
        if policy not in POLICIES:
            raise ConfigError(f"{where}.policy", policy, f"expected one of {', '.join(POLICIES)}")
        out.append(ChannelPolicy(pattern, policy))
    return tuple(out)


def _mapping_items(path: str, section: str, raw: object) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: {section}", raw, "expected a list")
    out = []
    for i, item in enumerate(raw):
        where = f"{path}: {section}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(where, item, "expected a mapping")
        out.append((where, item))
    return out


def _check_keys(where: str, item: dict[str, Any], required: set[str], optional: set[str]) -> None:
    missing = required - set(item)
    if missing:
        raise ConfigError(where, item, f"missing {sorted(missing)}")
    unknown = set(item) - required - optional
    if unknown:
        raise ConfigError(where, item, f"unknown keys {sorted(unknown)}")
    for key in required | (optional & set(item)):
        value = item[key]
        if key in ("maxlen",) and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(f"{where}.{key}", value, "expected a whole number >= 1")
        if key == "max_age_seconds" and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
        ):
            raise ConfigError(f"{where}.{key}", value, "expected seconds >= 0")
        if key in ("pattern", "channel", "key", "field") and (
            not isinstance(value, str) or not value
        ):
            raise ConfigError(f"{where}.{key}", value, "expected a non-empty string")


def _durable_from_file(path: str, raw: object) -> tuple[DurableRule, ...]:
    rules = []
    for where, item in _mapping_items(path, "durable", raw):
        _check_keys(where, item, {"pattern"}, {"maxlen", "max_age_seconds"})
        rules.append(
            DurableRule(
                item["pattern"],
                int(item.get("maxlen", 100_000)),
                float(item.get("max_age_seconds", 0)),
            )
        )
    return tuple(rules)


def _streams_from_file(path: str, raw: object) -> tuple[ExposedStream, ...]:
    out = []
    for where, item in _mapping_items(path, "streams", raw):
        _check_keys(where, item, {"channel", "key"}, {"field"})
        if any(c in item["channel"] for c in "*?["):
            raise ConfigError(f"{where}.channel", item["channel"], "must be an exact channel name")
        out.append(ExposedStream(item["channel"], item["key"], item.get("field")))
    return tuple(out)


def _snapshots_from_file(path: str, raw: object) -> tuple[SnapshotRule, ...]:
    out = []
    for where, item in _mapping_items(path, "snapshots", raw):
        _check_keys(where, item, {"pattern", "key"}, {"type"})
        kind = item.get("type", "string")
        if kind not in ("string", "hash"):
            raise ConfigError(f"{where}.type", kind, "expected string or hash")
        out.append(SnapshotRule(item["pattern"], item["key"], kind))
    return tuple(out)


FILE_SECTIONS = ("roles", "channel_policies", "durable", "streams", "snapshots")


def _load_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("REDIS_WS_GATEWAY_CONFIG", path, f"cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("REDIS_WS_GATEWAY_CONFIG", path, f"not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("REDIS_WS_GATEWAY_CONFIG", path, "expected a YAML mapping at top level")
    unknown = set(data) - set(FILE_SECTIONS)
    if unknown:
        raise ConfigError(
            "REDIS_WS_GATEWAY_CONFIG",
            path,
            f"unknown sections {sorted(unknown)} (known: {', '.join(FILE_SECTIONS)})",
        )
    return data


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment (and the config file it names)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name, (attr, parse) in ENV_SETTINGS.items():
        raw = env.get(name)
        if raw is None or (raw == "" and attr in _OPTIONAL_STRINGS):
            continue
        values[attr] = parse(name, raw)

    path = values.get("config_file")
    if path:
        data = _load_file(path)
        if "roles" in data:
            values["roles"] = _roles_from_file(path, data["roles"])
        if "channel_policies" in data:
            values["channel_policies"] = _policies_from_file(path, data["channel_policies"])
        if "durable" in data:
            values["durable"] = _durable_from_file(path, data["durable"])
        if "streams" in data:
            values["streams"] = _streams_from_file(path, data["streams"])
        if "snapshots" in data:
            values["snapshots"] = _snapshots_from_file(path, data["snapshots"])

    if not values.get("jwt_algorithms"):
        values["jwt_algorithms"] = _default_algorithms(values)
    settings = Settings(**values)
    _check_consistency(settings)
    return settings


def _default_algorithms(values: Mapping[str, Any]) -> tuple[str, ...]:
    algs: list[str] = []
    secret = values.get("jwt_secret")
    if secret:
        # Only the HMAC sizes the secret is long enough for (RFC 7518 3.2).
        size = len(secret.encode())
        algs += [alg for alg, need in (("HS256", 32), ("HS384", 48), ("HS512", 64)) if size >= need]
    if values.get("jwt_public_key_file") or values.get("jwks_url") or values.get("jwks_file"):
        algs += ["RS256", "ES256", "EdDSA"]
    return tuple(algs)


def _check_consistency(s: Settings) -> None:
    if s.internal_port and s.internal_port == s.port:
        raise ConfigError(
            "REDIS_WS_GATEWAY_INTERNAL_PORT", s.internal_port, "must differ from the public port"
        )
    if s.default_role not in s.roles:
        raise ConfigError(
            "DEFAULT_ROLE", s.default_role, f"no such role (known: {', '.join(sorted(s.roles))})"
        )
    if s.redis_reconnect_min_seconds > s.redis_reconnect_max_seconds:
        raise ConfigError(
            "REDIS_RECONNECT_MIN_SECONDS",
            s.redis_reconnect_min_seconds,
            "must not exceed REDIS_RECONNECT_MAX_SECONDS",
        )
    if s.outbound_high_water_bytes > s.outbound_buffer_bytes:
        raise ConfigError(
            "OUTBOUND_HIGH_WATER_BYTES",
            s.outbound_high_water_bytes,
            "must not exceed OUTBOUND_BUFFER_BYTES",
        )
    jwt_keys = s.jwt_public_key_file or s.jwks_url or s.jwks_file
    if s.require_auth and s.api_key is None and not (s.jwt_secret or jwt_keys):
        # Without any credential source, requiring auth would lock everybody out.
        raise ConfigError(
            "REQUIRE_AUTH", "true", "needs GATEWAY_API_KEY, JWT_SECRET or a JWT public key source"
        )
    for alg in s.jwt_algorithms:
        if alg.startswith("HS") and not s.jwt_secret:
            raise ConfigError(
                "JWT_ALGORITHMS", ",".join(s.jwt_algorithms), f"{alg} needs JWT_SECRET"
            )
        if not alg.startswith("HS") and not jwt_keys:
            raise ConfigError(
                "JWT_ALGORITHMS",
                ",".join(s.jwt_algorithms),
                f"{alg} needs JWT_PUBLIC_KEY_FILE, JWKS_FILE or JWKS_URL",
            )
    if s.jwt_secret is not None and len(s.jwt_secret.encode()) < 32:
        # RFC 7518 3.2: an HS256 key shorter than the hash output is guessable.
        raise ConfigError("JWT_SECRET", s.jwt_secret, "must be at least 32 bytes")
    for name, path in (("JWT_PUBLIC_KEY_FILE", s.jwt_public_key_file), ("JWKS_FILE", s.jwks_file)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(name, path, "file not found")
    for name, path in (
        ("REDIS_TLS_CA_FILE", s.redis_tls_ca_file),
        ("REDIS_TLS_CERT_FILE", s.redis_tls_cert_file),
        ("REDIS_TLS_KEY_FILE", s.redis_tls_key_file),
    ):
        if path is not None and not Path(path).is_file():
            raise ConfigError(name, path, "file not found")
    if s.redis_cluster_nodes and s.redis_sentinels:
        raise ConfigError(
            "REDIS_CLUSTER_NODES", s.redis_cluster_nodes, "cannot be used with REDIS_SENTINELS"
        )
    if s.redis_sharded_channels and not s.redis_cluster_nodes:
        raise ConfigError(
            "REDIS_SHARDED_CHANNELS",
            ",".join(s.redis_sharded_channels),
            "sharded pub/sub needs REDIS_CLUSTER_NODES",
        )
    if bool(s.redis_tls_cert_file) != bool(s.redis_tls_key_file):
        raise ConfigError(
            "REDIS_TLS_CERT_FILE", s.redis_tls_cert_file, "needs REDIS_TLS_KEY_FILE too (and back)"
        )
    if s.jwks_url is not None and not s.jwks_url.startswith(("https://", "http://")):
        raise ConfigError("JWKS_URL", s.jwks_url, "expected an http(s) URL")


# Names people reach for that are not settings; a silent default is worse
# than a warning at start.
KNOWN_TYPOS = {
    "REDIS_URI": "REDIS_URL",
    "REDIS_HOST": "REDIS_URL",
    "REDIS_PORT": "REDIS_URL",
    "GATEWAY_PORT": "REDIS_WS_GATEWAY_PORT",
    "API_KEY": "GATEWAY_API_KEY",
    "REDIS_WS_GATEWAY_API_KEY": "GATEWAY_API_KEY",
    "REDIS_WS_GATEWAY_REDIS_URL": "REDIS_URL",
}
_NAMESPACE = "REDIS_WS_GATEWAY_"


def unknown_setting_warnings(env: Mapping[str, str] | None = None) -> list[str]:
    """One line per variable that looks meant for the gateway but sets nothing:
    unknown names in its REDIS_WS_GATEWAY_ namespace, known typos, and names
    one or two letters away from a real setting."""
    import difflib

    env = os.environ if env is None else env
    known = list(ENV_SETTINGS)
    out = []
    for name in sorted(env):
        if name in ENV_SETTINGS:
            continue
        if env[name].startswith("tcp://"):
            # A Kubernetes service link (REDIS_PORT=tcp://10.0.0.7:6379 for a
            # Service named redis), not something a person set.
            continue
        hint = KNOWN_TYPOS.get(name)
        if hint is None:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.88)
            hint = close[0] if close else None
        if hint is not None:
            out.append(f"{name} is not a setting (did you mean {hint}?); it is ignored")
        elif name.startswith(_NAMESPACE):
            out.append(f"{name} is not a setting of this gateway; it is ignored")
    return out


def settings_help() -> str:
    """Every environment setting with its default, for `serve --help`."""
    defaults = Settings()
    lines = ["settings (environment variables; docs/CONFIG.md explains each):"]
    for name, (attr, _) in ENV_SETTINGS.items():
        value = getattr(defaults, attr)
        if value is None or value == ():
            shown = "unset"
        elif isinstance(value, bool):
            shown = str(value).lower()
        elif isinstance(value, tuple):
            shown = ",".join(map(str, value))
        else:
            shown = str(value)
        lines.append(f"  {name}={shown}")
    lines.append("  OTEL_* (tracing; docs/CONFIG.md)")
    return "\n".join(lines)
