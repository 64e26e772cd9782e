"""The config document: reading YAML as written, rendering it back, checks and entity edits."""

from __future__ import annotations

import math
from typing import Any

import pytest

from piuptime.config import ConfigError
from piuptime.configstore.apply import (
    _diff,
    create_entity,
    delete_entity,
    get_entity,
    items,
    put_entity,
)
from piuptime.configstore.base import (
    EntityExists,
    EntityNotFound,
    InvalidChange,
    document_rows,
    row_changes,
    rows_document,
)
from piuptime.configstore.document import (
    check_data,
    contains_redacted,
    entities_of,
    load_raw,
    merge,
    render,
    validate,
)

BOOT = {"gateway": {"listen": ["127.0.0.1:0"], "access_log": {"path": "off"}}}
UPSTREAMS = {"u": {"targets": ["http://127.0.0.1:9"]}}


def test_load_raw_keeps_references_and_reads_yaml_12_scalars() -> None:
    text = (
        "a: ${SECRET}\nb: yes\nc: 0o17\nd: 1e3\ne: ~\nf: $${x}\n"
        "base: &b {k: 1}\nmerged: {<<: *b, j: 2}\n"
    )
    data = load_raw(text)
    assert data == {
        "a": "${SECRET}",  # not expanded, so secrets stay out of the database
        "b": "yes",  # YAML 1.2: a string
        "c": 15,
        "d": 1000.0,
        "e": None,
        "f": "$${x}",
        "base": {"k": 1},
        "merged": {"k": 1, "j": 2},
    }


def test_load_raw_errors_have_positions() -> None:
    with pytest.raises(ConfigError) as caught:
        load_raw("a: 1\na: 2\n", "doc.yaml")
    assert str(caught.value).startswith("doc.yaml:2:1: a: duplicate key 'a'")
    with pytest.raises(ConfigError, match=r"doc.yaml:2:1: invalid YAML"):
        load_raw("a: [\n", "doc.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_raw("- 1\n", "doc.yaml")


TRICKY = [
    "0o17",
    "0x1F",
    "1e3",
    ".5",
    "-.inf",
    ".nan",
    "yes",
    "no",
    "on",
    "true",
    "False",
    "null",
    "~",
    "",
    "<<",
    "12:30",
    "2024-01-01",
    "a: b",
    "#x",
    "${VAR}",
    "é ✓",
    "line\nbreak",
    " lead",
]


@pytest.mark.parametrize("value", TRICKY)
def test_render_reads_back_as_the_same_data(value: str) -> None:
    document = {"s": value, "n": [1, -2, 0.5, 1e30, True, None], value or "k": {"x": value}}
    assert load_raw(render(document)) == document


def test_check_data_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(InvalidChange) as caught:
        check_data(
            {
                "nan": math.nan,
                "inf": [math.inf],
                "big": 2**70,
                "bad": "\ud800",
                "nul": "a\x00b",
                "deep": _nested(40),
                "ok": [1, "x", None, True, 1.5],
            }
        )
    by_path = {i.path: i.message for i in caught.value.issues}
    assert by_path["nan"] == "expected a finite number, got nan"
    assert by_path["inf[0]"] == "expected a finite number, got inf"
    assert by_path["big"] == "the number is too large"
    assert by_path["bad"] == "not valid Unicode text"
    assert by_path["nul"] == "not valid Unicode text"
    assert any(p.startswith("deep") and "levels deep" in m for p, m in by_path.items())
    assert not any(p.startswith("ok") for p in by_path)
    with pytest.raises(InvalidChange, match="key 1 is not a string"):
        check_data({"a": {1: "x"}})


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"n": value}
    return value


def test_validate_is_the_files_validation_with_positions_in_the_rendering() -> None:
    whole = merge(BOOT, {"upstreams": UPSTREAMS, "routes": [{"name": "r", "upstream": "nope"}]})
    with pytest.raises(ConfigError) as caught:
        validate(whole, "<change>")
    text = render(whole)
    issues = {i.path: i for i in caught.value.errors}
    assert set(issues) == {"routes[0].match", "routes[0].upstream"}
    assert issues["routes[0].match"].message == "required key 'match' is missing; add it"
    upstream = issues["routes[0].upstream"]
    assert upstream.file == "<change>"
    assert text.splitlines()[upstream.line - 1].strip() == "upstream: nope"
    ok = merge(BOOT, {"upstreams": UPSTREAMS, "routes": [_route("r", "/r")]})
    assert validate(ok, "<x>").routes[0].name == "r"


def _route(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "match": {"path": path}, "upstream": "u"}


def test_entities_merge_and_bootstrap_order() -> None:
    raw = {"gateway": {}, "routes": None, "upstreams": UPSTREAMS, "admin": {}}
    entities = entities_of(raw)
    assert entities == {"upstreams": UPSTREAMS, "consumers": {}, "routes": [], "plugins": {}}
    assert list(merge(raw, entities)) == [
        "gateway",
        "admin",
        "upstreams",
        "consumers",
        "routes",
        "plugins",
    ]


def test_entity_operations() -> None:
    doc: dict[str, Any] = entities_of({"routes": [_route("a", "/a")], "upstreams": UPSTREAMS})
    assert get_entity(doc, "routes", "a") == {"match": {"path": "/a"}, "upstream": "u"}
    with pytest.raises(EntityNotFound, match="no route named 'b'"):
        get_entity(doc, "routes", "b")
    create_entity(doc, "routes", "b", {"match": {"path": "/b"}, "upstream": "u"})
    with pytest.raises(EntityExists, match="a route named 'b' exists already"):
        create_entity(doc, "routes", "b", {})
    assert put_entity(doc, "routes", "a", {"name": "a", "match": {"path": "/a2"}}) is False
    assert [n for n, _ in items(doc, "routes")] == ["a", "b"]  # replaced in place
    assert doc["routes"][0] == {"name": "a", "match": {"path": "/a2"}}
    assert put_entity(doc, "plugins", "request_id", {}) is True
    assert delete_entity(doc, "plugins", "request_id") == {}
    with pytest.raises(EntityNotFound, match="no global plugin named 'cors'"):
        delete_entity(doc, "plugins", "cors")
    assert delete_entity(doc, "routes", "b")["match"] == {"path": "/b"}
    assert _diff(entities_of({"upstreams": UPSTREAMS}), doc) == {
        "added": {"routes": ["a"]},
        "removed": {},
        "changed": {},
    }


def test_rows_round_trip_and_changes() -> None:
    doc = entities_of(
        {
            "upstreams": UPSTREAMS,
            "routes": [_route("z", "/z"), _route("a", "/a")],
            "plugins": {"request_id": None},
        }
    )
    rows = document_rows(doc)
    back = rows_document((s, n, p, b) for (s, n), (p, b) in reversed(list(rows.items())))
    assert back == doc and [r["name"] for r in back["routes"]] == ["z", "a"]  # order kept
    swapped = dict(doc, routes=[doc["routes"][1], doc["routes"][0]])
    upserts, deletes = row_changes(rows, document_rows(swapped))
    assert sorted(u[1] for u in upserts) == ["a", "z"] and deletes == []
    upserts, deletes = row_changes(rows, document_rows(dict(doc, plugins={})))
    assert upserts == [] and deletes == [("plugins", "request_id")]


def test_contains_redacted() -> None:
    assert (
        contains_redacted({"consumers": {"c": {"keys": ["<redacted>"]}}}) == "consumers.c.keys[0]"
    )
    assert contains_redacted({"consumers": {"c": {"keys": ["${K}"]}}}) is None
