"""The ``analytics:`` section: defaults, the ways to turn it on and off, and every refusal with
its position in the file."""

from __future__ import annotations

import sys

import pytest

from piuptime.config import ConfigError, parse_config
from piuptime.config.analytics import AnalyticsConfig


def analytics(text: str) -> AnalyticsConfig:
    return parse_config(text, "a.yaml").analytics


def test_absent_means_off_and_the_section_means_on_with_defaults() -> None:
    off = analytics("")
    assert not off.enabled
    for text in ("analytics:\n", "analytics: {}\n", "analytics: true\n"):
        on = analytics(text)
        assert on.enabled and on.store == "sqlite" and on.sqlite is None and on.dsn is None
        assert (on.retention, on.flush_interval, on.recent) == (7 * 86400.0, 10.0, 1000)
    assert not analytics("analytics: false\n").enabled
    assert not analytics("analytics: {enabled: false}\n").enabled


def test_every_option() -> None:
    a = analytics(
        "analytics:\n  store: postgres\n  dsn: postgresql://gw@db:5432/piuptime\n"
        "  retention: 30d\n  flush_interval: 2s\n  recent: 0\n  gateway_id: pi-kitchen.1\n"
    )
    assert (a.store, a.dsn, a.retention, a.flush_interval, a.recent, a.gateway_id) == (
        "postgres",
        "postgresql://gw@db:5432/piuptime",
        30 * 86400.0,
        2.0,
        0,
        "pi-kitchen.1",
    )
    assert analytics("analytics: {store: postgres, dsn: 'host=db dbname=x'}\n").dsn == (
        "host=db dbname=x"
    )
    assert analytics("analytics: {sqlite: /var/lib/piuptime/a.db}\n").sqlite == (
        "/var/lib/piuptime/a.db"
    )


def test_the_dsn_comes_from_the_environment() -> None:
    text = "analytics: {store: postgres, dsn: '${AN_DSN}'}\n"
    config = parse_config(text, "a.yaml", env={"AN_DSN": "postgresql://h/db"})
    assert config.analytics.dsn == "postgresql://h/db"


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("analytics: {store: postgres}\n", "analytics.store", "needs dsn"),
        ("analytics: {store: mysql}\n", "analytics.store", "sqlite"),
        ("analytics: {dsn: 'postgresql://h/db'}\n", "analytics.dsn", "is for store: postgres"),
        ("analytics: {store: postgres, dsn: 'db'}\n", "analytics.dsn", "connection string"),
        ("analytics: {store: postgres, dsn: ''}\n", "analytics.dsn", "empty"),
        (
            "analytics: {store: postgres, dsn: 'postgresql://h/db', sqlite: a.db}\n",
            "analytics.sqlite",
            "is for store: sqlite",
        ),
        ("analytics: {sqlite: ''}\n", "analytics.sqlite", "empty"),
        ("analytics: {retention: 30s}\n", "analytics.retention", "at least 1m"),
        ("analytics: {retention: 0s}\n", "analytics.retention", "longer than 0s"),
        ("analytics: {flush_interval: 50ms}\n", "analytics.flush_interval", "100ms to 10m"),
        ("analytics: {flush_interval: 1h}\n", "analytics.flush_interval", "100ms to 10m"),
        ("analytics: {flush_interval: soon}\n", "analytics.flush_interval", "duration"),
        ("analytics: {recent: -1}\n", "analytics.recent", "at least 0"),
        ("analytics: {recent: 2000000}\n", "analytics.recent", "1000000"),
        ("analytics: {recent: true}\n", "analytics.recent", "whole number"),
        ("analytics: {gateway_id: 'a b'}\n", "analytics.gateway_id", "letters, digits"),
        ("analytics: {flush: 1s}\n", "analytics.flush", "unknown key"),
        ("analytics: [sqlite]\n", "analytics", "mapping"),
    ],
)
def test_refusals_point_at_the_key(text: str, where: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "a.yaml")
    [issue] = info.value.errors
    assert issue.path == where and message in issue.message, str(issue)
    assert issue.file == "a.yaml" and issue.line == 1


def test_postgres_without_psycopg_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    with pytest.raises(ConfigError) as info:
        parse_config("analytics: {store: postgres, dsn: 'postgresql://h/db'}\n", "a.yaml")
    [issue] = info.value.errors
    assert issue.path == "analytics.store" and "piuptime[postgres]" in issue.message
    from piuptime.observe.analytics_pg import check_driver

    with pytest.raises(RuntimeError, match=r"pip install 'piuptime\[postgres\]'"):
        check_driver()
