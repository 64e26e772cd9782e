"""The ``config_store:`` section: defaults, and each refusal at its key."""

from __future__ import annotations

import sys

import pytest

from piuptime.config import ConfigError, parse_config


def test_defaults_and_kinds() -> None:
    assert parse_config("{}\n").config_store.kind == "file"
    sqlite = parse_config("config_store: {kind: sqlite, poll_interval: 250ms}\n").config_store
    assert sqlite.kind == "sqlite" and sqlite.path is None and sqlite.poll_interval == 0.25
    pg = parse_config("config_store: {kind: postgres, dsn: 'postgresql://h/db'}\n").config_store
    assert pg.dsn == "postgresql://h/db"


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("config_store: {kind: mysql}", "config_store.kind", "expected one of 'file', 'sqlite'"),
        ("config_store: {kind: postgres}", "config_store.kind", "kind: postgres needs dsn"),
        (
            "config_store: {kind: postgres, dsn: 'mysql://h/db'}",
            "config_store.dsn",
            "expected a PostgreSQL URL",
        ),
        (
            "config_store: {kind: sqlite, dsn: 'postgresql://h/db'}",
            "config_store.dsn",
            "dsn is only used with kind: postgres (kind is sqlite)",
        ),
        (
            "config_store: {kind: postgres, dsn: 'postgresql://h/db', path: x.db}",
            "config_store.path",
            "path is only used with kind: sqlite",
        ),
        ("config_store: {kind: sqlite, path: ''}", "config_store.path", "expected a file path"),
        ("config_store: {poll_interval: 0s}", "config_store.poll_interval", ""),
        ("config_store: {kind: file, url: x}", "config_store.url", "unknown key 'url'"),
    ],
)
def test_refusals_point_at_the_key(text: str, where: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text + "\n", "c.yaml")
    [issue] = info.value.errors
    assert issue.path == where and message in issue.message, str(issue)
    assert issue.line == 1


def test_postgres_without_psycopg_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    with pytest.raises(ConfigError) as info:
        parse_config("config_store: {kind: postgres, dsn: 'postgresql://h/db'}\n", "c.yaml")
    [issue] = info.value.errors
    assert issue.path == "config_store.kind" and "piuptime[postgres]" in issue.message
