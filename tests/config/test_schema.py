"""The models on their own: defaults, conveniences, and checks that hold without the loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from piuptime.config.schema import (
    AccessLog,
    Config,
    GatewayConfig,
    Limits,
    Listener,
    Pool,
    Route,
    RouteMatch,
    Target,
    Timeouts,
    parse_address,
    split_target_url,
)


def test_defaults_match_the_wire_layer() -> None:
    limits = Limits()
    assert limits.max_header_bytes == 16 * 1024
    assert limits.max_header_count == 100
    assert limits.max_body_bytes == 10 * 1024 * 1024
    assert (limits.header_timeout, limits.idle_timeout, limits.body_timeout) == (10.0, 75.0, 30.0)
    assert (Pool().max_connections, Pool().max_idle, Pool().idle_timeout) == (256, 64, 60.0)
    assert (Timeouts().connect, Timeouts().read) == (2.0, 30.0)
    gateway = GatewayConfig()
    assert gateway.drain_timeout == 30.0 and gateway.via == "piuptime"
    assert gateway.access_log.path == "stdout"
    config = Config()
    assert config.store.sqlite == "./piuptime.db" and config.store.redis is None
    assert config.admin is None and config.llm is None


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, "127.0.0.1:8080"),
        ("localhost:0", "localhost", 0, "localhost:0"),
        (":8080", "", 8080, ":8080"),
        ("[::1]:9000", "::1", 9000, "[::1]:9000"),
        ("[::]:80", "::", 80, "[::]:80"),
        ("0.0.0.0:65535", "0.0.0.0", 65535, "0.0.0.0:65535"),
    ],
)
def test_listener_forms(text: str, host: str, port: int, shown: str) -> None:
    listener = Listener.model_validate(text)
    assert (listener.host, listener.port, listener.tls) == (host, port, None)
    assert str(listener) == listener.address == shown
    assert parse_address(shown) == (host, port)


@pytest.mark.parametrize(
    "text", ["8080", "host:", "host:http", "::1:80", "[::1]80", "a b:1", ":-1"]
)
def test_listener_rejects(text: str) -> None:
    with pytest.raises(ValidationError):
        Listener.model_validate(text)


def test_listener_with_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    listener = Listener.model_validate({"address": ":8443", "tls": {"cert": cert, "key": key}})
    assert listener.tls is not None
    assert (listener.tls.cert, listener.tls.key) == (str(cert), str(key))
    assert str(listener) == ":8443"
    # The model's own field names work too (for code that builds configs).
    assert Listener(host="::1", port=1).address == "[::1]:1"


def test_gateway_listen_accepts_one_string_and_rejects_duplicates() -> None:
    assert [str(x) for x in GatewayConfig.model_validate({"listen": ":1"}).listen] == [":1"]
    with pytest.raises(ValidationError, match="listed twice"):
        GatewayConfig.model_validate({"listen": [":1", ":1"]})
    # Port 0 twice is fine: each gets its own port.
    GatewayConfig.model_validate({"listen": ["127.0.0.1:0", "127.0.0.1:0"]})
    with pytest.raises(ValidationError, match="at least 1"):
        GatewayConfig.model_validate({"listen": []})


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "authority"),
    [
        ("http://127.0.0.1:9001", "http", "127.0.0.1", 9001, "127.0.0.1:9001"),
        ("http://Pi-4.local", "http", "pi-4.local", 80, "pi-4.local:80"),
        ("https://api.example.com/", "https", "api.example.com", 443, "api.example.com:443"),
        ("HTTP://h:81", "http", "h", 81, "h:81"),
        ("http://[::1]:9000", "http", "::1", 9000, "[::1]:9000"),
        ("https://[fe80::1]", "https", "fe80::1", 443, "[fe80::1]:443"),
    ],
)
def test_target_parts(url: str, scheme: str, host: str, port: int, authority: str) -> None:
    target = Target.model_validate(url)
    assert (target.scheme, target.host, target.port) == (scheme, host, port)
    assert target.authority == authority
    assert target.key == (scheme, host, port)
    assert target.url == url and target.weight == 1 and not target.backup


@pytest.mark.parametrize(
    "url",
    [
        "http://h/x",
        "http://h:1/?a=b",
        "http://h?",
        "http://h#frag",
        "http://user:pw@h",
        "ws://h",
        "h:80",
        "http://",
        "http://h:0",
        "http://h:99999",
        "http://h :80",
        "http://bad_host!",
    ],
)
def test_target_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        split_target_url(url)
    with pytest.raises(ValidationError):
        Target.model_validate({"url": url})


def test_route_match_conveniences() -> None:
    match = RouteMatch.model_validate(
        {"path": "/dev/{id}/x/{part}/", "methods": "get", "host": ["A.com", "*.B.com"]}
    )
    assert match.is_prefix
    assert match.captures == ("id", "part")
    assert match.methods == ["GET"] and match.method_set == frozenset({"GET"})
    assert match.hosts == ("a.com", "*.b.com")
    exact = RouteMatch(path="/a")
    assert not exact.is_prefix and exact.hosts == () and exact.method_set is None


@pytest.mark.parametrize(
    "host_header", ["pass", "target", "api.internal", "api.internal:8080", "10.0.0.1", "[::1]"]
)
def test_host_header_values(host_header: str) -> None:
    route = Route.model_validate(
        {"name": "r", "match": {"path": "/"}, "upstream": "u", "host_header": host_header}
    )
    assert route.host_header == host_header


@pytest.mark.parametrize("host_header", ["", "two words", "a.com:port", "http://a.com"])
def test_host_header_rejects(host_header: str) -> None:
    with pytest.raises(ValidationError, match='expected "pass"'):
        Route.model_validate(
            {"name": "r", "match": {"path": "/"}, "upstream": "u", "host_header": host_header}
        )


def test_route_checks_hold_without_the_loader() -> None:
    with pytest.raises(ValidationError, match="strip_prefix needs a prefix path"):
        Route.model_validate(
            {"name": "r", "match": {"path": "/a"}, "upstream": "u", "strip_prefix": True}
        )
    with pytest.raises(ValidationError, match="not captured"):
        Route.model_validate(
            {"name": "r", "match": {"path": "/a/"}, "upstream": "u", "rewrite": "/{x}"}
        )


def test_config_cross_checks_hold_without_the_loader() -> None:
    upstreams = {"u": {"targets": ["http://h"]}}
    route = {"name": "r", "match": {"path": "/"}, "upstream": "u"}
    Config.model_validate({"upstreams": upstreams, "routes": [route]})
    with pytest.raises(ValidationError, match="unknown upstream 'x'"):
        Config.model_validate({"upstreams": upstreams, "routes": [{**route, "upstream": "x"}]})
    with pytest.raises(ValidationError, match="duplicate route name 'r'"):
        Config.model_validate({"upstreams": upstreams, "routes": [route, route]})


def test_config_route_lookup() -> None:
    config = Config.model_validate(
        {
            "upstreams": {"u": {"targets": ["http://h"]}},
            "routes": [{"name": "r", "match": {"path": "/"}, "upstream": "u"}],
        }
    )
    assert config.route("r").upstream == "u"
    with pytest.raises(KeyError):
        config.route("nope")


def test_access_log_modes() -> None:
    assert AccessLog().to_stdout and AccessLog().enabled and AccessLog().file is None
    off = AccessLog(path="off")
    assert not off.enabled and off.file is None
    assert AccessLog(path="/var/log/a.log").file == "/var/log/a.log"


def test_models_are_frozen_and_strict_about_keys() -> None:
    limits = Limits()
    with pytest.raises(ValidationError):
        limits.max_body_bytes = 5  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs"):
        Limits.model_validate({"max_bodybytes": 1})


def test_numbers_are_not_booleans() -> None:
    with pytest.raises(ValidationError, match="expected a whole number, got true"):
        Limits.model_validate({"max_header_count": True})
    with pytest.raises(ValidationError):
        Limits.model_validate({"max_body_bytes": True})
