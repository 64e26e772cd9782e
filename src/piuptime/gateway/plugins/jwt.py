"""jwt_auth: JSON Web Tokens (HS256, RS256, ES256) with keys from the config or a JWKS URL.

Its own module so that a gateway without jwt_auth never imports PyJWT (and with it
``cryptography``): start-up time and memory on a Pi. See ``auth.py`` for how several auth
plugins on one route decide.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jwt as pyjwt
import orjson

from piuptime.config.plugins.auth import ALGORITHMS, valid_name
from piuptime.gateway.consumers import Consumer
from piuptime.gateway.plugins import register
from piuptime.gateway.plugins.auth import (
    _AUTHORIZATION,
    _JWT_SHAPE,
    AuthPlugin,
    _bearer,
    _cookie,
    _query_param,
    _remove_cookie,
    _without_params,
    grant,
    strip_identity_headers,
)
from piuptime.gateway.plugins.base import Ctx, PluginEnv, Reply, RequestResult
from piuptime.http1.client import Pool, PoolOptions

if TYPE_CHECKING:
    from piuptime.config.plugins.auth import JwtAuth
    from piuptime.gateway.runtime import CompiledRoute
    from piuptime.observe.metrics import Counter

log = logging.getLogger("piuptime.auth")


# --------------------------------------------------------------------------------------------
# jwt_auth


class JwtKey:
    """A key that may verify a token: the plugin's, a consumer's or one from a JWKS."""

    __slots__ = ("algorithm", "consumer", "issuer", "key", "kid")

    def __init__(
        self,
        key: Any,
        algorithm: str,
        kid: str | None = None,
        consumer: Consumer | None = None,
        issuer: str | None = None,
    ) -> None:
        self.key = key
        self.algorithm = algorithm
        self.kid = kid
        self.consumer = consumer
        self.issuer = issuer


_JWKS_MAX_BYTES = 1024 * 1024


class Jwks:
    """Keys from a JWKS URL, fetched with the gateway's own HTTP client and kept for ``ttl``.

    ``refresh()`` is single-flight and rate-limited: at most one fetch per ``min_interval``
    whatever asks for it (an unknown ``kid``, the TTL), so tokens with made-up kids cannot
    hammer the JWKS server. A failed fetch keeps the keys already known."""

    def __init__(
        self,
        url: str,
        *,
        ttl: float,
        min_interval: float,
        timeout: float,
        fetches: Counter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(url)
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default = (parts.scheme == "https" and self.port == 443) or self.port == 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = (host if default else f"{host}:{self.port}").encode()
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        self.target = target.encode()
        self.ttl = ttl
        self.min_interval = min_interval
        self.timeout = timeout
        self.clock = clock
        self._ok = fetches.labels(url, "ok")
        self._failed = fetches.labels(url, "error")
        self.by_kid: dict[str, JwtKey] = {}
        self.keys: list[JwtKey] = []
        self.generation = 0  # bumped whenever the key set changes
        self.fetched_at: float | None = None
        self.attempted_at = -math.inf
        self.fetches = 0
        self._fingerprint = b""
        self._inflight: asyncio.Future[bool] | None = None
        self._pool: Pool | None = None

    @property
    def ready(self) -> bool:
        return self.fetched_at is not None

    def stale(self) -> bool:
        return self.fetched_at is not None and self.clock() - self.fetched_at >= self.ttl

    def may_refresh(self) -> bool:
        return self._inflight is not None or self.clock() - self.attempted_at >= self.min_interval

    def refresh(self) -> Awaitable[bool] | None:
        """Fetch again unless one fetch is running (join it) or the last began less than
        ``min_interval`` ago (None). The awaitable tells whether the fetch succeeded."""
        if self._inflight is not None:
            return asyncio.shield(self._inflight)
        if self.clock() - self.attempted_at < self.min_interval:
            return None
        self.attempted_at = self.clock()
        task = asyncio.ensure_future(self._fetch())
        self._inflight = task
        task.add_done_callback(self._done)
        return asyncio.shield(task)

    def _done(self, task: asyncio.Future[bool]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: _fetch logs its own failures

    async def _fetch(self) -> bool:
        self.fetches += 1
        try:
            body = await asyncio.wait_for(self._get(), self.timeout)
            keys = self._parse(body)
        except Exception as exc:  # any failure keeps the keys we have
            self._failed.inc()
            log.warning(
                "JWKS %s: fetch failed (%s); keeping %d known key(s)",
                self.url,
                exc or type(exc).__name__,
                len(self.keys),
            )
            return False
        self._ok.inc()
        fingerprint = hashlib.sha256(body).digest()
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            self.keys = keys
            self.by_kid = {k.kid: k for k in keys if k.kid is not None}
            self.generation += 1
        self.fetched_at = self.clock()
        return True

    async def _get(self) -> bytes:
        if self._pool is None:
            self._pool = Pool(
                self.scheme,
                self.host,
                self.port,
                PoolOptions(
                    max_connections=2,
                    max_idle=0,
                    connect_timeout=self.timeout,
                    read_timeout=self.timeout,
                ),
            )
        headers = [
            (b"host", self.authority),
            (b"accept", b"application/json, application/jwk-set+json"),
            (b"user-agent", b"piuptime-jwks"),
        ]
        resp = await self._pool.request(b"GET", self.target, headers)
        try:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            parts: list[bytes] = []
            size = 0
            while chunk := await resp.read():
                size += len(chunk)
                if size > _JWKS_MAX_BYTES:
                    raise ValueError("JWKS larger than 1 MiB")
                parts.append(chunk)
            return b"".join(parts)
        finally:
            resp.release()

    def _parse(self, body: bytes) -> list[JwtKey]:
        data = orjson.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError('not a JWK set (no "keys" list)')
        out: list[JwtKey] = []
        for item in data["keys"]:
            if not isinstance(item, dict) or item.get("use", "sig") != "sig":
                continue
            try:
                jwk = pyjwt.PyJWK(item)
            except (pyjwt.PyJWKError, pyjwt.InvalidKeyError, ValueError, TypeError) as exc:
                log.debug("JWKS %s: key skipped (%s)", self.url, exc)
                continue
            if jwk.algorithm_name not in ALGORITHMS:
                continue
            kid = item.get("kid")
            out.append(JwtKey(jwk.key, jwk.algorithm_name, kid if isinstance(kid, str) else None))
        return out


class _Verified:
    __slots__ = ("consumer", "exp", "generation", "ident", "until")

    def __init__(
        self, consumer: Consumer, ident: bytes | None, exp: float, until: float, generation: int
    ) -> None:
        self.consumer = consumer
        self.ident = ident
        self.exp = exp  # the token's exp (wall clock), inf when it has none
        self.until = until  # monotonic: cache_ttl from verification
        self.generation = generation


class _Invalid(Exception):
    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description


_DESCRIPTIONS: tuple[tuple[type[Exception], str, str], ...] = (
    (pyjwt.ExpiredSignatureError, "expired", "token expired"),
    (pyjwt.ImmatureSignatureError, "invalid_token", "token not valid yet"),
    (pyjwt.InvalidAudienceError, "invalid_token", "token audience not accepted"),
    (pyjwt.InvalidIssuerError, "invalid_token", "token issuer not accepted"),
    (pyjwt.MissingRequiredClaimError, "invalid_token", "token lacks a required claim"),
    (pyjwt.InvalidIssuedAtError, "invalid_token", "token iat is not valid"),
    (pyjwt.InvalidAlgorithmError, "invalid_token", "token algorithm not accepted"),
    (pyjwt.DecodeError, "invalid_token", "malformed token"),
)


def _describe_error(exc: Exception) -> _Invalid:
    for cls, reason, text in _DESCRIPTIONS:
        if isinstance(exc, cls):
            return _Invalid(reason, text)
    return _Invalid("invalid_token", "token rejected")


@register
class JwtAuthPlugin(AuthPlugin):
    """JSON Web Tokens: HS256, RS256, ES256; keys from the plugin, consumers or a JWKS URL."""

    name = "jwt_auth"
    priority = 2450
    scheme = b"Bearer"

    def __init__(self, config: JwtAuth, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        from piuptime.config.plugins.auth import load_jwt_key

        c = config
        self.algorithms = frozenset(c.algorithms)
        self.static = [JwtKey(load_jwt_key(k.key, k.algorithm), k.algorithm, k.kid) for k in c.keys]
        self.static_by_kid = {k.kid: k for k in self.static if k.kid is not None}
        self.jwks: Jwks | None = None
        if c.jwks_url is not None:
            # kept across reloads: the keys and the fetch rate limit survive a config change
            spec = (c.jwks_url, c.jwks_ttl, c.jwks_refresh_interval, c.jwks_timeout)
            jwks = env.keep.get(f"jwt_auth.jwks:{spec}")
            if jwks is None:
                fetches = env.metrics.counter(
                    "auth_jwks_fetches", "JWKS fetches by jwt_auth, by result", ("url", "result")
                )
                jwks = Jwks(
                    c.jwks_url,
                    ttl=c.jwks_ttl,
                    min_interval=c.jwks_refresh_interval,
                    timeout=c.jwks_timeout,
                    fetches=fetches,
                )
                env.keep[f"jwt_auth.jwks:{spec}"] = jwks
            self.jwks = jwks
        self.issuer = list(c.issuer) if c.issuer else None
        self.audience = list(c.audience) if c.audience else None
        self.leeway = c.leeway
        self.options: dict[str, Any] = {
            "require": list(c.require),
            "verify_aud": self.audience is not None,
        }
        self.claim = c.consumer_claim
        self.allow_unknown = c.unknown_consumer == "allow"
        self.groups_claim = c.groups_claim
        self.headers = tuple(n.lower().encode() for n in c.header_names)
        self.cookies = tuple(n.encode() for n in c.cookie_names)
        self.query_names = tuple(n.encode() for n in c.query_names)
        self.hide = c.hide_credentials
        self.cache_size = c.cache_size
        self.cache_ttl = c.cache_ttl
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self.verifications = 0  # signature checks run (for tests and curiosity)

    def describe(self) -> str:
        return "a JSON Web Token (Authorization: Bearer)"

    # -- finding the token --------------------------------------------------------------------

    def _find(self, ctx: Ctx) -> tuple[bytes, bytes, str] | None:
        """(token, name, where): where is "bearer", "header", "cookie" or "query"."""
        for name in self.headers:
            value = ctx.header(name)
            if value is None:
                continue
            if name == _AUTHORIZATION:
                token = _bearer(value)
                if token is not None:
                    return token, name, "bearer"
                continue
            token = _bearer(value) or value.strip()
            if token:
                return token, name, "header"
        if self.cookies:
            found = _cookie(ctx.req.headers, self.cookies)
            if found is not None:
                return found[1], found[0], "cookie"
        if self.query_names:
            found = _query_param(ctx.req.query, self.query_names)
            if found is not None:
                return found[1], found[0], "query"
        return None

    def _hide(self, ctx: Ctx, name: bytes, where: str) -> None:
        if where in ("bearer", "header"):
            ctx.remove_request_header(name)
        elif where == "cookie":
            _remove_cookie(ctx, name)
        else:
            ctx.req.query = _without_params(ctx.req.query, frozenset((name,)))

    def invalid(self, reason: str, description: str) -> Reply:
        challenge = (
            b'Bearer realm="'
            + self.realm
            + b'", error="invalid_token", error_description="'
            + description.encode()
            + b'"'
        )
        return self.reject(reason, "invalid_token", description, challenge)

    # -- the request --------------------------------------------------------------------------

    def on_request(self, ctx: Ctx) -> RequestResult:
        if ctx.consumer is not None:
            return None
        strip_identity_headers(ctx.req.headers)
        found = self._find(ctx)
        if found is None:
            return self.no_credential(ctx)
        token, name, where = found
        if not _JWT_SHAPE.match(token):
            return self.invalid("invalid_token", "malformed token")
        digest = hashlib.sha256(token).digest()
        hit = self._cache.get(digest)
        if hit is not None:
            if (
                hit.until > time.monotonic()
                and hit.exp > time.time()
                and hit.generation == self._generation()
            ):
                self._cache.move_to_end(digest)
                self._pass(ctx, name, where, hit.consumer, hit.ident)
                return None
            del self._cache[digest]
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.PyJWTError:
            return self.invalid("invalid_token", "malformed token")
        alg = header.get("alg")
        kid = header.get("kid")
        if alg not in self.algorithms:
            return self.invalid("invalid_token", "token algorithm not accepted")
        if kid is not None and not isinstance(kid, str):
            return self.invalid("invalid_token", "malformed token")
        jwks = self.jwks
        if jwks is not None:
            if not jwks.ready:
                return self._after_refresh(ctx, token, digest, name, where, alg, kid)
            if jwks.stale() and jwks.may_refresh():
                pending = jwks.refresh()  # in the background; the known keys serve meanwhile
                if pending is not None:
                    self.env.spawn(pending)
        try:
            keys = self._candidates(token, alg, kid)
        except _Invalid as exc:
            return self.invalid(exc.reason, exc.description)
        if not keys and kid is not None and jwks is not None and jwks.may_refresh():
            return self._after_refresh(ctx, token, digest, name, where, alg, kid)
        return self._verify(ctx, token, digest, name, where, alg, kid, keys)

    async def _after_refresh(
        self,
        ctx: Ctx,
        token: bytes,
        digest: bytes,
        name: bytes,
        where: str,
        alg: str,
        kid: str | None,
    ) -> Reply | None:
        jwks = self.jwks
        assert jwks is not None
        pending = jwks.refresh()
        if pending is not None:
            await pending
        try:
            keys = self._candidates(token, alg, kid)
        except _Invalid as exc:
            return self.invalid(exc.reason, exc.description)
        if not keys and not jwks.ready:
            self.count("jwks_unavailable")
            wait = b"%d" % max(1, math.ceil(jwks.min_interval))
            return Reply.error(
                503,
                "auth_unavailable",
                "the keys to check this token cannot be fetched now (JWKS unreachable)",
                [(b"retry-after", wait)],
            )
        return self._verify(ctx, token, digest, name, where, alg, kid, keys)

    def _generation(self) -> int:
        return self.jwks.generation if self.jwks is not None else 0

    def _candidates(self, token: bytes, alg: str, kid: str | None) -> list[JwtKey]:
        """The keys that may have signed the token, most specific first; only keys of the
        token's algorithm (never let a token choose how a key is read)."""
        consumers = self.consumers
        out: list[JwtKey] = []
        if kid is not None:
            own = consumers.jwt_by_kid.get(kid)
            if own is not None:
                out.append(JwtKey(own.key, own.algorithm, kid, own.consumer, own.issuer))
            static = self.static_by_kid.get(kid)
            if static is not None:
                out.append(static)
            if self.jwks is not None:
                fetched = self.jwks.by_kid.get(kid)
                if fetched is not None:
                    out.append(fetched)
        else:
            if consumers.has_jwt_keys:
                try:
                    claims = pyjwt.decode(token, options={"verify_signature": False})
                except pyjwt.PyJWTError:
                    raise _Invalid("invalid_token", "malformed token") from None
                subject = claims.get(self.claim)
                owner = consumers.jwt_by_subject.get(subject) if isinstance(subject, str) else None
                if owner is not None:
                    own = consumers.jwt_keys.get(owner.name)
                    if own is not None:
                        out.append(JwtKey(own.key, own.algorithm, None, own.consumer, own.issuer))
                iss = claims.get("iss")
                if isinstance(iss, str):
                    for own in consumers.jwt_by_issuer.get(iss, ()):
                        out.append(JwtKey(own.key, own.algorithm, None, own.consumer, own.issuer))
            out.extend(self.static)
            if self.jwks is not None:
                out.extend(self.jwks.keys)
        return [k for k in out if k.algorithm == alg]

    def _verify(
        self,
        ctx: Ctx,
        token: bytes,
        digest: bytes,
        name: bytes,
        where: str,
        alg: str,
        kid: str | None,
        keys: list[JwtKey],
    ) -> Reply | None:
        if not keys:
            if kid is not None:
                return self.invalid("unknown_kid", "unknown key id")
            return self.invalid("invalid_token", "no key to verify this token")
        payload: dict[str, Any] | None = None
        used: JwtKey | None = None
        for key in keys:
            self.verifications += 1
            try:
                payload = pyjwt.decode(
                    token,
                    key.key,
                    algorithms=[key.algorithm],
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self.leeway,
                    options=self.options,  # type: ignore[arg-type]
                )
            except pyjwt.InvalidSignatureError:
                continue
            except pyjwt.PyJWTError as exc:
                # the signature held (PyJWT checks it first): the claims are wrong
                bad = _describe_error(exc)
                return self.invalid(bad.reason, bad.description)
            used = key
            break
        if payload is None or used is None:
            return self.invalid("invalid_token", "signature verification failed")
        if used.issuer is not None and payload.get("iss") != used.issuer:
            return self.invalid("invalid_token", "token issuer not accepted")
        consumer = used.consumer
        if consumer is None:
            try:
                consumer = self._consumer_for(payload)
            except _Invalid as exc:
                return self.invalid(exc.reason, exc.description)
        ident = kid.encode() if kid is not None and kid.isascii() and kid.isprintable() else None
        if self.cache_size:
            exp = payload.get("exp")
            expires = float(exp) if isinstance(exp, int | float) else math.inf
            self._cache[digest] = _Verified(
                consumer, ident, expires, time.monotonic() + self.cache_ttl, self._generation()
            )
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._pass(ctx, name, where, consumer, ident)
        return None

    def _consumer_for(self, payload: dict[str, Any]) -> Consumer:
        value = payload.get(self.claim)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise _Invalid("unknown_consumer", f"token has no {self.claim} claim")
        consumer = self.consumers.jwt_by_subject.get(value)
        if consumer is not None:
            return consumer
        if not self.allow_unknown:
            raise _Invalid("unknown_consumer", "token subject is not a known consumer")
        if not valid_name(value):
            raise _Invalid("unknown_consumer", "token subject cannot be a consumer name")
        groups: list[str] = []
        if self.groups_claim is not None:
            raw = payload.get(self.groups_claim)
            if isinstance(raw, str):
                raw = raw.split()
            if isinstance(raw, list):
                groups = [g for g in raw if isinstance(g, str) and valid_name(g, commas=False)]
        return Consumer(value, frozenset(groups), ordered=tuple(dict.fromkeys(groups)))

    def _pass(
        self, ctx: Ctx, name: bytes, where: str, consumer: Consumer, ident: bytes | None
    ) -> None:
        if self.hide:
            self._hide(ctx, name, where)
        grant(ctx, consumer, ident)
