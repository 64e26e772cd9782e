"""The config service: loads the configuration from its source, changes it, and keeps the running
gateway in step with it.

One :class:`ConfigService` per gateway process (``App.config_service``), over one
:class:`~piuptime.configstore.base.ConfigStore`:

- **Loading.** The bootstrap file is read and validated on its own (errors point into the file);
  in database mode its non-entity sections are joined with the stored entities and the whole
  document is validated again, exactly like a file (``<sqlite ./piuptime.db v7>:12:5: ...``).
- **Seeding.** A database that was never written (version 0) is seeded with the entities of
  the bootstrap file on the first start; afterwards the file's entities are ignored (a warning
  says so) and ``piuptime config import`` replaces the stored ones.
- **Changing.** :meth:`ConfigService.change` loads the stored document, applies a change to it,
  validates the whole document, and hands the result to the app (:class:`Applier`), which
  compiles it and then, under its reload lock, has the store write it (one transaction, version
  + 1, checked against the version the change was based on) before swapping it in with one
  assignment. Nothing changes when any step fails. Without ``expected_version`` a change that
  lost a race with another writer is retried on the new document; with one it is a conflict.
- **Following.** The store reports its version (NOTIFY, a poll); a version newer than the one
  running makes the app reload, one reload at a time, newest version wins. A version this gateway
  could not load (an unset ``${VAR}`` here, ...) is tried again only after a back-off, while
  a newer version is tried at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from piuptime.config import Config, ConfigError, load_config, parse_config
from piuptime.config.configstore import ConfigStoreConfig
from piuptime.config.schema import StoreConfig

from .base import (
    Change,
    ConfigStore,
    EntityDocument,
    EntityExists,
    EntityNotFound,
    HistoryEntry,
    InvalidChange,
    Issue,
    ReadOnlySource,
    Snapshot,
    VersionConflict,
    cancel,
)
from .document import (
    ENTITY_SECTIONS,
    check_data,
    contains_redacted,
    entities_of,
    invalid,
    load_raw,
    merge,
    render,
    validate,
)
from .file import FileConfigStore

if TYPE_CHECKING:
    from piuptime.observe.metrics import Metrics

__all__ = [
    "Applier",
    "ConfigService",
    "ImportResult",
    "Loaded",
    "open_store",
    "read_config_file",
]

log = logging.getLogger("piuptime.configstore")

T = TypeVar("T")

#: Entity kinds of the API, by their section
SECTIONS = ENTITY_SECTIONS


@dataclass(frozen=True, slots=True)
class Loaded:
    """A validated configuration and where it came from."""

    config: Config
    version: int
    bootstrap: dict[str, Any]  # the non-entity sections as written in the file
    entities: EntityDocument  # the entity sections as written / stored


@dataclass(frozen=True, slots=True)
class ImportResult:
    version: int
    added: dict[str, list[str]] = field(default_factory=dict)
    removed: dict[str, list[str]] = field(default_factory=dict)
    changed: dict[str, list[str]] = field(default_factory=dict)
    ignored_sections: list[str] = field(default_factory=list)


class Applier(Protocol):
    """What the service needs from the running app (``piuptime.app.App``)."""

    @property
    def config_version(self) -> int: ...

    async def apply_change(
        self, loaded: Loaded, commit: Callable[[], Awaitable[int]], reason: str
    ) -> int:
        """Compile ``loaded``, ``await commit()`` (the store write; its version is returned),
        then swap it in. Raises :class:`InvalidChange` when it does not compile, and whatever
        ``commit`` raises; nothing changes then."""
        ...

    async def sync_config(self, version: int) -> bool:
        """Reload from the store if ``version`` is newer than the running one."""
        ...


def open_store(settings: ConfigStoreConfig, store: StoreConfig, path: Path | None) -> ConfigStore:
    """The store ``config_store`` asks for (nothing is opened yet)."""
    if settings.kind == "sqlite":
        from .sqlite import SQLiteConfigStore

        return SQLiteConfigStore(settings.path or store.sqlite)
    if settings.kind == "postgres":
        try:
            from .postgres import PostgresConfigStore
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError(
                [
                    _issue_at(
                        str(path or "<config>"),
                        "config_store.kind",
                        f"kind: postgres needs psycopg: install piuptime[postgres] ({exc})",
                    )
                ]
            ) from None
        assert settings.dsn is not None
        return PostgresConfigStore(settings.dsn)
    return FileConfigStore(str(path) if path is not None else None)


def _issue_at(file: str, path: str, message: str) -> Any:
    from piuptime.config import ConfigIssue

    return ConfigIssue(file, 0, 0, path, message)


def read_config_file(
    path: Path, env: Mapping[str, str] | None = None
) -> tuple[Config, dict[str, Any]]:
    """The file validated (errors as ``load_config`` gives them) and its data as written."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        config = load_config(path, env)  # raises the positioned error; if not, it was a race
        return config, {}
    config = parse_config(text, str(path), env)
    try:
        raw = load_raw(text, str(path))
    except ConfigError:  # pragma: no cover - parse_config read the same text
        raw = {}
    return config, raw


class ConfigService:
    """Loads, changes and follows the configuration of one gateway (see the module doc)."""

    def __init__(
        self,
        store: ConfigStore,
        path: Path | None,
        *,
        poll_interval: float = 5.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.path = path
        self.poll_interval = poll_interval
        self.env = env
        self.version = 0  # of the running document
        self.bootstrap: dict[str, Any] = {}
        self.entities: EntityDocument = entities_of({})
        self.applier: Applier | None = None
        self.failures_total = 0  # versions this gateway could not load
        self._wanted = 0
        self._failed = 0
        self._retry_at = 0.0
        self._failed_backoff = 0.0
        self._wake = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._sync_task: asyncio.Task[None] | None = None

    @classmethod
    def for_config(
        cls, config: Config, path: Path | None, env: Mapping[str, str] | None = None
    ) -> ConfigService:
        settings = config.config_store
        store = open_store(settings, config.store, path)
        return cls(store, path, poll_interval=settings.poll_interval, env=env)

    @property
    def kind(self) -> str:
        return self.store.kind

    @property
    def database(self) -> bool:
        """True when the store is a database (the API may change the configuration)."""
        return self.store.writable

    def _name(self, version: int) -> str:
        return f"<{self.store.describe()} v{version}>"

    # -- loading ---------------------------------------------------------------------------

    async def start(self, config: Config) -> Loaded:
        """At start-up, with ``config`` the validated bootstrap file: the document to run."""
        if not self.database:
            raw = await asyncio.to_thread(self._read_raw)
            loaded = Loaded(config, 1, _bootstrap_of(raw), entities_of(raw))
            self.adopt(loaded)
            return loaded
        if self.path is None:
            raise ValueError(
                f"config_store kind {self.kind} needs the bootstrap file; start with -c FILE"
            )
        _, raw = await asyncio.to_thread(read_config_file, self.path, self.env)
        bootstrap, from_file = _bootstrap_of(raw), entities_of(raw)
        await self.store.open()
        snapshot = await self.store.load()
        if snapshot.version == 0 and any(from_file.values()):
            await self._seed(bootstrap, from_file)
            snapshot = await self.store.load()
        elif snapshot.version > 0 and any(from_file.values()):
            log.warning(
                "config_store is %s (version %d): the %s in %s are ignored; the database holds "
                "the configuration (`piuptime config import` replaces it with a file's)",
                self.store.describe(),
                snapshot.version,
                ", ".join(s for s in ENTITY_SECTIONS if from_file.get(s)),
                self.path,
            )
        loaded = await self._validated(bootstrap, snapshot)
        self.adopt(loaded)
        return loaded

    def _read_raw(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            return load_raw(self.path.read_bytes().decode("utf-8-sig"), str(self.path))
        except (OSError, UnicodeDecodeError, ConfigError):
            return {}

    async def _seed(self, bootstrap: dict[str, Any], entities: EntityDocument) -> None:
        await asyncio.to_thread(validate, merge(bootstrap, entities), str(self.path), self.env)
        counts = {s: len(entities[s]) for s in ENTITY_SECTIONS}
        change = Change("piuptime", "seed", "config", {"from": str(self.path), "counts": counts})
        try:
            version = await self.store.write(entities, base_version=0, change=change)
        except VersionConflict:
            log.info("config store: another gateway seeded %s first", self.store.describe())
            return
        log.info(
            "config store: seeded %s from %s (version %d)",
            self.store.describe(),
            self.path,
            version,
        )

    async def _validated(self, bootstrap: dict[str, Any], snapshot: Snapshot) -> Loaded:
        whole = merge(bootstrap, snapshot.document)
        config = await asyncio.to_thread(validate, whole, self._name(snapshot.version), self.env)
        return Loaded(config, snapshot.version, bootstrap, snapshot.document)

    async def load(self) -> Loaded:
        """For a reload: the bootstrap file again and, in database mode, the stored entities;
        validated. Raises :class:`ConfigError`, ``OSError``, :class:`StoreUnavailable`."""
        if self.path is None:
            raise ValueError("no config file to load")
        config, raw = await asyncio.to_thread(read_config_file, self.path, self.env)
        if not self.database:
            return Loaded(config, self.version + 1, _bootstrap_of(raw), entities_of(raw))
        snapshot = await self.store.load()
        return await self._validated(_bootstrap_of(raw), snapshot)

    def adopt(self, loaded: Loaded) -> None:
        """``loaded`` now runs (the app calls this after each swap)."""
        self.version = loaded.version
        self.bootstrap = loaded.bootstrap
        self.entities = loaded.entities
        if isinstance(self.store, FileConfigStore):
            self.store.adopt(Snapshot(loaded.version, loaded.entities, time.time()))

    # -- reading -----------------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        """The document the API shows: the stored one (database), the running one (file)."""
        return await self.store.load()

    async def export(self) -> tuple[int, dict[str, Any]]:
        """The whole document (the bootstrap sections and the entities), as written."""
        snapshot = await self.snapshot()
        return snapshot.version, merge(self.bootstrap, snapshot.document)

    async def history(self, limit: int = 50) -> list[HistoryEntry]:
        return await self.store.history(limit)

    # -- changing --------------------------------------------------------------------------

    async def change(
        self,
        mutate: Callable[[EntityDocument], T],
        *,
        actor: str,
        action: str,
        target: str,
        expected_version: int | None = None,
        detail: Callable[[EntityDocument, EntityDocument], dict[str, Any]] | None = None,
    ) -> tuple[int, T]:
        """Apply ``mutate`` to a copy of the stored document (it may raise
        :class:`EntityNotFound`, :class:`EntityExists`, :class:`InvalidChange`), validate,
        write, apply. Returns the new version and what ``mutate`` returned."""
        if not self.database:
            raise ReadOnlySource(str(self.path) if self.path is not None else None)
        for _ in range(5):
            snapshot = await self.store.load()
            if expected_version is not None and snapshot.version != expected_version:
                raise VersionConflict(expected_version, snapshot.version)
            document = copy.deepcopy(snapshot.document)
            result = mutate(document)
            loaded = await self._candidate(document, snapshot.version)
            extra = detail(snapshot.document, loaded.entities) if detail is not None else {}
            record = Change(actor, action, target, {"base_version": snapshot.version, **extra})

            def commit(
                entities: EntityDocument = loaded.entities,
                base: int = snapshot.version,
                record: Change = record,
                bootstrap: dict[str, Any] = loaded.bootstrap,
            ) -> Awaitable[int]:
                if bootstrap is not self.bootstrap:  # the file was reloaded meanwhile
                    raise _Redo(base, base)
                return self.store.write(entities, base_version=base, change=record)

            try:
                if self.applier is not None:
                    version = await self.applier.apply_change(
                        loaded, commit, f"{action} {target} by {actor}"
                    )
                else:
                    version = await commit()
            except VersionConflict as exc:
                if expected_version is not None and not isinstance(exc, _Redo):
                    raise
                continue  # another writer won the race: redo the change on its document
            return version, result
        current = await self.store.version()
        raise VersionConflict(snapshot.version, current)

    async def _candidate(self, document: EntityDocument, base: int) -> Loaded:
        check_data(document)
        whole = merge(self.bootstrap, document)
        try:
            config = await asyncio.to_thread(validate, whole, "<change>", self.env)
        except ConfigError as exc:
            raise invalid(exc) from None
        return Loaded(config, base + 1, self.bootstrap, entities_of(document))

    async def import_document(
        self,
        text: str,
        *,
        actor: str,
        expected_version: int | None = None,
        filename: str = "<import>",
    ) -> ImportResult:
        """Replace the stored entities with those of YAML ``text`` (one version); its other
        sections are ignored (they come from the bootstrap file) and listed."""
        if not self.database:
            raise ReadOnlySource(str(self.path) if self.path is not None else None)
        try:
            raw = load_raw(text, filename)
        except ConfigError as exc:
            raise invalid(exc) from None
        marked = contains_redacted({s: raw.get(s) for s in ENTITY_SECTIONS})
        if marked is not None:
            raise InvalidChange(
                [
                    Issue(
                        marked,
                        "this document has redacted secrets (<redacted>); export it with "
                        "secrets kept to import it again",
                    )
                ]
            )
        ignored = [k for k in raw if k not in ENTITY_SECTIONS]

        def replace_all(document: EntityDocument) -> None:
            for section in ENTITY_SECTIONS:
                document[section] = raw.get(section)

        diff: dict[str, Any] = {}

        def describe(before: EntityDocument, after: EntityDocument) -> dict[str, Any]:
            diff.clear()
            diff.update(_diff(before, after))
            return {**diff, "ignored_sections": ignored}

        version, _ = await self.change(
            replace_all,
            actor=actor,
            action="import",
            target="config",
            expected_version=expected_version,
            detail=describe,
        )
        return ImportResult(
            version,
            diff.get("added", {}),
            diff.get("removed", {}),
            diff.get("changed", {}),
            ignored,
        )

    # -- following the store ---------------------------------------------------------------

    def start_watch(self, applier: Applier) -> None:
        """Follow the store: reload the app when a newer version shows up."""
        self.applier = applier
        if not self.database:
            return
        self._watch_task = self.store.watch(self._on_version, self.poll_interval)
        self._sync_task = asyncio.get_running_loop().create_task(self._sync())

    def _on_version(self, version: int) -> None:
        self._wanted = max(self._wanted, version)
        applier = self.applier
        if applier is None or self._wanted <= applier.config_version:
            return
        if self._wanted == self._failed and time.monotonic() < self._retry_at:
            return
        self._wake.set()

    async def _sync(self) -> None:
        assert self.applier is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            wanted = self._wanted
            if await self.applier.sync_config(wanted):
                self._failed, self._failed_backoff = 0, 0.0
                continue
            if self.applier.config_version >= wanted:
                continue
            self.failures_total += 1
            if wanted != self._failed:
                self._failed, self._failed_backoff = wanted, self.poll_interval
            else:
                self._failed_backoff = min(self._failed_backoff * 2, 300.0)
            self._retry_at = time.monotonic() + self._failed_backoff

    @property
    def connected(self) -> bool:
        """Whether the store is followed live (the PostgreSQL listener is connected)."""
        return bool(getattr(self.store, "listening", True))

    def register_metrics(self, metrics: Metrics) -> None:
        metrics.gauge(
            "config_version",
            "Version of the configuration this gateway runs (database: the stored version; "
            "file: configurations loaded since start).",
            read=lambda: [((), float(self.version))],
        )
        if self.kind == "postgres":
            metrics.gauge(
                "config_store_connected",
                "1 while the PostgreSQL config listener is connected (changes arrive at once), "
                "0 while it reconnects (the gateway serves its last configuration).",
                read=lambda: [((), 1.0 if self.connected else 0.0)],
            )

    def audit_log(self) -> Any:
        """The admin audit log to use with this store: PostgreSQL's (shared by the gateways)
        for ``postgres``, else None (the admin API's own SQLite log)."""
        if self.kind != "postgres":
            return None
        from .audit_pg import PostgresAuditLog
        from .postgres import PostgresConfigStore

        assert isinstance(self.store, PostgresConfigStore)
        return PostgresAuditLog(self.store)

    async def stop_watch(self) -> None:
        """Stop following the store (at shutdown, before the drain)."""
        await cancel(self._sync_task)
        await cancel(self._watch_task)
        self._sync_task = self._watch_task = None

    async def aclose(self) -> None:
        await self.stop_watch()
        with contextlib.suppress(Exception):
            await self.store.aclose()


class _Redo(VersionConflict):
    """The bootstrap file was reloaded between validating a change and writing it: validate
    the change again with the new one (whatever the change's ``expected_version``)."""


# --------------------------------------------------------------------------------------------
# entity operations on a document (used by the admin API and the CLI)


def _bootstrap_of(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k not in ENTITY_SECTIONS}


def _diff(before: EntityDocument, after: EntityDocument) -> dict[str, Any]:
    added: dict[str, list[str]] = {}
    removed: dict[str, list[str]] = {}
    changed: dict[str, list[str]] = {}
    for section in ENTITY_SECTIONS:
        old = dict(items(before, section))
        new = dict(items(after, section))
        if a := sorted(set(new) - set(old)):
            added[section] = a
        if r := sorted(set(old) - set(new)):
            removed[section] = r
        if c := sorted(n for n in set(old) & set(new) if old[n] != new[n]):
            changed[section] = c
    return {"added": added, "removed": removed, "changed": changed}


def items(document: EntityDocument, section: str) -> list[tuple[str, Any]]:
    """``(name, config)`` of each entity of ``section``, in order; a route's config is the
    route without its name."""
    value: Any = document.get(section) or ({} if section != "routes" else [])
    if section == "routes":
        return [
            (str(route.get("name")), {k: v for k, v in route.items() if k != "name"})
            for route in value
        ]
    return [(str(name), body) for name, body in value.items()]


def get_entity(document: EntityDocument, section: str, name: str) -> Any:
    for found, body in items(document, section):
        if found == name:
            return body
    raise EntityNotFound(section, name)


def put_entity(document: EntityDocument, section: str, name: str, body: Any) -> bool:
    """Create or replace; True when it was created."""
    if section == "routes":
        route = {"name": name, **{k: v for k, v in body.items() if k != "name"}}
        routes = document.setdefault("routes", [])
        for index, existing in enumerate(routes):
            if str(existing.get("name")) == name:
                routes[index] = route
                return False
        routes.append(route)
        return True
    entries = document.setdefault(section, {})
    created = name not in entries
    entries[name] = body
    return created


def create_entity(document: EntityDocument, section: str, name: str, body: Any) -> None:
    if any(found == name for found, _ in items(document, section)):
        raise EntityExists(section, name)
    put_entity(document, section, name, body)


def delete_entity(document: EntityDocument, section: str, name: str) -> Any:
    """Remove it; returns its config."""
    old = get_entity(document, section, name)
    if section == "routes":
        document["routes"] = [r for r in document["routes"] if str(r.get("name")) != name]
    else:
        del document[section][name]
    return old


def export_text(version: int, document: Mapping[str, Any], source: str) -> str:
    """The YAML export: a comment line, then the document."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    head = f"# piuptime configuration, version {version} of {source}, exported {stamp}\n"
    return head + render(document)


def with_version(loaded: Loaded, version: int) -> Loaded:
    return replace(loaded, version=version)
