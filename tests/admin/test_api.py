"""The admin API over real sockets: a gateway in-process, its admin listener, raw HTTP clients."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from piuptime.admin.api import API
from tests.support import Reply, Upstream, fetch, gateway_yaml, start_app, wait_until

TOKEN = "s3cret-admin-token"
CI_TOKEN = "ci-token-0123456789"

ROUTES = """\
  - name: sensors
    match: {path: /sensors/, methods: [GET, POST]}
    upstream: sensors
    strip_prefix: true
    plugins:
      cache: {ttl: 60s}
      request_id: {}
  - name: cams
    match: {path: /cams/}
    upstream: cams
"""


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIUPTIME_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("ADMIN_API_TEST_TOKEN", TOKEN)


@pytest.fixture
async def ups() -> AsyncIterator[list[Upstream]]:
    servers = [await Upstream(name=f"u{i}").start() for i in range(2)]
    yield servers
    for s in servers:
        await s.stop()


def config_text(
    ups: list[Upstream], tmp_path: Path, admin: str | None = None, extra: str = ""
) -> str:
    admin = admin or (
        '{listen: "127.0.0.1:0", token: "${ADMIN_API_TEST_TOKEN}", tokens: {ci: "'
        + CI_TOKEN
        + '"}}'
    )
    more = f"admin: {admin}\nstore: {{sqlite: {tmp_path / 'store.sqlite'}}}\n{extra}"
    return gateway_yaml({"sensors": [ups[0].port], "cams": [ups[1].port]}, ROUTES, extra=more)


class Admin:
    def __init__(self, app: Any, token: str | None = TOKEN) -> None:
        self.app = app
        self.port = app.admin.port
        self.token = token

    def headers(self, token: str | None = None, **more: str) -> dict[str, str]:
        token = token or self.token
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        return {**auth, **more}

    async def get(self, path: str, token: str | None = None) -> Reply:
        return await fetch(self.port, path, headers=self.headers(token))

    async def post(
        self,
        path: str,
        body: bytes | dict[str, Any] = b"",
        content_type: str = "application/json",
        token: str | None = None,
    ) -> Reply:
        raw = orjson.dumps(body) if isinstance(body, dict) else body
        headers = self.headers(token, **{"Content-Type": content_type})
        return await fetch(self.port, path, method="POST", headers=headers, body=raw)


def doc(reply: Reply) -> Any:
    return orjson.loads(reply.body)


def error(reply: Reply) -> dict[str, Any]:
    err: dict[str, Any] = doc(reply)["error"]
    assert err["status"] == reply.status
    return err


@pytest.fixture
async def running(ups: list[Upstream], tmp_path: Path) -> AsyncIterator[Admin]:
    app, _ = await start_app(config_text(ups, tmp_path), tmp_path, watch_interval=0)
    try:
        yield Admin(app)
    finally:
        await app.stop()


# -- probes ----------------------------------------------------------------------------------


async def test_liveness_and_readiness_need_no_token(running: Admin) -> None:
    live = await fetch(running.port, "/healthz")
    assert live.status == 200 and doc(live) == {"status": "ok"}
    ready = await fetch(running.port, "/readyz")
    assert ready.status == 200
    assert doc(ready) == {
        "status": "ready",
        "checks": {"listeners": True, "config": True, "not_draining": True},
        "reasons": [],
    }
    assert ready.header(b"cache-control") == b"no-store"
    head = await fetch(running.port, "/readyz", method="HEAD")
    assert head.status == 200 and head.body == b""


async def test_readiness_fails_while_draining(ups: list[Upstream], tmp_path: Path) -> None:
    app, _ = await start_app(config_text(ups, tmp_path), tmp_path, watch_interval=0)
    try:
        admin = Admin(app)
        app.request_stop()  # what SIGTERM does: the app is draining from now on
        reply = await fetch(admin.port, "/readyz")
        assert reply.status == 503
        body = doc(reply)
        assert body["status"] == "not_ready" and body["checks"]["not_draining"] is False
        assert body["reasons"] == ["the gateway is draining (stopping)"]
        assert (await fetch(admin.port, "/healthz")).status == 200  # alive all the same
    finally:
        await app.stop()


# -- auth --------------------------------------------------------------------------------------


PROTECTED = [
    ("GET", "/status"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", f"{API}/routes"),
    ("GET", f"{API}/routes/sensors"),
    ("GET", f"{API}/upstreams"),
    ("GET", f"{API}/upstreams/sensors"),
    ("GET", f"{API}/analytics"),
    ("GET", f"{API}/requests/recent"),
    ("GET", f"{API}/config"),
    ("POST", f"{API}/config/validate"),
    ("POST", f"{API}/config/reload"),
    ("POST", f"{API}/cache/purge"),
    ("GET", f"{API}/audit"),
    ("GET", f"{API}/nothing-here"),
]


async def test_every_endpoint_but_the_probes_needs_a_token(running: Admin) -> None:
    for method, path in PROTECTED:
        bare = await fetch(
            running.port, path, method=method, body=b"" if method == "POST" else None
        )
        assert bare.status == 401, (method, path)
        assert bare.header(b"www-authenticate") == b'Bearer realm="piuptime"'
        assert error(bare)["code"] == "unauthorized"

        wrong = await fetch(
            running.port,
            path,
            method=method,
            headers={"Authorization": f"Bearer {TOKEN}x"},
            body=b"" if method == "POST" else None,
        )
        assert wrong.status == 401, (method, path)
        challenge = wrong.header(b"www-authenticate") or b""
        assert challenge == b'Bearer realm="piuptime", error="invalid_token"'
        assert error(wrong)["code"] == "invalid_token"
    basic = await fetch(running.port, "/status", headers={"Authorization": "Basic eDp5"})
    assert basic.status == 401 and error(basic)["code"] == "unauthorized"
    # nothing changed, nothing audited
    assert doc(await running.get(f"{API}/audit"))["entries"] == []


async def test_named_tokens_are_told_apart_in_the_audit_log(running: Admin) -> None:
    assert (await running.post(f"{API}/config/reload", token=CI_TOKEN)).status == 200
    assert (await running.post(f"{API}/config/reload")).status == 200
    entries = doc(await running.get(f"{API}/audit"))["entries"]
    assert [(e["actor"], e["address"]) for e in entries] == [
        ("admin", "127.0.0.1"),
        ("ci", "127.0.0.1"),
    ]


async def test_without_a_token_on_loopback_the_actor_is_anonymous(
    ups: list[Upstream], tmp_path: Path
) -> None:
    app, _ = await start_app(
        config_text(ups, tmp_path, admin='{listen: "127.0.0.1:0"}'), tmp_path, watch_interval=0
    )
    try:
        admin = Admin(app, token=None)
        assert (await admin.get(f"{API}/routes")).status == 200
        assert (await admin.post(f"{API}/config/reload")).status == 200
        (entry,) = doc(await admin.get(f"{API}/audit"))["entries"]
        assert entry["actor"] == "anonymous" and entry["action"] == "config.reload"
    finally:
        await app.stop()


# -- errors of the HTTP kind -----------------------------------------------------------------


async def test_unknown_path_wrong_method_and_big_bodies(running: Admin) -> None:
    missing = await running.get(f"{API}/nope")
    assert missing.status == 404
    assert error(missing)["code"] == "not_found" and f"{API}/nope" in error(missing)["message"]

    wrong = await fetch(
        running.port, f"{API}/config/reload", method="GET", headers=running.headers()
    )
    assert wrong.status == 405 and wrong.header(b"allow") == b"POST"
    assert error(wrong)["code"] == "method_not_allowed"
    delete = await fetch(running.port, f"{API}/routes", method="DELETE", headers=running.headers())
    assert delete.status == 405 and delete.header(b"allow") == b"GET, HEAD"

    typo = await running.get(f"{API}/audit?limt=5")
    assert typo.status == 422
    assert error(typo)["message"] == (
        "unknown query parameter 'limt' (this endpoint takes: action, before, limit)"
    )
    assert (await fetch(running.port, "/healthz?x=1")).status == 422
    twice = await running.get(f"{API}/audit?limit=1&limit=500")
    assert twice.status == 422
    assert "'limit' given more than once" in error(twice)["message"]

    big = b"routes: []\n" + b"#" * (1024 * 1024)
    too_big = await running.post(f"{API}/config/validate", big, "application/yaml")
    assert too_big.status == 413 and error(too_big)["code"] == "body_too_large"


# -- status of routes and upstreams ------------------------------------------------------------


async def test_routes_and_upstreams(running: Admin, ups: list[Upstream]) -> None:
    routes = doc(await running.get(f"{API}/routes"))
    assert [r["name"] for r in routes] == ["sensors", "cams"]
    sensors = routes[0]
    assert sensors["match"] == {
        "path": "/sensors/",
        "methods": ["GET", "POST"],
        "host": None,
        "headers": {},
    }
    assert sensors["upstream"] == "sensors" and sensors["priority"] is None
    assert sensors["plugins"] == ["request_id", "cache"]  # run order
    assert (sensors["upstream_healthy_targets"], sensors["upstream_targets"]) == (1, 1)
    assert sensors["config"]["strip_prefix"] is True
    assert sensors["config"]["plugins"]["cache"]["ttl"] == 60.0
    assert doc(await running.get(f"{API}/routes/cams"))["plugins"] == []

    gone = await running.get(f"{API}/routes/nope")
    assert gone.status == 404 and error(gone)["code"] == "route_not_found"

    assert (await fetch(running.app.servers[0].sockets[0].getsockname()[1], "/cams/")).status == 200
    upstreams = doc(await running.get(f"{API}/upstreams"))
    assert set(upstreams) == {"sensors", "cams"}
    (target,) = upstreams["cams"]["targets"]
    assert target["url"] == f"http://127.0.0.1:{ups[1].port}"
    assert target["requests_total"] == 1 and target["breaker"] == "closed"
    assert target["in_flight"] == 0 and target["healthy"] is True
    one = doc(await running.get(f"{API}/upstreams/cams"))
    assert one["targets"][0]["requests_total"] == 1 and one["balance"] == "round_robin"
    gone = await running.get(f"{API}/upstreams/nope")
    assert gone.status == 404 and error(gone)["code"] == "upstream_not_found"


# -- analytics -------------------------------------------------------------------------------


async def test_analytics_disabled_is_a_clear_503(running: Admin) -> None:
    if getattr(running.app, "analytics", None) is not None:
        pytest.skip("analytics run by default in this build")
    for path in (f"{API}/analytics?by=route&since=1h", f"{API}/requests/recent?limit=5"):
        reply = await running.get(path)
        assert reply.status == 503, path
        assert error(reply)["code"] == "analytics_unavailable"
        assert "analytics" in error(reply)["message"]


async def test_analytics_parameters_are_checked(running: Admin) -> None:
    for query, fragment in (
        ("by=host", "by"),
        ("step=5", "step"),
        ("since=yesterday", "since"),
        ("since=2025-01-01T00:00:00", "zone"),
    ):
        reply = await running.get(f"{API}/analytics?{query}")
        assert reply.status == 422, query
        assert fragment in error(reply)["message"], (query, error(reply))
    reply = await running.get(f"{API}/requests/recent?limit=0")
    assert reply.status == 422 and "limit" in error(reply)["message"]
    reply = await running.get(f"{API}/analytics?since=10m&until=1h")
    assert reply.status == 422 and "until must be after since" in error(reply)["message"]
    for query in ("step=90", "status=600", "status=5x"):
        path = f"{API}/analytics?{query}" if "step" in query else f"{API}/requests/recent?{query}"
        reply = await running.get(path)
        assert reply.status == 422, query


# -- config: redacted, validate, reload -------------------------------------------------------


async def test_validate_accepts_a_good_config_and_lists_every_error(running: Admin) -> None:
    good = "upstreams:\n  a: {targets: ['http://127.0.0.1:9']}\nroutes:\n"
    good += "  - {name: r, match: {path: /r/}, upstream: a}\n"
    ok = await running.post(f"{API}/config/validate?filename=new.yaml", good.encode(), "text/plain")
    assert ok.status == 200, ok.body
    assert doc(ok) == {"ok": True, "summary": "new.yaml: OK (1 route, 1 upstream)", "errors": []}

    bad = (
        "gateway:\n  listen: [nowhere]\n"
        "routes:\n  - {name: r, match: {path: /r/}, upstream: missing}\n"
        "surprise: 1\n"
    )
    reply = await running.post(f"{API}/config/validate", bad.encode(), "application/yaml")
    assert reply.status == 422
    body = doc(reply)
    assert body["ok"] is False and body["summary"] is None
    texts = [e["text"] for e in body["errors"]]
    assert len(texts) == 3, texts
    assert texts[0].startswith("<request>:2:")
    assert any(t.startswith("<request>:4:") and "missing" in t for t in texts)
    assert any(t.startswith("<request>:5:1: surprise: unknown key") for t in texts)
    first = body["errors"][0]
    assert (first["file"], first["line"], first["path"]) == ("<request>", 2, "gateway.listen[0]")

    # the same config as JSON (positions are JSON's lines and columns)
    as_json = json.dumps({"routes": [{"name": "r", "match": {"path": "/r/"}}]}, indent=1)
    reply = await running.post(f"{API}/config/validate", as_json.encode())
    assert reply.status == 422
    (issue,) = doc(reply)["errors"]
    assert issue["path"] == "routes[0].upstream" and "missing" in issue["message"]
    assert issue["line"] > 1

    for body_bytes, message in (
        (b"routes: [\n", "invalid YAML"),
        (b"- a list\n", "top level must be a mapping"),
        (b"routes: []\n\xff\xfe\n", "not UTF-8"),
    ):
        reply = await running.post(f"{API}/config/validate", body_bytes, "application/yaml")
        assert reply.status == 422, body_bytes
        assert message in doc(reply)["errors"][0]["message"]
    assert doc(await running.get(f"{API}/audit"))["entries"] == []  # validating changes nothing


async def test_validate_does_not_leak_environment_values(
    running: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEAKY_VALUE", "very-secret-value")
    reply = await running.post(
        f"{API}/config/validate", b"gateway: {listen: ['${LEAKY_VALUE}']}\n", "application/yaml"
    )
    assert reply.status == 422
    assert b"very-secret-value" not in reply.body and b"<redacted>" in reply.body
    # an unset variable is an error, as in piuptime validate
    reply = await running.post(
        f"{API}/config/validate", b"admin: {token: '${NOT_SET_ANYWHERE_X}'}\n", "application/yaml"
    )
    assert reply.status == 422 and b"NOT_SET_ANYWHERE_X is not set" in reply.body


async def test_reload_applies_the_file_and_audits_what_changed(
    running: Admin, ups: list[Upstream], tmp_path: Path
) -> None:
    path = tmp_path / "piuptime.yaml"
    text = path.read_text().replace(
        "  - name: cams\n    match: {path: /cams/}", "  - name: cams\n    match: {path: /cameras/}"
    )
    path.write_text(text + "consumers:\n  app: {keys: [k3y-one]}\n")
    reply = await running.post(f"{API}/config/reload")
    assert reply.status == 200, reply.body
    body = doc(reply)
    assert body["ok"] is True and body["message"].endswith(": 2 routes, 2 upstreams")
    assert body["changes"] == {
        "routes": {"added": [], "removed": [], "changed": ["cams"]},
        "consumers": {"added": ["app"], "removed": [], "changed": []},
    }
    assert body["reloads"]["succeeded"] == 1
    assert doc(await running.get(f"{API}/routes/cams"))["match"]["path"] == "/cameras/"

    path.write_text(text + "routes: oops\n")
    reply = await running.post(f"{API}/config/reload")
    assert reply.status == 422
    body = doc(reply)
    assert body["ok"] is False and "still serving the previous config" in body["message"]
    assert any("duplicate key 'routes'" in e for e in body["errors"])
    assert body["reloads"] == {
        "succeeded": 1,
        "failed": 1,
        "last_error": body["reloads"]["last_error"],
    }

    entries = doc(await running.get(f"{API}/audit"))["entries"]
    assert [(e["action"], e["result"]) for e in entries] == [
        ("config.reload", "invalid"),
        ("config.reload", "ok"),
    ]
    assert entries[0]["target"] == str(path) and entries[0]["detail"]["errors"] == body["errors"]
    assert entries[1]["detail"]["changes"]["routes"]["changed"] == ["cams"]
    assert entries[1]["actor"] == "admin" and entries[1]["time"] > 0 and entries[1]["id"] >= 1


async def test_reload_without_a_file_is_a_conflict(ups: list[Upstream], tmp_path: Path) -> None:
    app, _ = await start_app(config_text(ups, tmp_path))  # from text: no file
    try:
        admin = Admin(app)
        reply = await admin.post(f"{API}/config/reload")
        assert reply.status == 409 and error(reply)["code"] == "no_config_file"
        config = doc(await admin.get(f"{API}/config"))
        assert config["source"] == "memory" and config["path"] is None
    finally:
        await app.stop()


async def test_config_is_served_with_secrets_redacted(
    ups: list[Upstream], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAM_BEARER", "bearer-from-env-123")
    monkeypatch.setenv("REDIS_PW", "redis-pw-456")
    hashed = (  # piuptime hash-password --scheme pbkdf2
        "pbkdf2_sha256$600000$69Ii7d4IROcXfvfIMU5TdA$AKMFBir0fcjumHTyK8GahTfar2rgIHOuItilxu+7fNA"
    )
    extra = (
        "consumers:\n"
        "  app: {keys: [plain-key-789], basic: {username: app, password_hash: '" + hashed + "'},"
        " jwt: {key: 'jwt-hs256-secret-that-is-long-enough-0123456789'}}\n"
        "plugins:\n"
        "  request_transformer: {set: {authorization: 'Bearer ${UPSTREAM_BEARER}'}}\n"
    )
    text = config_text(ups, tmp_path, extra=extra)
    text = text.replace(
        f"store: {{sqlite: {tmp_path / 'store.sqlite'}}}",
        f"store: {{sqlite: {tmp_path / 'store.sqlite'}, redis: 'redis://:${{REDIS_PW}}@127.0.0.1:6379/0'}}",
    )
    app, _ = await start_app(text, tmp_path, watch_interval=0)
    try:
        admin = Admin(app)
        reply = await admin.get(f"{API}/config")
        assert reply.status == 200
        for secret in (
            TOKEN,
            CI_TOKEN,
            "plain-key-789",
            hashed,
            "jwt-hs256-secret",
            "bearer-from-env-123",
            "redis-pw-456",
        ):
            assert secret.encode() not in reply.body, secret
        body = doc(reply)
        assert body["source"] == "file" and body["path"] == str(tmp_path / "piuptime.yaml")
        config = body["config"]
        assert config["admin"]["token"] == "<redacted>"
        assert config["admin"]["tokens"] == {"ci": "<redacted>"}
        assert config["admin"]["listen"] == "127.0.0.1:0"  # not a secret
        consumer = config["consumers"]["app"]
        assert consumer["keys"] == ["<redacted>"]
        assert consumer["basic"] == {"username": "app", "password_hash": "<redacted>"}
        assert consumer["jwt"]["key"] == "<redacted>"
        assert config["store"]["redis"] == "redis://:<redacted>@127.0.0.1:6379/0"
        edits = config["plugins"]["request_transformer"]
        assert edits["set"]["authorization"] == "Bearer <redacted>"
        assert config["routes"][0]["name"] == "sensors"  # the rest is intact
    finally:
        await app.stop()


# -- cache purge -----------------------------------------------------------------------------


async def test_purge_by_path_and_prefix(running: Admin, ups: list[Upstream]) -> None:
    port = running.app.servers[0].sockets[0].getsockname()[1]

    async def get(path: str) -> bytes | None:
        reply = await fetch(port, path)
        assert reply.status == 200
        return reply.header(b"x-cache")

    for path in ("/sensors/a", "/sensors/a?x=1", "/sensors/b/1", "/sensors/b/2"):
        assert await get(path) == b"MISS"
        assert await get(path) == b"HIT"

    one = await running.post(f"{API}/cache/purge", {"route": "sensors", "path": "/sensors/a"})
    assert one.status == 200, one.body
    assert doc(one) == {"route": "sensors", "store": "memory", "purged": 2}  # both queries
    assert await get("/sensors/a") == b"MISS" and await get("/sensors/b/1") == b"HIT"

    exact = await running.post(
        f"{API}/cache/purge", {"route": "sensors", "path": "/sensors/a", "query": "x=1"}
    )
    assert doc(exact)["purged"] == 0  # already gone
    some = await running.post(f"{API}/cache/purge", {"route": "sensors", "prefix": "/sensors/b/"})
    assert doc(some)["purged"] == 2
    assert await get("/sensors/b/2") == b"MISS" and await get("/sensors/a") == b"HIT"
    host = await running.post(
        f"{API}/cache/purge", {"route": "sensors", "prefix": "/", "host": "elsewhere"}
    )
    assert doc(host)["purged"] == 0

    entries = doc(await running.get(f"{API}/audit?action=cache.purge"))["entries"]
    assert len(entries) == 4
    assert entries[-1]["detail"] == {"route": "sensors", "path": "/sensors/a", "purged": 2}
    assert entries[-1]["target"] == "sensors" and entries[-1]["result"] == "ok"


async def test_purge_refusals(running: Admin) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"route": "nope", "path": "/x"}, 404, "route_not_found"),
        ({"route": "cams", "path": "/cams/x"}, 404, "no_cache"),
        ({"route": "sensors"}, 422, "invalid_purge"),
        ({"route": "sensors", "path": "/a", "prefix": "/"}, 422, "invalid_purge"),
        ({"route": "sensors", "prefix": "/", "query": "a=1"}, 422, "invalid_purge"),
        ({"route": "sensors", "path": "no-slash"}, 422, "invalid_request"),
        ({"path": "/x"}, 422, "invalid_request"),
        ({"route": "sensors", "path": "/x", "extra": 1}, 422, "invalid_request"),
    ]
    for body, status, code in cases:
        reply = await running.post(f"{API}/cache/purge", body)
        assert reply.status == status, (body, reply.body)
        assert error(reply)["code"] == code, (body, reply.body)
    not_json = await running.post(f"{API}/cache/purge", b"{", "application/json")
    assert not_json.status == 422 and error(not_json)["code"] == "invalid_request"
    # refusals of a purge the route's cache could not do are audited; unknown names are not
    entries = doc(await running.get(f"{API}/audit?action=cache.purge"))["entries"]
    assert sorted(e["result"] for e in entries) == ["invalid_purge"] * 3


# -- the audit log -----------------------------------------------------------------------------


async def test_audit_log_pages_and_survives_a_restart(ups: list[Upstream], tmp_path: Path) -> None:
    app, _ = await start_app(config_text(ups, tmp_path), tmp_path, watch_interval=0)
    try:
        admin = Admin(app)
        for _ in range(3):
            assert (await admin.post(f"{API}/config/reload")).status == 200
        first = doc(await admin.get(f"{API}/audit?limit=2"))["entries"]
        assert len(first) == 2 and first[0]["id"] > first[1]["id"]
        rest = doc(await admin.get(f"{API}/audit?before={first[1]['id']}"))["entries"]
        assert len(rest) == 1 and rest[0]["id"] < first[1]["id"]
        assert doc(await admin.get(f"{API}/audit?action=cache.purge"))["entries"] == []
        bad = await admin.get(f"{API}/audit?limit=0")
        assert bad.status == 422 and "limit" in error(bad)["message"]
    finally:
        await app.stop()

    # a new process on the same store reads them back
    app, _ = await start_app(config_text(ups, tmp_path), tmp_path, watch_interval=0)
    try:
        entries = doc(await Admin(app).get(f"{API}/audit"))["entries"]
        assert len(entries) == 3 and {e["action"] for e in entries} == {"config.reload"}
    finally:
        await app.stop()
    rows = sqlite3.connect(tmp_path / "store.sqlite").execute("SELECT count(*) FROM admin_audit")
    assert rows.fetchone() == (3,)


async def test_an_unwritable_audit_log_does_not_undo_the_change(
    ups: list[Upstream], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = config_text(ups, tmp_path).replace(
        f"sqlite: {tmp_path / 'store.sqlite'}",
        f"sqlite: {tmp_path}",  # a directory: unusable
    )
    app, _ = await start_app(text, tmp_path, watch_interval=0)
    try:
        admin = Admin(app)
        assert (await admin.post(f"{API}/config/reload")).status == 200
        assert "audit log unavailable" in caplog.text and '"action":"config.reload"' in caplog.text
        metrics = (await admin.get("/metrics")).body.decode()
        assert "piuptime_admin_audit_failures_total 1" in metrics
        reply = await admin.get(f"{API}/audit")
        assert reply.status == 503 and error(reply)["code"] == "audit_unavailable"
    finally:
        await app.stop()


# -- lifecycle -------------------------------------------------------------------------------


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def test_stop_drains_a_request_in_flight(running: Admin) -> None:
    """A slow admin request that began before stop still gets its answer."""
    app = running.app
    gate = asyncio.Event()
    release = asyncio.Event()
    original = app.reload

    async def slow_reload(reason: str = "signal") -> bool:
        gate.set()
        await release.wait()
        return await original(reason)

    app.reload = slow_reload
    pending = asyncio.create_task(running.post(f"{API}/config/reload"))
    await asyncio.wait_for(gate.wait(), 10)
    port = running.port
    stopping = asyncio.create_task(app.admin.aclose(timeout=5))
    await wait_until(lambda: not _accepts(port), what="the admin listener closed")
    release.set()
    reply = await asyncio.wait_for(pending, 10)
    assert reply.status == 200
    await stopping


async def test_analytics_queries_and_recent_requests(ups: list[Upstream], tmp_path: Path) -> None:
    text = config_text(ups, tmp_path, extra="analytics: {flush_interval: 10m, recent: 10}\n")
    app, port = await start_app(text, tmp_path, watch_interval=0)
    try:
        admin = Admin(app)
        for path in ("/sensors/a", "/sensors/b", "/cams/", "/nowhere"):
            await fetch(port, path)
        assert await app.analytics.flush()

        reply = await admin.get(f"{API}/analytics?by=route&since=10m")
        assert reply.status == 200, reply.body
        body = doc(reply)
        assert body["by"] == "route" and body["step"] == 60 and body["name"] is None
        assert body["until"] - body["since"] == pytest.approx(600, abs=5)
        counts = {row["name"]: row["requests"] for row in body["rows"]}
        assert counts["sensors"] == 2 and counts["cams"] == 1
        one = doc(await admin.get(f"{API}/analytics?by=upstream&name=cams&step=300"))
        assert [row["requests"] for row in one["rows"]] == [1] and one["step"] == 300

        recent = doc(await admin.get(f"{API}/requests/recent?limit=2"))["requests"]
        assert [r["path"] for r in recent] == ["/nowhere", "/cams/"]
        only = doc(await admin.get(f"{API}/requests/recent?route=sensors"))["requests"]
        assert [r["path"] for r in only] == ["/sensors/b", "/sensors/a"]
        missing = doc(await admin.get(f"{API}/requests/recent?status=4xx"))["requests"]
        assert [r["status"] for r in missing] == [404]
    finally:
        await app.stop()
