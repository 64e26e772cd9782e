"""Request routing: compile route specs once, then match each request in a few dict look-ups.

The router answers one question per request: *which route handles this method, host, path and
header set?*  It is on the hot path of every proxied request, so all the work that can be done
once is done in :class:`Router`'s constructor:

* Paths are split into segments and inserted into a **segment trie**: every node has a dict of
  literal children (keyed by the raw segment ``bytes``), at most one ``{param}`` child, and two
  terminal slots — routes whose *exact* path ends at this node and routes whose *prefix* ends
  here.  Matching walks the request's segments down the trie and only ever looks at the routes
  whose path can match; it never scans the whole route table.
* The routes of one terminal are grouped by priority into *levels*; each level holds its routes
  in three **host buckets** (exact host → routes, wildcard suffix → routes, any host), each
  bucket already sorted by the remaining tie-breakers.  Every level carries a precomputed global
  ``rank`` (priority, then path specificity), so comparing candidates is comparing two ints.
* Routes without ``{param}`` captures get a prebuilt :class:`Match`; matching them allocates
  nothing but the split of the request path.

The full precedence order, the treatment of hosts, ports, percent-encoding and the bare-prefix
rule are documented in ``docs/routing.md``; the short version is in :class:`Router`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Match", "RouteSpec", "Router"]

# Shared by every match without captures: never mutate ``Match.params``.
_EMPTY_PARAMS: dict[str, str] = {}

# Path-specificity classes of one pattern position (bigger is more specific).
_LITERAL = 2
_PARAM = 1
_PREFIX_END = 0


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """What a route matches on, as given by the configuration layer.

    ``path``: ``"/a/b"`` exact, ``"/a/"`` prefix (also matches the bare ``"/a"``),
    ``"/dev/{id}/x"`` with one-segment captures.  ``methods``: ``None`` for any.
    ``hosts``: exact ``"api.example.com"`` or wildcard ``"*.example.com"``; ``()`` for any.
    ``headers``: every ``(name, value)`` pair must be present in the request (names lower-case,
    values compared as bytes).  ``priority``: higher wins over everything else; ``None`` is 0.
    ``payload``: opaque to the router, handed back through :attr:`Match.spec`.
    """

    name: str
    path: str
    methods: frozenset[bytes] | None = None
    hosts: tuple[str, ...] = ()
    headers: tuple[tuple[bytes, bytes], ...] = ()
    priority: int | None = None
    payload: object = None


class Match:
    """The result of :meth:`Router.match`.

    ``params`` holds the ``{name}`` captures, decoded from the raw (still percent-encoded) path
    bytes as UTF-8 with ``surrogateescape`` — lossless: ``value.encode("utf-8",
    "surrogateescape")`` gives the bytes back.  ``prefix_len`` is the number of bytes of the
    request path the route's path consumed: ``path[prefix_len:]`` is what ``strip_prefix``
    leaves (empty means ``/``).  For exact routes it is the whole path length.

    Matches of routes without captures are prebuilt once and returned to every request, and
    ``params`` is then one shared empty dict: treat a ``Match`` as read-only.
    """

    __slots__ = ("params", "prefix_len", "spec")

    def __init__(self, spec: RouteSpec, params: dict[str, str], prefix_len: int) -> None:
        self.spec = spec
        self.params = params
        self.prefix_len = prefix_len

    def __repr__(self) -> str:
        name, params, plen = self.spec.name, self.params, self.prefix_len
        return f"Match(route={name!r}, params={params!r}, prefix_len={plen})"


class _Route:
    """One compiled route: what the matcher needs, flattened into slots."""

    __slots__ = (
        "decl",
        "depth",
        "headers",
        "is_prefix",
        "match",
        "methods",
        "param_slots",
        "shape",
        "spec",
    )

    def __init__(
        self,
        spec: RouteSpec,
        decl: int,
        is_prefix: bool,
        depth: int,
        shape: tuple[bytes | None, ...],
        param_slots: tuple[tuple[int, str], ...],
        headers: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        self.spec = spec
        self.decl = decl
        self.is_prefix = is_prefix
        self.depth = depth
        self.shape = shape  # literal bytes, or None for a {param}; identifies the trie terminal
        self.param_slots = param_slots  # (segment index, capture name)
        self.methods = spec.methods
        self.headers = headers
        self.match: Match | None = None
        if not param_slots:
            # Literal prefix "/a/b/" consumes "/a/b"; an exact literal path consumes itself.
            consumed = sum(1 + len(s) for s in shape if s is not None)
            self.match = Match(spec, _EMPTY_PARAMS, consumed)

    def sort_key(self) -> tuple[int, int, int]:
        """Order inside a host bucket: more header conditions, method-restricted, declared first."""
        return (-len(self.headers), 0 if self.methods is not None else 1, self.decl)


class _Level:
    """The routes of one trie terminal that share one priority, in host buckets."""

    __slots__ = ("any_host", "exact_hosts", "has_hosts", "rank", "wild_hosts")

    def __init__(self) -> None:
        self.rank = 0
        self.exact_hosts: dict[bytes, tuple[_Route, ...]] = {}
        self.wild_hosts: dict[bytes, tuple[_Route, ...]] = {}  # ".example.com" → routes
        self.any_host: tuple[_Route, ...] = ()
        self.has_hosts = False


class _Node:
    """A segment-trie node."""

    __slots__ = ("children", "exact", "param", "prefix")

    def __init__(self) -> None:
        self.children: dict[bytes, _Node] = {}
        self.param: _Node | None = None
        self.exact: tuple[_Level, ...] = ()  # sorted by rank, best first
        self.prefix: tuple[_Level, ...] = ()


def _first_ok(
    routes: tuple[_Route, ...], method: bytes, headers: list[tuple[bytes, bytes]]
) -> _Route | None:
    """The first route of a sorted bucket whose method and header conditions hold."""
    for r in routes:
        m = r.methods
        if m is not None and method not in m:
            continue
        for pair in r.headers:
            if pair not in headers:
                break
        else:
            return r
    return None


def _search(
    level: _Level, method: bytes, host: bytes, headers: list[tuple[bytes, bytes]]
) -> _Route | None:
    """Best route of a level with host buckets: exact host, then longest wildcard, then any."""
    routes = level.exact_hosts.get(host)
    if routes is not None:
        r = _first_ok(routes, method, headers)
        if r is not None:
            return r
    wild = level.wild_hosts
    if wild:
        # ".b.example.com", then ".example.com", then ".com": longest suffix first, and at least
        # one label must remain in front of it.
        j = host.find(b".", 1)
        while j > 0:
            routes = wild.get(host[j:])
            if routes is not None:
                r = _first_ok(routes, method, headers)
                if r is not None:
                    return r
            j = host.find(b".", j + 1)
    return _first_ok(level.any_host, method, headers)


def normalise_host(host: bytes) -> bytes:
    """A request ``Host`` as the router compares it: port removed, lower-case, no trailing dot.

    ``b"API.Example.com:8080"`` → ``b"api.example.com"``; ``b"[::1]:8080"`` → ``b"[::1]"``.
    """
    if not host:
        return host
    if host[0] == 0x5B:  # "[": IPv6 literal, the port follows "]"
        end = host.find(b"]")
        if end > 0:
            host = host[: end + 1]
    else:
        colon = host.rfind(b":")
        if colon >= 0:
            host = host[:colon]
    if host.endswith(b"."):
        host = host[:-1]
    return host.lower()


def _compile_host(route: str, host: str) -> tuple[bool, bytes]:
    """``(is_wildcard, key)``: key is the exact host, or the suffix ``.example.com``."""
    if not isinstance(host, str):
        raise ValueError(f"route {route!r}: host {host!r} must be a string")
    h = host.strip().lower()
    if h.endswith("."):
        h = h[:-1]
    wildcard = h.startswith("*.")
    if wildcard:
        h = h[2:]
    if not h:
        raise ValueError(f"route {route!r}: empty host {host!r}")
    if h.startswith("[") or ":" in h:
        inner = h[1:-1] if h.startswith("[") and h.endswith("]") else h
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(
                f"route {route!r}: host {host!r} must not carry a port "
                "(the request's port is ignored when matching)"
            ) from None
        if wildcard:
            raise ValueError(f"route {route!r}: wildcard host {host!r} cannot be an IPv6 literal")
        return False, f"[{inner}]".encode("ascii")
    if "*" in h:
        raise ValueError(
            f"route {route!r}: host {host!r}: the only wildcard form is a leading '*.' "
            "(like '*.example.com')"
        )
    if any(c in h for c in "/?#@ \t") or any(not label for label in h.split(".")):
        raise ValueError(f"route {route!r}: invalid host {host!r}")
    try:
        key = h.encode("ascii") if h.isascii() else h.encode("idna")
    except UnicodeError as exc:
        raise ValueError(f"route {route!r}: invalid host {host!r}: {exc}") from None
    return wildcard, (b"." + key) if wildcard else key


def _compile_path(
    route: str, path: str
) -> tuple[bool, tuple[bytes | None, ...], tuple[tuple[int, str], ...]]:
    """``(is_prefix, shape, param_slots)`` for a route path; raises ValueError when malformed."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"route {route!r}: path {path!r} must start with '/'")
    if "?" in path or "#" in path:
        raise ValueError(
            f"route {route!r}: path {path!r} must not contain '?' or '#' "
            "(the query string is not part of the path)"
        )
    is_prefix = path.endswith("/")
    body = path[1:-1] if is_prefix else path[1:]
    shape: list[bytes | None] = []
    slots: list[tuple[int, str]] = []
    if body:
        for i, part in enumerate(body.split("/")):
            if not part:
                raise ValueError(f"route {route!r}: path {path!r} has an empty segment ('//')")
            if part.startswith("{") and part.endswith("}"):
                name = part[1:-1]
                if not name.isidentifier():
                    raise ValueError(
                        f"route {route!r}: path {path!r}: capture name {name!r} "
                        "must be an identifier"
                    )
                if any(n == name for _, n in slots):
                    raise ValueError(f"route {route!r}: path {path!r} captures {name!r} twice")
                shape.append(None)
                slots.append((i, name))
            elif "{" in part or "}" in part:
                raise ValueError(
                    f"route {route!r}: path {path!r}: a {{param}} must be a whole segment"
                )
            else:
                shape.append(part.encode("utf-8"))
    return is_prefix, tuple(shape), tuple(slots)


def _methods_clash(a: frozenset[bytes] | None, b: frozenset[bytes] | None) -> bool:
    """Two routes that differ only in methods can't be told apart for some request."""
    if a is None or b is None:
        return a is b  # "any" vs a set: the set wins for its methods, "any" gets the rest
    return not a.isdisjoint(b)


class Router:
    """Routes compiled into a segment trie; :meth:`match` picks the best route for a request.

    Precedence, first difference wins (details and examples in ``docs/routing.md``):

    1. higher ``priority`` (``None`` counts as 0);
    2. exact path over prefix path;
    3. path specificity, compared segment by segment from the left: a literal segment beats a
       ``{param}``, which beats the end of a shorter prefix (so longer prefixes win);
    4. host: an exact host beats a wildcard, a longer wildcard beats a shorter one, and any host
       constraint beats none;
    5. more header conditions;
    6. a method-restricted route over an any-method one;
    7. declaration order.

    Raises ValueError for malformed specs and for two routes that can never be told apart (same
    path shape, priority, host set and header set, with overlapping method sets).
    """

    __slots__ = ("_nlevels", "_root", "specs")

    def __init__(self, specs: Sequence[RouteSpec]) -> None:
        self.specs: tuple[RouteSpec, ...] = tuple(specs)
        self._root = _Node()
        # terminal (node, is_prefix) → priority → [(route, compiled hosts)]
        terminals: dict[
            tuple[int, bool],
            tuple[_Node, tuple[int, ...], dict[int, list[tuple[_Route, frozenset[bytes]]]]],
        ] = {}
        for decl, spec in enumerate(self.specs):
            name = spec.name
            is_prefix, shape, slots = _compile_path(name, spec.path)
            if spec.methods is not None and not spec.methods:
                raise ValueError(f"route {name!r}: empty methods set (use None for any method)")
            headers = tuple((n.lower(), v) for n, v in spec.headers)
            hosts = frozenset(
                (b"*" if wild else b"") + key
                for wild, key in (_compile_host(name, h) for h in spec.hosts)
            )
            route = _Route(spec, decl, is_prefix, len(shape), shape, slots, headers)
            node = self._root
            for seg in shape:
                if seg is None:
                    if node.param is None:
                        node.param = _Node()
                    node = node.param
                else:
                    child = node.children.get(seg)
                    if child is None:
                        child = node.children[seg] = _Node()
                    node = child
            key = (id(node), is_prefix)
            if key not in terminals:
                classes = tuple(_PARAM if s is None else _LITERAL for s in shape)
                if is_prefix:
                    classes += (_PREFIX_END,)
                terminals[key] = (node, classes, {})
            by_prio = terminals[key][2]
            prio = spec.priority or 0
            peers = by_prio.setdefault(prio, [])
            for other, other_hosts in peers:
                if (
                    other_hosts == hosts
                    and frozenset(other.headers) == frozenset(headers)
                    and _methods_clash(other.methods, route.methods)
                ):
                    raise ValueError(
                        f"routes {other.spec.name!r} and {name!r} can never be told apart: "
                        f"same path ({other.spec.path!r} / {spec.path!r}), priority, hosts and "
                        "headers, and overlapping methods; give one a priority, a host, a "
                        "header or disjoint methods"
                    )
            peers.append((route, hosts))

        # Build levels and rank them globally: priority first, then exact over prefix, then
        # segment classes left to right.  Levels that tie can never both match one request.
        levels: list[tuple[tuple[int, int, tuple[int, ...]], _Node, bool, _Level]] = []
        for (_, is_prefix), (node, classes, by_prio) in terminals.items():
            for prio, members in by_prio.items():
                levels.append(
                    ((prio, 0 if is_prefix else 1, classes), node, is_prefix, _build_level(members))
                )
        levels.sort(key=lambda item: item[0], reverse=True)
        self._nlevels = len(levels)
        per_terminal: dict[tuple[int, bool], list[_Level]] = {}
        for rank, (_, node, is_prefix, level) in enumerate(levels):
            level.rank = rank
            per_terminal.setdefault((id(node), is_prefix), []).append(level)
        for (_, is_prefix), (node, _, _) in terminals.items():
            ranked = tuple(per_terminal[(id(node), is_prefix)])
            if is_prefix:
                node.prefix = ranked
            else:
                node.exact = ranked

    def __len__(self) -> int:
        return len(self.specs)

    def match(
        self, method: bytes, host: bytes, path: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Match | None:
        """The best route for a request, or None.

        ``host`` is the raw ``Host`` value (port and case are ignored), ``path`` the raw path
        without the query string, matched as sent: no percent-decoding, no dot-segment removal.
        A path that is empty or does not start with ``/`` matches nothing.
        """
        if not path or path[0] != 0x2F:
            return None
        segs = path[1:].split(b"/")
        n = len(segs)
        # Walk the trie depth first, literal child before {param} child, collecting the ranked
        # levels of every terminal on the way: prefix terminals at each node visited, the exact
        # terminal where the path ends.
        cands: list[tuple[_Level, ...]] = []
        stack: list[tuple[_Node, int]] | None = None
        node = self._root
        i = 0
        while True:
            if node.prefix:
                cands.append(node.prefix)
            if i == n:
                if node.exact:
                    cands.append(node.exact)
            else:
                seg = segs[i]
                param = node.param
                if param is not None and seg:
                    if stack is None:
                        stack = []
                    stack.append((param, i + 1))
                child = node.children.get(seg)
                if child is not None:
                    node = child
                    i += 1
                    continue
            if not stack:
                break
            node, i = stack.pop()

        best: _Route | None = None
        best_rank = self._nlevels
        hostn: bytes | None = None
        for ranked in reversed(cands):  # deepest first: usually the best, so the rest is pruned
            for level in ranked:
                if level.rank >= best_rank:
                    break
                if level.has_hosts:
                    if hostn is None:
                        hostn = normalise_host(host)
                    r = _search(level, method, hostn, headers)
                else:
                    r = _first_ok(level.any_host, method, headers)
                if r is not None:
                    best = r
                    best_rank = level.rank
                    break
        if best is None:
            return None
        if best.match is not None:
            return best.match
        params = {name: segs[k].decode("utf-8", "surrogateescape") for k, name in best.param_slots}
        if best.is_prefix:
            consumed = best.depth
            for k in range(best.depth):
                consumed += len(segs[k])
        else:
            consumed = len(path)
        return Match(best.spec, params, consumed)


def _build_level(members: list[tuple[_Route, frozenset[bytes]]]) -> _Level:
    """Sort one level's routes into host buckets, each bucket in tie-break order."""
    exact: dict[bytes, list[_Route]] = {}
    wild: dict[bytes, list[_Route]] = {}
    anyh: list[_Route] = []
    for route, hosts in members:
        if not hosts:
            anyh.append(route)
        for h in hosts:
            if h.startswith(b"*"):
                wild.setdefault(h[1:], []).append(route)
            else:
                exact.setdefault(h, []).append(route)
    level = _Level()

    def ordered(routes: list[_Route]) -> tuple[_Route, ...]:
        return tuple(sorted(routes, key=_Route.sort_key))

    level.exact_hosts = {h: ordered(rs) for h, rs in exact.items()}
    level.wild_hosts = {h: ordered(rs) for h, rs in wild.items()}
    level.any_host = ordered(anyh)
    level.has_hosts = bool(exact or wild)
    return level
