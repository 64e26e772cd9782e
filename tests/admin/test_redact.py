"""Redaction of secrets (unit): the four rules, one by one, and what is left alone."""

from __future__ import annotations

from piuptime.admin.redact import REDACTED, env_references, redact, redact_text
from piuptime.config import parse_config

R = REDACTED


def test_known_secret_fields_of_the_schema() -> None:
    data = {
        "admin": {"listen": "127.0.0.1:9180", "token": "t0k", "tokens": {"ci": "c1", "al": "a1"}},
        "consumers": {
            "app": {
                "keys": ["k1", "k2"],
                "groups": ["apps"],
                "basic": {"username": "app", "password_hash": "scrypt$..."},
                "jwt": {"key": "hs-secret", "algorithm": "HS256", "kid": "one"},
            }
        },
        "plugins": {"jwt_auth": {"keys": [{"key": "k", "kid": "a", "algorithm": "HS256"}]}},
        "routes": [
            {"name": "r", "plugins": {"jwt_auth": {"keys": [{"key": "k2", "kid": "b"}]}}},
        ],
        "llm": {"providers": {"openai": {"kind": "openai", "keys": ["sk-1"], "base_url": "x"}}},
        "tracing": {"otlp_endpoint": "http://c:4318", "headers": {"X-Honeycomb-Team": "abc"}},
    }
    out = redact(data)
    assert out["tracing"] == {"otlp_endpoint": "http://c:4318", "headers": {"X-Honeycomb-Team": R}}
    assert out["admin"] == {"listen": "127.0.0.1:9180", "token": R, "tokens": {"ci": R, "al": R}}
    app = out["consumers"]["app"]
    assert app["keys"] == [R, R] and app["groups"] == ["apps"]
    assert app["basic"] == {"username": "app", "password_hash": R}
    assert app["jwt"] == {"key": R, "algorithm": "HS256", "kid": "one"}
    assert out["plugins"]["jwt_auth"]["keys"] == [{"key": R, "kid": "a", "algorithm": "HS256"}]
    assert out["routes"][0]["plugins"]["jwt_auth"]["keys"][0] == {"key": R, "kid": "b"}
    provider = out["llm"]["providers"]["openai"]
    assert provider == {"kind": "openai", "keys": [R], "base_url": "x"}
    assert data["admin"]["token"] == "t0k"  # a copy: the input is untouched


def test_secret_names_anywhere_but_not_user_chosen_names_above_them() -> None:
    data = {
        "llm": {"providers": {"x": {"api_key": "a", "extra": {"client_secret": "b"}}}},
        "somewhere": {"password": "p", "Token": "t", "passwords": ["p1", "p2"]},
        "upstreams": {"secret": {"targets": [{"url": "http://10.0.0.1:80"}]}},
        "consumers": {"password": {"groups": ["token"]}},
    }
    out = redact(data)
    assert out["llm"]["providers"]["x"] == {"api_key": R, "extra": {"client_secret": R}}
    assert out["somewhere"] == {"password": R, "Token": R, "passwords": [R, R]}
    # an upstream named "secret", a consumer named "password": their contents are not secrets
    assert out["upstreams"]["secret"]["targets"][0]["url"] == "http://10.0.0.1:80"
    assert out["consumers"]["password"]["groups"] == ["token"]


def test_passwords_in_urls_and_dsns() -> None:
    data = {
        "store": {
            "redis": "redis://:pw1@127.0.0.1:6379/0",
            "other": "rediss://user:pw2@h:6380",
            "plain": "redis://127.0.0.1:6379/0",
        },
        "config_store": {"dsn": "postgresql://piuptime:pw3@10.0.0.2:5432/db?sslmode=require"},
        "analytics": {"dsn": "host=10.0.0.2 dbname=a password=pw4 user=u"},
        "quoted": "host=h password='pw 5' user=u",
    }
    out = redact(data)
    assert out["store"]["redis"] == f"redis://:{R}@127.0.0.1:6379/0"
    assert out["store"]["other"] == f"rediss://user:{R}@h:6380"
    assert out["store"]["plain"] == "redis://127.0.0.1:6379/0"
    assert (
        out["config_store"]["dsn"] == f"postgresql://piuptime:{R}@10.0.0.2:5432/db?sslmode=require"
    )
    assert out["analytics"]["dsn"] == f"host=10.0.0.2 dbname=a password={R} user=u"
    assert out["quoted"] == f"host=h password={R} user=u"


def test_values_that_came_from_the_environment() -> None:
    text = (
        "plugins:\n  request_transformer: {set: {authorization: 'Bearer ${UP_TOKEN}'}}\n"
        "x: ${SHORT}\ny: ${UNSET_ONE:-fallback}\nz: $${NOT_A_REFERENCE}\n"
    )
    names = env_references(text)
    assert names == {"UP_TOKEN", "SHORT", "UNSET_ONE"}
    environ = {"UP_TOKEN": "abcdef123", "SHORT": "42", "NOT_A_REFERENCE": "nope"}
    data = {
        "plugins": {"request_transformer": {"set": {"authorization": "Bearer abcdef123"}}},
        "x": "42",
        "y": "fallback",
        "port": "127.0.0.1:8042",  # a short value only goes when it is the whole string
        "z": "nope",
        "n": 42,
    }
    out = redact(data, names, environ=environ)
    assert out["plugins"]["request_transformer"]["set"]["authorization"] == f"Bearer {R}"
    assert out["x"] == R and out["y"] == "fallback" and out["port"] == "127.0.0.1:8042"
    assert out["z"] == "nope" and out["n"] == 42
    assert redact_text("listen: 'abcdef123' is bad", names, environ) == f"listen: '{R}' is bad"


def test_a_whole_config_dump_keeps_its_shape() -> None:
    config = parse_config(
        "admin: {token: t0k3n}\n"
        "store: {redis: 'redis://:pw@127.0.0.1:6379/0'}\n"
        "consumers:\n  app: {keys: [my-api-key]}\n"
        "upstreams:\n  a: {targets: ['http://127.0.0.1:9']}\n"
        "routes:\n  - {name: r, match: {path: /r/}, upstream: a, plugins: {key_auth: {}}}\n",
        "t.yaml",
        {},
    )
    dumped = config.model_dump(mode="json")
    out = redact(dumped)
    assert set(out) == set(dumped)
    flat = repr(out)
    for secret in ("t0k3n", ":pw@", "my-api-key"):
        assert secret not in flat
    assert out["routes"] == dumped["routes"]
    assert out["upstreams"] == dumped["upstreams"]
