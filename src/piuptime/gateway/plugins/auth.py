"""Auth plugins: key_auth, jwt_auth, basic_auth, and acl on the consumer they find.

Each auth plugin looks for its own kind of credential. Several on one route run in priority
order (key_auth, jwt_auth, basic_auth) and **the first that finds a credential decides**: a
valid one sets ``ctx.consumer`` and the others stand aside, an invalid one is answered 401 at
once. When none finds a credential, the last one answers 401 with every plugin's challenge
(``WWW-Authenticate``), unless one of them names an ``anonymous`` consumer.

Whatever the client sent as ``X-Consumer-*``, ``X-Credential-Identifier`` or
``X-Anonymous-Consumer`` is removed before the gateway sets its own: the upstream can trust
them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

import orjson

from piuptime.config.plugins.auth import PasswordHash, hash_password
from piuptime.gateway.consumers import Consumer, Consumers
from piuptime.gateway.plugins import register
from piuptime.gateway.plugins.base import Ctx, Headers, Plugin, PluginEnv, Reply, RequestResult

if TYPE_CHECKING:
    from piuptime.config.plugins.auth import Acl, BasicAuth, KeyAuth
    from piuptime.gateway.runtime import CompiledRoute
    from piuptime.observe.metrics import Counter

log = logging.getLogger("piuptime.auth")

_X_CONSUMER = b"x-consumer-"
_IDENTITY = frozenset({b"x-credential-identifier", b"x-anonymous-consumer"})
_AUTHORIZATION = b"authorization"


def strip_identity_headers(headers: Headers) -> None:
    """Remove what a client may have sent to pass for a consumer."""
    for name, _ in headers:
        if name.startswith(_X_CONSUMER) or name in _IDENTITY:
            break
    else:
        return
    headers[:] = [(n, v) for n, v in headers if not (n.startswith(_X_CONSUMER) or n in _IDENTITY)]


def grant(ctx: Ctx, consumer: Consumer, ident: bytes | None) -> None:
    """Make ``consumer`` the request's and tell the upstream who it is."""
    ctx.consumer = consumer
    ctx.req.headers += identity_fields(consumer, ident)


def identity_fields(consumer: Consumer, ident: bytes | None) -> Headers:
    """The header fields that tell the upstream who the consumer is."""
    out = [(b"x-consumer-username", consumer.name_bytes)]
    if consumer.groups_bytes:
        out.append((b"x-consumer-groups", consumer.groups_bytes))
    if ident:
        out.append((b"x-credential-identifier", ident))
    if consumer.anonymous:
        out.append((b"x-anonymous-consumer", b"true"))
    return out


def _rejections(env: PluginEnv) -> Counter:
    return env.metrics.counter(
        "auth_rejections",
        "Requests refused by an auth or acl plugin, by reason",
        ("route", "plugin", "reason"),
    )


def _without_params(query: bytes, names: frozenset[bytes]) -> bytes:
    return b"&".join(p for p in query.split(b"&") if p.partition(b"=")[0] not in names)


def _query_param(query: bytes, names: tuple[bytes, ...]) -> tuple[bytes, bytes] | None:
    """The first parameter called one of ``names`` with a non-empty value (decoded)."""
    if not query:
        return None
    for part in query.split(b"&"):
        name, eq, value = part.partition(b"=")
        if eq and name in names and value:
            return name, unquote_to_bytes(value.replace(b"+", b" "))
    return None


def _cookie(headers: Headers, names: tuple[bytes, ...]) -> tuple[bytes, bytes] | None:
    for n, v in headers:
        if n != b"cookie":
            continue
        for part in v.split(b";"):
            name, eq, value = part.strip().partition(b"=")
            if eq and name in names and value:
                return name, value.strip(b'"')
    return None


def _remove_cookie(ctx: Ctx, name: bytes) -> None:
    out: Headers = []
    for n, v in ctx.req.headers:
        if n == b"cookie":
            kept = [p for p in v.split(b";") if p.strip().partition(b"=")[0] != name]
            v = b";".join(kept).strip()
            if not v:
                continue
        out.append((n, v))
    ctx.req.headers[:] = out


_JWT_SHAPE = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\Z")


def _bearer(value: bytes) -> bytes | None:
    if value[:7].lower() == b"bearer ":
        token = value[7:].strip()
        return token or None
    return None


class AuthPlugin(Plugin):
    """What key_auth, jwt_auth and basic_auth share: the anonymous consumer, the challenge,
    the 401s and the chaining rule of several auth plugins on one route."""

    scheme = b""

    def __init__(self, config: Any, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        self.consumers: Consumers = env.consumers
        self.realm = config.realm.encode()
        self.challenge = self.scheme + b' realm="' + self.realm + b'"'
        self.anonymous: Consumer | None = None
        if config.anonymous is not None:
            named = env.consumers.get(config.anonymous)
            if named is None:
                raise ValueError(f"{self.name}: anonymous: no consumer {config.anonymous!r}")
            self.anonymous = named.as_anonymous()
        family = _rejections(env)
        route_name = route.name if route is not None else ""
        self._family = family
        self._labels = (route_name, self.name)
        self._later: frozenset[str] | None = None  # auth plugins that run after this one

    def count(self, reason: str) -> None:
        self._family.labels(*self._labels, reason).inc()

    def reject(self, reason: str, code: str, message: str, challenge: bytes | None = None) -> Reply:
        self.count(reason)
        return Reply.error(401, code, message, [(b"www-authenticate", challenge or self.challenge)])

    def later_auth(self, ctx: Ctx) -> frozenset[str]:
        """The names of the auth plugins that run after this one on the route (found on the
        first request, then kept: a plugin instance belongs to one compiled route)."""
        later = self._later
        if later is None:
            pipe = ctx.route.pipeline
            plugins = pipe.plugins if pipe is not None else ()
            at = plugins.index(self) if self in plugins else len(plugins)
            later = frozenset(p.name for p in plugins[at + 1 :] if isinstance(p, AuthPlugin))
            self._later = later
        return later

    def no_credential(self, ctx: Ctx) -> Reply | None:
        """This plugin found nothing to check: leave it to a later auth plugin, or (the last
        one) fall back to ``anonymous`` or answer 401 with every plugin's challenge."""
        if self.later_auth(ctx):
            if ctx.vars is None:
                ctx.vars = {}
            ctx.vars.setdefault("auth.pending", []).append(self)
            return None
        chain: list[AuthPlugin] = [*(ctx.vars or {}).get("auth.pending", ()), self]
        for plugin in chain:
            if plugin.anonymous is not None:
                grant(ctx, plugin.anonymous, None)
                return None
        self.count("missing")
        return Reply.error(
            401,
            "missing_credentials",
            "this route needs credentials: " + ", ".join(p.describe() for p in chain),
            [(b"www-authenticate", p.challenge) for p in chain],
        )

    def describe(self) -> str:
        return self.name


# --------------------------------------------------------------------------------------------
# key_auth


@register
class KeyAuthPlugin(AuthPlugin):
    """API keys from a header, ``Authorization: Bearer`` or a query parameter."""

    name = "key_auth"
    priority = 2500
    scheme = b"Key"

    def __init__(self, config: KeyAuth, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        self.headers = tuple(n.lower().encode() for n in config.header_names)
        self.ranks = {name: i for i, name in enumerate(self.headers)}
        self.bearer = config.bearer
        self.query_names = tuple(n.encode() for n in config.query_names)
        self.query_set = frozenset(self.query_names)
        self.hide = config.hide_credentials
        self.bearer_challenge = b'Bearer realm="' + self.realm + b'", error="invalid_token"'
        self._lane_keys: dict[bytes, tuple[bytes, str, bytes, bytes]] | None = None

    # -- the fast lane (gateway/lane.py) ----------------------------------------------------

    def lane_ready(self) -> bool:
        """Can the fast lane take this route's successful key checks? (Everything else - no
        key, an unknown one, identity headers a client sent, a percent-encoded query key - it
        leaves to ``on_request``.) It finds the key and hides it the same way."""
        return True

    def lane_keys(self) -> dict[bytes, tuple[bytes, str, bytes, bytes]]:
        """The consumers by API key digest for the lane: ``digest -> (digest, consumer name,
        the header fields grant() sends upstream, the name as a JSON string)``."""
        out = self._lane_keys
        if out is None:
            out = self._lane_keys = {
                digest: (
                    digest,
                    consumer.name,
                    b"".join([b"%s: %s\r\n" % f for f in identity_fields(consumer, ident)]),
                    orjson.dumps(consumer.name),
                )
                for digest, consumer, ident in self.consumers.keys.values()
            }
        return out

    def describe(self) -> str:
        where = [f"header {n.decode()}" for n in self.headers]
        if self.bearer:
            where.append("Authorization: Bearer")
        where += [f"?{n.decode()}=" for n in self.query_names]
        return "an API key (" + ", ".join(where) + ")"

    def on_request(self, ctx: Ctx) -> RequestResult:
        if ctx.consumer is not None:
            return None
        req = ctx.req
        headers = req.headers
        # one pass over the headers: the key's header (the first configured name present
        # wins), Authorization, and any identity header a client sent to pass for a consumer
        key: bytes | None = None
        rank = len(self.headers)
        at = -1  # index of the key's header
        auth_at = -1
        spoofed = False
        ranks = self.ranks
        key_headers = 0
        for i, (name, value) in enumerate(headers):
            r = ranks.get(name)
            if r is not None:
                key_headers += 1
                if r < rank and value:
                    key, rank, at = value, r, i
            elif name == _AUTHORIZATION:
                if auth_at < 0:
                    auth_at = i
            elif name[:11] == _X_CONSUMER or name in _IDENTITY:
                spoofed = True
        bearer = False
        if key is None and self.bearer and auth_at >= 0:
            key = _bearer(headers[auth_at][1])
            if key is not None:
                bearer = True
                at = auth_at
                if _JWT_SHAPE.match(key) and "jwt_auth" in self.later_auth(ctx):
                    key = None  # a JSON Web Token: jwt_auth's credential, not an API key
                    at = -1
        from_query = False
        if key is None and self.query_names:
            found = _query_param(req.query, self.query_names)
            if found is not None:
                key = found[1]
                from_query = True
        if key is None:
            if spoofed:
                strip_identity_headers(headers)
            return self.no_credential(ctx)
        hit = self.consumers.by_key(key)
        if hit is None:
            challenge = self.bearer_challenge if bearer else None
            return self.reject("invalid", "invalid_credentials", "unknown API key", challenge)
        if self.hide:
            if from_query:
                req.query = _without_params(req.query, self.query_set)
            elif bearer:
                ctx.remove_request_header(_AUTHORIZATION)
            elif key_headers > 1:  # several key headers: none of them goes upstream
                headers[:] = [(n, v) for n, v in headers if n not in ranks]
            else:
                del headers[at]  # the usual case: one header, removed in place
        if spoofed:
            strip_identity_headers(headers)
        grant(ctx, hit[0], hit[1])
        return None


# --------------------------------------------------------------------------------------------
# basic_auth


_dummy: PasswordHash | None = None


def _verify_unknown_user(password: bytes) -> bool:
    """As slow as a real check, so a wrong user name cannot be told from a wrong password."""
    global _dummy
    if _dummy is None:
        _dummy = PasswordHash.parse(hash_password(os.urandom(16).hex()))
    _dummy.verify(password)
    return False


@register
class BasicAuthPlugin(AuthPlugin):
    """HTTP Basic against consumers' password hashes. The slow hash runs in a thread; a
    credential that passed is remembered (by an HMAC of it under a per-process random key) in
    a bounded LRU, so a steady client costs one dict look-up."""

    name = "basic_auth"
    priority = 2400
    scheme = b"Basic"

    def __init__(self, config: BasicAuth, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        self.challenge = b'Basic realm="' + self.realm + b'", charset="UTF-8"'
        self.hide = config.hide_credentials
        self.cache_size = config.cache_size
        self._cache: OrderedDict[bytes, tuple[Consumer, bytes]] = OrderedDict()
        self._salt = os.urandom(32)
        self._slots = asyncio.Semaphore(config.max_concurrent_checks)
        self.hash_checks = 0  # slow verifications run (for tests and curiosity)
        self.failures = 0

    def describe(self) -> str:
        return "HTTP Basic"

    def on_request(self, ctx: Ctx) -> RequestResult:
        if ctx.consumer is not None:
            return None
        strip_identity_headers(ctx.req.headers)
        auth = ctx.header(_AUTHORIZATION)
        if auth is None or auth[:6].lower() != b"basic ":
            return self.no_credential(ctx)
        token = auth[6:].strip()
        digest = hmac.new(self._salt, token, hashlib.sha256).digest()
        hit = self._cache.get(digest)
        if hit is not None:
            self._cache.move_to_end(digest)
            self._pass(ctx, hit)
            return None
        try:
            user_b, colon, password = base64.b64decode(token, validate=True).partition(b":")
            user = user_b.decode()
        except (binascii.Error, ValueError):
            colon = b""
        if not colon:
            self.failures += 1
            return self.reject(
                "invalid", "invalid_credentials", "malformed Basic credentials (base64 user:pass)"
            )
        return self._check(ctx, digest, user, password)

    async def _check(self, ctx: Ctx, digest: bytes, user: str, password: bytes) -> Reply | None:
        entry = self.consumers.basic.get(user)
        async with self._slots:
            self.hash_checks += 1
            if entry is None:
                ok = await asyncio.to_thread(_verify_unknown_user, password)
            else:
                ok = await asyncio.to_thread(entry[1].verify, password)
        if not ok or entry is None:
            self.failures += 1
            return self.reject("invalid", "invalid_credentials", "wrong user name or password")
        hit = (entry[0], user.encode())
        if self.cache_size:
            self._cache[digest] = hit
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._pass(ctx, hit)
        return None

    def _pass(self, ctx: Ctx, hit: tuple[Consumer, bytes]) -> None:
        if self.hide:
            ctx.remove_request_header(_AUTHORIZATION)
        grant(ctx, hit[0], hit[1])


# --------------------------------------------------------------------------------------------
# acl


@register
class AclPlugin(Plugin):
    """Allow or deny the authenticated consumer by group: 403 when it may not pass, 401 when
    no auth plugin found a consumer."""

    name = "acl"
    priority = 2350

    def __init__(self, config: Acl, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        self.allow = frozenset(config.allow) if config.allow is not None else None
        self.deny = frozenset(config.deny or ())
        family = _rejections(env)
        route_name = route.name if route is not None else ""
        self._forbidden = family.labels(route_name, self.name, "forbidden")
        self._anonymous = family.labels(route_name, self.name, "no_consumer")
        known = {g for c in env.consumers.by_name.values() for g in c.groups}
        unknown = sorted((self.allow or self.deny) - known)
        if unknown:
            log.warning(
                "route %s: acl names group(s) no consumer has: %s (tokens with a groups "
                "claim may still carry them)",
                route_name or "(global)",
                ", ".join(unknown),
            )

    def on_request(self, ctx: Ctx) -> RequestResult:
        consumer = ctx.consumer
        if consumer is None:
            self._anonymous.inc()
            return Reply.error(
                401,
                "missing_credentials",
                "acl needs an authenticated consumer: put key_auth, jwt_auth or basic_auth "
                "on this route",
                [(b"www-authenticate", b'Key realm="piuptime"')],
            )
        groups = consumer.groups
        if self.allow is not None:
            ok = not groups.isdisjoint(self.allow)
        else:
            ok = groups.isdisjoint(self.deny)
        if ok:
            return None
        self._forbidden.inc()
        return Reply.error(403, "forbidden", f"consumer {consumer.name} may not use this route")
