"""State behind small interfaces: counters, key-value and logs, in memory, SQLite or Redis.

``await open_stores("memory" | "sqlite" | "redis", ...)`` gives an object with ``.counters``,
``.kv``, ``.logs``, ``available``, ``failures_total`` and ``aclose()``. See ``docs/state.md``.

The backends are imported when asked for, so using memory never imports ``sqlite3`` or redis-py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .base import KV, BucketResult, Counters, Logs, StateUnavailable, Stores, WindowResult

if TYPE_CHECKING:
    from .memory import MemoryStores
    from .redis import RedisStores
    from .sqlite import SQLiteStores

__all__ = [
    "KV",
    "BucketResult",
    "Counters",
    "Logs",
    "StateUnavailable",
    "StoreKind",
    "Stores",
    "WindowResult",
    "open_stores",
]

StoreKind = Literal["memory", "sqlite", "redis"]


async def open_stores(
    kind: StoreKind,
    *,
    sqlite_path: str | Path | None = None,
    redis_url: str | None = None,
    redis_prefix: str = "piuptime:",
    redis_timeout: float = 0.25,
    redis_backoff: float = 1.0,
    memory_kv_max_bytes: int = 64 * 1024 * 1024,
    clock: Callable[[], float] | None = None,
) -> Stores:
    """Open the stores of one backend.

    - ``"memory"``: one process, nothing survives it; ``memory_kv_max_bytes`` bounds the KV.
    - ``"sqlite"``: ``sqlite_path`` (required) is opened, switched to WAL and given its tables
      now; raises :class:`StateUnavailable` when it cannot be.
    - ``"redis"``: ``redis_url`` (required); nothing is contacted until the first call, so a
      gateway starts while Redis is down (calls then raise :class:`StateUnavailable`).

    ``clock`` replaces the backend's clock (tests).
    """
    if kind == "memory":
        return _memory(memory_kv_max_bytes, clock)
    if kind == "sqlite":
        if sqlite_path is None:
            raise ValueError("open_stores('sqlite') needs sqlite_path")
        return await _sqlite(sqlite_path, clock)
    if kind == "redis":
        if redis_url is None:
            raise ValueError("open_stores('redis') needs redis_url")
        return _redis(redis_url, redis_prefix, redis_timeout, redis_backoff, clock)
    raise ValueError(f"unknown state backend {kind!r}: expected memory, sqlite or redis")


def _memory(kv_max_bytes: int, clock: Callable[[], float] | None) -> MemoryStores:
    from .memory import MemoryStores

    if clock is None:
        return MemoryStores(kv_max_bytes=kv_max_bytes)
    return MemoryStores(kv_max_bytes=kv_max_bytes, clock=clock)


async def _sqlite(path: str | Path, clock: Callable[[], float] | None) -> SQLiteStores:
    from .sqlite import SQLiteStores

    stores = SQLiteStores(path) if clock is None else SQLiteStores(path, clock=clock)
    try:
        await stores.open()
    except BaseException:
        await stores.aclose()
        raise
    return stores


def _redis(
    url: str, prefix: str, timeout: float, backoff: float, clock: Callable[[], float] | None
) -> RedisStores:
    from .redis import RedisStores

    return RedisStores(
        url,
        prefix=prefix,
        connect_timeout=timeout,
        timeout=timeout,
        backoff=backoff,
        clock=clock,
    )
