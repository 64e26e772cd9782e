"""key_auth, basic_auth and acl through the real gateway over sockets; consumer config errors
with positions; ``piuptime hash-password``."""

from __future__ import annotations

import base64
import hashlib
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from piuptime.config import ConfigError, parse_config
from piuptime.config.plugins.auth import PasswordHash, hash_password
from piuptime.gateway.consumers import Consumers
from tests.support import RawClient, Upstream, fetch, gateway_yaml, start_app

KITCHEN_KEY = "kitchen-secret-key-1"
GARDEN_KEY = "garden-secret-key-2"
GARDEN_SHA = hashlib.sha256(GARDEN_KEY.encode()).hexdigest()


@pytest.fixture
async def up() -> AsyncIterator[Upstream]:
    server = await Upstream(name="u0").start()
    yield server
    await server.stop()


def seen(up: Upstream) -> dict[bytes, bytes]:
    return dict(up.seen[-1].headers)


def cfg(up: Upstream, routes: str, consumers: str) -> str:
    return gateway_yaml({"main": [up.port]}, routes, "consumers:\n" + consumers)


CONSUMERS = f"""\
  kitchen-app: {{keys: ["{KITCHEN_KEY}"], groups: [apps, kitchen]}}
  garden: {{keys: ["sha256:{GARDEN_SHA}"], groups: [apps]}}
  guest: {{groups: [guests]}}
"""


def route(name: str, path: str, plugins: str) -> str:
    return f"""\
  - name: {name}
    match: {{path: {path}}}
    upstream: main
    plugins: {plugins}
"""


async def test_key_auth_header_bearer_query_and_hidden(up: Upstream) -> None:
    routes = route("keys", "/k/", "{key_auth: {}}") + route(
        "shown", "/shown/", "{key_auth: {hide_credentials: false}}"
    )
    app, port = await start_app(cfg(up, routes, CONSUMERS))
    try:
        r = await fetch(port, "/k/a", headers={"apikey": KITCHEN_KEY})
        assert r.status == 200
        h = seen(up)
        assert h[b"x-consumer-username"] == b"kitchen-app"
        assert h[b"x-consumer-groups"] == b"apps, kitchen"
        assert h[b"x-credential-identifier"] == b"keys[0]"
        assert b"apikey" not in h  # hidden by default

        r = await fetch(port, "/k/b", headers={"Authorization": f"Bearer {KITCHEN_KEY}"})
        assert r.status == 200
        assert seen(up)[b"x-consumer-username"] == b"kitchen-app"
        assert b"authorization" not in seen(up)

        r = await fetch(port, f"/k/c?x=1&apikey={KITCHEN_KEY}&y=2")
        assert r.status == 200
        assert up.seen[-1].path == b"/k/c?x=1&y=2"  # the key left the query
        assert seen(up)[b"x-consumer-username"] == b"kitchen-app"

        # pre-hashed key (sha256:<hex> in the config), url-encoded in the query
        r = await fetch(port, "/k/d?apikey=" + GARDEN_KEY.replace("-", "%2D"))
        assert r.status == 200 and seen(up)[b"x-consumer-username"] == b"garden"
        assert up.seen[-1].path == b"/k/d"

        # hide_credentials: false passes the key on
        r = await fetch(port, "/shown/a", headers={"apikey": GARDEN_KEY})
        assert r.status == 200 and seen(up)[b"apikey"] == GARDEN_KEY.encode()
        r = await fetch(port, f"/shown/b?apikey={GARDEN_KEY}")
        assert up.seen[-1].path == f"/shown/b?apikey={GARDEN_KEY}".encode()
    finally:
        await app.stop()


async def test_key_auth_missing_and_unknown_are_401(up: Upstream) -> None:
    app, port = await start_app(cfg(up, route("keys", "/", "{key_auth: {}}"), CONSUMERS))
    try:
        r = await fetch(port, "/a")
        assert r.status == 401
        assert r.header(b"www-authenticate") == b'Key realm="piuptime"'
        assert b"missing_credentials" in r.body
        r = await fetch(port, "/a", headers={"apikey": "nope"})
        assert r.status == 401 and r.header(b"www-authenticate") == b'Key realm="piuptime"'
        assert b"unknown API key" in r.body
        r = await fetch(port, "/a", headers={"Authorization": "Bearer nope"})
        assert r.status == 401
        assert r.header(b"www-authenticate") == b'Bearer realm="piuptime", error="invalid_token"'
        # the sha256 form in the config is a digest, not a key: sending it does not work
        r = await fetch(port, "/a", headers={"apikey": f"sha256:{GARDEN_SHA}"})
        assert r.status == 401
        assert up.seen == []
        snap = app.metrics.snapshot()["piuptime_auth_rejections_total"]
        assert snap["route=keys,plugin=key_auth,reason=missing"] == 1
        assert snap["route=keys,plugin=key_auth,reason=invalid"] == 3
    finally:
        await app.stop()


async def test_key_auth_anonymous_and_custom_names(up: Upstream) -> None:
    routes = route(
        "anon",
        "/",
        "{key_auth: {anonymous: guest, header_names: [X-Api-Key], query_names: [key], "
        "bearer: false}}",
    )
    app, port = await start_app(cfg(up, routes, CONSUMERS))
    try:
        r = await fetch(port, "/a")
        assert r.status == 200
        h = seen(up)
        assert h[b"x-consumer-username"] == b"guest"
        assert h[b"x-anonymous-consumer"] == b"true"
        assert h[b"x-consumer-groups"] == b"guests"
        r = await fetch(port, "/b", headers={"X-Api-Key": KITCHEN_KEY})
        assert r.status == 200 and seen(up)[b"x-consumer-username"] == b"kitchen-app"
        assert b"x-anonymous-consumer" not in seen(up)
        r = await fetch(port, f"/c?key={KITCHEN_KEY}")
        assert seen(up)[b"x-consumer-username"] == b"kitchen-app"
        # a wrong key is not anonymous: it is refused
        r = await fetch(port, "/d", headers={"X-Api-Key": "wrong"})
        assert r.status == 401
        # apikey is not a name this route reads, and bearer is off: anonymous
        r = await fetch(
            port, "/e", headers={"apikey": KITCHEN_KEY, "Authorization": f"Bearer {KITCHEN_KEY}"}
        )
        assert r.status == 200 and seen(up)[b"x-consumer-username"] == b"guest"
    finally:
        await app.stop()


async def test_spoofed_consumer_headers_are_removed(up: Upstream) -> None:
    routes = route("keys", "/", "{key_auth: {anonymous: guest}}")
    app, port = await start_app(cfg(up, routes, CONSUMERS))
    try:
        spoof = {
            "X-Consumer-Username": "admin",
            "X-Consumer-Groups": "admins",
            "X-Consumer-ID": "1",
            "X-Credential-Identifier": "root",
            "X-Anonymous-Consumer": "false",
        }
        r = await fetch(port, "/a", headers={**spoof, "apikey": GARDEN_KEY})
        assert r.status == 200
        got = up.seen[-1].headers
        assert [v for n, v in got if n == b"x-consumer-username"] == [b"garden"]
        assert [v for n, v in got if n == b"x-consumer-groups"] == [b"apps"]
        assert not any(n == b"x-consumer-id" for n, _ in got)
        assert [v for n, v in got if n == b"x-credential-identifier"] == [b"keys[0]"]
        assert not any(n == b"x-anonymous-consumer" for n, _ in got)
        r = await fetch(port, "/b", headers=spoof)  # anonymous: still not the spoofed admin
        got = up.seen[-1].headers
        assert [v for n, v in got if n == b"x-consumer-username"] == [b"guest"]
        assert [v for n, v in got if n == b"x-anonymous-consumer"] == [b"true"]
        assert not any(v == b"admins" for _, v in got)
    finally:
        await app.stop()


async def test_key_headers_in_any_number_never_reach_the_upstream(up: Upstream) -> None:
    routes = route("keys", "/", "{key_auth: {header_names: [apikey, x-api-key]}}")
    app, port = await start_app(cfg(up, routes, CONSUMERS))
    try:
        c = await RawClient.connect(port)
        try:
            # two key headers: the first configured name wins, neither goes upstream
            await c.send(
                b"GET /two HTTP/1.1\r\nHost: t\r\nx-api-key: nope\r\n"
                b"apikey: " + KITCHEN_KEY.encode() + b"\r\napikey: other\r\n\r\n"
            )
            r = await c.read_response()
            assert r.status == 200
            got = up.seen[-1].headers
            assert not any(n in (b"apikey", b"x-api-key") for n, _ in got), got
            assert dict(got)[b"x-consumer-username"] == b"kitchen-app"
            # an empty key header does not hide a bearer key
            await c.send(
                b"GET /bearer HTTP/1.1\r\nHost: t\r\napikey: \r\n"
                b"Authorization: Bearer " + GARDEN_KEY.encode() + b"\r\n\r\n"
            )
            r = await c.read_response()
            assert r.status == 200
            got = up.seen[-1].headers
            assert dict(got)[b"x-consumer-username"] == b"garden"
            assert not any(n == b"authorization" for n, _ in got)
            # the second configured name alone
            await c.send(
                b"GET /second HTTP/1.1\r\nHost: t\r\nX-API-Key: "
                + GARDEN_KEY.encode()
                + b"\r\n\r\n"
            )
            r = await c.read_response()
            assert (
                r.status == 200 and dict(up.seen[-1].headers)[b"x-consumer-username"] == b"garden"
            )
        finally:
            await c.close()
    finally:
        await app.stop()


def test_key_lookup_uses_digests_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(
        f"consumers:\n  a: {{keys: [{KITCHEN_KEY}, 'sha256:{GARDEN_SHA}']}}\n", "t.yaml"
    )
    consumers = Consumers.from_config(config)
    # only digests are kept: the plaintext key is nowhere in the index
    assert set(consumers.keys) == {
        hashlib.sha256(KITCHEN_KEY.encode()).digest(),
        bytes.fromhex(GARDEN_SHA),
    }
    assert all(KITCHEN_KEY.encode() not in (d, e[0], e[2]) for d, e in consumers.keys.items())
    compared: list[tuple[bytes, bytes]] = []
    import piuptime.gateway.consumers as mod

    real = mod.hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(mod.hmac, "compare_digest", spy)
    hit = consumers.by_key(GARDEN_KEY.encode())
    assert hit is not None and hit[0].name == "a" and hit[1] == b"keys[1]"
    digest = hashlib.sha256(GARDEN_KEY.encode()).digest()
    assert compared == [(digest, digest)]
    assert consumers.by_key(b"other") is None


# --------------------------------------------------------------------------------------------
# basic_auth


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def test_basic_auth_hashed_password_cached_after_first(up: Upstream) -> None:
    consumers = (
        f"  alice: {{basic: {{username: alice, password_hash: '{hash_password('s3cret-pw')}'}}, "
        "groups: [staff]}\n"
        f"  bob: {{basic: {{username: bob, password_hash: "
        f"'{hash_password('bobs-pw', 'pbkdf2')}'}}}}\n"
    )
    app, port = await start_app(cfg(up, route("b", "/", "{basic_auth: {}}"), consumers))
    try:
        plugin = app.runtime.routes[0].pipeline.plugins[0]
        assert plugin.name == "basic_auth"
        r = await fetch(port, "/x")
        assert r.status == 401
        assert r.header(b"www-authenticate") == b'Basic realm="piuptime", charset="UTF-8"'
        t0 = time.perf_counter()
        r = await fetch(port, "/a", headers=basic("alice", "s3cret-pw"))
        first = time.perf_counter() - t0
        assert r.status == 200
        assert seen(up)[b"x-consumer-username"] == b"alice"
        assert seen(up)[b"x-credential-identifier"] == b"alice"
        assert b"authorization" not in seen(up)  # hidden by default
        assert plugin.hash_checks == 1
        t0 = time.perf_counter()
        for _ in range(5):
            r = await fetch(port, "/a", headers=basic("alice", "s3cret-pw"))
            assert r.status == 200
        later = (time.perf_counter() - t0) / 5
        assert plugin.hash_checks == 1  # cached: no more slow hashes
        assert later < first
        r = await fetch(port, "/b", headers=basic("bob", "bobs-pw"))  # pbkdf2 hash
        assert r.status == 200 and seen(up)[b"x-consumer-username"] == b"bob"
        # wrong password, unknown user, malformed: 401, never cached
        for headers in (
            basic("alice", "wrong"),
            basic("alice", "wrong"),
            basic("mallory", "s3cret-pw"),
            {"Authorization": "Basic !!!notbase64"},
        ):
            r = await fetch(port, "/c", headers=headers)
            assert r.status == 401
            assert r.header(b"www-authenticate") == b'Basic realm="piuptime", charset="UTF-8"'
        assert plugin.hash_checks == 5  # each wrong attempt was checked again
        assert plugin.failures == 4
        snap = app.metrics.snapshot()["piuptime_auth_rejections_total"]
        assert snap["route=b,plugin=basic_auth,reason=invalid"] == 4
    finally:
        await app.stop()


async def test_basic_auth_does_not_block_the_event_loop(up: Upstream) -> None:
    """While a slow hash runs in a thread, a cached client is answered."""
    import asyncio

    slow = PasswordHash.parse(hash_password("pw"))
    slower = PasswordHash("scrypt", (2**16, 8, 1), slow.salt, slow.digest)  # ~4x the work
    consumers = (
        f"  a: {{basic: {{username: a, password_hash: '{hash_password('fast-pw')}'}}}}\n"
        f"  b: {{basic: {{username: b, password_hash: '{slower}'}}}}\n"
    )
    app, port = await start_app(cfg(up, route("b", "/", "{basic_auth: {}}"), consumers))
    try:
        assert (await fetch(port, "/", headers=basic("a", "fast-pw"))).status == 200
        plugin = app.runtime.routes[0].pipeline.plugins[0]
        slow_call = asyncio.ensure_future(fetch(port, "/", headers=basic("b", "not-it")))
        from tests.support import wait_until

        await wait_until(lambda: plugin.hash_checks == 2, what="slow check started")
        r = await fetch(port, "/", headers=basic("a", "fast-pw"))
        assert r.status == 200
        assert not slow_call.done()  # answered while the slow hash was still running
        assert (await slow_call).status == 401
    finally:
        await app.stop()


# --------------------------------------------------------------------------------------------
# acl and several auth plugins


async def test_acl_allow_deny_401_403(up: Upstream) -> None:
    routes = (
        route("apps", "/apps/", "{key_auth: {}, acl: {allow: [kitchen]}}")
        + route("nodeny", "/nodeny/", "{key_auth: {anonymous: guest}, acl: {deny: [guests]}}")
        + route("noauth", "/noauth/", "{acl: {allow: [apps]}}")
    )
    app, port = await start_app(cfg(up, routes, CONSUMERS))
    try:
        assert (await fetch(port, "/apps/", headers={"apikey": KITCHEN_KEY})).status == 200
        r = await fetch(port, "/apps/", headers={"apikey": GARDEN_KEY})
        assert r.status == 403 and b"forbidden" in r.body
        assert r.header(b"www-authenticate") is None
        r = await fetch(port, "/apps/")
        assert r.status == 401  # no credential: key_auth answers before acl runs
        assert (await fetch(port, "/nodeny/", headers={"apikey": GARDEN_KEY})).status == 200
        r = await fetch(port, "/nodeny/")  # anonymous guest is in the denied group
        assert r.status == 403
        r = await fetch(port, "/noauth/", headers={"apikey": KITCHEN_KEY})
        assert r.status == 401 and b"put key_auth" in r.body
        snap = app.metrics.snapshot()["piuptime_auth_rejections_total"]
        assert snap["route=apps,plugin=acl,reason=forbidden"] == 1
        assert snap["route=nodeny,plugin=acl,reason=forbidden"] == 1
        assert snap["route=noauth,plugin=acl,reason=no_consumer"] == 1
    finally:
        await app.stop()


async def test_several_auth_plugins_first_credential_decides(up: Upstream) -> None:
    consumers = CONSUMERS + (
        f"  alice: {{basic: {{username: alice, password_hash: '{hash_password('pw-alice')}'}}}}\n"
    )
    routes = route("both", "/", "{key_auth: {}, basic_auth: {}}")
    app, port = await start_app(cfg(up, routes, consumers))
    try:
        r = await fetch(port, "/")
        assert r.status == 401
        assert r.header_all(b"www-authenticate") == [
            b'Key realm="piuptime"',
            b'Basic realm="piuptime", charset="UTF-8"',
        ]
        r = await fetch(port, "/", headers=basic("alice", "pw-alice"))
        assert r.status == 200 and seen(up)[b"x-consumer-username"] == b"alice"
        r = await fetch(port, "/", headers={"apikey": KITCHEN_KEY, **basic("alice", "bad")})
        assert r.status == 200 and seen(up)[b"x-consumer-username"] == b"kitchen-app"
        # key_auth found a (wrong) key: it decides, basic_auth is not asked
        r = await fetch(port, "/", headers={"apikey": "wrong", **basic("alice", "pw-alice")})
        assert r.status == 401 and b"unknown API key" in r.body
    finally:
        await app.stop()


async def test_access_log_names_the_consumer(up: Upstream, tmp_path: Any) -> None:
    import json

    log = tmp_path / "access.log"
    text = cfg(up, route("keys", "/", "{key_auth: {}}"), CONSUMERS).replace(
        "access_log: {path: off}", f"access_log: {{path: {log}}}"
    )
    app, port = await start_app(text)
    try:
        await fetch(port, "/", headers={"apikey": KITCHEN_KEY})
        await fetch(port, "/")
    finally:
        await app.stop()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["consumer"], x["status"]) for x in lines] == [("kitchen-app", 200), (None, 401)]


# --------------------------------------------------------------------------------------------
# config


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.yaml", {})
    return [str(i) for i in caught.value.errors]


ROUTES = """\
upstreams:
  u: {targets: ["http://127.0.0.1:1"]}
routes:
  - name: r
    match: {path: /}
    upstream: u
    plugins:
"""


def test_design_example_shapes() -> None:
    config = parse_config(
        'consumers:\n  kitchen-app: {keys: ["${KITCHEN_KEY}"], groups: [apps]}\n'
        + ROUTES
        + "      key_auth: {}\n",
        "t.yaml",
        {"KITCHEN_KEY": "k"},
    )
    assert config.routes[0].plugins.key_auth is not None
    assert config.consumers["kitchen-app"].keys == ["k"]


CONFIG_ERRORS = [
    (
        "duplicate key across consumers",
        "consumers:\n  a: {keys: [k1, k2]}\n  b:\n    keys:\n      - k2\n",
        "t.yaml:5:9: consumers.b.keys[0]: this API key is also a key of consumer 'a'",
    ),
    (
        "a plain key equal to another consumer's sha256 form",
        f"consumers:\n  a: {{keys: [{GARDEN_KEY}]}}\n  b: {{keys: ['sha256:{GARDEN_SHA}']}}\n",
        "t.yaml:3:14: consumers.b.keys[0]: this API key is also a key of consumer 'a'",
    ),
    (
        "bad sha256 form",
        "consumers:\n  a: {keys: ['sha256:abc']}\n",
        "t.yaml:2:14: consumers.a.keys[0]: a pre-hashed key is sha256: and 64 hex digits "
        "(sha256sum of the key)",
    ),
    (
        "plaintext password",
        "consumers:\n  a:\n    basic: {username: a, password: hunter2}\n",
        "t.yaml:3:26: consumers.a.basic.password: passwords are never stored in the clear: run "
        "`piuptime hash-password` and write its output as password_hash",
    ),
    (
        "bad password hash",
        "consumers:\n  a:\n    basic: {username: a, password_hash: md5$x}\n",
        "t.yaml:3:41: consumers.a.basic.password_hash: expected a hash made by `piuptime "
        "hash-password` (scrypt$N$r$p$salt$hash or pbkdf2_sha256$iterations$salt$hash)",
    ),
    (
        "bad algorithm",
        "consumers:\n  a:\n    jwt: {key: x, algorithm: HS512}\n",
        "t.yaml:3:30: consumers.a.jwt.algorithm: expected one of 'HS256', 'RS256' or 'ES256', "
        "got 'HS512'",
    ),
    (
        "missing key material on a consumer",
        "consumers:\n  a:\n    jwt: {algorithm: RS256}\n",
        "t.yaml:3:22: consumers.a.jwt.algorithm: algorithm RS256 is set but there is no key "
        "material: add key (a secret for HS256, a PEM public key for RS256/ES256, or ${ENV_VAR})",
    ),
    (
        "short HS256 secret",
        "consumers:\n  a:\n    jwt: {key: short}\n",
        "t.yaml:3:16: consumers.a.jwt.key: an HS256 secret must be at least 32 bytes (RFC 7518), "
        "got 5",
    ),
    (
        "not a PEM for RS256",
        "consumers:\n  a:\n    jwt: {key: 'just text', algorithm: RS256}\n",
        "t.yaml:3:16: consumers.a.jwt.key: RS256 needs a PEM public key (-----BEGIN PUBLIC "
        "KEY-----)",
    ),
    (
        "group with a comma",
        "consumers:\n  a: {groups: ['x,y']}\n",
        "t.yaml:2:16: consumers.a.groups[0]: a group name is 1-128 printable ASCII characters "
        "without commas or leading/trailing spaces, got 'x,y'",
    ),
    (
        "acl with allow and deny",
        ROUTES + "      acl: {allow: [a], deny: [b]}\n",
        "t.yaml:8:25: routes[0].plugins.acl.deny: use allow or deny, not both",
    ),
    (
        "acl with neither",
        ROUTES + "      acl: {}\n",
        "t.yaml:8:12: routes[0].plugins.acl: acl needs allow: [groups] or deny: [groups]",
    ),
    (
        "jwt_auth without keys anywhere",
        ROUTES + "      jwt_auth: {issuer: me}\n",
        "t.yaml:8:17: routes[0].plugins.jwt_auth: jwt_auth has no key material to verify tokens "
        "with: set keys or jwks_url here, or jwt.key on a consumer",
    ),
    (
        "jwt_auth key with bad algorithm",
        ROUTES + "      jwt_auth:\n        keys:\n          - {key: x, algorithm: none}\n",
        "t.yaml:10:33: routes[0].plugins.jwt_auth.keys[0].algorithm: expected one of 'HS256', "
        "'RS256' or 'ES256', got 'none'",
    ),
    (
        "unknown anonymous consumer",
        "consumers:\n  a: {keys: [k]}\n" + ROUTES + "      key_auth: {anonymous: nobody}\n",
        "t.yaml:10:29: routes[0].plugins.key_auth.anonymous: no consumer is called 'nobody'; "
        "anonymous names the consumer used for requests without credentials",
    ),
    (
        "duplicate basic user",
        f"consumers:\n  a: {{basic: {{username: u, password_hash: '{hash_password('x')}'}}}}\n"
        f"  b:\n    basic: {{username: u, password_hash: '{hash_password('y')}'}}\n",
        "t.yaml:4:23: consumers.b.basic.username: user name 'u' is also consumer 'a''s",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS]
)
def test_config_errors_with_positions(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_rs256_without_cryptography_says_install_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import piuptime.config.plugins.auth as auth

    monkeypatch.setattr(auth, "have_crypto", lambda: False)
    auth.load_jwt_key.cache_clear()
    try:
        found = problems("consumers:\n  a:\n    jwt: {key: 'x', algorithm: ES256}\n")
        assert found == [
            't.yaml:3:16: consumers.a.jwt.key: ES256 needs the "cryptography" package: install '
            "piuptime[jwt]"
        ]
        found = problems(ROUTES + "      jwt_auth: {jwks_url: 'http://127.0.0.1:1/jwks'}\n")
        assert len(found) == 1 and "install piuptime[jwt]" in found[0]
    finally:
        auth.load_jwt_key.cache_clear()


# --------------------------------------------------------------------------------------------
# piuptime hash-password


def test_hash_password_round_trip(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from piuptime.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
    assert main(["hash-password", "--stdin"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("scrypt$16384$8$1$") and "correct" not in out
    parsed = PasswordHash.parse(out)
    assert parsed.verify(b"correct horse battery")
    assert not parsed.verify(b"correct horse battery ")
    # what it prints is accepted by the config
    config = parse_config(
        f"consumers:\n  a: {{basic: {{username: a, password_hash: '{out}'}}}}\n", "t.yaml"
    )
    assert config.consumers["a"].basic is not None

    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    assert main(["hash-password", "--stdin", "--scheme", "pbkdf2"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("pbkdf2_sha256$600000$")
    assert PasswordHash.parse(out).verify(b"pw")

    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["hash-password", "--stdin"]) == 1


def test_acl_group_no_consumer_has_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from piuptime.gateway.runtime import compile_runtime

    config = parse_config(
        "consumers:\n  a: {keys: [k], groups: [apps]}\n" + ROUTES + "      key_auth: {}\n"
        "      acl: {allow: [apps, admins]}\n",
        "t.yaml",
    )
    with caplog.at_level("WARNING", logger="piuptime.auth"):
        compile_runtime(config)
    assert "route r: acl names group(s) no consumer has: admins" in caplog.text
