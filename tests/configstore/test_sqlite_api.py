"""The SQLite config store through the real admin listener of an in-process gateway: CRUD round
trips that the data plane answers, refused changes that change nothing, version conflicts,
export/import, the history and audit, and changes written by another process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from piuptime.app import App
from piuptime.config import load_config
from piuptime.configstore.base import Change
from piuptime.configstore.sqlite import SQLiteConfigStore
from tests.configstore.support import Admin, body, bootstrap, etag, route
from tests.support import Upstream, fetch, wait_until

# uvloop keeps pytest-timeout's SIGALRM from firing: a hang ends the run instead
pytestmark = pytest.mark.timeout(90, method="thread")

ROUTES = """\
  - name: one
    match: {path: /one}
    upstream: a
"""
CONSUMER = "consumers:\n  kitchen: {keys: ['${KITCHEN_KEY}']}\n"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KITCHEN_KEY", "kitchen-key-0123")


@pytest.fixture
async def ups() -> AsyncIterator[dict[str, Upstream]]:
    servers = {name: await Upstream(name=name).start() for name in ("a", "b")}
    yield servers
    for server in servers.values():
        await server.stop()


async def start(path: Path) -> tuple[App, int]:
    app = App(load_config(path), path, watch_interval=0)
    await app.start()
    return app, app.servers[0].sockets[0].getsockname()[1]


@pytest.fixture
async def gw(ups: dict[str, Upstream], tmp_path: Path) -> AsyncIterator[tuple[App, int, Admin]]:
    path = bootstrap(
        tmp_path, "sqlite", {"a": ups["a"].port, "b": ups["b"].port}, ROUTES, extra=CONSUMER
    )
    app, port = await start(path)
    try:
        yield app, port, Admin(app)
    finally:
        await app.stop()


async def served_by(port: int, path: str) -> str | int:
    reply = await fetch(port, path)
    return reply.body.decode() if reply.status == 200 else reply.status


# -- seeding -----------------------------------------------------------------------------------


async def test_seeded_from_the_file_once_then_the_database_wins(
    ups: dict[str, Upstream], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ports = {"a": ups["a"].port, "b": ups["b"].port}
    path = bootstrap(tmp_path, "sqlite", ports, ROUTES)
    app, port = await start(path)
    try:
        assert app.config_source == "sqlite" and app.config_version == 1
        assert await served_by(port, "/one") == "a"
        history = body(await Admin(app).get("/history"))
        assert [(e["version"], e["actor"], e["action"]) for e in history["entries"]] == [
            (1, "piuptime", "seed")
        ]
    finally:
        await app.stop()
    # The file now names another route: the database holds the configuration, so it is ignored.
    bootstrap(tmp_path, "sqlite", ports, ROUTES.replace("one", "two"))
    caplog.set_level(logging.WARNING, "piuptime.configstore")
    app, port = await start(path)
    try:
        assert app.config_version == 1
        assert await served_by(port, "/one") == "a" and await served_by(port, "/two") == 404
        assert "the upstreams, routes in" in caplog.text and "are ignored" in caplog.text
    finally:
        await app.stop()
    assert (tmp_path / "state.sqlite").exists()  # default path: store.sqlite


# -- CRUD --------------------------------------------------------------------------------------


async def test_routes_crud_round_trip_on_the_data_plane(gw: tuple[App, int, Admin]) -> None:
    app, port, admin = gw
    listed = await admin.get("/routes")
    assert listed.status == 200 and etag(listed) == 1
    assert body(listed) == {
        "version": 1,
        "items": [{"name": "one", "config": route("/one", "a")}],
    }

    created = await admin.post("/routes", {"name": "two", "config": route("/two", "a")})
    assert created.status == 201, created.body
    assert body(created) == {"version": 2, "name": "two", "config": route("/two", "a")}
    assert etag(created) == 2 and app.config_version == 2
    assert await served_by(port, "/two") == "a"  # applied before the answer

    got = await admin.get("/routes/two")
    assert got.status == 200 and body(got)["config"] == route("/two", "a")

    updated = await admin.put("/routes/two", route("/two", "b"), version=2)
    assert updated.status == 200 and body(updated)["version"] == 3
    assert await served_by(port, "/two") == "b"

    made = await admin.put("/routes/three", {"name": "three", **route("/three", "b")})
    assert made.status == 201 and body(made)["version"] == 4
    assert [i["name"] for i in body(await admin.get("/routes"))["items"]] == ["one", "two", "three"]

    deleted = await admin.delete("/routes/two")
    assert deleted.status == 200 and body(deleted) == {"version": 5, "name": "two"}
    assert await served_by(port, "/two") == 404
    assert await served_by(port, "/three") == "b"
    assert app.reloads.succeeded == 4  # each change counted like a reload

    history = body(await admin.get("/history?limit=3"))["entries"]
    assert [(e["version"], e["action"], e["target"]) for e in history] == [
        (5, "route.delete", "routes/two"),
        (4, "route.update", "routes/three"),
        (3, "route.update", "routes/two"),
    ]
    assert history[0]["actor"] == "anonymous@127.0.0.1"
    audit = await fetch(admin.port, "/api/v1/audit?limit=2")
    entries = body(audit)["entries"]
    assert entries[0]["action"] == "route.delete" and entries[0]["result"] == "ok"
    assert entries[0]["detail"]["before"] == route("/two", "b")
    assert entries[1]["detail"]["before"] is None  # three was created by PUT


async def test_upstreams_consumers_and_plugins(gw: tuple[App, int, Admin]) -> None:
    app, port, admin = gw
    target = {"targets": [f"http://127.0.0.1:{app.config.upstreams['b'].targets[0].port}"]}
    assert (await admin.put("/upstreams/c", target)).status == 201
    assert (await admin.post("/routes", {"name": "c", "config": route("/c", "c")})).status == 201
    assert await served_by(port, "/c") == "b"
    assert body(await admin.get("/upstreams/c"))["config"] == target

    # an upstream still in use cannot go
    refused = await admin.delete("/upstreams/c")
    assert refused.status == 422
    assert "unknown upstream 'c'" in body(refused)["error"]["errors"][0]

    # a consumer and key_auth on one route (through the route's plugins)
    new_consumer = {"keys": ["bob-key-456789"], "groups": ["apps"]}
    assert (await admin.put("/consumers/bob", new_consumer)).status == 201
    on = await admin.put("/routes/one/plugins/key_auth", {})
    assert on.status == 200 and body(on)["config"] == {}
    assert (await fetch(port, "/one")).status == 401
    allowed = await fetch(port, "/one", headers={"apikey": "bob-key-456789"})
    assert allowed.status == 200
    kitchen = await fetch(port, "/one", headers={"apikey": "kitchen-key-0123"})  # from ${VAR}
    assert kitchen.status == 200
    plugin = await admin.get("/routes/one/plugins/key_auth")
    assert plugin.status == 200 and body(plugin)["config"] == {}

    # a global plugin, turned off on one route with false
    assert (await admin.put("/plugins/request_id", {})).status == 201
    assert (await fetch(port, "/c")).header(b"x-request-id") is not None
    assert (await admin.put("/routes/c/plugins/request_id", False)).status == 200
    assert (await fetch(port, "/c")).header(b"x-request-id") is None
    assert body(await admin.get("/plugins"))["items"] == [{"name": "request_id", "config": {}}]

    assert (await admin.delete("/routes/one/plugins/key_auth")).status == 200
    assert (await fetch(port, "/one")).status == 200
    missing = await admin.delete("/routes/one/plugins/key_auth")
    assert missing.status == 404 and "no route plugin named 'key_auth'" in missing.body.decode()
    assert (await admin.delete("/consumers/bob")).status == 200
    assert (await admin.delete("/plugins/request_id")).status == 200
    assert [i["name"] for i in body(await admin.get("/consumers"))["items"]] == ["kitchen"]
    # the stored document keeps the reference, not the secret
    assert body(await admin.get("/consumers/kitchen"))["config"] == {"keys": ["${KITCHEN_KEY}"]}


# -- refusals ----------------------------------------------------------------------------------


async def test_an_invalid_change_is_refused_and_nothing_changes(
    gw: tuple[App, int, Admin],
) -> None:
    app, port, admin = gw
    runtime = app.runtime
    refused = await admin.put("/routes/one", {"match": {"path": "one"}, "upstream": "nope"})
    assert refused.status == 422
    error = body(refused)["error"]
    assert error["code"] == "invalid_config" and "nothing changed" in error["message"]
    issues = {i["path"]: i for i in error["issues"]}
    assert set(issues) == {"routes[0].match.path", "routes[0].upstream"}
    assert issues["routes[0].upstream"]["message"].startswith("unknown upstream 'nope'")
    assert issues["routes[0].upstream"]["line"] > 0
    assert app.runtime is runtime and app.config_version == 1
    assert etag(await admin.get("/routes")) == 1
    assert await served_by(port, "/one") == "a"

    # valid for the schema, but two routes the router cannot tell apart: refused too
    twin = await admin.post("/routes", {"name": "twin", "config": route("/one", "b")})
    assert twin.status == 422 and "can never be told apart" in twin.body.decode()
    assert app.runtime is runtime and await served_by(port, "/one") == "a"

    # the API's own checks
    assert (await admin.post("/routes", {"name": "one", "config": route("/x", "a")})).status == 409
    assert (await admin.get("/routes/nope")).status == 404
    assert (await admin.delete("/upstreams/nope")).status == 404
    mismatch = await admin.put("/routes/one", {"name": "other", **route("/one", "a")})
    assert mismatch.status == 422 and body(mismatch)["error"]["code"] == "name_mismatch"
    huge_json = b'{"targets": ["http://127.0.0.1:1"], "x": ' + str(2**70).encode() + b"}"
    huge = await admin.put("/upstreams/a", raw=huge_json)
    assert huge.status == 422 and "too large" in huge.body.decode()
    bad_tag = await admin.put("/routes/one", route("/one", "a"), version="soon")
    assert bad_tag.status == 422 and body(bad_tag)["error"]["code"] == "invalid_if_match"
    not_object = await admin.put("/routes/one", raw=b"[1, 2]")
    assert not_object.status == 422
    audit = body(await fetch(admin.port, "/api/v1/audit?limit=20"))["entries"]
    assert {(e["action"], e["result"]) for e in audit} >= {
        ("route.update", "invalid"),
        ("route.create", "invalid"),
    }
    assert etag(await admin.get("/routes")) == 1 and app.config_version == 1


async def test_version_conflicts(gw: tuple[App, int, Admin]) -> None:
    app, port, admin = gw
    assert (await admin.put("/routes/one", route("/one", "b"), version=1)).status == 200
    stale = await admin.put("/routes/one", route("/one", "a"), version=1)
    assert stale.status == 409 and etag(stale) == 2
    assert body(stale)["error"]["code"] == "version_conflict"
    assert await served_by(port, "/one") == "b"
    by_query = await admin.delete("/routes/one?expected_version=1")
    assert by_query.status == 409
    both = await admin.delete("/routes/one?expected_version=2", version=1)
    assert both.status == 422
    # two writers with the same base version: exactly one wins
    replies = await asyncio.gather(
        admin.put("/routes/one", route("/one", "a"), version=2),
        admin.put("/routes/one", route("/one", "b"), version=2),
        admin.post("/routes", {"name": "x", "config": route("/x", "a")}, version=2),
    )
    # whichever is applied first wins (a PUT answers 200, the POST 201); the others conflict
    statuses = sorted(r.status for r in replies)
    assert statuses in ([200, 409, 409], [201, 409, 409]), statuses
    assert app.config_version == 3
    # without If-Match a change is redone on the newer document instead
    replies = await asyncio.gather(
        *(
            admin.post("/routes", {"name": f"n{i}", "config": route(f"/n{i}", "a")})
            for i in range(3)
        )
    )
    assert [r.status for r in replies] == [201, 201, 201]
    assert app.config_version == 6
    for i in range(3):
        assert await served_by(port, f"/n{i}") == "a"


# -- export and import -------------------------------------------------------------------------


async def test_export_import_round_trip(gw: tuple[App, int, Admin]) -> None:
    _app, port, admin = gw
    redacted = await admin.get("/export")
    assert redacted.status == 200 and redacted.header(b"content-type") == b"application/yaml"
    text = redacted.body.decode()
    assert text.startswith("# piuptime configuration, version 1 of sqlite ")
    assert "kitchen" in text and "<redacted>" in text
    kept = (await admin.get("/export?secrets=keep")).body
    assert b"${KITCHEN_KEY}" in kept and b"<redacted>" not in kept

    assert (await admin.delete("/routes/one")).status == 200
    assert await served_by(port, "/one") == 404
    imported = await admin.post("/import", raw=kept, content_type="application/yaml")
    assert imported.status == 200, imported.body
    assert body(imported) == {
        "version": 3,
        "added": {"routes": ["one"]},
        "removed": {},
        "changed": {},
        "ignored_sections": ["gateway", "admin", "store", "config_store"],
    }
    assert await served_by(port, "/one") == "a"
    again = (await admin.get("/export?secrets=keep")).body.decode()
    assert again.split("\n", 1)[1] == kept.decode().split("\n", 1)[1]  # the same document

    assert (await admin.post("/import", raw=redacted.body)).status == 422
    broken = await admin.post("/import", raw=b"routes:\n  - name: [\n")
    assert broken.status == 422 and body(broken)["error"]["issues"][0]["line"] == 3
    invalid = await admin.post("/import", raw=b"routes: [{name: x, upstream: a}]\n")
    assert (
        invalid.status == 422 and body(invalid)["error"]["issues"][0]["path"] == "routes[0].match"
    )
    stale = await admin.post("/import", raw=kept, version=1)
    assert stale.status == 409
    not_utf8 = await admin.post("/import", raw=b"\xff\xfe")
    assert not_utf8.status == 422
    emptied = await admin.post("/import", raw=b"{}")
    assert emptied.status == 200 and body(emptied)["removed"] == {
        "upstreams": ["a", "b"],
        "consumers": ["kitchen"],
        "routes": ["one"],
    }
    assert await served_by(port, "/one") == 404
    audit = body(await fetch(admin.port, "/api/v1/audit?action=config.import"))["entries"]
    assert [e["result"] for e in audit][:2] == ["ok", "conflict"]


async def test_a_change_written_by_another_process_is_followed(
    gw: tuple[App, int, Admin],
) -> None:
    app, port, _admin = gw
    store = SQLiteConfigStore(str(app.config.store.sqlite))
    try:
        snapshot = await store.load()
        document: dict[str, Any] = dict(snapshot.document)
        document["routes"] = [*document["routes"], {"name": "ext", **route("/ext", "b")}]
        await store.write(document, base_version=1, change=Change("test", "import", "config"))
    finally:
        await store.aclose()
    await wait_until(lambda: app.config_version == 2, 5, "the poll to see version 2")
    assert await served_by(port, "/ext") == "b"


async def test_the_admin_token_guards_changes(ups: dict[str, Upstream], tmp_path: Path) -> None:
    path = bootstrap(
        tmp_path,
        "sqlite",
        {"a": ups["a"].port},
        ROUTES,
        admin='{listen: "127.0.0.1:0", tokens: {ci: "ci-token-0123456789"}}',
    )
    app, _ = await start(path)
    try:
        anonymous = await Admin(app).post("/routes", {"name": "x", "config": route("/x", "a")})
        assert anonymous.status == 401
        ci = Admin(app, token="ci-token-0123456789")
        assert (await ci.post("/routes", {"name": "x", "config": route("/x", "a")})).status == 201
        entries = body(await ci.get("/history?limit=1"))["entries"]
        assert entries[0]["actor"] == "ci@127.0.0.1"
    finally:
        await app.stop()


async def test_a_change_is_validated_again_when_the_file_was_reloaded_meanwhile(
    gw: tuple[App, int, Admin], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, port, _ = gw
    service = app.config_service
    validate = service._candidate
    calls = 0

    async def validated_then_reloaded(document: dict[str, Any], base: int) -> Any:
        nonlocal calls
        calls += 1
        loaded = await validate(document, base)
        if calls == 1:  # as if a reload swapped in another bootstrap file meanwhile
            service.bootstrap = dict(service.bootstrap)
        return loaded

    monkeypatch.setattr(service, "_candidate", validated_then_reloaded)
    created = await gw[2].post(
        "/routes", {"name": "late", "config": route("/late", "b")}, version=1
    )
    assert created.status == 201 and calls == 2  # redone, even with If-Match
    assert body(created)["version"] == 2 == app.config_version
    assert await served_by(port, "/late") == "b"
