"""jwt_auth through the real gateway over sockets: HS256/RS256/ES256 keys of the plugin and of
consumers, claims (issuer, audience, expiry and leeway, required), the consumer mapping, the
verification cache, and a real JWKS server on a socket that rotates its keys and goes down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.support import Upstream, fetch, gateway_yaml, start_app, wait_until

SECRET = "an-hs256-secret-of-at-least-32-bytes!"


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def token(key: Any, alg: str = "HS256", kid: str | None = None, **claims: Any) -> str:
    claims.setdefault("exp", int(time.time()) + 300)
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def forge_hs256(secret: bytes, claims: dict[str, Any], kid: str) -> str:
    """An HS256 token made by hand (PyJWT itself refuses a PEM as an HMAC secret)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def challenge(r: Any) -> str:
    value = r.header(b"www-authenticate")
    return value.decode() if value is not None else ""


@pytest.fixture
async def up() -> AsyncIterator[Upstream]:
    server = await Upstream(name="u0").start()
    yield server
    await server.stop()


def seen(up: Upstream) -> dict[bytes, bytes]:
    return dict(up.seen[-1].headers)


def indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.strip().splitlines())


def cfg(up: Upstream, plugins: str, consumers: str = "") -> str:
    routes = f"""\
  - name: r
    match: {{path: /}}
    upstream: main
    plugins:
{plugins}
"""
    extra = "consumers:\n" + consumers if consumers else ""
    return gateway_yaml({"main": [up.port]}, routes, extra)


def plugin_of(app: Any, name: str = "jwt_auth") -> Any:
    return next(p for p in app.runtime.routes[0].pipeline.plugins if p.name == name)


async def test_hs256_issuer_audience_expiry_leeway_required(up: Upstream) -> None:
    plugins = f"""\
      jwt_auth:
        keys: [{{key: "{SECRET}"}}]
        issuer: https://issuer.example
        audience: [sensors, other]
        leeway: 30s
        require: [exp, sub]
"""
    consumers = "  kitchen-app: {groups: [apps]}\n"
    app, port = await start_app(cfg(up, plugins, consumers))
    good = {"iss": "https://issuer.example", "aud": "sensors", "sub": "kitchen-app"}
    try:
        r = await fetch(port, "/", headers=bearer(token(SECRET, **good)))
        assert r.status == 200
        assert seen(up)[b"x-consumer-username"] == b"kitchen-app"
        assert seen(up)[b"x-consumer-groups"] == b"apps"
        assert seen(up)[b"authorization"].startswith(b"Bearer ")  # JWTs pass on by default

        r = await fetch(port, "/")
        assert r.status == 401 and challenge(r) == 'Bearer realm="piuptime"'

        now = int(time.time())
        # expired 10 s ago, inside the 30 s leeway: accepted
        r = await fetch(port, "/", headers=bearer(token(SECRET, **{**good, "exp": now - 10})))
        assert r.status == 200
        cases = [
            ({**good, "exp": now - 120}, "token expired"),
            ({**good, "iss": "https://evil.example"}, "token issuer not accepted"),
            ({**good, "aud": "printers"}, "token audience not accepted"),
            ({**good, "nbf": now + 600}, "token not valid yet"),
            ({"iss": good["iss"], "aud": "sensors"}, "token lacks a required claim"),
            ({**good, "sub": "nobody"}, "token subject is not a known consumer"),
        ]
        for claims, why in cases:
            r = await fetch(port, "/", headers=bearer(token(SECRET, **claims)))
            assert r.status == 401, why
            assert challenge(r) == (
                f'Bearer realm="piuptime", error="invalid_token", error_description="{why}"'
            )
        # required exp missing
        no_exp = jwt.encode({**good}, SECRET, algorithm="HS256")
        r = await fetch(port, "/", headers=bearer(no_exp))
        assert r.status == 401 and "token lacks a required claim" in challenge(r)
        # signed with another secret
        r = await fetch(port, "/", headers=bearer(token("x" * 40, **good)))
        assert r.status == 401 and "signature verification failed" in challenge(r)
        # garbage that looks like a JWT
        r = await fetch(port, "/", headers=bearer("a.b.c"))
        assert r.status == 401 and "malformed token" in challenge(r)
        snap = app.metrics.snapshot()["piuptime_auth_rejections_total"]
        assert snap["route=r,plugin=jwt_auth,reason=expired"] == 1
        assert snap["route=r,plugin=jwt_auth,reason=unknown_consumer"] == 1
        assert snap["route=r,plugin=jwt_auth,reason=missing"] == 1
    finally:
        await app.stop()


async def test_consumer_keys_rs256_es256_by_kid_issuer_and_subject(
    up: Upstream, rsa_keys: list[rsa.RSAPrivateKey], ec_key: ec.EllipticCurvePrivateKey
) -> None:
    consumers = f"""\
  camera:
    groups: [devices]
    jwt:
      algorithm: RS256
      kid: cam-1
      key: |
{indent(pem(rsa_keys[0]), 8)}
  thermostat:
    jwt:
      algorithm: ES256
      issuer: thermo-fleet
      key: |
{indent(pem(ec_key), 8)}
  lamp:
    jwt: {{key: "{SECRET}"}}
"""
    app, port = await start_app(cfg(up, "      jwt_auth: {}\n", consumers))
    try:
        r = await fetch(port, "/", headers=bearer(token(rsa_keys[0], "RS256", kid="cam-1")))
        assert r.status == 200
        assert seen(up)[b"x-consumer-username"] == b"camera"
        assert seen(up)[b"x-credential-identifier"] == b"cam-1"
        # the key decides the consumer, whatever sub says
        tok = token(rsa_keys[0], "RS256", kid="cam-1", sub="lamp")
        assert (await fetch(port, "/", headers=bearer(tok))).status == 200
        assert seen(up)[b"x-consumer-username"] == b"camera"
        # ES256, found by issuer
        tok = token(ec_key, "ES256", iss="thermo-fleet")
        assert (await fetch(port, "/", headers=bearer(tok))).status == 200
        assert seen(up)[b"x-consumer-username"] == b"thermostat"
        # HS256, found by sub (the consumer's name)
        assert (await fetch(port, "/", headers=bearer(token(SECRET, sub="lamp")))).status == 200
        assert seen(up)[b"x-consumer-username"] == b"lamp"
        # another RSA key claiming the camera's kid
        r = await fetch(port, "/", headers=bearer(token(rsa_keys[1], "RS256", kid="cam-1")))
        assert r.status == 401 and "signature verification failed" in challenge(r)
        # algorithm confusion: HS256 "signed" with the camera's public PEM as the secret
        tok = forge_hs256(pem(rsa_keys[0]).encode(), {"exp": int(time.time()) + 60}, "cam-1")
        r = await fetch(port, "/", headers=bearer(tok))
        assert r.status == 401
        # an unknown kid, no JWKS to ask
        r = await fetch(port, "/", headers=bearer(token(rsa_keys[0], "RS256", kid="nope")))
        assert r.status == 401 and "unknown key id" in challenge(r)
    finally:
        await app.stop()


async def test_unknown_subject_allowed_with_groups_claim_then_acl(up: Upstream) -> None:
    plugins = f"""\
      jwt_auth:
        keys: [{{key: "{SECRET}", kid: main}}]
        unknown_consumer: allow
        groups_claim: roles
      acl: {{allow: [admin]}}
"""
    app, port = await start_app(cfg(up, plugins))
    try:
        tok = token(SECRET, kid="main", sub="user-17", roles=["admin", "x,y", "ops"])
        r = await fetch(port, "/", headers=bearer(tok))
        assert r.status == 200
        assert seen(up)[b"x-consumer-username"] == b"user-17"
        assert seen(up)[b"x-consumer-groups"] == b"admin, ops"  # "x,y" is not a usable group
        tok = token(SECRET, kid="main", sub="user-18", roles="ops")
        assert (await fetch(port, "/", headers=bearer(tok))).status == 403
        tok = token(SECRET, kid="main", sub="bad\x01name")
        r = await fetch(port, "/", headers=bearer(tok))
        assert r.status == 401
    finally:
        await app.stop()


async def test_verification_cache_never_outlives_exp(up: Upstream) -> None:
    plugins = f'      jwt_auth: {{keys: [{{key: "{SECRET}"}}], unknown_consumer: allow}}\n'
    app, port = await start_app(cfg(up, plugins))
    try:
        plugin = plugin_of(app)
        long = token(SECRET, sub="a")
        for _ in range(3):
            assert (await fetch(port, "/", headers=bearer(long))).status == 200
        assert plugin.verifications == 1
        exp = int(time.time()) + 1
        short = token(SECRET, sub="b", exp=exp)
        assert (await fetch(port, "/", headers=bearer(short))).status == 200
        assert plugin.verifications == 2
        await wait_until(lambda: time.time() >= exp, 3, "the token to expire")
        r = await fetch(port, "/", headers=bearer(short))
        assert r.status == 401 and "token expired" in challenge(r)
    finally:
        await app.stop()


async def test_token_from_cookie_and_query_hidden(up: Upstream) -> None:
    plugins = f"""\
      jwt_auth:
        keys: [{{key: "{SECRET}"}}]
        unknown_consumer: allow
        cookie_names: [session]
        query_names: [jwt]
        hide_credentials: true
"""
    app, port = await start_app(cfg(up, plugins))
    try:
        tok = token(SECRET, sub="c")
        r = await fetch(port, "/", headers={"Cookie": f"theme=dark; session={tok}; lang=en"})
        assert r.status == 200 and seen(up)[b"x-consumer-username"] == b"c"
        assert seen(up)[b"cookie"] == b"theme=dark; lang=en"
        r = await fetch(port, f"/p?a=1&jwt={tok}")
        assert r.status == 200 and up.seen[-1].path == b"/p?a=1"
        r = await fetch(port, "/", headers=bearer(tok))
        assert r.status == 200 and b"authorization" not in seen(up)
    finally:
        await app.stop()


async def test_jwt_auth_and_key_auth_together(up: Upstream) -> None:
    """key_auth runs first but leaves a bearer value shaped like a JWT to jwt_auth."""
    plugins = f"""\
      jwt_auth: {{keys: [{{key: "{SECRET}"}}]}}
      key_auth: {{}}
"""
    consumers = "  kitchen-app: {keys: [plain-api-key]}\n"
    app, port = await start_app(cfg(up, plugins, consumers))
    try:
        r = await fetch(port, "/", headers=bearer("plain-api-key"))
        assert r.status == 200 and seen(up)[b"x-consumer-username"] == b"kitchen-app"
        r = await fetch(port, "/", headers=bearer(token(SECRET, sub="kitchen-app")))
        assert r.status == 200 and seen(up)[b"x-consumer-username"] == b"kitchen-app"
        r = await fetch(port, "/")
        assert r.status == 401
        assert r.header_all(b"www-authenticate") == [
            b'Key realm="piuptime"',
            b'Bearer realm="piuptime"',
        ]
        r = await fetch(port, "/", headers=bearer("wrong-api-key"))
        assert r.status == 401 and b"unknown API key" in r.body
        r = await fetch(port, "/", headers=bearer(token("y" * 40, sub="kitchen-app")))
        assert r.status == 401 and "signature verification failed" in challenge(r)
    finally:
        await app.stop()


# --------------------------------------------------------------------------------------------
# a JWKS server on a real socket


@dataclass
class JwksServer:
    keys: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    server: asyncio.AbstractServer | None = None
    port: int = 0

    async def start(self, port: int = 0) -> JwksServer:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", port or self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"GET /.well-known/jwks.json HTTP/1.1\r\n")
            self.requests += 1
            body = json.dumps({"keys": self.keys}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"


def jwk(key: Any, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        out = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        out["alg"] = "RS256"
    else:
        out = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        out["alg"] = "ES256"
    return {**out, "kid": kid, "use": "sig"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_jwks_rotation_refresh_rate_limit_and_outage(
    up: Upstream, rsa_keys: list[rsa.RSAPrivateKey], ec_key: ec.EllipticCurvePrivateKey
) -> None:
    old, new = rsa_keys
    jwks = await JwksServer(keys=[jwk(old, "old")]).start()
    plugins = f"""\
      jwt_auth:
        jwks_url: {jwks.url}
        jwks_ttl: 1m
        unknown_consumer: allow
"""
    app, port = await start_app(cfg(up, plugins))
    try:
        plugin = plugin_of(app)
        clock = Clock()
        plugin.jwks.clock = clock  # refresh timing under the test's control
        old_tok = token(old, "RS256", kid="old", sub="dev-1")
        r = await fetch(port, "/", headers=bearer(old_tok))
        assert r.status == 200 and seen(up)[b"x-consumer-username"] == b"dev-1"
        assert jwks.requests == 1

        # the server rotates: new key in, old key out
        jwks.keys = [jwk(new, "new"), jwk(ec_key, "ec")]
        new_tok = token(new, "RS256", kid="new", sub="dev-2")
        # within 10 s of the last fetch an unknown kid does not reach the JWKS server
        r = await fetch(port, "/", headers=bearer(new_tok))
        assert r.status == 401 and "unknown key id" in challenge(r)
        for _ in range(5):
            tok = token(new, "RS256", kid=uuid.uuid4().hex, sub="x")
            assert (await fetch(port, "/", headers=bearer(tok))).status == 401
        assert jwks.requests == 1
        assert (await fetch(port, "/", headers=bearer(old_tok))).status == 200  # still known

        clock.now += 10
        # many requests with the new kid at once: one refresh serves them all
        results = await asyncio.gather(
            *(fetch(port, "/", headers=bearer(new_tok)) for _ in range(8))
        )
        assert [r.status for r in results] == [200] * 8
        assert jwks.requests == 2
        ec_tok = token(ec_key, "ES256", kid="ec", sub="dev-3")
        assert (await fetch(port, "/", headers=bearer(ec_tok))).status == 200
        # the old key left the set: its (earlier cached) token stops verifying
        r = await fetch(port, "/", headers=bearer(old_tok))
        assert r.status == 401 and "unknown key id" in challenge(r)
        # random kids right after a refresh: still rate-limited
        for _ in range(5):
            tok = token(new, "RS256", kid=uuid.uuid4().hex, sub="x")
            assert (await fetch(port, "/", headers=bearer(tok))).status == 401
        assert jwks.requests == 2

        # the JWKS server goes away; the TTL runs out: the keys we have keep working
        await jwks.stop()
        clock.now += 61
        fresh = token(new, "RS256", kid="new", sub="dev-4")
        r = await fetch(port, "/", headers=bearer(fresh))
        assert r.status == 200 and seen(up)[b"x-consumer-username"] == b"dev-4"
        fetches = app.metrics.snapshot()["piuptime_auth_jwks_fetches_total"]
        await wait_until(
            lambda: (
                app.metrics.snapshot()["piuptime_auth_jwks_fetches_total"].get(
                    f"url={jwks.url},result=error"
                )
                == 1
            ),
            what="the failed background refresh",
        )
        assert fetches[f"url={jwks.url},result=ok"] == 2
        another = token(new, "RS256", kid="new", sub="dev-5")
        assert (await fetch(port, "/", headers=bearer(another))).status == 200
        assert (await fetch(port, "/", headers=bearer(ec_tok))).status == 200

        # the server comes back with a third key: found once the interval allows a refresh
        jwks.keys = [jwk(new, "new"), jwk(old, "back")]
        await jwks.start(jwks.port)
        back = token(old, "RS256", kid="back", sub="dev-6")
        assert (await fetch(port, "/", headers=bearer(back))).status == 401  # rate-limited
        clock.now += 10
        assert (await fetch(port, "/", headers=bearer(back))).status == 200
        assert jwks.requests == 3
    finally:
        await jwks.stop()
        await app.stop()


async def test_jwks_unreachable_from_the_start_is_503_then_recovers(
    up: Upstream, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    jwks = JwksServer(keys=[jwk(rsa_keys[0], "k")])
    from tests.support import free_port

    jwks.port = free_port()  # nothing listens there yet
    plugins = f"      jwt_auth: {{jwks_url: {jwks.url}, unknown_consumer: allow}}\n"
    app, port = await start_app(cfg(up, plugins))
    try:
        plugin = plugin_of(app)
        clock = Clock()
        plugin.jwks.clock = clock
        tok = token(rsa_keys[0], "RS256", kid="k", sub="d")
        r = await fetch(port, "/", headers=bearer(tok))
        assert r.status == 503 and r.header(b"retry-after") == b"10"
        assert b"auth_unavailable" in r.body
        assert plugin.jwks.fetches == 1
        r = await fetch(port, "/", headers=bearer(tok))  # no new attempt within the interval
        assert r.status == 503 and plugin.jwks.fetches == 1
        await jwks.start(jwks.port)
        clock.now += 10
        assert (await fetch(port, "/", headers=bearer(tok))).status == 200
        assert jwks.requests == 1
    finally:
        await jwks.stop()
        await app.stop()
