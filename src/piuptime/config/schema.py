"""The configuration schema: pydantic models, one per YAML section.

Every model forbids unknown keys and is frozen. Durations are ``float`` seconds, sizes ``int``
bytes. Build a :class:`Config` with :func:`piuptime.config.load_config` /
:func:`piuptime.config.parse_config` to get positions in error messages and the checks that need
the whole file ("not supported yet" sections); ``Config.model_validate(dict)`` runs the schema and
the cross-reference checks (unknown upstream, duplicate route names) only.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, Field, field_validator, model_validator

from .analytics import AnalyticsConfig, AnalyticsSection
from .configstore import ConfigStoreConfig
from .llm import LlmConfig, llm_route_problems
from .plugins import PluginsConfig
from .plugins.auth import (
    BasicCredential,
    JwtCredential,
    consumer_problems,
    is_prehashed_key,
    valid_name,
)
from .plugins.traffic import upstream_reference_problems
from .plugins.transform import Networks
from .tracing import TracingConfig
from .types import (
    _IDENT,
    _PLACEHOLDER,
    Duration,
    Int,
    Loc,
    PathStr,
    Percent,
    PositiveDuration,
    SchemaValueError,
    Size,
    _is_hostname,
    _is_token,
    _Items,
    _model,
    _readable_file,
    _Section,
    _suggest,
    is_true,
)

__all__ = [
    "AccessLog",
    "ActiveHealth",
    "AdminConfig",
    "Config",
    "Consumer",
    "Duration",
    "GatewayConfig",
    "Health",
    "Limits",
    "Listener",
    "PassiveHealth",
    "Percent",
    "Pool",
    "Retries",
    "Route",
    "RouteMatch",
    "SchemaValueError",
    "Size",
    "StoreConfig",
    "TLSFiles",
    "Target",
    "Timeouts",
    "Upstream",
    "UpstreamTLS",
    "config_problems",
    "is_true",
    "parse_address",
    "path_captures",
    "route_problems",
    "split_target_url",
]


_ADDRESS_HINT = 'expected "host:port" like 127.0.0.1:8080, [::1]:8080 or :8080 (all interfaces)'


def parse_address(text: str) -> tuple[str, int]:
    """``"host:port"`` → ``(host, port)``. ``"[::1]:80"`` → ``("::1", 80)``; ``":80"`` →
    ``("", 80)`` meaning every interface. Raises ``ValueError`` with a readable message."""
    raw = text.strip()
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0 or raw[close + 1 : close + 2] != ":":
            raise ValueError(f"{_ADDRESS_HINT}, got {text!r}")
        host, port_text = raw[1:close], raw[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets: {text!r}") from None
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep:
            raise ValueError(f"{_ADDRESS_HINT}, got {text!r} (the port is missing)")
        if ":" in host:
            raise ValueError(f"put an IPv6 address in brackets, like [::1]:8080, got {text!r}")
        if host and not _is_hostname(host):
            raise ValueError(f"not a host name or IP address: {host!r} in {text!r}")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"the port must be a number from 0 to 65535, got {text!r}")
    return host, int(port_text)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TLSFiles(BaseModel):
    """Certificate chain and private key (PEM files) for a TLS listener."""

    model_config = _model()

    cert: PathStr
    key: PathStr

    @field_validator("cert")
    @classmethod
    def _cert_exists(cls, value: str) -> str:
        return _readable_file(value, "certificate file")

    @field_validator("key")
    @classmethod
    def _key_exists(cls, value: str) -> str:
        return _readable_file(value, "key file")


class Listener(BaseModel):
    """Where the gateway accepts connections.

    Written as ``"host:port"`` or ``{address: "host:port", tls: {cert: ..., key: ...}}``; an empty
    host (``":8080"``) listens on every interface.
    """

    model_config = _model()

    host: str
    port: int = Field(ge=0, le=65535)
    tls: TLSFiles | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_address(cls, data: Any) -> Any:
        if isinstance(data, str):
            host, port = parse_address(data)
            return {"host": host, "port": port}
        if isinstance(data, dict) and "host" not in data and "port" not in data:
            unknown = [k for k in data if k not in ("address", "tls")]
            if unknown:
                raise SchemaValueError(
                    f"unknown key {unknown[0]!r}{_suggest(str(unknown[0]), ['address', 'tls'])}"
                    " (a listener has address and tls)",
                    (unknown[0],),
                    on_key=True,
                )
            if "address" not in data:
                raise ValueError(
                    'a listener needs an address: write "host:port" or '
                    '{address: "host:port", tls: {cert: FILE, key: FILE}}'
                )
            address = data["address"]
            if not isinstance(address, str):
                raise SchemaValueError(f"{_ADDRESS_HINT}, got {address!r}", ("address",))
            try:
                host, port = parse_address(address)
            except ValueError as exc:
                raise SchemaValueError(str(exc), ("address",)) from None
            rest = {k: v for k, v in data.items() if k != "address"}
            return {"host": host, "port": port, **rest}
        if not isinstance(data, dict | Listener):
            raise ValueError(f"{_ADDRESS_HINT}, or {{address: ..., tls: ...}}, got {data!r}")
        return data

    @property
    def address(self) -> str:
        """``host:port`` as written in the config (``[::1]:8080``, ``:8080``)."""
        return _format_address(self.host, self.port)

    def __str__(self) -> str:
        return self.address


class Limits(BaseModel):
    """Per-request limits of the data-plane listener (see ``http1.server.ServerLimits``)."""

    model_config = _model()

    max_header_bytes: Size = Field(default=16 * 1024, gt=0)
    max_header_count: Int = Field(default=100, ge=1)
    max_body_bytes: Size = Field(default=10 * 1024 * 1024, ge=0)
    header_timeout: PositiveDuration = 10.0
    idle_timeout: PositiveDuration = 75.0
    body_timeout: PositiveDuration = 30.0


class AccessLog(BaseModel):
    """``path``: ``stdout``, ``off``, or a file to append JSON lines to."""

    model_config = _model()

    path: PathStr = "stdout"

    @field_validator("path")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected stdout, off, or a file path; got an empty string")
        return value

    @property
    def enabled(self) -> bool:
        return self.path != "off"

    @property
    def to_stdout(self) -> bool:
        return self.path == "stdout"

    @property
    def file(self) -> str | None:
        """The file path, or ``None`` for ``stdout``/``off``."""
        return None if self.path in ("stdout", "off") else self.path


def _listeners(value: Any) -> Any:
    return [value] if isinstance(value, str | dict) else value


class GatewayConfig(BaseModel):
    model_config = _model()

    listen: Annotated[list[Listener], BeforeValidator(_listeners)] = Field(
        default_factory=lambda: [Listener(host="127.0.0.1", port=8080)], min_length=1
    )
    limits: Annotated[Limits, _Section] = Field(default_factory=Limits)
    access_log: Annotated[AccessLog, _Section] = Field(default_factory=AccessLog)
    drain_timeout: Duration = 30.0
    # the C fast lane for plain proxied requests (docs/internals.md); off: Python path only
    fast_lane: bool = True
    via: str = "piuptime"
    # proxies whose X-Forwarded-For is believed: the client address used by ip_restriction,
    # rate limits and the access log is the right-most X-Forwarded-For entry not in this list
    trusted_proxies: Networks = Field(default_factory=list)

    @field_validator("listen")
    @classmethod
    def _unique_listeners(cls, value: list[Listener]) -> list[Listener]:
        seen: dict[tuple[str, int], int] = {}
        for index, listener in enumerate(value):
            key = (listener.host, listener.port)
            if key in seen and listener.port != 0:
                raise SchemaValueError(
                    f"{listener} is listed twice (also at listen[{seen[key]}])", (index,)
                )
            seen[key] = index
        return value

    @field_validator("via")
    @classmethod
    def _via_token(cls, value: str) -> str:
        if not _is_token(value):
            raise ValueError(
                f"the Via pseudonym is one word of letters, digits and -._~ (got {value!r})"
            )
        return value


# --------------------------------------------------------------------------------------------
# admin, store


def _is_loopback_host(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ``::1``: reachable from this machine only. An empty host
    (every interface) and any other name are not."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token_name(name: str) -> bool:
    return (
        0 < len(name) <= 64
        and name.isascii()
        and name[0].isalnum()
        and all(c.isalnum() or c in "._-" for c in name)
    )


class AdminConfig(BaseModel):
    """The admin listener: the admin API (``/api/v1/...``), ``/status``, ``/metrics``,
    ``/healthz`` and ``/readyz`` (see docs/admin-api.md).

    ``token``: the bearer token every admin request but ``/healthz`` and ``/readyz`` must carry;
    it acts as ``admin`` in the audit log. ``tokens``: more tokens, each under a name the audit
    log records (``{ci: ${CI_ADMIN_TOKEN}, alice: ${ALICE_ADMIN_TOKEN}}``). An empty string
    (``${PIUPTIME_ADMIN_TOKEN:-}`` with the variable unset) counts as no token; a listener off
    loopback needs at least one.
    """

    model_config = _model()

    listen: str = "127.0.0.1:9180"
    token: str | None = None
    tokens: dict[str, str] = Field(default_factory=dict)

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("token")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value if value is not None and value.strip() else None

    @field_validator("tokens")
    @classmethod
    def _named_tokens(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _token_name(name):
                raise SchemaValueError(
                    f"an admin token name is 1-64 letters, digits, '.', '_' or '-' (it is what "
                    f"the audit log records), got {name!r}",
                    (name,),
                    on_key=True,
                )
            if name == "admin":
                raise SchemaValueError(
                    "'admin' is the name of admin.token; give this token another name",
                    (name,),
                    on_key=True,
                )
        return {name: token for name, token in value.items() if token.strip()}

    @model_validator(mode="after")
    def _token_off_loopback(self) -> AdminConfig:
        """Off loopback only with a token; no two tokens alike (the audit log names them)."""
        if not self.named_tokens() and not _is_loopback_host(self.host):
            where = f"{self.host}:{self.port}" if self.host else f"every interface (:{self.port})"
            raise SchemaValueError(
                f"the admin listener on {where} would be reachable from other machines "
                "without a token; set admin.token (e.g. token: ${PIUPTIME_ADMIN_TOKEN}) or "
                "listen on a loopback address such as 127.0.0.1:9180",
                ("listen",),
            )
        seen: dict[str, str] = {}
        for name, token in self.named_tokens().items():
            if token in seen:
                raise SchemaValueError(
                    f"admin tokens {seen[token]!r} and {name!r} are the same; each token must "
                    "be different, so the audit log can tell who made a change",
                    ("tokens", name),
                )
            seen[token] = name
        return self

    def named_tokens(self) -> dict[str, str]:
        """Every token by the name the audit log records (``admin`` for ``token``)."""
        named = {"admin": self.token} if self.token is not None else {}
        named.update(self.tokens)
        return named

    @property
    def host(self) -> str:
        """The host part of ``listen`` (``""``: every interface)."""
        return parse_address(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_address(self.listen)[1]


class StoreConfig(BaseModel):
    model_config = _model()

    sqlite: PathStr = "./piuptime.db"
    redis: str | None = None  # redis://[:password@]host:6379/0, rediss://... (TLS), unix:///path

    @field_validator("redis")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"expected a Redis URL like redis://127.0.0.1:6379/0 (or rediss:// for TLS, "
                f"unix:///run/redis.sock), got {value!r}"
            )
        return value

    @field_validator("sqlite")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected a file path for the SQLite database, got an empty string")
        return value


# --------------------------------------------------------------------------------------------
# upstreams

_URL_HINT = 'expected a target URL like "http://10.0.0.5:8000" (http or https, host, port)'


@lru_cache(maxsize=4096)
def split_target_url(url: str) -> tuple[str, str, int]:
    """``"http://h:9001/"`` → ``("http", "h", 9001)``; default ports 80/443; IPv6 hosts come
    back without brackets. Raises ``ValueError`` for anything but scheme://host[:port][/]."""
    text = url.strip()
    if text != url or any(ch.isspace() for ch in url):
        raise ValueError(f"{_URL_HINT}, got {url!r} (it contains spaces)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{_URL_HINT}, got {url!r} ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not url.lower().startswith(f"{scheme}://"):
        raise ValueError(f"{_URL_HINT}, got {url!r}")
    if "@" in parts.netloc:
        raise ValueError(f"a target URL cannot carry a user name or password: {url!r}")
    host = parts.hostname or ""
    if not host or not _is_hostname(host):
        raise ValueError(f"{_URL_HINT}, got {url!r} (no valid host)")
    if parts.path not in ("", "/"):
        raise ValueError(
            f"a target URL has no path, got {url!r}: write {scheme}://{parts.netloc} and use "
            "the route's rewrite to change the path"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"a target URL has no query or fragment, got {url!r}")
    if port is None:
        port = 443 if scheme == "https" else 80
    elif port == 0:
        raise ValueError(f"the port of a target must be from 1 to 65535, got {url!r}")
    return scheme, host.lower(), port


class Target(BaseModel):
    """One server of an upstream. A plain string is taken as its ``url``."""

    model_config = _model()

    url: str
    weight: Int = Field(default=1, ge=1, le=1000)
    backup: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_url(cls, data: Any) -> Any:
        return {"url": data} if isinstance(data, str) else data

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        split_target_url(value)
        return value

    @property
    def scheme(self) -> str:
        """``"http"`` or ``"https"``."""
        return split_target_url(self.url)[0]

    @property
    def host(self) -> str:
        """Host name or IP (IPv6 without brackets), lower-case."""
        return split_target_url(self.url)[1]

    @property
    def port(self) -> int:
        return split_target_url(self.url)[2]

    @property
    def authority(self) -> str:
        """``host:port`` (IPv6 in brackets): the Host value for ``host_header: target``."""
        return _format_address(self.host, self.port)

    @property
    def key(self) -> tuple[str, str, int]:
        """``(scheme, host, port)``: one connection pool per key."""
        return split_target_url(self.url)


class Timeouts(BaseModel):
    """Per attempt: ``connect``, ``ttfb`` (request sent → response head), ``read`` (the longest
    silence while a body streams). ``total``: the deadline for the whole request up to the
    response head, every attempt, backoff and wait included (a streamed body is then bounded
    by ``read``, so long downloads and event streams are not cut)."""

    model_config = _model()

    connect: PositiveDuration = 2.0
    ttfb: PositiveDuration | None = None  # default: read
    read: PositiveDuration = 30.0
    total: PositiveDuration = 60.0


class Pool(BaseModel):
    """Connections per target. ``max_connections`` is also the target's in-flight limit; up to
    ``max_pending`` more requests wait for a connection, beyond that the target answers busy
    (the request tries another target, or gets 503)."""

    model_config = _model()

    max_connections: Int = Field(default=256, ge=1)
    max_pending: Int = Field(default=256, ge=0)
    max_idle: Int = Field(default=64, ge=0)
    idle_timeout: PositiveDuration = 60.0


class UpstreamTLS(BaseModel):
    """How the gateway checks an https target's certificate."""

    model_config = _model()

    verify: bool = True
    ca: PathStr | None = None
    server_name: str | None = None

    @field_validator("ca")
    @classmethod
    def _ca_exists(cls, value: str | None) -> str | None:
        return None if value is None else _readable_file(value, "CA file")

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, value: str | None) -> str | None:
        if value is not None and not _is_hostname(value):
            raise ValueError(f"expected a host name, got {value!r}")
        return value


_RETRY_STATUSES = frozenset({429, 502, 503, 504})


class Retries(BaseModel):
    """Re-sending a failed attempt to another target (see docs/reliability.md)."""

    model_config = _model()

    attempts: Int = Field(default=1, ge=0, le=10)  # retries after the first attempt
    budget: Percent = 0.2  # retries at most this share of requests, per upstream
    min_per_second: float = Field(default=3.0, ge=0)  # ... but always this many per second
    statuses: list[Int] = Field(default_factory=lambda: sorted(_RETRY_STATUSES))
    backoff: PositiveDuration = 0.025  # first wait; doubles per retry, full jitter
    max_backoff: PositiveDuration = 1.0

    @field_validator("statuses")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        for status in value:
            if status not in _RETRY_STATUSES:
                raise ValueError(
                    f"{status} is not retryable; choose from {sorted(_RETRY_STATUSES)}"
                )
        return value


class ActiveHealth(BaseModel):
    model_config = _model()

    kind: Literal["http", "tcp"] = "http"
    path: str = "/"
    method: Literal["GET", "HEAD", "OPTIONS"] = "GET"
    host: str | None = None
    expected_statuses: list[Int] = Field(default_factory=lambda: list(range(200, 400)))
    body_contains: str | None = None
    interval: PositiveDuration = 5.0
    timeout: PositiveDuration = 1.0
    healthy_after: Int = Field(default=2, ge=1)
    unhealthy_after: Int = Field(default=3, ge=1)
    jitter: Percent = 0.1

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"a health-check path starts with /, got {value!r}")
        return value

    @field_validator("expected_statuses")
    @classmethod
    def _expected(cls, value: list[int]) -> list[int]:
        if not value or any(not 100 <= s <= 599 for s in value):
            raise ValueError("expected_statuses needs HTTP statuses from 100 to 599")
        return value


class PassiveHealth(BaseModel):
    """Outlier detection: on unless ``enabled: false``."""

    model_config = _model()

    enabled: bool = True
    consecutive_failures: Int = Field(default=5, ge=1)
    eject_for: PositiveDuration = 30.0
    max_eject_multiplier: Int = Field(default=10, ge=1)
    max_ejected: Percent = 0.5


class Health(BaseModel):
    model_config = _model()

    active: ActiveHealth | None = None
    passive: Annotated[PassiveHealth, _Section] = Field(default_factory=PassiveHealth)
    # Below this share of usable primaries, spread over all targets regardless of health
    # (0: only when no target at all is usable).
    panic_threshold: Percent = 0.0


class Breaker(BaseModel):
    """Per-target circuit breaker: on unless ``enabled: false``."""

    model_config = _model()

    enabled: bool = True
    window: PositiveDuration = 10.0
    min_requests: Int = Field(default=20, ge=1)
    failure_ratio: Percent = 0.5
    open_for: PositiveDuration = 5.0
    max_open_for: PositiveDuration = 60.0
    half_open_probes: Int = Field(default=3, ge=1)

    @field_validator("failure_ratio")
    @classmethod
    def _ratio(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("failure_ratio must be above 0%")
        return value


def _hash_on(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    kind, _, name = value.partition(":")
    if kind in ("ip", "path") and not name:
        return value
    if kind in ("header", "cookie") and name.strip():
        return value
    raise ValueError(f"hash_on is ip, path, header:<name> or cookie:<name>, got {value!r}")


class Upstream(BaseModel):
    model_config = _model()

    balance: Literal["round_robin", "least_conn", "ewma", "hash"] = "round_robin"
    hash_on: Annotated[str, BeforeValidator(_hash_on)] = "ip"
    hash_load_factor: float = Field(default=1.25, ge=1.0)  # bounded load for hash
    slow_start: Duration = 10.0  # a recovered target's weight ramps up over this
    targets: list[Target] = Field(min_length=1)
    timeouts: Annotated[Timeouts, _Section] = Field(default_factory=Timeouts)
    pool: Annotated[Pool, _Section] = Field(default_factory=Pool)
    tls: Annotated[UpstreamTLS, _Section] = Field(default_factory=UpstreamTLS)
    retries: Annotated[Retries, _Section] = Field(default_factory=Retries)
    health: Annotated[Health, _Section] = Field(default_factory=Health)
    breaker: Annotated[Breaker, _Section] = Field(default_factory=Breaker)

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, value: list[Target]) -> list[Target]:
        seen: dict[tuple[str, str, int], int] = {}
        for index, target in enumerate(value):
            if target.key in seen:
                raise SchemaValueError(
                    f"{target.url} is the same server as targets[{seen[target.key]}]; "
                    "list it once and raise its weight instead",
                    (index, "url"),
                )
            seen[target.key] = index
        return value


# --------------------------------------------------------------------------------------------
# consumers


class Consumer(BaseModel):
    """A person or program using the gateway: its groups (for ``acl``) and credentials, any
    of API ``keys`` (plaintext, usually ``${ENV}``, or ``sha256:<hex>``), ``basic`` (a user
    name and a password hash) and ``jwt``. Checks across consumers (a key or user name used
    twice) are in ``piuptime.config.plugins.auth.consumer_problems``."""

    model_config = _model()

    keys: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    basic: BasicCredential | None = None
    jwt: JwtCredential | None = None

    @field_validator("keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        for i, key in enumerate(value):
            if not key:
                raise SchemaValueError("an API key cannot be empty", (i,))
            if key.startswith("sha256:") and not is_prehashed_key(key):
                raise SchemaValueError(
                    "a pre-hashed key is sha256: and 64 hex digits (sha256sum of the key)", (i,)
                )
        return value

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: list[str]) -> list[str]:
        for i, group in enumerate(value):
            if not valid_name(group, commas=False):
                raise SchemaValueError(
                    "a group name is 1-128 printable ASCII characters without commas or "
                    f"leading/trailing spaces, got {group!r}",
                    (i,),
                )
        return value


# --------------------------------------------------------------------------------------------
# routes


def path_captures(path: str) -> tuple[str, ...]:
    """The ``{name}`` placeholders of a path pattern, in order."""
    return tuple(_PLACEHOLDER.findall(path))


def _check_pattern(value: str, what: str) -> None:
    if not value.startswith("/"):
        raise ValueError(f"{what} starts with /, got {value!r}")
    if "?" in value or "#" in value:
        raise ValueError(f"{what} cannot contain a query or fragment (? or #), got {value!r}")
    if any(ch.isspace() or ord(ch) < 0x20 or ch == "\x7f" for ch in value):
        raise ValueError(f"{what} cannot contain spaces or control characters, got {value!r}")
    if _PLACEHOLDER.sub("", value).count("{") or _PLACEHOLDER.sub("", value).count("}"):
        raise ValueError(f"unbalanced {{ or }} in {what} {value!r}; a capture is written {{name}}")
    names = path_captures(value)
    for name in names:
        if not _IDENT.match(name):
            raise ValueError(
                f"{{{name}}} in {what} {value!r}: a capture name is letters, digits and _, "
                "not starting with a digit"
            )


def _methods(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [m.upper() if isinstance(m, str) else m for m in value]
    return value


def _hosts(value: Any) -> Any:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(h, str) for h in items):
        raise ValueError(f"expected a host name or a list of host names, got {value!r}")
    if not items:
        raise ValueError("expected at least one host name (or leave host out to match any host)")
    for host in items:
        bare = host[2:] if host.startswith("*.") else host
        if ":" in bare and not bare.startswith("["):
            raise ValueError(f"match.host is a host name without a port, got {host!r}")
        if not _is_hostname(bare.strip("[]")):
            raise ValueError(
                f'expected a host name like api.example.com or "*.example.com", got {host!r}'
            )
    lowered = [h.lower() for h in items]
    return lowered[0] if isinstance(value, str) else lowered


class RouteMatch(BaseModel):
    """What a request must look like for the route to take it."""

    model_config = _model()

    path: str
    methods: Annotated[list[str] | None, BeforeValidator(_methods)] = None
    host: Annotated[str | list[str] | None, BeforeValidator(_hosts)] = None
    headers: Annotated[dict[str, str], _Section] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        _check_pattern(value, "match.path")
        names = path_captures(value)
        for segment in value.split("/"):
            if "{" in segment and not (segment.startswith("{") and segment.endswith("}")):
                raise ValueError(
                    f"a capture is a whole path segment, like /devices/{{id}}/status; "
                    f"got {segment!r} in {value!r}"
                )
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"capture {{{name}}} appears twice in {value!r}")
        return value

    @field_validator("methods")
    @classmethod
    def _methods_tokens(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("list at least one method, or leave methods out to match any method")
        for method in value:
            if not _is_token(method):
                raise ValueError(f"not an HTTP method: {method!r}")
        return list(dict.fromkeys(value))

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _is_token(name):
                raise SchemaValueError(f"not an HTTP header name: {name!r}", (name,), on_key=True)
        return value

    @property
    def is_prefix(self) -> bool:
        """``True`` when ``path`` ends in ``/``: it matches everything below it."""
        return self.path.endswith("/")

    @property
    def captures(self) -> tuple[str, ...]:
        """Names of the ``{name}`` segments of ``path``, in order."""
        return path_captures(self.path)

    @property
    def hosts(self) -> tuple[str, ...]:
        """``host`` as a tuple (``()`` = any host), lower-case."""
        if self.host is None:
            return ()
        return (self.host,) if isinstance(self.host, str) else tuple(self.host)

    @property
    def method_set(self) -> frozenset[str] | None:
        return None if self.methods is None else frozenset(self.methods)


def route_problems(path: object, strip_prefix: object, rewrite: object) -> list[tuple[Loc, str]]:
    """Checks between a route's fields, on raw or validated values; ``(loc below the route,
    message)`` for each problem. Values of the wrong type are skipped (the schema reports them)."""
    problems: list[tuple[Loc, str]] = []
    if not isinstance(path, str):
        return problems
    if is_true(strip_prefix) and not path.endswith("/"):
        problems.append(
            (
                ("strip_prefix",),
                f"strip_prefix needs a prefix path (ending in /), but match.path {path!r} "
                "matches exactly; end it with / or remove strip_prefix",
            )
        )
    if is_true(strip_prefix) and isinstance(rewrite, str):
        problems.append(
            (
                ("strip_prefix",),
                "strip_prefix and rewrite together: rewrite already replaces the matched part "
                "of the path; keep only one of them",
            )
        )
    if isinstance(rewrite, str):
        captures = path_captures(path)
        for name in dict.fromkeys(path_captures(rewrite)):
            if name not in captures:
                known = ", ".join(f"{{{c}}}" for c in captures) or "none"
                problems.append(
                    (
                        ("rewrite",),
                        f"{{{name}}} is not captured by match.path {path!r} (captures: {known})",
                    )
                )
    return problems


def config_problems(
    routes: object, upstreams: object, plugins: object = None
) -> list[tuple[Loc, str]]:
    """Checks across sections, on raw or validated data: duplicate route names, and routes or
    plugins (on a route or in the global ``plugins:`` section) naming an upstream that does not
    exist."""
    problems: list[tuple[Loc, str]] = []
    upstream_names = [str(u) for u in upstreams] if isinstance(upstreams, dict) else None
    if upstream_names is not None:
        for loc, msg in upstream_reference_problems(plugins, upstream_names):
            problems.append((("plugins", *loc), msg))
    if not isinstance(routes, list):
        return problems
    names: dict[str, int] = {}
    for index, route in enumerate(routes):
        if isinstance(route, Route):
            name: object = route.name
            upstream: object = route.upstream
        elif isinstance(route, dict):
            name, upstream = route.get("name"), route.get("upstream")
        else:
            continue
        if isinstance(name, str):
            if name in names:
                problems.append(
                    (
                        ("routes", index, "name"),
                        f"duplicate route name {name!r} (routes[{names[name]}] has it too); "
                        "route names must be unique",
                    )
                )
            else:
                names[name] = index
        known = upstream_names is not None and upstream in upstream_names
        if isinstance(upstream, str) and upstream_names is not None and not known:
            defined = ", ".join(upstream_names) or "none"
            problems.append(
                (
                    ("routes", index, "upstream"),
                    f"unknown upstream {upstream!r}{_suggest(upstream, upstream_names)} "
                    f"(defined under upstreams: {defined})",
                )
            )
        if upstream_names is not None:
            own = route.plugins if isinstance(route, Route) else route.get("plugins")
            for loc, msg in upstream_reference_problems(own, upstream_names):
                problems.append((("routes", index, "plugins", *loc), msg))
    return problems


class Route(BaseModel):
    model_config = _model()

    name: str
    match: RouteMatch
    priority: Int | None = None
    upstream: str
    strip_prefix: bool = False
    rewrite: str | None = None
    host_header: str = "pass"
    max_body_bytes: Size | None = None
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    # Retry POST and PATCH even without an Idempotency-Key header (the route says they are safe).
    retry_non_idempotent: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip() or value != value.strip():
            raise ValueError(f"a route name is non-empty, without surrounding spaces: {value!r}")
        return value

    @field_validator("rewrite")
    @classmethod
    def _rewrite(cls, value: str | None) -> str | None:
        if value is not None:
            _check_pattern(value, "rewrite")
        return value

    @field_validator("host_header")
    @classmethod
    def _host_header(cls, value: str) -> str:
        if value in ("pass", "target"):
            return value
        try:
            if value.startswith("[") and value.endswith("]"):
                ipaddress.IPv6Address(value[1:-1])
                valid = True
            elif ":" in value:
                host, port = parse_address(value)
                valid = bool(host) and port > 0
            else:
                valid = _is_hostname(value)
        except ValueError:
            valid = False
        if not valid:
            raise ValueError(
                'expected "pass" (keep the client\'s Host), "target" (the target\'s host:port) '
                f"or a host name to send, got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Route:
        problems = route_problems(self.match.path, self.strip_prefix, self.rewrite)
        if problems:
            raise SchemaValueError(problems[0][1], problems[0][0])
        return self


class Config(BaseModel):
    """The whole configuration file."""

    model_config = _model()

    gateway: Annotated[GatewayConfig, _Section] = Field(default_factory=GatewayConfig)
    admin: AdminConfig | None = None
    store: Annotated[StoreConfig, _Section] = Field(default_factory=StoreConfig)
    config_store: Annotated[ConfigStoreConfig, _Section] = Field(default_factory=ConfigStoreConfig)
    upstreams: Annotated[dict[str, Upstream], _Section] = Field(default_factory=dict)
    consumers: Annotated[dict[str, Consumer], _Section] = Field(default_factory=dict)
    routes: Annotated[list[Route], _Items] = Field(default_factory=list)
    # plugins every route runs, unless a route turns one off (name: false) or configures it
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    analytics: AnalyticsSection = Field(default_factory=AnalyticsConfig.off)
    tracing: Annotated[TracingConfig | None, _Section] = None
    llm: LlmConfig | None = None

    @model_validator(mode="after")
    def _references(self) -> Config:
        problems = config_problems(self.routes, self.upstreams, self.plugins)
        # consumers and auth plugins (keys used twice, unknown anonymous consumer, ...)
        problems += consumer_problems(
            self.consumers,
            [(("plugins",), self.plugins)]
            + [(("routes", i, "plugins"), r.plugins) for i, r in enumerate(self.routes)]
            + [
                (("llm", "routes", i, "plugins"), r.plugins)
                for i, r in enumerate(self.llm.routes if self.llm is not None else ())
            ],
        )
        if self.llm is not None:
            problems += llm_route_problems(self.llm.routes, [r.name for r in self.routes])
        if problems:
            raise SchemaValueError(problems[0][1], problems[0][0])
        return self

    def route(self, name: str) -> Route:
        """The route called ``name``; ``KeyError`` if there is none."""
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)
