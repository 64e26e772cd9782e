"""Compile a validated config into the structures the hot path reads.

A ``Runtime`` is immutable once built. Reload builds a new one beside the old and the handler
swaps to it in one assignment; requests in flight keep the ``Runtime`` they started with.
Upstreams whose configuration did not change are carried over as the same objects, so their
connection pools (and, later, health state) survive a reload.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from piuptime.gateway.balancer import Balancer
from piuptime.gateway.router import Match, Router, RouteSpec
from piuptime.http1.client import Pool, PoolOptions

if TYPE_CHECKING:
    from piuptime.config.schema import Config, Route, Upstream

log = logging.getLogger("piuptime.runtime")


class Target:
    """One upstream target and its connection pool."""

    __slots__ = ("authority", "label", "pool", "url", "weight")

    def __init__(self, scheme: str, host: str, port: int, weight: int, options: PoolOptions):
        default_port = 443 if scheme == "https" else 80
        host_part = f"[{host}]" if ":" in host else host
        self.authority = (host_part if port == default_port else f"{host_part}:{port}").encode()
        self.url = f"{scheme}://{host_part}:{port}"
        self.label = self.url
        self.weight = weight
        self.pool = Pool(scheme, host, port, options)


class UpstreamRuntime:
    """Targets plus their balancer; ``config`` is kept to detect changes on reload."""

    __slots__ = ("balancer", "config", "name", "targets")

    def __init__(self, name: str, config: Upstream) -> None:
        self.name = name
        self.config = config
        timeouts = config.timeouts
        pool_cfg = config.pool
        tls = config.tls
        self.targets: list[Target] = []
        for t in config.targets:
            options = PoolOptions(
                max_connections=pool_cfg.max_connections,
                max_idle=pool_cfg.max_idle,
                idle_timeout=pool_cfg.idle_timeout,
                connect_timeout=timeouts.connect,
                read_timeout=timeouts.read,
                tls_verify=tls.verify,
                ca_file=tls.ca,
                server_hostname=tls.server_name,
            )
            self.targets.append(Target(t.scheme, t.host, t.port, t.weight, options))
        self.balancer = Balancer([t.weight for t in self.targets])

    async def aclose(self) -> None:
        for t in self.targets:
            await t.pool.aclose()


class CompiledRoute:
    """What the proxy needs per matched route, precomputed at load."""

    __slots__ = (
        "host_mode",
        "host_value",
        "is_prefix",
        "max_body_bytes",
        "name",
        "rewrite",
        "strip_prefix",
        "upstream",
    )

    def __init__(self, route: Route, upstream: UpstreamRuntime) -> None:
        self.name = route.name
        self.upstream = upstream
        self.is_prefix = route.match.path.endswith("/")
        self.strip_prefix = route.strip_prefix
        self.max_body_bytes = route.max_body_bytes
        self.rewrite = _compile_template(route.rewrite) if route.rewrite else None
        mode = route.host_header
        self.host_mode = mode if mode in ("pass", "target") else "literal"
        self.host_value = mode.encode() if self.host_mode == "literal" else b""

    def upstream_path(self, path: bytes, query: bytes, match: Match) -> bytes:
        """The request-target sent upstream: rewrite or strip the matched part, keep the query."""
        if self.rewrite is not None:
            new = _expand(self.rewrite, match.params)
            if self.is_prefix:
                rest = path[match.prefix_len :]
                new = new.rstrip(b"/") + rest if rest and rest != b"/" else new
        elif self.strip_prefix:
            new = path[match.prefix_len :] or b"/"
            if new[:1] != b"/":
                new = b"/" + new
        else:
            new = path
        return new + b"?" + query if query else new

    def upstream_host(self, request_host: bytes, target: Target) -> bytes:
        if self.host_mode == "pass":
            return request_host or target.authority
        if self.host_mode == "target":
            return target.authority
        return self.host_value


def _compile_template(template: str) -> tuple[bytes | tuple[str], ...]:
    """``/v2/{id}/x`` → (b"/v2/", ("id",), b"/x"); placeholders were checked by config."""
    parts: list[bytes | tuple[str]] = []
    rest = template
    while rest:
        start = rest.find("{")
        if start < 0:
            parts.append(rest.encode())
            break
        end = rest.index("}", start)
        if start:
            parts.append(rest[:start].encode())
        parts.append((rest[start + 1 : end],))
        rest = rest[end + 1 :]
    return tuple(parts)


def _expand(parts: tuple[bytes | tuple[str], ...], params: dict[str, str]) -> bytes:
    out = []
    for p in parts:
        out.append(p if isinstance(p, bytes) else params[p[0]].encode("utf-8", "surrogateescape"))
    return b"".join(out)


class Runtime:
    """One compiled configuration: router, routes and upstreams."""

    __slots__ = ("config", "router", "routes", "upstreams", "via")

    def __init__(
        self,
        config: Config,
        router: Router,
        routes: list[CompiledRoute],
        upstreams: dict[str, UpstreamRuntime],
    ):
        self.config = config
        self.router = router
        self.routes = routes
        self.upstreams = upstreams
        self.via = f"1.1 {config.gateway.via}".encode()


def compile_runtime(config: Config, previous: Runtime | None = None) -> Runtime:
    """Build a runtime, reusing upstreams from ``previous`` whose config is unchanged."""
    old = previous.upstreams if previous is not None else {}
    upstreams: dict[str, UpstreamRuntime] = {}
    for name, ucfg in config.upstreams.items():
        prior = old.get(name)
        if prior is not None and prior.config == ucfg:
            upstreams[name] = prior
        else:
            upstreams[name] = UpstreamRuntime(name, ucfg)
    routes: list[CompiledRoute] = []
    specs: list[RouteSpec] = []
    for r in config.routes:
        compiled = CompiledRoute(r, upstreams[r.upstream])
        routes.append(compiled)
        specs.append(_spec(r, compiled))
    return Runtime(config, Router(specs), routes, upstreams)


def _spec(r: Route, compiled: CompiledRoute) -> RouteSpec:
    m = r.match
    hosts: Iterable[str]
    if m.host is None:
        hosts = ()
    elif isinstance(m.host, str):
        hosts = (m.host,)
    else:
        hosts = m.host
    return RouteSpec(
        name=r.name,
        path=m.path,
        methods=frozenset(x.encode() for x in m.methods) if m.methods else None,
        hosts=tuple(hosts),
        headers=tuple((k.lower().encode(), v.encode()) for k, v in m.headers.items()),
        priority=r.priority,
        payload=compiled,
    )


def retired_upstreams(old: Runtime, new: Runtime) -> list[UpstreamRuntime]:
    """Upstreams of ``old`` that ``new`` no longer uses (their pools can be closed)."""
    kept = {id(u) for u in new.upstreams.values()}
    return [u for u in old.upstreams.values() if id(u) not in kept]
