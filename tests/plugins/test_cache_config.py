"""The cache plugin's schema (positioned errors through ``parse_config``) and its pure parts:
Cache-Control parsing, the storage policy, the entry byte format and the memory LRU."""

from __future__ import annotations

import pytest
import yaml

from piuptime.config import ConfigError, load_config, parse_config
from piuptime.config.plugins.cache import Cache
from piuptime.gateway.cache.entry import Entry, dump, dump_vary, load, load_vary
from piuptime.gateway.cache.policy import (
    RequestAsks,
    ResponsePolicy,
    etag_matches,
    parse_cache_control,
    stored_headers,
    vary_values,
)
from piuptime.gateway.cache.store import MemoryStore, RedisLayout
from tests.support import ROOT

BASE = """\
gateway:
  listen: ["127.0.0.1:0"]
upstreams:
  u: {targets: ["http://127.0.0.1:9"]}
routes:
  - name: r
    match: {path: /}
    upstream: u
    plugins:
      cache: %s
"""


def errors(plugin: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE % plugin, "t.yaml")
    return [str(e) for e in caught.value.errors]


def test_the_design_example_validates() -> None:
    path = ROOT / "examples" / "design-example.yaml"
    data = yaml.safe_load(path.read_text())
    cache = Cache.model_validate(data["routes"][0]["plugins"]["cache"])
    assert (cache.ttl, cache.stale_if_error, cache.store) == (10.0, 300.0, "memory")
    env = {
        "PIUPTIME_ADMIN_TOKEN": "t",
        "KITCHEN_KEY": "k",
        "OPENAI_API_KEY": "o",
        "ANTHROPIC_API_KEY": "a",
    }
    try:
        load_config(path, env=env)
    except ConfigError as exc:  # other sections may not be built yet; the cache is
        assert not [e for e in exc.errors if "plugins.cache" in e.path], exc
    config = parse_config(BASE % "{ttl: 10s, stale_if_error: 5m}", "t.yaml")
    got = config.routes[0].plugins.cache
    assert got is not None and (got.ttl, got.stale_if_error) == (10.0, 300.0)
    assert got.statuses == [200, 203, 204, 301, 404, 410]
    assert (got.max_bytes, got.max_entry_bytes, got.lock_timeout) == (64 << 20, 1 << 20, 5.0)


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [
        (
            "{tll: 10s}",
            "t.yaml:10:15: routes[0].plugins.cache.tll: unknown key 'tll'; did you mean 'ttl'?",
        ),
        (
            "{statuses: [206]}",
            "t.yaml:10:25: routes[0].plugins.cache.statuses: 206 cannot be cached: partial "
            "(range) responses are not cached",
        ),
        (
            "{statuses: [700]}",
            "t.yaml:10:25: routes[0].plugins.cache.statuses: expected HTTP statuses from 200 to "
            "599, got 700",
        ),
        (
            "{zone: 'a b'}",
            "t.yaml:10:21: routes[0].plugins.cache.zone: expected a name of letters, digits, "
            "'_', '.' or '-' (at most 64), got 'a b'",
        ),
        (
            "{max_bytes: 1MiB, max_entry_bytes: 2MiB}",
            "t.yaml:10:49: routes[0].plugins.cache.max_entry_bytes: max_entry_bytes (2097152) "
            "is larger than max_bytes (1048576): no response could ever be stored",
        ),
        (
            "{max_bytes: 10}",
            "t.yaml:10:26: routes[0].plugins.cache.max_bytes: must be at least 1KiB, got 10 bytes",
        ),
        (
            "{purge: {}}",
            "t.yaml:10:22: routes[0].plugins.cache.purge: list allow_groups and/or allow_ips "
            "(who may purge); leave purge out to refuse every PURGE",
        ),
        (
            "{purge: {allow_ips: [nope]}}",
            "t.yaml:10:34: routes[0].plugins.cache.purge.allow_ips: expected an IP address or a "
            "CIDR block like 10.0.0.0/8 or fd00::/8, got 'nope'",
        ),
        (
            "{store: disk}",
            "t.yaml:10:22: routes[0].plugins.cache.store: expected one of 'memory' or 'redis', "
            "got 'disk'",
        ),
        (
            "{store: redis}",
            "t.yaml:10:22: routes[0].plugins.cache.store: store: redis needs a Redis to use, but "
            "the top-level store.redis is not set",
        ),
        (
            "{ignore_query_params: ['a=b']}",
            "t.yaml:10:36: routes[0].plugins.cache.ignore_query_params: expected query parameter "
            "names (or '*'), got 'a=b'",
        ),
        (
            "{lock_timeout: 0s}",
            "t.yaml:10:29: routes[0].plugins.cache.lock_timeout: must be longer than 0s, got '0s'",
        ),
        (
            "{ttl: soon}",
            "t.yaml:10:20: routes[0].plugins.cache.ttl:",
        ),
    ],
)
def test_config_errors_are_positioned(plugin: str, expected: str) -> None:
    found = errors(plugin)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]


def test_global_cache_with_a_route_turning_it_off() -> None:
    text = (BASE % "false") + "plugins:\n  cache: {ttl: 1m}\n"
    config = parse_config(text, "t.yaml")
    assert config.plugins.cache is not None and config.plugins.cache.ttl == 60.0
    assert "cache" in config.routes[0].plugins.disabled


# -- pure parts --------------------------------------------------------------------------------


def test_parse_cache_control() -> None:
    d = parse_cache_control(b'Max-Age=60, no-cache="set-cookie, x-a", private,, s-maxage="5"')
    assert d == {
        b"max-age": b"60",
        b"no-cache": b"set-cookie, x-a",
        b"private": None,
        b"s-maxage": b"5",
    }
    assert parse_cache_control(b"max-age=1, max-age=9") == {b"max-age": b"1"}


def _policy(**kw: object) -> ResponsePolicy:
    args: dict[str, object] = dict(
        ttl=60.0,
        override=False,
        stale_while_revalidate=0.0,
        stale_if_error=0.0,
        statuses=frozenset({200}),
        cache_private=False,
        cache_set_cookie=False,
    )
    args.update(kw)
    return ResponsePolicy(**args)  # type: ignore[arg-type]


def test_policy_windows_and_vary() -> None:
    p = _policy(stale_while_revalidate=30.0, stale_if_error=300.0)
    f = p.decide(200, [(b"vary", b"Accept-Encoding, accept-language")], 1000.0)
    assert f is not None
    assert (f.lifetime, f.swr, f.sie, f.created) == (60.0, 30.0, 300.0, 1000.0)
    assert f.vary == (b"accept-encoding", b"accept-language")
    cc = [(b"cache-control", b"max-age=5, stale-while-revalidate=7, stale-if-error=9")]
    f = p.decide(200, cc, 0.0)
    assert f is not None and (f.lifetime, f.swr, f.sie) == (5.0, 7.0, 9.0)
    f = p.decide(200, [(b"cache-control", b"max-age=5, must-revalidate")], 0.0)
    assert f is not None and (f.swr, f.sie) == (0.0, 0.0)
    f = p.decide(200, [(b"cache-control", b"no-cache")], 0.0)
    assert f is not None and (f.lifetime, f.swr, f.sie) == (0.0, 0.0, 300.0)
    assert p.decide(201, [], 0.0) is None
    assert p.decide(200, [(b"vary", b"a, *")], 0.0) is None
    over = _policy(override=True, ttl=5.0)
    f = over.decide(200, [(b"cache-control", b"no-cache, max-age=100")], 0.0)
    assert f is not None and f.lifetime == 5.0
    assert over.decide(200, [(b"cache-control", b"no-store")], 0.0) is None


def test_request_asks() -> None:
    a = RequestAsks(b"max-age=0", None)
    assert a.no_cache and not a.no_store and a.max_age == 0
    a = RequestAsks(None, b"no-cache")
    assert a.no_cache
    a = RequestAsks(b"max-age=30, only-if-cached", b"no-cache")  # Cache-Control wins
    assert not a.no_cache and a.only_if_cached and a.max_age == 30


def test_stored_headers_and_vary_values() -> None:
    headers = [
        (b"content-type", b"text/plain"),
        (b"connection", b"x-hop"),
        (b"x-hop", b"1"),
        (b"transfer-encoding", b"chunked"),
        (b"content-length", b"5"),
        (b"date", b"x"),
        (b"age", b"3"),
        (b"x-cache", b"HIT from cdn"),
        (b"set-cookie", b"a=b"),
        (b"proxy-authenticate", b"x"),
        (b"etag", b'"1"'),
    ]
    assert stored_headers(headers, True) == [(b"content-type", b"text/plain"), (b"etag", b'"1"')]
    req = [(b"accept-language", b"en ,fr"), (b"x", b"1"), (b"accept-language", b"de")]
    assert vary_values((b"accept-language", b"missing"), req) == b"en,fr,de\x00"
    assert etag_matches(b'"a", W/"b"', b'"b"') and etag_matches(b"*", b'"z"')
    assert not etag_matches(b'"a"', b'"b"')


def test_entry_bytes_round_trip() -> None:
    e = Entry(
        203,
        [(b"content-type", b"application/json"), (b"x-long", b"v" * 70000)],
        b"\x00body\xff" * 100,
        100.5,
        160.5,
        190.5,
        460.5,
        (b"accept-language",),
        b"en",
    )
    back = load(dump(e))
    assert back is not None
    for name in ("status", "headers", "body", "created", "fresh_until", "swr_until"):
        assert getattr(back, name) == getattr(e, name), name
    assert (back.sie_until, back.keep_until, back.vary, back.vary_key) == (
        460.5,
        460.5,
        (b"accept-language",),
        b"en",
    )
    assert load(dump(e)[:-1]) is None  # truncated
    assert load(b"garbage") is None
    assert load(dump_vary((b"a",))) is None  # a Vary record is not an entry
    assert load_vary(dump_vary((b"a", b"bb"))) == (b"a", b"bb")
    assert load_vary(dump(e)) is None
    assert load_vary(b"PCV1\x00\x05") is None


def _entry(body: bytes, vary: tuple[bytes, ...] = (), key: bytes = b"") -> Entry:
    return Entry(200, [], body, 0.0, 10.0, 10.0, 10.0, vary, key)


def test_memory_store_lru_variants_and_purge() -> None:
    store = MemoryStore(2000)
    en = [(b"accept-language", b"en")]
    fr = [(b"accept-language", b"fr")]
    assert store.put(b"r1", b"", _entry(b"a" * 500, (b"accept-language",), b"en"))
    assert store.put(b"r1", b"", _entry(b"b" * 500, (b"accept-language",), b"fr"))
    assert store.get(b"r1", b"", en).body[:1] == b"a"  # type: ignore[union-attr]
    assert store.get(b"r1", b"", fr).body[:1] == b"b"  # type: ignore[union-attr]
    assert store.get(b"r1", b"", []) is None
    assert store.get(b"r1", b"c=alice", en) is None
    # the URL stops varying: its old variants go
    assert store.put(b"r1", b"", _entry(b"c" * 100))
    assert len(store) == 1 and store.get(b"r1", b"", en).body[:1] == b"c"  # type: ignore[union-attr]
    assert store.put(b"r2", b"", _entry(b"d" * 700))
    assert store.put(b"r3", b"", _entry(b"e" * 700))  # over 2000: r1 (least recent) goes
    assert store.get(b"r1", b"", []) is None and len(store) == 2 and store.evictions == 1
    assert not store.put(b"r4", b"", _entry(b"f" * 3000))  # larger than the store
    assert store.purge(b"r2") == 1 and store.purge(b"r2") == 0
    assert store.bytes == store.get(b"r3", b"", []).size  # type: ignore[union-attr]
    store.purge(b"r3")
    assert store.bytes == 0 and len(store) == 0


def test_redis_layout_keeps_kinds_and_urls_apart() -> None:
    lay = RedisLayout("z")
    e = lay.entry(b"rid", b"")
    assert e.startswith("cache:z:e:") and lay.vary(b"rid", b"").startswith("cache:z:v:")
    assert lay.entry(b"rid", b"c=alice") != e and lay.entry(b"rid", b"c=alice").startswith(e)
    assert lay.variant(e, b"en").startswith(e + ":")
    entries, varies = lay.purge_prefixes(b"rid")
    assert e.startswith(entries) and lay.vary(b"rid", b"x").startswith(varies)
    assert not lay.entry(b"other", b"").startswith(entries)
    assert not lay.refresh_lock(b"rid", b"", b"").startswith(entries)
