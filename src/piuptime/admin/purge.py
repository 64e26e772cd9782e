"""Cache purge from the admin API, through the running route's ``cache`` plugin and its store.

A cached URL's resource id is ``route \\0 host \\0 path \\0 query`` (see
``piuptime.gateway.cache.store``); a purge removes a resource id with every variant below it,
as a ``PURGE`` request on the data plane does.

- **memory store**: by exact ``path`` (with ``query`` and ``host`` when given; otherwise every
  query and host) or by ``prefix`` (every path starting with it); the matching resource ids of
  this route are found in the store and each is purged.
- **Redis store**: keys are hashes of the resource id, so only an exact URL (``path`` and
  ``host``, ``query`` if any) or the whole zone (``prefix: /``) can be purged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from piuptime.state import StateUnavailable

if TYPE_CHECKING:
    from piuptime.gateway.runtime import Runtime

__all__ = ["PurgeError", "PurgeOutcome", "purge_cache"]


class PurgeError(Exception):
    """``status`` 404 (no such route, no cache), 422 (a purge this store cannot do) or 503."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class PurgeOutcome:
    store: str
    purged: int


def _cache_plugin(runtime: Runtime, route: str) -> Any:
    for compiled in runtime.routes:
        if compiled.name == route:
            pipeline = compiled.pipeline
            for plugin in pipeline.plugins if pipeline is not None else ():
                if plugin.name == "cache":
                    return plugin
            raise PurgeError(404, "no_cache", f"route {route!r} has no cache plugin")
    raise PurgeError(404, "route_not_found", f"no route named {route!r}")


def _normal_query(plugin: Any, query: bytes) -> bytes:
    """The query as the plugin keys it (dropped, filtered or sorted per its config)."""
    if not query:
        return b""
    if plugin.drop_query:
        return b""
    if plugin.ignore_params or plugin.sort_query:
        params = [
            p for p in query.split(b"&") if p and p.partition(b"=")[0] not in plugin.ignore_params
        ]
        if plugin.sort_query:
            params.sort()
        return b"&".join(params)
    return query


async def purge_cache(
    runtime: Runtime,
    route: str,
    *,
    path: str | None = None,
    prefix: str | None = None,
    query: str | None = None,
    host: str | None = None,
) -> PurgeOutcome:
    if (path is None) == (prefix is None):
        raise PurgeError(422, "invalid_purge", "give exactly one of path (one URL) and prefix")
    if prefix is not None and query is not None:
        raise PurgeError(422, "invalid_purge", "query goes with path, not with prefix")
    plugin = _cache_plugin(runtime, route)
    route_b = plugin.route_bytes
    host_b = host.lower().encode() if host is not None else None
    query_b = _normal_query(plugin, query.encode()) if query is not None else None
    if plugin.memory is not None:
        store = plugin.memory
        chosen: list[bytes] = []
        want = (path if path is not None else prefix or "").encode()
        for rid in list(store._resources):
            parts = rid.split(b"\x00", 3)
            if len(parts) != 4 or parts[0] != route_b:
                continue
            _, rhost, rpath, rquery = parts
            if host_b is not None and rhost != host_b:
                continue
            if path is not None:
                if rpath != want or (query_b is not None and rquery != query_b):
                    continue
            elif not rpath.startswith(want):
                continue
            chosen.append(rid)
        return PurgeOutcome("memory", sum(store.purge(rid) for rid in chosen))
    kv = plugin.kv
    layout = plugin.layout
    if path is not None:
        if host_b is None:
            raise PurgeError(
                422,
                "host_required",
                f"route {route!r} caches in Redis, where a URL is stored under a hash of "
                "host, path and query: give host (the Host header clients send)",
            )
        rid = b"%s\x00%s\x00%s\x00%s" % (route_b, host_b, path.encode(), query_b or b"")
        entries, varies = layout.purge_prefixes(rid)
    elif prefix == "/":
        entries, varies = layout.entries, layout.varies
    else:
        raise PurgeError(
            422,
            "prefix_unsupported",
            f"route {route!r} caches in Redis, where keys are hashed: purge one URL (path and "
            "host) or everything (prefix: /)",
        )
    try:
        purged = int(await kv.delete_prefix(entries))
        await kv.delete_prefix(varies)
    except StateUnavailable:
        plugin.errors.inc()
        raise PurgeError(
            503,
            "cache_store_unavailable",
            "the cache store (Redis) cannot be reached; nothing was purged",
        ) from None
    return PurgeOutcome("redis", purged)
