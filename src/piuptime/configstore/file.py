"""The YAML file as the config source (the default, Kong's DB-less mode): read-only.

The document is the one the gateway runs: the file as written (``${VAR}`` not expanded) at the
last successful load. Its version counts the configurations this process has loaded (1 at start,
one more per successful reload). Writes raise :class:`ReadOnlySource`; the file changes by
editing it (the gateway reloads on change or SIGHUP).
"""

from __future__ import annotations

import asyncio

from .base import (
    Change,
    ConfigStore,
    EntityDocument,
    OnVersion,
    ReadOnlySource,
    Snapshot,
    rows_document,
)

__all__ = ["FileConfigStore"]


class FileConfigStore(ConfigStore):
    kind = "file"
    writable = False

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._snapshot = Snapshot(0, rows_document([]))

    def describe(self) -> str:
        return f"file {self.path}" if self.path else "file"

    def adopt(self, snapshot: Snapshot) -> None:
        """The document the gateway now runs (set after each successful load)."""
        self._snapshot = snapshot

    async def load(self) -> Snapshot:
        return self._snapshot

    async def version(self) -> int:
        return self._snapshot.version

    async def write(self, document: EntityDocument, *, base_version: int, change: Change) -> int:
        raise ReadOnlySource(self.path)

    def watch(self, on_version: OnVersion, interval: float) -> asyncio.Task[None]:
        raise NotImplementedError("the file is watched by the app")
