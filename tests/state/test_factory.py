"""open_stores: the three kinds, its argument errors, and lazy imports of the backends."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from piuptime.state import StateUnavailable, open_stores


async def test_open_each_kind(tmp_path: Path, shared_redis: str) -> None:
    for kind, kwargs in [
        ("memory", {}),
        ("sqlite", {"sqlite_path": tmp_path / "s.db"}),
        (
            "redis",
            {"redis_url": shared_redis, "redis_prefix": f"piuptime-test:{uuid.uuid4().hex}:"},
        ),
    ]:
        stores = await open_stores(kind, **kwargs)  # type: ignore[arg-type]
        try:
            assert stores.kind == kind
            await stores.kv.set("k", b"v", ttl=5.0)
            assert await stores.kv.get("k") == b"v"
            assert await stores.kv.delete("k")
            assert stores.available
        finally:
            await stores.aclose()


async def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="sqlite_path"):
        await open_stores("sqlite")
    with pytest.raises(ValueError, match="redis_url"):
        await open_stores("redis")
    with pytest.raises(ValueError, match="unknown state backend"):
        await open_stores("postgres")  # type: ignore[arg-type]


async def test_redis_is_not_contacted_at_open() -> None:
    stores = await open_stores("redis", redis_url="redis://127.0.0.1:1/0")
    try:
        with pytest.raises(StateUnavailable):
            await stores.counters.get("n")
        assert not stores.available
        assert stores.failures_total == 1
    finally:
        await stores.aclose()


def test_the_memory_backend_imports_neither_sqlite3_nor_redis() -> None:
    code = (
        "import asyncio, sys\n"
        "from piuptime.state import open_stores\n"
        "asyncio.run(open_stores('memory'))\n"
        "print(sorted(m for m in ('sqlite3', 'redis') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
