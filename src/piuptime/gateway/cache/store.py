"""Where cached responses live.

Keys. A cached URL is a *resource id* (``rid``): route, host, path and the (normalised) query,
joined. Under it each *sub-key* holds one entry: the consumer when ``per_consumer`` is on, the
upstream when a traffic split sent the request elsewhere, then the request's values of the
response's ``Vary`` headers. A PURGE removes a resource id with every sub-key below it.

- ``MemoryStore``: a byte-bounded LRU in this process (entry sizes count body, headers and a
  fixed overhead). It lives in a ``Zone``, kept across config reloads in ``env.keep``.
- ``Zone``: one per zone name (default: the route's name); also holds the in-flight misses for
  request coalescing and the keys being refreshed in the background.
- ``RedisLayout``: the key names in Redis (``cache:<zone>:e:<rid hash>[.<sub hash>]``, variants
  ``...:<vary hash>``; Vary records under ``cache:<zone>:v:``), under the stores' own prefix.
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from collections import OrderedDict
from typing import Any

from piuptime.gateway.cache.entry import Entry
from piuptime.gateway.cache.policy import Headers, vary_values

# What a coalescing waiter receives from the request that went upstream: the entry it stored
# (None when the answer was not stored), and whether the upstream failed.
Outcome = tuple[Entry | None, bool]


class _Sub:
    __slots__ = ("keys", "vary")

    def __init__(self, vary: tuple[bytes, ...]) -> None:
        self.vary = vary
        self.keys: set[tuple[bytes, bytes]] = set()


class MemoryStore:
    """A byte-bounded LRU of entries, by resource id and sub-key."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._lru: OrderedDict[tuple[bytes, bytes], Entry] = OrderedDict()
        self._resources: dict[bytes, dict[bytes, _Sub]] = {}

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, rid: bytes, sub: bytes, headers: Headers) -> Entry | None:
        """The entry for this request (its Vary values taken from ``headers``), if any; one
        past its last useful moment too (it says the answer is EXPIRED rather than a MISS, and
        is replaced by the next answer or evicted)."""
        subs = self._resources.get(rid)
        if subs is None:
            return None
        s = subs.get(sub)
        if s is None:
            return None
        key = (rid, sub + b"\x00" + vary_values(s.vary, headers)) if s.vary else (rid, sub)
        entry = self._lru.get(key)
        if entry is None:
            return None
        self._lru.move_to_end(key)
        return entry

    def put(self, rid: bytes, sub: bytes, entry: Entry) -> bool:
        """Store ``entry`` (replacing the one of the same variant); evicts the least recently
        used entries until the store fits. False when the entry alone is larger than it."""
        if entry.size > self.max_bytes:
            return False
        subs = self._resources.get(rid)
        if subs is None:
            subs = self._resources[rid] = {}
        s = subs.get(sub)
        if s is not None and s.vary != entry.vary:
            for key in list(s.keys):  # the URL now varies on other headers: old variants go
                self._remove(key)
            subs = self._resources.setdefault(rid, {})
            s = None
        if s is None:
            s = subs[sub] = _Sub(entry.vary)
        key = (rid, sub + b"\x00" + entry.vary_key) if entry.vary else (rid, sub)
        old = self._lru.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self._lru[key] = entry
        s.keys.add(key)
        self.bytes += entry.size
        self.shrink()
        return True

    def shrink(self) -> None:
        """Evict least recently used entries while over ``max_bytes``."""
        while self.bytes > self.max_bytes and self._lru:
            key = next(iter(self._lru))
            self._remove(key)
            self.evictions += 1

    def purge(self, rid: bytes) -> int:
        """Remove every entry of a resource; how many there were."""
        subs = self._resources.get(rid)
        if subs is None:
            return 0
        keys = [k for s in subs.values() for k in s.keys]
        for key in keys:
            self._remove(key)
        return len(keys)

    def _remove(self, key: tuple[bytes, bytes]) -> None:
        entry = self._lru.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size
        rid = key[0]
        subs = self._resources.get(rid)
        if subs is None:
            return
        for name, s in list(subs.items()):
            if key in s.keys:
                s.keys.discard(key)
                if not s.keys:
                    del subs[name]
                break
        if not subs:
            del self._resources[rid]


class Zone:
    """A named cache area: its memory store (for ``store: memory`` routes) and the
    coordination of concurrent requests, kept across reloads."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.memory: MemoryStore | None = None
        # (rid, sub) of a miss on its way upstream → what its waiters will get
        self.inflight: dict[tuple[bytes, bytes], asyncio.Future[Outcome]] = {}
        # (rid, sub + vary key) of stale entries being refreshed in the background
        self.refreshing: set[tuple[bytes, bytes]] = set()

    def memory_store(self, max_bytes: int) -> MemoryStore:
        """The memory store, made on first use; a new ``max_bytes`` applies at once."""
        if self.memory is None:
            self.memory = MemoryStore(max_bytes)
        elif self.memory.max_bytes != max_bytes:
            self.memory.max_bytes = max_bytes
            self.memory.shrink()
        return self.memory


_KEEP = "cache.zones"


def zones(keep: dict[str, Any]) -> weakref.WeakValueDictionary[str, Zone]:
    """The process's zones, by name. Weakly held: a zone lives while a route's plugin (of the
    running configuration, or of one still finishing requests) uses it, so a reload keeps it
    and a zone no route names any more is freed."""
    found = keep.get(_KEEP)
    if found is None:
        found = keep[_KEEP] = weakref.WeakValueDictionary()
    return found


def zone(keep: dict[str, Any], name: str) -> Zone:
    registry = zones(keep)
    z = registry.get(name)
    if z is None:
        z = Zone(name)
        registry[name] = z
    return z


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class RedisLayout:
    """Key names in the shared KV store for one zone: entries under ``e:``, the Vary records
    (the header names a URL's variants are keyed by) under ``v:``."""

    __slots__ = ("entries", "locks", "varies")

    def __init__(self, zone_name: str) -> None:
        self.entries = f"cache:{zone_name}:e:"
        self.varies = f"cache:{zone_name}:v:"
        self.locks = f"cache:{zone_name}:r:"

    @staticmethod
    def _tail(rid: bytes, sub: bytes) -> str:
        tail = _digest(rid)
        return tail + "." + _digest(sub)[:16] if sub else tail

    def entry(self, rid: bytes, sub: bytes) -> str:
        """The key of the entry of a URL that does not vary (variants: ``variant()``)."""
        return self.entries + self._tail(rid, sub)

    def vary(self, rid: bytes, sub: bytes) -> str:
        return self.varies + self._tail(rid, sub)

    @staticmethod
    def variant(entry_key: str, vary_key: bytes) -> str:
        return entry_key + ":" + _digest(vary_key)

    def refresh_lock(self, rid: bytes, sub: bytes, vary_key: bytes) -> str:
        """Held (with a TTL) by the gateway refreshing a stale entry in the background."""
        return self.locks + self._tail(rid, sub) + ":" + _digest(vary_key)

    def purge_prefixes(self, rid: bytes) -> tuple[str, str]:
        """Key prefixes of every entry and every Vary record of a URL (all sub-keys)."""
        tail = _digest(rid)
        return self.entries + tail, self.varies + tail
