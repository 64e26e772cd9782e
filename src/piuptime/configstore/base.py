"""The config store interface: a versioned document of entities, and the errors around it.

A store keeps the *entity* sections of the configuration (``upstreams``, ``consumers``,
``routes``, ``plugins``) with one version number. Version 0 is the empty store that was never
written. Every write is one transaction that checks the version it was based on (optimistic
concurrency), bumps it by one, records what changed in the store's history and, for PostgreSQL,
notifies every gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from piuptime.config import ConfigIssue

__all__ = [
    "Change",
    "ConfigStore",
    "ConfigStoreError",
    "EntityDocument",
    "EntityExists",
    "EntityNotFound",
    "HistoryEntry",
    "InvalidChange",
    "Issue",
    "ReadOnlySource",
    "Row",
    "Snapshot",
    "StoreUnavailable",
    "VersionConflict",
    "document_rows",
    "rows_document",
]

log = logging.getLogger("piuptime.configstore")

#: ``{"upstreams": {name: value}, "consumers": {...}, "routes": [route, ...], "plugins": {...}}``
EntityDocument = dict[str, Any]

#: One stored entity: (section, name, position, JSON text of its value).
Row = tuple[str, str, int, str]


# --------------------------------------------------------------------------------------------
# errors


class ConfigStoreError(Exception):
    """Base of what a config change can run into."""


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem with a document or a change: the path (``routes[0].match.path``), the
    message, and the line and column in the YAML rendering when known (0 otherwise)."""

    path: str
    message: str
    line: int = 0
    column: int = 0

    @classmethod
    def of(cls, issue: ConfigIssue) -> Issue:
        return cls(issue.path, issue.message, issue.line, issue.column)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "line": self.line,
            "column": self.column,
            "message": self.message,
        }

    def __str__(self) -> str:
        where = f"{self.line}:{self.column}: " if self.line else ""
        return f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"


class InvalidChange(ConfigStoreError):
    """The changed document does not validate; nothing was written."""

    def __init__(self, issues: list[Issue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


class VersionConflict(ConfigStoreError):
    """The document changed since the version the change was based on."""

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(
            f"the configuration is at version {current}, not {expected}: "
            "read it again and retry the change"
        )
        self.expected = expected
        self.current = current


class ReadOnlySource(ConfigStoreError):
    """The config source is the YAML file."""

    def __init__(self, path: str | None = None) -> None:
        where = f" ({path})" if path else ""
        super().__init__(
            f"the config source is the YAML file{where}; edit it and reload "
            "(or set config_store.kind to sqlite or postgres to change it through the API)"
        )


class EntityNotFound(ConfigStoreError):
    def __init__(self, section: str, name: str) -> None:
        super().__init__(f"no {_singular(section)} named {name!r}")
        self.section = section
        self.name = name


class EntityExists(ConfigStoreError):
    def __init__(self, section: str, name: str) -> None:
        super().__init__(f"a {_singular(section)} named {name!r} exists already; PUT replaces it")
        self.section = section
        self.name = name


class StoreUnavailable(ConfigStoreError):
    """The database cannot be reached or refused the operation (locked, disk full, ...)."""


def _singular(section: str) -> str:
    return {"plugins": "global plugin"}.get(section, section.rstrip("s"))


# --------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The stored document at one version."""

    version: int
    document: EntityDocument
    updated_at: float | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """Who changed what, for the history: ``action`` is create, update, delete, import or
    seed; ``target`` names the entity (``routes/sensors``) or ``config``."""

    actor: str
    action: str
    target: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    version: int
    time: float
    actor: str
    action: str
    target: str
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "time": self.time,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "detail": self.detail,
        }


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def document_rows(document: EntityDocument) -> dict[tuple[str, str], tuple[int, str]]:
    """``(section, name) → (position, JSON text)`` for every entity of a document."""
    rows: dict[tuple[str, str], tuple[int, str]] = {}
    for section, value in document.items():
        if section == "routes":
            for position, route in enumerate(value):
                rows[(section, str(route["name"]))] = (position, _dumps(route))
        else:
            for position, (name, body) in enumerate(value.items()):
                rows[(section, str(name))] = (position, _dumps(body))
    return rows


def rows_document(rows: Iterable[tuple[str, str, int, str | bytes]]) -> EntityDocument:
    """The document back from stored rows (any order)."""
    by_section: dict[str, list[tuple[int, str, Any]]] = {}
    for section, name, position, body in rows:
        by_section.setdefault(section, []).append((position, name, orjson.loads(body)))
    doc: EntityDocument = {"upstreams": {}, "consumers": {}, "routes": [], "plugins": {}}
    for section, items in by_section.items():
        items.sort(key=lambda item: (item[0], item[1]))
        if section == "routes":
            doc[section] = [body for _, _, body in items]
        else:
            doc[section] = {name: body for _, name, body in items}
    return doc


def row_changes(
    current: dict[tuple[str, str], tuple[int, str]],
    wanted: dict[tuple[str, str], tuple[int, str]],
) -> tuple[list[Row], list[tuple[str, str]]]:
    """What to upsert and delete to turn ``current`` rows into ``wanted`` ones."""
    upserts = [(s, n, p, b) for (s, n), (p, b) in wanted.items() if current.get((s, n)) != (p, b)]
    deletes = [key for key in current if key not in wanted]
    return upserts, deletes


# --------------------------------------------------------------------------------------------
# the interface

OnVersion = Callable[[int], None]


class ConfigStore(ABC):
    """Where the entity document lives. Implementations: file (read-only), SQLite, PostgreSQL."""

    kind: str = ""
    writable: bool = True

    async def open(self) -> None:
        """Connect and create the tables if needed. Raises :class:`StoreUnavailable`."""
        return None

    @abstractmethod
    async def load(self) -> Snapshot:
        """The current document and its version (one consistent read)."""

    @abstractmethod
    async def version(self) -> int:
        """The current version (cheap)."""

    @abstractmethod
    async def write(self, document: EntityDocument, *, base_version: int, change: Change) -> int:
        """Replace the document in one transaction if the stored version is still
        ``base_version`` (else :class:`VersionConflict`); returns the new version."""

    async def history(self, limit: int = 50) -> list[HistoryEntry]:
        """The latest changes, newest first."""
        return []

    async def aclose(self) -> None:
        """Close connections and stop watching."""
        return None

    def describe(self) -> str:
        """Where the document lives, for messages (no password)."""
        return self.kind

    # -- watching for changes made elsewhere ---------------------------------------------

    def watch(self, on_version: OnVersion, interval: float) -> asyncio.Task[None]:
        """Call ``on_version(version)`` with the stored version every ``interval`` seconds
        (and as soon as a change is announced, where the store can announce). A failed check is
        logged once per outage and tried again at the next tick."""
        return asyncio.get_running_loop().create_task(self._poll(on_version, interval))

    async def _poll(self, on_version: OnVersion, interval: float) -> None:
        failing = False
        while True:
            try:
                version = await self.version()
            except StoreUnavailable as exc:
                if not failing:
                    log.warning("config store %s: cannot check the version: %s", self.kind, exc)
                failing = True
            else:
                if failing:
                    log.info("config store %s: reachable again", self.kind)
                failing = False
                on_version(version)
            await asyncio.sleep(interval)


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait for it to end. Cancelled again until it does: a library that
    finishes an operation at the moment it is cancelled may swallow one cancellation."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()


def now() -> float:
    return time.time()
