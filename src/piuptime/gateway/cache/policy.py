"""Cache-Control as a shared cache reads it (RFC 9111, RFC 5861): may a response be stored,
for how long is it fresh, how long may it be served stale; what does a request ask.

Clock skew: a small device often boots without a real-time clock, so freshness never compares
our clock with the upstream's: ``Expires`` counts from the response's own ``Date``, and the age
at arrival comes only from the ``Age`` header (RFC 9111 4.2.3 without the apparent age).
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime

from piuptime.gateway.headers import HOP_BY_HOP, connection_tokens

Headers = list[tuple[bytes, bytes]]
Directives = dict[bytes, bytes | None]

_EMPTY: Directives = {}


def parse_cache_control(value: bytes) -> Directives:
    """``max-age=60, no-cache="set-cookie", private`` → ``{b"max-age": b"60", ...}``; names
    lower-cased, quotes removed; the first of a repeated directive wins."""
    out: Directives = {}
    for part in _split(value):
        name, eq, arg = part.partition(b"=")
        name = name.strip().lower()
        if not name:
            continue
        if name in out:
            continue
        if eq:
            arg = arg.strip()
            if len(arg) >= 2 and arg[:1] == b'"' and arg[-1:] == b'"':
                arg = arg[1:-1]
            out[name] = arg
        else:
            out[name] = None
    return out


def _split(value: bytes) -> list[bytes]:
    if b'"' not in value:
        return value.split(b",")
    parts: list[bytes] = []
    start = 0
    quoted = False
    for i, ch in enumerate(value):
        if ch == 0x22:  # "
            quoted = not quoted
        elif ch == 0x2C and not quoted:  # ,
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return parts


def delta_seconds(arg: bytes | None) -> int | None:
    """A ``max-age``-style argument; None when absent or not a number."""
    if arg is None:
        return None
    arg = arg.strip()
    if not arg.isdigit():
        return None
    return min(int(arg), 2**31)


def http_date(value: bytes) -> float | None:
    """An HTTP-date as a POSIX timestamp; None when it does not parse."""
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class Freshness:
    """What the policy decided for a storable response."""

    __slots__ = ("created", "lifetime", "sie", "swr", "vary")

    def __init__(
        self, created: float, lifetime: float, swr: float, sie: float, vary: tuple[bytes, ...]
    ) -> None:
        self.created = created  # when the response was generated (now - Age)
        self.lifetime = lifetime  # seconds fresh from ``created``
        self.swr = swr  # seconds it may be served stale while a refresh runs
        self.sie = sie  # seconds it may be served stale when the upstream fails
        self.vary = vary  # lower-cased request header names the response varies on

    def __repr__(self) -> str:
        return (
            f"<Freshness lifetime={self.lifetime} swr={self.swr} sie={self.sie} vary={self.vary}>"
        )


class ResponsePolicy:
    """The route's rules for storing a response (built once per plugin instance)."""

    __slots__ = ("cache_private", "cache_set_cookie", "override", "sie", "statuses", "swr", "ttl")

    def __init__(
        self,
        *,
        ttl: float,
        override: bool,
        stale_while_revalidate: float,
        stale_if_error: float,
        statuses: frozenset[int],
        cache_private: bool,
        cache_set_cookie: bool,
    ) -> None:
        self.ttl = ttl
        self.override = override
        self.swr = stale_while_revalidate
        self.sie = stale_if_error
        self.statuses = statuses
        self.cache_private = cache_private
        self.cache_set_cookie = cache_set_cookie

    def decide(self, status: int, headers: Headers, now: float) -> Freshness | None:
        """None when the response must not be stored; else its freshness."""
        if status not in self.statuses:
            return None
        cc: bytes | None = None
        expires: bytes | None = None
        date: bytes | None = None
        age = 0
        vary: list[bytes] = []
        for name, value in headers:
            if name == b"cache-control":
                cc = value if cc is None else cc + b"," + value
            elif name == b"expires":
                expires = value
            elif name == b"date":
                date = value
            elif name == b"age":
                age = delta_seconds(value) or 0
            elif name == b"vary":
                for token in value.split(b","):
                    token = token.strip().lower()
                    if token == b"*":
                        return None  # varies on things outside the request: never reusable
                    if token and token not in vary:
                        vary.append(token)
            elif name == b"set-cookie" and not self.cache_set_cookie:
                return None
        d = parse_cache_control(cc) if cc else _EMPTY
        if b"no-store" in d:
            return None
        if b"private" in d and not self.cache_private:
            return None
        revalidate = b"must-revalidate" in d or b"proxy-revalidate" in d
        if self.override:
            lifetime = self.ttl
            swr, sie = self.swr, self.sie
        else:
            if b"no-cache" in d:
                lifetime = 0.0  # stored, but every use is a revalidation (treated as stale)
            elif b"s-maxage" in d:
                lifetime = float(delta_seconds(d[b"s-maxage"]) or 0)
            elif b"max-age" in d:
                lifetime = float(delta_seconds(d[b"max-age"]) or 0)
            elif expires is not None:
                lifetime = _expires_lifetime(expires, date, now)
            else:
                lifetime = self.ttl
            swr = _window(d, b"stale-while-revalidate", self.swr)
            sie = _window(d, b"stale-if-error", self.sie)
            if revalidate or b"no-cache" in d:
                swr = 0.0  # the origin wants to be asked before each use once stale
            if revalidate and b"stale-if-error" not in d:
                sie = 0.0  # "even when disconnected" (RFC 9111 5.2.2.2), unless it says otherwise
        if lifetime + max(swr, sie) <= 0:
            return None  # never usable: not worth the space
        return Freshness(now - age, lifetime, swr, sie, tuple(vary))


def _window(d: Directives, name: bytes, default: float) -> float:
    if name in d:
        return float(delta_seconds(d[name]) or 0)
    return default


def _expires_lifetime(expires: bytes, date: bytes | None, now: float) -> float:
    at = http_date(expires)
    if at is None:
        return 0.0  # an invalid Expires ("0", "-1") means already expired
    base = http_date(date) if date is not None else None
    return max(0.0, at - (base if base is not None else now))


class RequestAsks:
    """What a request's Cache-Control (or ``Pragma: no-cache``) asks of the cache."""

    __slots__ = ("max_age", "no_cache", "no_store", "only_if_cached")

    def __init__(self, cc: bytes | None, pragma: bytes | None) -> None:
        d = parse_cache_control(cc) if cc else _EMPTY
        self.no_store = b"no-store" in d
        max_age = delta_seconds(d[b"max-age"]) if b"max-age" in d else None
        self.no_cache = (
            b"no-cache" in d
            or max_age == 0
            or (cc is None and pragma is not None and b"no-cache" in pragma.lower())
        )
        self.max_age = max_age
        self.only_if_cached = b"only-if-cached" in d


_DROP = HOP_BY_HOP | {b"content-length", b"date", b"age", b"x-cache"}


def stored_headers(headers: Headers, drop_set_cookie: bool) -> Headers:
    """The response headers worth keeping with an entry: no framing, hop-by-hop, Date (the
    server sends its own), Age (recomputed) or X-Cache; no Set-Cookie when it was allowed only
    to be stripped."""
    named: frozenset[bytes] | set[bytes] | None = None
    for name, value in headers:
        if name == b"connection":
            tokens = connection_tokens(value)
            named = tokens if named is None else named | tokens
    out: Headers = []
    for name, value in headers:
        if name in _DROP or name[:6] == b"proxy-":
            continue
        if drop_set_cookie and name == b"set-cookie":
            continue
        if named and name in named:
            continue
        out.append((name, value))
    return out


def vary_values(names: tuple[bytes, ...], headers: Headers) -> bytes:
    """The request's values of the ``Vary`` headers, as one key part (repeated headers joined,
    whitespace around commas ignored)."""
    parts: list[bytes] = []
    for wanted in names:
        got: list[bytes] = []
        for name, value in headers:
            if name == wanted:
                got.extend(p.strip() for p in value.split(b","))
        parts.append(b",".join(got))
    return b"\x00".join(parts)


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """``If-None-Match`` against a stored ETag, weak comparison (RFC 9110 13.1.2)."""
    if if_none_match.strip() == b"*":
        return True
    tag = etag.strip().removeprefix(b"W/")
    return any(p.strip().removeprefix(b"W/") == tag for p in if_none_match.split(b","))
