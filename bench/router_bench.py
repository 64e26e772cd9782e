"""Router benchmark: the compiled trie router beside a naive linear scan, same routes, same run.

    uv run python bench/router_bench.py [--sizes 10,100,1000] [--min-time 0.5]

For each route-table size it builds a mix of exact, prefix, ``{param}``, exact-host and
wildcard-host routes (a few with method and header conditions), then times ``match()`` over a
set of requests that hit (every route once) and a set that miss.  The baseline is what a naive
router does: one precompiled regex per route, routes pre-sorted by precedence, first match wins.
Both answers are checked to agree before timing.

What to look for: the compiled router's µs/match stays about flat from 10 to 1,000 routes (it
only looks at routes whose path can match), while the scan grows with the table.  This is a
script, not a test; figures depend on the machine, so compare the columns of one run.
"""

from __future__ import annotations

import argparse
import platform
import random
import re
import sys
import time
from collections.abc import Callable, Sequence

from piuptime.gateway.router import Match, Router, RouteSpec, normalise_host

Request = tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]

# Typical request headers (names lower-case, as the server hands them over).
BASE_HEADERS = [
    (b"user-agent", b"curl/8.5.0"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip"),
    (b"x-request-id", b"5d1f7c1e-0a3b-4b1f-9d3e-6c9e2f8a7b10"),
]


def build_routes(n: int) -> list[RouteSpec]:
    """``n`` routes: a fifth each of exact, prefix, param, exact-host and wildcard-host routes."""
    specs = []
    for i in range(n):
        kind = i % 5
        methods = frozenset({b"GET", b"POST"}) if i % 7 == 0 else None
        headers = ((b"x-version", b"2"),) if i % 11 == 0 else ()
        if kind == 0:
            spec = RouteSpec(f"exact{i}", f"/svc{i}/items", methods, headers=headers)
        elif kind == 1:
            spec = RouteSpec(f"prefix{i}", f"/svc{i}/api/", methods, headers=headers)
        elif kind == 2:
            spec = RouteSpec(f"param{i}", f"/svc{i}/devices/{{id}}/status", methods)
        elif kind == 3:
            spec = RouteSpec(f"host{i}", f"/svc{i}/items", methods, hosts=(f"t{i}.example.com",))
        else:
            spec = RouteSpec(
                f"wild{i}", f"/svc{i}/", frozenset({b"GET"}), hosts=(f"*.t{i}.example.net",)
            )
        specs.append(spec)
    return specs


def build_requests(specs: Sequence[RouteSpec]) -> tuple[list[Request], list[Request]]:
    """One hitting request per route, and as many that match nothing."""
    hits: list[Request] = []
    misses: list[Request] = []
    for i, spec in enumerate(specs):
        headers = list(BASE_HEADERS)
        if spec.headers:
            headers += list(spec.headers)
        kind = i % 5
        if kind == 0:
            hits.append((b"GET", b"gw.local:8080", f"/svc{i}/items".encode(), headers))
            misses.append((b"GET", b"gw.local:8080", f"/svc{i}/items/more".encode(), headers))
        elif kind == 1:
            hits.append((b"POST", b"gw.local", f"/svc{i}/api/v1/things/42".encode(), headers))
            misses.append((b"GET", b"gw.local", f"/svc{i}/apix/v1".encode(), headers))
        elif kind == 2:
            hits.append((b"GET", b"gw.local", f"/svc{i}/devices/pi-{i}/status".encode(), headers))
            misses.append((b"GET", b"gw.local", f"/svc{i}/devices//status".encode(), headers))
        elif kind == 3:
            host = f"T{i}.example.com:443".encode()
            hits.append((b"GET", host, f"/svc{i}/items".encode(), headers))
            misses.append((b"GET", b"other.example.com", f"/svc{i}/items".encode(), headers))
        else:
            host = f"cam.t{i}.example.net".encode()
            hits.append((b"GET", host, f"/svc{i}/snapshot.jpg".encode(), headers))
            misses.append((b"GET", f"t{i}.example.net".encode(), f"/svc{i}/x".encode(), headers))
    random.Random(1).shuffle(hits)
    random.Random(2).shuffle(misses)
    return hits, misses


class NaiveRouter:
    """The baseline: every route as a regex, scanned in precedence order, first match wins.

    Each benchmark route has at most one host, so a static precedence order is exact here.
    """

    def __init__(self, specs: Sequence[RouteSpec]) -> None:
        entries = []
        for decl, spec in enumerate(specs):
            prefix = spec.path.endswith("/")
            body = spec.path[1:-1] if prefix else spec.path[1:]
            names: list[str] = []
            rx = b""
            classes: list[int] = []
            for part in body.split("/") if body else []:
                if part.startswith("{"):
                    names.append(part[1:-1])
                    rx += b"/([^/]+)"
                    classes.append(1)
                else:
                    rx += b"/" + re.escape(part.encode())
                    classes.append(2)
            if prefix:
                classes.append(0)
            pattern = re.compile(b"(" + rx + (b")(?:/.*)?" if prefix else b")"), re.S)
            host = spec.hosts[0].lower().encode() if spec.hosts else None
            host_rank = 0 if host is None else (1 if host.startswith(b"*.") else 2)
            key = (
                spec.priority or 0,
                0 if prefix else 1,
                tuple(classes),
                host_rank,
                len(spec.headers),
                spec.methods is not None,
                -decl,
            )
            entries.append((key, spec, pattern, names, prefix, host))
        entries.sort(key=lambda e: e[0], reverse=True)
        self.entries = [e[1:] for e in entries]

    def match(
        self, method: bytes, host: bytes, path: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Match | None:
        if not path.startswith(b"/"):
            return None
        hostn = normalise_host(host)
        for spec, pattern, names, prefix, want_host in self.entries:
            m = pattern.fullmatch(path)
            if m is None:
                continue
            if spec.methods is not None and method not in spec.methods:
                continue
            if want_host is not None:
                if want_host.startswith(b"*."):
                    suffix = want_host[1:]
                    if not (hostn.endswith(suffix) and len(hostn) > len(suffix)):
                        continue
                elif hostn != want_host:
                    continue
            if any(h not in headers for h in spec.headers):
                continue
            params = {
                n: m.group(k + 2).decode("utf-8", "surrogateescape") for k, n in enumerate(names)
            }
            return Match(spec, params, len(m.group(1)) if prefix else len(path))
        return None


Matcher = Callable[[bytes, bytes, bytes, list[tuple[bytes, bytes]]], Match | None]


def per_match_us(match: Matcher, reqs: list[Request], min_time: float) -> float:
    """Best of 5 timed passes (each at least ``min_time / 5`` s) in µs per ``match`` call."""
    for method, host, path, headers in reqs:  # warm up
        match(method, host, path, headers)
    best = float("inf")
    for _ in range(5):
        calls = 0
        start = time.perf_counter()
        while True:
            for method, host, path, headers in reqs:
                match(method, host, path, headers)
            calls += len(reqs)
            elapsed = time.perf_counter() - start
            if elapsed >= min_time / 5:
                break
        best = min(best, elapsed / calls * 1e6)
    return best


def check_agree(router: Router, naive: NaiveRouter, reqs: list[Request], hit: bool) -> None:
    for req in reqs:
        a = router.match(*req)
        b = naive.match(*req)
        if (a is None) != (not hit) or (b is None) != (not hit):
            sys.exit(f"unexpected {'miss' if hit else 'hit'} for {req[:3]}: {a} / {b}")
        if (
            a is not None
            and b is not None
            and (a.spec, a.params, a.prefix_len) != (b.spec, b.params, b.prefix_len)
        ):
            sys.exit(f"router and naive scan disagree on {req[:3]}: {a} vs {b}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sizes", default="10,100,1000", help="route-table sizes, comma-separated")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    print(f"python {platform.python_version()} on {platform.machine()} ({platform.system()})")
    print("µs per match() call, best of 5; naive = regex per route, precedence-sorted scan\n")
    header = (
        f"{'routes':>7} | {'compiled hit':>12} {'compiled miss':>13} | "
        f"{'naive hit':>10} {'naive miss':>10} | {'ratio hit':>9} {'ratio miss':>10} | build ms"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for n in sizes:
        specs = build_routes(n)
        t0 = time.perf_counter()
        router = Router(specs)
        build_ms = (time.perf_counter() - t0) * 1e3
        naive = NaiveRouter(specs)
        hits, misses = build_requests(specs)
        check_agree(router, naive, hits, hit=True)
        check_agree(router, naive, misses, hit=False)
        ch = per_match_us(router.match, hits, args.min_time)
        cm = per_match_us(router.match, misses, args.min_time)
        nh = per_match_us(naive.match, hits, args.min_time)
        nm = per_match_us(naive.match, misses, args.min_time)
        rows.append((n, ch, cm))
        print(
            f"{n:>7} | {ch:>12.2f} {cm:>13.2f} | {nh:>10.2f} {nm:>10.2f} | "
            f"{nh / ch:>8.1f}x {nm / cm:>9.1f}x | {build_ms:>8.1f}"
        )
    if len(rows) > 1:
        (n0, h0, m0), (n1, h1, m1) = rows[0], rows[-1]
        print(
            f"\ncompiled router, {n0} → {n1} routes: hit {h0:.2f} → {h1:.2f} µs "
            f"(x{h1 / h0:.2f}), miss {m0:.2f} → {m1:.2f} µs (x{m1 / m0:.2f})"
        )


if __name__ == "__main__":
    main()
