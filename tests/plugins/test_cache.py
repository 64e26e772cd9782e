"""The cache plugin with the memory store, through the real gateway over sockets: hits and
misses, Cache-Control, Vary, HEAD, sizes and eviction, reloads, stale-while-revalidate,
stale-if-error, coalescing, PURGE and invalidation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.plugins.test_cache_support import (
    Answer,
    Clock,
    Scripted,
    cache_counts,
    clock,
    metric,
    zone_of,
)
from tests.support import SeenRequest, fetch, gateway_yaml, start_app, wait_until

_ = clock


def _header(req: SeenRequest, name: bytes) -> str | None:
    for n, v in req.headers:
        if n == name:
            return v.decode()
    return None


def route(plugins: str, path: str = "/", name: str = "r", methods: str = "") -> str:
    match = f"{{path: {path}{', methods: [' + methods + ']' if methods else ''}}}"
    return f"""\
  - name: {name}
    match: {match}
    upstream: main
    plugins: {plugins}
"""


def cfg(up: Scripted, routes: str, extra: str = "") -> str:
    return gateway_yaml({"main": [up.port]}, routes, extra)


class Versions:
    """Answers ``<path> v<n>`` where n counts the requests for that path."""

    def __init__(self, headers: list[tuple[str, str]] | None = None, status: int = 200) -> None:
        self.headers = headers or []
        self.status = status
        self.n: dict[bytes, int] = {}

    def __call__(self, req: SeenRequest) -> Answer:
        n = self.n[req.path] = self.n.get(req.path, 0) + 1
        body = req.path + b" v%d" % n
        return self.status, [("content-type", "text/plain"), *self.headers], body


@pytest.fixture
async def versions() -> AsyncIterator[tuple[Scripted, Versions]]:
    v = Versions()
    up = await Scripted(v).start()
    yield up, v
    await up.stop()


async def test_miss_then_hit_with_age_then_expired(
    versions: tuple[Scripted, Versions], clock: Clock
) -> None:
    up, _v = versions
    app, port = await start_app(cfg(up, route("{cache: {ttl: 10s}}")))
    try:
        r = await fetch(port, "/a")
        assert (r.status, r.body, r.header(b"x-cache")) == (200, b"/a v1", b"MISS")
        r = await fetch(port, "/a")
        assert (r.status, r.body, r.header(b"x-cache")) == (200, b"/a v1", b"HIT")
        assert r.header(b"age") == b"0"
        assert r.header(b"content-type") == b"text/plain"
        assert r.header(b"content-length") == b"5"
        assert len(r.header_all(b"date")) == 1
        clock.advance(4)
        r = await fetch(port, "/a")
        assert (r.body, r.header(b"x-cache"), r.header(b"age")) == (b"/a v1", b"HIT", b"4")
        assert up.count("/a") == 1
        clock.advance(7)  # 11s old: past the ttl
        r = await fetch(port, "/a")
        assert (r.body, r.header(b"x-cache")) == (b"/a v2", b"EXPIRED")
        r = await fetch(port, "/a")
        assert (r.body, r.header(b"x-cache"), r.header(b"age")) == (b"/a v2", b"HIT", b"0")
        # the query is part of the key
        r = await fetch(port, "/a?x=1")
        assert r.header(b"x-cache") == b"MISS"
        assert cache_counts(app, "r") == {"miss": 2, "hit": 3, "expired": 1}
    finally:
        await app.stop()


async def test_hit_keeps_the_access_log_cache_field(
    versions: tuple[Scripted, Versions], clock: Clock, tmp_path: Path
) -> None:
    up, _v = versions
    log = tmp_path / "access.log"
    text = cfg(up, route("{cache: {}}")).replace(
        "access_log: {path: off}", f"access_log: {{path: {log}}}"
    )
    app, port = await start_app(text)
    try:
        await fetch(port, "/a")
        await fetch(port, "/a")
    finally:
        await app.stop()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["cache"] for x in lines] == ["MISS", "HIT"]


async def test_vary_keeps_variants_apart(clock: Clock) -> None:
    def answer(req: SeenRequest) -> Answer:
        lang = _header(req, b"accept-language") or "none"
        return 200, [("vary", "Accept-Language"), ("content-type", "text/plain")], lang.encode()

    up = await Scripted(answer).start()
    app, port = await start_app(cfg(up, route("{cache: {}}")))
    try:
        en = {"Accept-Language": "en"}
        fr = {"Accept-Language": "fr"}
        r = await fetch(port, "/v", headers=en)
        assert (r.body, r.header(b"x-cache")) == (b"en", b"MISS")
        r = await fetch(port, "/v", headers=fr)
        assert (r.body, r.header(b"x-cache")) == (b"fr", b"MISS")
        r = await fetch(port, "/v", headers=en)
        assert (r.body, r.header(b"x-cache")) == (b"en", b"HIT")
        assert r.header(b"vary") == b"Accept-Language"
        r = await fetch(port, "/v", headers=fr)
        assert (r.body, r.header(b"x-cache")) == (b"fr", b"HIT")
        r = await fetch(port, "/v")
        assert (r.body, r.header(b"x-cache")) == (b"none", b"MISS")
        r = await fetch(port, "/v")
        assert (r.body, r.header(b"x-cache")) == (b"none", b"HIT")
        assert up.count() == 3
    finally:
        await app.stop()
        await up.stop()


async def test_vary_star_is_never_cached(clock: Clock) -> None:
    up = await Scripted(lambda req: (200, [("vary", "*")], b"x")).start()
    app, port = await start_app(cfg(up, route("{cache: {}}")))
    try:
        for _ in range(2):
            assert (await fetch(port, "/s")).header(b"x-cache") == b"MISS"
        assert up.count() == 2
    finally:
        await app.stop()
        await up.stop()


# (response headers, seconds later, X-Cache of the second request)
_DATE = ("date", "Mon, 01 Jan 2024 00:00:00 GMT")
_EXPIRES = ("expires", "Mon, 01 Jan 2024 00:00:30 GMT")  # 30s after its Date
DIRECTIVES = [
    ([("cache-control", "no-store")], 0, "MISS"),
    ([("cache-control", "private, max-age=60")], 0, "MISS"),
    ([("cache-control", "public, max-age=5")], 4, "HIT"),
    ([("cache-control", "max-age=5")], 6, "EXPIRED"),
    ([("cache-control", "s-maxage=2, max-age=100")], 3, "EXPIRED"),
    ([("cache-control", "s-maxage=100, max-age=2")], 3, "HIT"),
    ([("cache-control", "max-age=0")], 0, "MISS"),  # never usable, not stored
    ([("cache-control", "no-cache")], 0, "MISS"),  # no stale window: never usable, not stored
    ([("cache-control", "no-cache, stale-if-error=60")], 0, "EXPIRED"),  # stored, revalidated
    ([("expires", "Thu, 01 Jan 1970 00:00:00 GMT")], 0, "MISS"),
    ([("expires", "0")], 0, "MISS"),
    ([_DATE, _EXPIRES], 20, "HIT"),  # counted from its own Date: our clock may be off
    ([_DATE, _EXPIRES], 40, "EXPIRED"),
    ([("age", "8"), ("cache-control", "max-age=10")], 3, "EXPIRED"),  # 8s old on arrival
    ([], 50, "HIT"),  # no freshness given: the route ttl (60s)
    ([], 70, "EXPIRED"),
    ([("set-cookie", "session=abc")], 0, "MISS"),
]


@pytest.mark.parametrize(("headers", "later", "expected"), DIRECTIVES)
async def test_response_cache_control(
    headers: list[tuple[str, str]], later: float, expected: str, clock: Clock
) -> None:
    up = await Scripted(lambda req: (200, headers, b"body")).start()
    app, port = await start_app(cfg(up, route("{cache: {ttl: 60s}}")))
    try:
        r = await fetch(port, "/d")
        assert (r.status, r.header(b"x-cache")) == (200, b"MISS")
        clock.advance(later)
        r = await fetch(port, "/d")
        assert (r.status, r.body, r.header(b"x-cache")) == (200, b"body", expected.encode())
        assert up.count() == (1 if expected == "HIT" else 2)
    finally:
        await app.stop()
        await up.stop()


async def test_override_forces_the_route_ttl_but_not_no_store(clock: Clock) -> None:
    def answer(req: SeenRequest) -> Answer:
        cc = "no-store" if req.path == b"/never" else "max-age=0, no-cache"
        return 200, [("cache-control", cc)], b"x"

    up = await Scripted(answer).start()
    app, port = await start_app(cfg(up, route("{cache: {ttl: 30s, override: true}}")))
    try:
        await fetch(port, "/o")
        clock.advance(20)
        assert (await fetch(port, "/o")).header(b"x-cache") == b"HIT"
        await fetch(port, "/never")
        assert (await fetch(port, "/never")).header(b"x-cache") == b"MISS"
    finally:
        await app.stop()
        await up.stop()


async def test_private_and_set_cookie_when_configured(clock: Clock) -> None:
    def answer(req: SeenRequest) -> Answer:
        if req.path == b"/private":
            return 200, [("cache-control", "private, max-age=60")], b"p"
        return 200, [("set-cookie", "session=abc"), ("x-other", "1")], b"c"

    up = await Scripted(answer).start()
    plugins = "{cache: {cache_private: true, cache_set_cookie: true}}"
    app, port = await start_app(cfg(up, route(plugins)))
    try:
        await fetch(port, "/private")
        assert (await fetch(port, "/private")).header(b"x-cache") == b"HIT"
        r = await fetch(port, "/cookie")
        assert r.header(b"set-cookie") == b"session=abc"  # the one who caused it gets it
        r = await fetch(port, "/cookie")
        assert (r.header(b"x-cache"), r.body) == (b"HIT", b"c")
        assert r.header(b"set-cookie") is None  # never handed to everyone else
        assert r.header(b"x-other") == b"1"
    finally:
        await app.stop()
        await up.stop()


async def test_only_listed_statuses_are_cached(clock: Clock) -> None:
    def answer(req: SeenRequest) -> Answer:
        return int(req.path[1:]), [], b"" if req.path == b"/204" else b"s"

    up = await Scripted(answer).start()
    app, port = await start_app(cfg(up, route("{cache: {}}")))
    try:
        for status, cached in [(200, True), (204, True), (404, True), (410, True), (302, False),
                               (403, False), (500, False)]:  # fmt: skip
            await fetch(port, f"/{status}")
            r = await fetch(port, f"/{status}")
            assert r.status == status
            assert r.header(b"x-cache") == (b"HIT" if cached else b"MISS"), status
    finally:
        await app.stop()
        await up.stop()
    up = await Scripted(answer).start()
    app, port = await start_app(cfg(up, route("{cache: {statuses: [302]}}")))
    try:
        await fetch(port, "/302")
        assert (await fetch(port, "/302")).header(b"x-cache") == b"HIT"
        await fetch(port, "/200")
        assert (await fetch(port, "/200")).header(b"x-cache") == b"MISS"
    finally:
        await app.stop()
        await up.stop()


async def test_head_is_answered_from_the_get_entry(
    versions: tuple[Scripted, Versions], clock: Clock
) -> None:
    up, _v = versions
    app, port = await start_app(cfg(up, route("{cache: {}}")))
    try:
        # a HEAD miss goes upstream as a HEAD and stores nothing (there is no body to keep)
        r = await fetch(port, "/h", method="HEAD")
        assert (r.status, r.header(b"x-cache")) == (200, b"MISS")
        r = await fetch(port, "/h")
        assert (r.body, r.header(b"x-cache")) == (b"/h v2", b"MISS")
        r = await fetch(port, "/h", method="HEAD")
        assert (r.status, r.body, r.header(b"x-cache")) == (200, b"", b"HIT")
        assert r.header(b"content-length") == b"5"
        assert [s.method for s in up.seen] == [b"HEAD", b"GET"]
    finally:
        await app.stop()


async def test_conditional_requests_answered_from_the_entry(clock: Clock) -> None:
    up = await Scripted(
        lambda req: (
            200,
            [("etag", '"v1"'), ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")],
            b"body",
        )
    ).start()
    app, port = await start_app(cfg(up, route("{cache: {}}")))
    try:
        await fetch(port, "/c")
        r = await fetch(port, "/c", headers={"If-None-Match": 'W/"v1"'})
        assert (r.status, r.body, r.header(b"etag"), r.header(b"x-cache")) == (
            304,
            b"",
            b'"v1"',
            b"HIT",
        )
        r = await fetch(port, "/c", headers={"If-None-Match": '"v0"'})
        assert (r.status, r.body) == (200, b"body")
        r = await fetch(port, "/c", headers={"If-Modified-Since": "Tue, 02 Jan 2024 00:00:00 GMT"})
        assert r.status == 304
        r = await fetch(port, "/c", headers={"If-Modified-Since": "Sun, 31 Dec 2023 00:00:00 GMT"})
        assert r.status == 200
        assert up.count() == 1
    finally:
        await app.stop()
        await up.stop()


async def test_request_cache_control_bypasses(
    versions: tuple[Scripted, Versions], clock: Clock
) -> None:
    up, _v = versions
    app, port = await start_app(cfg(up, route("{cache: {}}")))
    try:
        await fetch(port, "/q")  # v1 stored
        # no-cache: not served from the cache, but the fresh answer replaces the entry
        r = await fetch(port, "/q", headers={"Cache-Control": "no-cache"})
        assert (r.body, r.header(b"x-cache")) == (b"/q v2", b"BYPASS")
        r = await fetch(port, "/q")
        assert (r.body, r.header(b"x-cache")) == (b"/q v2", b"HIT")
        r = await fetch(port, "/q", headers={"Pragma": "no-cache"})
        assert (r.body, r.header(b"x-cache")) == (b"/q v3", b"BYPASS")
        # no-store: neither served nor stored
        r = await fetch(port, "/q", headers={"Cache-Control": "no-store"})
        assert (r.body, r.header(b"x-cache")) == (b"/q v4", b"BYPASS")
        assert (await fetch(port, "/q")).body == b"/q v3"
        # max-age: an entry older than that is not good enough
        clock.advance(10)
        r = await fetch(port, "/q", headers={"Cache-Control": "max-age=5"})
        assert (r.body, r.header(b"x-cache")) == (b"/q v5", b"EXPIRED")
        r = await fetch(port, "/q", headers={"Cache-Control": "max-age=5"})
        assert r.header(b"x-cache") == b"HIT"
        # only-if-cached: 504 rather than going upstream
        r = await fetch(port, "/nothing", headers={"Cache-Control": "only-if-cached"})
        assert r.status == 504 and up.count("/nothing") == 0
        r = await fetch(port, "/q", headers={"Cache-Control": "only-if-cached"})
        assert (r.status, r.header(b"x-cache")) == (200, b"HIT")
        assert cache_counts(app, "r")["bypass"] == 3
    finally:
        await app.stop()


async def test_request_cache_control_ignored_when_configured(
    versions: tuple[Scripted, Versions], clock: Clock
) -> None:
    up, _v = versions
    plugins = "{cache: {respect_request_cache_control: false}}"
    app, port = await start_app(cfg(up, route(plugins)))
    try:
        await fetch(port, "/q")
        r = await fetch(port, "/q", headers={"Cache-Control": "no-cache, no-store"})
        assert (r.body, r.header(b"x-cache")) == (b"/q v1", b"HIT")
    finally:
        await app.stop()


async def test_authorization_without_gateway_auth_is_not_cached(
    versions: tuple[Scripted, Versions], clock: Clock
) -> None:
    up, _v = versions
    app, port = await start_app(cfg(up, route("{cache: {}}")))
    try:
        auth = {"Authorization": "Bearer secret-of-alice"}
        r = await fetch(port, "/me", headers=auth)
        assert (r.body, r.header(b"x-cache")) == (b"/me v1", b"BYPASS")
        r = await fetch(port, "/me", headers={"Authorization": "Bearer secret-of-bob"})
        assert (r.body, r.header(b"x-cache")) == (b"/me v2", b"BYPASS")
        r = await fetch(port, "/me")
        assert r.header(b"x-cache") == b"MISS"  # nothing was stored for alice or bob
    finally:
        await app.stop()


async def test_query_normalisation(versions: tuple[Scripted, Versions], clock: Clock) -> None:
    up, _v = versions
    routes = route(
        "{cache: {sort_query: true, ignore_query_params: [utm_source]}}", "/sorted", "s"
    ) + route("{cache: {ignore_query_params: ['*']}}", "/none", "n")
    app, port = await start_app(cfg(up, routes))
    try:
        await fetch(port, "/sorted?b=2&a=1&utm_source=x")
        r = await fetch(port, "/sorted?a=1&b=2")
        assert r.header(b"x-cache") == b"HIT"
        r = await fetch(port, "/sorted?a=1&b=3")
        assert r.header(b"x-cache") == b"MISS"
        await fetch(port, "/none?x=1")
        assert (await fetch(port, "/none?y=2")).header(b"x-cache") == b"HIT"
        # the query still goes upstream as sent
        assert up.seen[0].path == b"/sorted?b=2&a=1&utm_source=x"
    finally:
        await app.stop()


async def test_other_methods_pass_and_a_successful_post_invalidates(
    versions: tuple[Scripted, Versions], clock: Clock
) -> None:
    up, _v = versions
    app, port = await start_app(cfg(up, route("{cache: {}}")))
    try:
        await fetch(port, "/item")
        assert (await fetch(port, "/item")).header(b"x-cache") == b"HIT"
        r = await fetch(port, "/item", method="POST", body=b"x")
        assert r.status == 200 and r.header(b"x-cache") is None
        r = await fetch(port, "/item")
        assert (r.body, r.header(b"x-cache")) == (b"/item v3", b"MISS")
    finally:
        await app.stop()


async def test_lru_eviction_by_bytes(clock: Clock) -> None:
    up = await Scripted(lambda req: (200, [], req.path * 1000)).start()  # ~3 KB bodies
    plugins = "{cache: {max_bytes: 8KiB, max_entry_bytes: 4KiB}}"
    app, port = await start_app(cfg(up, route(plugins)))
    try:
        for p in ("/p1", "/p2"):
            assert (await fetch(port, p)).header(b"x-cache") == b"MISS"
        assert (await fetch(port, "/p1")).header(b"x-cache") == b"HIT"  # /p2 is now the LRU
        store = zone_of(app, "r").memory
        assert len(store) == 2
        assert metric(app, "piuptime_cache_memory_bytes", "zone=r") == store.bytes > 6000
        await fetch(port, "/p3")  # does not fit beside both: /p2 goes
        assert len(store) == 2 and store.bytes <= 8 * 1024
        assert store.evictions == 1
        assert (await fetch(port, "/p1")).header(b"x-cache") == b"HIT"
        assert (await fetch(port, "/p3")).header(b"x-cache") == b"HIT"
        r = await fetch(port, "/p2")
        assert (r.header(b"x-cache"), r.body) == (b"MISS", b"/p2" * 1000)
    finally:
        await app.stop()
        await up.stop()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_too_large_passes_through_uncached_and_complete_bodies_are_kept(
    chunked: bool, clock: Clock
) -> None:
    def answer(req: SeenRequest) -> Answer:
        size = int(req.path.rsplit(b"/", 1)[1])
        return 200, [], bytes(range(256)) * (size // 256)

    up = await Scripted(answer).start()
    up.chunked = chunked
    app, port = await start_app(cfg(up, route("{cache: {max_entry_bytes: 2KiB}}")))
    try:
        for size, cached in [(4096, False), (1024, True), (2048, True), (100 * 1024, False)]:
            body = bytes(range(256)) * (size // 256)
            r = await fetch(port, f"/b/{size}")
            assert (r.body, r.header(b"x-cache")) == (body, b"MISS")
            r = await fetch(port, f"/b/{size}")
            assert r.body == body
            assert r.header(b"x-cache") == (b"HIT" if cached else b"MISS"), size
        assert zone_of(app, "r").memory.bytes < 2 * 3 * 1024
    finally:
        await app.stop()
        await up.stop()


async def test_the_cache_survives_a_reload(
    versions: tuple[Scripted, Versions], clock: Clock, tmp_path: Path
) -> None:
    up, _v = versions
    text = cfg(up, route("{cache: {}}"))
    app, port = await start_app(text, tmp_path)
    try:
        await fetch(port, "/a")
        extra = route("{}", "/other", "other")
        (tmp_path / "piuptime.yaml").write_text(cfg(up, route("{cache: {ttl: 2m}}") + extra))
        assert await app.reload()
        assert app.runtime.router.match(b"GET", b"x", b"/other", []) is not None
        r = await fetch(port, "/a")
        assert (r.body, r.header(b"x-cache")) == (b"/a v1", b"HIT")
        assert up.count("/a") == 1
    finally:
        await app.stop()


async def test_zones_are_shared_by_name_and_sized_by_the_last_config(
    versions: tuple[Scripted, Versions], clock: Clock
) -> None:
    up, _v = versions
    routes = route("{cache: {zone: z, max_bytes: 1MiB}}", "/one/", "one") + route(
        "{cache: {zone: z, max_bytes: 2MiB}}", "/two/", "two"
    )
    app, port = await start_app(cfg(up, routes))
    try:
        await fetch(port, "/one/x")
        await fetch(port, "/two/x")
        store = zone_of(app, "z").memory
        assert len(store) == 2  # one store, the routes' keys apart
        assert store.max_bytes == 2 * 1024 * 1024
        assert (await fetch(port, "/one/x")).body == b"/one/x v1"
    finally:
        await app.stop()


# -- stale-while-revalidate --------------------------------------------------------------------


async def test_stale_while_revalidate_serves_at_once_and_refreshes_once(clock: Clock) -> None:
    release = asyncio.Event()
    answered = 0
    n = 0

    async def answer(req: SeenRequest) -> Answer:
        nonlocal n, answered
        n += 1
        mine = n
        if mine > 1:
            await release.wait()  # the refresh is held until the test lets it go
        answered += 1
        return 200, [("cache-control", "max-age=10")], b"v%d" % mine

    up = await Scripted(answer).start()
    app, port = await start_app(cfg(up, route("{cache: {stale_while_revalidate: 1m}}")))
    try:
        await fetch(port, "/s")
        clock.advance(15)  # stale, within stale-while-revalidate
        for _ in range(5):  # answered while the one refresh is still held upstream
            r = await fetch(port, "/s")
            assert (r.body, r.header(b"x-cache"), r.header(b"age")) == (b"v1", b"STALE", b"15")
        await wait_until(lambda: up.count() == 2, what="the refresh reached the upstream")
        assert up.count() == 2  # exactly one refresh for the five stale hits
        release.set()
        zone = zone_of(app, "r")
        await wait_until(lambda: not zone.refreshing and answered == 2, what="refresh done")
        r = await fetch(port, "/s")
        assert (r.body, r.header(b"x-cache"), r.header(b"age")) == (b"v2", b"HIT", b"0")
        assert up.count() == 2
        assert cache_counts(app, "r") == {"miss": 1, "stale": 5, "hit": 1}
        # past the stale window: not served stale any more
        clock.advance(10 + 61)
        r = await fetch(port, "/s")
        assert (r.body, r.header(b"x-cache")) == (b"v3", b"EXPIRED")
    finally:
        await app.stop()
        await up.stop()


async def test_stale_while_revalidate_directive_and_304_revalidation(clock: Clock) -> None:
    def answer(req: SeenRequest) -> Answer:
        cc = ("cache-control", "max-age=10, stale-while-revalidate=30")
        if _header(req, b"if-none-match") == '"e1"':
            return 304, [cc, ("etag", '"e1"'), ("x-refreshed", "yes")], b""
        return 200, [cc, ("etag", '"e1"')], b"full body"

    up = await Scripted(answer).start()
    app, port = await start_app(cfg(up, route("{cache: {}}")))
    try:
        await fetch(port, "/e")
        clock.advance(12)
        r = await fetch(port, "/e")
        assert (r.body, r.header(b"x-cache")) == (b"full body", b"STALE")
        zone = zone_of(app, "r")
        await wait_until(lambda: up.count() == 2 and not zone.refreshing, what="revalidated")
        assert _header(up.seen[1], b"if-none-match") == '"e1"'
        r = await fetch(port, "/e")
        assert (r.body, r.header(b"x-cache"), r.header(b"x-refreshed")) == (
            b"full body",
            b"HIT",
            b"yes",
        )
        assert r.header(b"age") == b"0"
    finally:
        await app.stop()
        await up.stop()


async def test_must_revalidate_is_never_served_stale(clock: Clock) -> None:
    cc = ("cache-control", "max-age=1, must-revalidate")
    up = await Scripted(lambda req: (200, [cc], b"x")).start()
    plugins = "{cache: {stale_while_revalidate: 1m, stale_if_error: 1m}}"
    app, port = await start_app(cfg(up, route(plugins)))
    try:
        await fetch(port, "/m")
        clock.advance(5)
        assert (await fetch(port, "/m")).header(b"x-cache") == b"EXPIRED"
    finally:
        await app.stop()
        await up.stop()


# -- stale-if-error ----------------------------------------------------------------------------


async def test_stale_if_error_on_upstream_5xx(clock: Clock) -> None:
    state = {"status": 200}

    def answer(req: SeenRequest) -> Answer:
        if state["status"] != 200:
            return state["status"], [], b"upstream broke"
        return 200, [("cache-control", "max-age=10")], b"good"

    up = await Scripted(answer).start()
    app, port = await start_app(cfg(up, route("{cache: {stale_if_error: 5m}}")))
    try:
        await fetch(port, "/x")
        state["status"] = 500
        clock.advance(60)
        r = await fetch(port, "/x")
        assert (r.status, r.body, r.header(b"x-cache")) == (200, b"good", b"STALE")
        assert r.header(b"age") == b"60"
        state["status"] = 503
        clock.advance(200)
        r = await fetch(port, "/x")
        assert (r.status, r.body, r.header(b"x-cache")) == (200, b"good", b"STALE")
        clock.advance(100)  # 10s fresh + 5m: too old even for an outage
        r = await fetch(port, "/x")
        assert (r.status, r.body, r.header(b"x-cache")) == (503, b"upstream broke", b"EXPIRED")
        # a route without a stale copy: the failure as it is
        r = await fetch(port, "/never-cached")
        assert (r.status, r.header(b"x-cache")) == (503, b"MISS")
    finally:
        await app.stop()
        await up.stop()


async def test_stale_if_error_when_the_upstream_is_gone(clock: Clock) -> None:
    v = Versions([("cache-control", "max-age=10")])
    up = await Scripted(v).start()
    app, port = await start_app(cfg(up, route("{cache: {stale_if_error: 1m}}")))
    try:
        await fetch(port, "/g")
        await up.stop()  # connections reset, new ones refused
        clock.advance(30)
        r = await fetch(port, "/g")
        assert (r.status, r.body, r.header(b"x-cache")) == (200, b"/g v1", b"STALE")
        r = await fetch(port, "/other")
        assert r.status in (502, 503) and r.header(b"x-cache") == b"MISS"
    finally:
        await app.stop()


# -- coalescing --------------------------------------------------------------------------------


async def test_concurrent_misses_send_one_request_upstream(clock: Clock) -> None:
    v = Versions()
    up = await Scripted(v).start()
    up.gate = asyncio.Event()
    app, port = await start_app(cfg(up, route("{cache: {}}")))
    try:
        tasks = [asyncio.ensure_future(fetch(port, "/hot")) for _ in range(50)]
        server = app.servers[0]
        await wait_until(lambda: server.active_requests == 50, what="50 requests in the gateway")
        await wait_until(lambda: up.count() == 1, what="the leader upstream")
        up.gate.set()
        replies = await asyncio.gather(*tasks)
        assert {(r.status, r.body) for r in replies} == {(200, b"/hot v1")}
        assert sorted(r.header(b"x-cache") or b"" for r in replies) == [b"HIT"] * 49 + [b"MISS"]
        assert up.count() == 1
        assert not zone_of(app, "r").inflight
    finally:
        await app.stop()
        await up.stop()


async def test_waiters_go_upstream_themselves_when_the_answer_is_not_storable(
    clock: Clock,
) -> None:
    up = await Scripted(lambda req: (200, [("cache-control", "no-store")], b"private")).start()
    up.gate = asyncio.Event()
    app, port = await start_app(cfg(up, route("{cache: {}}")))
    try:
        tasks = [asyncio.ensure_future(fetch(port, "/ns")) for _ in range(5)]
        server = app.servers[0]
        await wait_until(lambda: server.active_requests == 5, what="5 requests in the gateway")
        assert up.count() == 1
        up.gate.set()
        replies = await asyncio.gather(*tasks)
        assert all(r.status == 200 and r.header(b"x-cache") == b"MISS" for r in replies)
        assert up.count() == 5
    finally:
        await app.stop()
        await up.stop()


async def test_waiters_stop_waiting_after_lock_timeout(clock: Clock) -> None:
    release = asyncio.Event()
    n = 0

    async def answer(req: SeenRequest) -> Answer:
        nonlocal n
        n += 1
        mine = n
        if mine == 1:
            await release.wait()  # the leader is stuck upstream
        return 200, [], b"r%d" % mine

    up = await Scripted(answer).start()
    app, port = await start_app(cfg(up, route("{cache: {lock_timeout: 100ms}}")))
    try:
        leader = asyncio.ensure_future(fetch(port, "/slow"))
        await wait_until(lambda: up.count() == 1, what="the leader upstream")
        r = await fetch(port, "/slow")  # waits 100ms, then goes upstream on its own
        assert (r.status, r.body, r.header(b"x-cache")) == (200, b"r2", b"MISS")
        release.set()
        assert (await leader).body == b"r1"
    finally:
        release.set()
        await app.stop()
        await up.stop()


# -- PURGE -------------------------------------------------------------------------------------


async def test_purge_by_address(clock: Clock) -> None:
    def answer(req: SeenRequest) -> Answer:
        lang = _header(req, b"accept-language") or "-"
        return 200, [("vary", "Accept-Language")], lang.encode()

    up = await Scripted(answer).start()
    routes = (
        route("{cache: {purge: {allow_ips: [127.0.0.0/8]}}}", "/ok/", "ok")
        + route("{cache: {purge: {allow_ips: [10.0.0.0/8]}}}", "/no/", "no")
        + route("{cache: {}}", "/off/", "off")
    )
    app, port = await start_app(cfg(up, routes))
    try:
        for lang in ("en", "fr"):
            await fetch(port, "/ok/x", headers={"Accept-Language": lang})
        await fetch(port, "/ok/y")
        r = await fetch(port, "/ok/x", method="PURGE")
        assert (r.status, json.loads(r.body)) == (200, {"purged": 2})  # both variants
        r = await fetch(port, "/ok/x", headers={"Accept-Language": "en"})
        assert r.header(b"x-cache") == b"MISS"
        assert (await fetch(port, "/ok/y")).header(b"x-cache") == b"HIT"  # others stay
        r = await fetch(port, "/ok/nothing", method="PURGE")
        assert (r.status, json.loads(r.body)) == (200, {"purged": 0})
        await fetch(port, "/no/x")
        r = await fetch(port, "/no/x", method="PURGE")
        assert r.status == 403 and json.loads(r.body)["error"]["code"] == "purge_forbidden"
        assert (await fetch(port, "/no/x")).header(b"x-cache") == b"HIT"
        r = await fetch(port, "/off/x", method="PURGE")
        assert r.status == 405
        assert not any(s.method == b"PURGE" for s in up.seen)  # never forwarded
    finally:
        await app.stop()
        await up.stop()


async def test_purge_by_consumer_group(versions: tuple[Scripted, Versions], clock: Clock) -> None:
    from piuptime.gateway.plugins import REGISTRY, _load_handlers

    _load_handlers()
    if "key_auth" not in REGISTRY:
        pytest.skip("key_auth is not built yet")
    up, _v = versions
    routes = route("{key_auth: {}, cache: {purge: {allow_groups: [ops]}}}")
    extra = """\
consumers:
  admin: {keys: [admin-key], groups: [ops]}
  app: {keys: [app-key], groups: [apps]}
"""
    app, port = await start_app(cfg(up, routes, extra))
    try:
        r = await fetch(port, "/k", headers={"apikey": "app-key"})
        assert r.status == 200
        r = await fetch(port, "/k", headers={"apikey": "app-key"})
        assert r.header(b"x-cache") == b"HIT"
        r = await fetch(port, "/k", method="PURGE", headers={"apikey": "app-key"})
        assert r.status == 403
        r = await fetch(port, "/k", method="PURGE", headers={"apikey": "admin-key"})
        assert (r.status, json.loads(r.body)) == (200, {"purged": 1})
        r = await fetch(port, "/k", headers={"apikey": "app-key"})
        assert r.header(b"x-cache") == b"MISS"
        r = await fetch(port, "/k", method="PURGE")
        assert r.status == 401  # no key: key_auth refuses before the cache is asked
    finally:
        await app.stop()


async def test_per_consumer_keys(versions: tuple[Scripted, Versions], clock: Clock) -> None:
    from piuptime.gateway.plugins import REGISTRY, _load_handlers

    _load_handlers()
    if "key_auth" not in REGISTRY:
        pytest.skip("key_auth is not built yet")
    up, _v = versions
    routes = route("{key_auth: {}, cache: {per_consumer: true}}")
    extra = """\
consumers:
  alice: {keys: [alice-key]}
  bob: {keys: [bob-key]}
"""
    app, port = await start_app(cfg(up, routes, extra))
    try:
        a = {"Authorization": "Bearer alice-key"}
        b = {"Authorization": "Bearer bob-key"}
        assert (await fetch(port, "/me", headers=a)).header(b"x-cache") == b"MISS"
        assert (await fetch(port, "/me", headers=b)).header(b"x-cache") == b"MISS"
        r = await fetch(port, "/me", headers=a)
        assert (r.body, r.header(b"x-cache")) == (b"/me v1", b"HIT")
        r = await fetch(port, "/me", headers=b)
        assert (r.body, r.header(b"x-cache")) == (b"/me v2", b"HIT")
    finally:
        await app.stop()


async def test_plugin_replies_and_gateway_errors_are_never_stored(clock: Clock) -> None:
    up = await Scripted(lambda req: (200, [], b"ok")).start()
    routes = route("{cache: {statuses: [200, 403, 404]}, ip_restriction: {deny: [127.0.0.1]}}")
    app, port = await start_app(cfg(up, routes))
    try:
        for _ in range(2):
            r = await fetch(port, "/x")
            assert r.status == 403 and r.header(b"x-cache") is None
        assert up.count() == 0
    finally:
        await app.stop()
        await up.stop()
