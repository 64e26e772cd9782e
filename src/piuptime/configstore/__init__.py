"""Where the configuration lives: the YAML file, or a database (SQLite, PostgreSQL) that the admin
API changes and that several gateways share (see ``docs/config-store.md``).

- :mod:`.base`: the store interface (a versioned document of entities) and its errors.
- :mod:`.document`: reading YAML as written, rendering it back, validating exactly like a file.
- :mod:`.file`, :mod:`.sqlite`, :mod:`.postgres`: the stores (psycopg is imported only by the
  last, and only when ``config_store.kind`` is ``postgres``).
- :mod:`.apply`: the service that loads, changes and follows the configuration for the app.
"""

from .apply import ConfigService, ImportResult, Loaded, open_store
from .base import (
    Change,
    ConfigStore,
    ConfigStoreError,
    EntityExists,
    EntityNotFound,
    InvalidChange,
    Issue,
    ReadOnlySource,
    Snapshot,
    StoreUnavailable,
    VersionConflict,
)

__all__ = [
    "Change",
    "ConfigService",
    "ConfigStore",
    "ConfigStoreError",
    "EntityExists",
    "EntityNotFound",
    "ImportResult",
    "InvalidChange",
    "Issue",
    "Loaded",
    "ReadOnlySource",
    "Snapshot",
    "StoreUnavailable",
    "VersionConflict",
    "open_store",
]
