"""The admin listener (GET /status, /healthz) and `piuptime status`, through a running app."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import piuptime
from piuptime.cli import main as cli_main
from piuptime.config import ConfigError, parse_config
from tests.support import Upstream, fetch, free_port, gateway_yaml, piuptime_cmd, start_app

ROUTES = """\
  - name: sensors
    match: {path: /sensors/}
    upstream: sensors
    strip_prefix: true
  - name: cams
    match: {path: /cams/}
    upstream: cams
"""

TARGET_KEYS = {
    "url",
    "weight",
    "backup",
    "healthy",
    "active_check",
    "last_check_error",
    "ejected",
    "ejected_for_s",
    "ejections_total",
    "breaker",
    "breaker_retry_after_s",
    "in_flight",
    "ewma_ms",
    "requests_total",
    "failures_total",
}


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIUPTIME_ADMIN_TOKEN", raising=False)


@pytest.fixture
async def ups() -> AsyncIterator[list[Upstream]]:
    servers = [await Upstream(name=f"u{i}").start() for i in range(3)]
    yield servers
    for s in servers:
        await s.stop()


def config_text(ups: list[Upstream], admin: str | None) -> str:
    extra = f"admin: {admin}\n" if admin is not None else ""
    return gateway_yaml(
        {"sensors": [ups[0].port, ups[1].port], "cams": [ups[2].port]}, ROUTES, extra=extra
    )


def admin_port(app: Any) -> int:
    assert app.admin is not None
    return int(app.admin.port)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- GET /status, /healthz -------------------------------------------------------------------


async def test_status_shows_every_upstream_and_target(ups: list[Upstream], tmp_path: Path) -> None:
    app, port = await start_app(
        config_text(ups, '{listen: "127.0.0.1:0"}'), tmp_path, watch_interval=0
    )
    try:
        for _ in range(4):
            assert (await fetch(port, "/sensors/x")).status == 200
        reply = await fetch(admin_port(app), "/status")
        assert reply.status == 200, reply.body
        assert reply.header(b"content-type") == b"application/json"
        assert reply.header(b"cache-control") == b"no-store"
        doc = orjson.loads(reply.body)
        assert doc["version"] == piuptime.__version__
        assert isinstance(doc["uptime_s"], float) and doc["uptime_s"] >= 0
        assert doc["config"] == str(tmp_path / "piuptime.yaml")
        assert doc["routes"] == 2
        assert doc["reloads"] == {"succeeded": 0, "failed": 0, "last_error": None}
        assert set(doc["upstreams"]) == {"sensors", "cams"}
        sensors = doc["upstreams"]["sensors"]
        assert sensors["balance"] == "round_robin" and sensors["panic"] is False
        assert set(sensors["retry_budget"]) >= {"ratio", "denied_total"}
        urls = [t["url"] for t in sensors["targets"]]
        assert urls == [f"http://127.0.0.1:{ups[0].port}", f"http://127.0.0.1:{ups[1].port}"]
        for target in sensors["targets"] + doc["upstreams"]["cams"]["targets"]:
            assert set(target) >= TARGET_KEYS, TARGET_KEYS - set(target)
            assert target["healthy"] is True and target["ejected"] is False
            assert target["breaker"] == "closed" and target["in_flight"] == 0
            assert target["active_check"] is None  # no active checks configured
        assert sum(t["requests_total"] for t in sensors["targets"]) == 4
        assert sum(t["failures_total"] for t in sensors["targets"]) == 0
        assert doc["upstreams"]["cams"]["targets"][0]["requests_total"] == 0

        head = await fetch(admin_port(app), "/status", method="HEAD")
        assert head.status == 200 and head.body == b""
        assert int(head.header(b"content-length") or 0) > 0
    finally:
        await app.stop()


async def test_status_counts_a_dead_target(ups: list[Upstream]) -> None:
    app, port = await start_app(config_text(ups, '{listen: "127.0.0.1:0"}'))
    try:
        await ups[2].stop()  # cams' only target is gone
        assert (await fetch(port, "/cams/")).status >= 500
        doc = orjson.loads((await fetch(admin_port(app), "/status")).body)
        target = doc["upstreams"]["cams"]["targets"][0]
        assert target["requests_total"] >= 1 and target["failures_total"] >= 1
    finally:
        await app.stop()


async def test_healthz_and_errors(ups: list[Upstream]) -> None:
    app, _ = await start_app(config_text(ups, '{listen: "127.0.0.1:0"}'))
    port = admin_port(app)
    try:
        ok = await fetch(port, "/healthz")
        assert ok.status == 200 and orjson.loads(ok.body) == {"status": "ok"}

        missing = await fetch(port, "/nope")
        assert missing.status == 404
        error = orjson.loads(missing.body)["error"]
        assert error["status"] == 404 and error["code"] == "not_found"
        assert "/nope" in error["message"]

        for method, path in (("POST", "/status"), ("DELETE", "/healthz"), ("PUT", "/status")):
            reply = await fetch(port, path, method=method, body=b"")
            assert reply.status == 405, (method, path)
            assert reply.header(b"allow") == b"GET, HEAD"
            assert orjson.loads(reply.body)["error"]["code"] == "method_not_allowed"
    finally:
        await app.stop()


async def test_token_required_except_for_healthz(ups: list[Upstream]) -> None:
    app, _ = await start_app(config_text(ups, '{listen: "127.0.0.1:0", token: s3cret}'))
    port = admin_port(app)
    try:
        bare = await fetch(port, "/status")
        assert bare.status == 401
        assert bare.header(b"www-authenticate") == b'Bearer realm="piuptime"'
        assert orjson.loads(bare.body)["error"]["code"] == "unauthorized"

        wrong = await fetch(port, "/status", headers=bearer("s3cre"))
        assert wrong.status == 401
        assert b'error="invalid_token"' in (wrong.header(b"www-authenticate") or b"")
        assert orjson.loads(wrong.body)["error"]["code"] == "invalid_token"

        basic = await fetch(port, "/status", headers={"Authorization": "Basic czNjcmV0"})
        assert basic.status == 401

        good = await fetch(port, "/status", headers=bearer("s3cret"))
        assert good.status == 200 and "upstreams" in orjson.loads(good.body)
        lower = await fetch(port, "/status", headers={"Authorization": "bearer s3cret"})
        assert lower.status == 200

        assert (await fetch(port, "/healthz")).status == 200
        # Without the token nothing else is revealed, not even which paths exist.
        assert (await fetch(port, "/nope")).status == 401
        assert (await fetch(port, "/nope", headers=bearer("s3cret"))).status == 404
    finally:
        await app.stop()


async def test_no_admin_section_no_listener(ups: list[Upstream]) -> None:
    app, _ = await start_app(config_text(ups, None))
    try:
        assert app.admin is None
    finally:
        await app.stop()


async def test_stop_closes_the_admin_listener(ups: list[Upstream]) -> None:
    app, _ = await start_app(config_text(ups, '{listen: "127.0.0.1:0"}'))
    port = admin_port(app)
    await app.stop()
    with pytest.raises(OSError):
        await fetch(port, "/healthz")


async def test_reload_applies_a_new_token_but_not_a_new_address(
    ups: list[Upstream], tmp_path: Path
) -> None:
    app, _ = await start_app(
        config_text(ups, '{listen: "127.0.0.1:0", token: old}'), tmp_path, watch_interval=0
    )
    port = admin_port(app)
    path = tmp_path / "piuptime.yaml"
    try:
        path.write_text(config_text(ups, '{listen: "127.0.0.1:0", token: new}'))
        assert await app.reload("test")
        assert (await fetch(port, "/status", headers=bearer("old"))).status == 401
        assert (await fetch(port, "/status", headers=bearer("new"))).status == 200

        # A new address needs a restart; meanwhile the running listener keeps its token, even
        # though the new (loopback) section has none.
        path.write_text(config_text(ups, f'{{listen: "127.0.0.1:{free_port()}"}}'))
        assert await app.reload("test")
        assert admin_port(app) == port
        assert (await fetch(port, "/status")).status == 401
        assert (await fetch(port, "/status", headers=bearer("new"))).status == 200

        # Removing the section does not open the listener either.
        path.write_text(config_text(ups, None))
        assert await app.reload("test")
        assert (await fetch(port, "/status")).status == 401
        doc = orjson.loads((await fetch(port, "/status", headers=bearer("new"))).body)
        assert doc["reloads"]["succeeded"] == 3
    finally:
        await app.stop()


# -- the config rule: off loopback only with a token -------------------------------------------


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:9180", ":9180", "[::]:9180", "192.168.1.20:9180", "pi.local:9180"]
)
@pytest.mark.parametrize("token", [None, '""', "${UNSET_ADMIN_TOKEN:-}"])
def test_non_loopback_admin_without_token_is_refused(listen: str, token: str | None) -> None:
    text = f'admin:\n  listen: "{listen}"\n'
    if token is not None:
        text += f"  token: {token}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.yaml", {})
    (issue,) = caught.value.errors
    assert (issue.line, issue.column, issue.path) == (2, 11, "admin.listen")
    assert "without a token" in issue.message and "admin.token" in issue.message


@pytest.mark.parametrize(
    ("listen", "token"),
    [
        ("127.0.0.1:9180", None),
        ("127.8.9.10:9180", None),
        ("localhost:9180", None),
        ("[::1]:9180", None),
        ("0.0.0.0:9180", "s3cret"),
        ("192.168.1.20:9180", "s3cret"),
    ],
)
def test_admin_accepted_on_loopback_or_with_a_token(listen: str, token: str | None) -> None:
    text = f'admin:\n  listen: "{listen}"\n' + (f"  token: {token}\n" if token else "")
    admin = parse_config(text, "t.yaml", {}).admin
    assert admin is not None and admin.listen == listen and admin.token == token


def test_empty_token_counts_as_none() -> None:
    admin = parse_config('admin: {token: "${T:-}"}\n', "t.yaml", {}).admin
    assert admin is not None and admin.token is None


def test_validate_refuses_an_exposed_admin_listener(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "exposed.yaml"
    path.write_text("admin:\n  listen: 0.0.0.0:9180\n")
    assert cli_main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{path}:2:11: admin.listen: the admin listener on 0.0.0.0:9180 ")
    assert "without a token; set admin.token" in out


# -- piuptime status ---------------------------------------------------------------------------


async def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`piuptime ARGS` in-process, on a thread so this loop keeps serving the app."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli_main, list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_cli_status_prints_a_table_and_json(
    ups: list[Upstream],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STATUS_TEST_TOKEN", "s3cret")
    admin = f'{{listen: "127.0.0.1:{free_port()}", token: "${{STATUS_TEST_TOKEN}}"}}'
    app, port = await start_app(config_text(ups, admin), tmp_path, watch_interval=0)
    config = str(tmp_path / "piuptime.yaml")
    try:
        for _ in range(3):
            assert (await fetch(port, "/sensors/")).status == 200

        code, out, err = await run_cli(capsys, "status", "-c", config)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].startswith(f"piuptime {piuptime.__version__}, up ")
        assert f"config {config}, 2 routes" in lines[0]
        assert "upstream sensors (balance round_robin, retry budget 20%, 0 denied)" in lines
        header = next(line for line in lines if "TARGET" in line).split()
        assert header == [
            "TARGET", "BACKUP", "HEALTH", "EJECTED", "BREAKER", "IN-FLIGHT", "EWMA", "MS",
            "REQ/FAIL",
        ]  # fmt: skip
        rows = {line.split()[0]: line.split() for line in lines if "http://" in line}
        assert set(rows) == {f"http://127.0.0.1:{u.port}" for u in ups}
        for row in rows.values():
            assert row[1:6] == ["no", "up", "no", "closed", "0"]
        assert sum(int(r[7].split("/")[0]) for r in rows.values()) == 3
        assert rows[f"http://127.0.0.1:{ups[2].port}"][6:] == ["-", "0/0"]

        code, out, err = await run_cli(capsys, "status", "-c", config, "--json")
        assert code == 0, err
        doc = orjson.loads(out)
        assert set(doc["upstreams"]) == {"sensors", "cams"} and doc["routes"] == 2

        # --admin and --token instead of the config
        url = app.admin.address
        code, out, _ = await run_cli(capsys, "status", "--admin", url, "--token", "s3cret")
        assert code == 0 and "upstream cams" in out
        monkeypatch.setenv("PIUPTIME_ADMIN_TOKEN", "s3cret")
        code, out, _ = await run_cli(capsys, "status", "--admin", url.removeprefix("http://"))
        assert code == 0 and "upstream cams" in out
    finally:
        await app.stop()


async def test_cli_status_401(ups: list[Upstream], capsys: pytest.CaptureFixture[str]) -> None:
    app, _ = await start_app(config_text(ups, '{listen: "127.0.0.1:0", token: s3cret}'))
    url = app.admin.address
    try:
        code, out, err = await run_cli(capsys, "status", "--admin", url)
        assert code == 1 and out == ""
        assert "needs a token (401)" in err and "PIUPTIME_ADMIN_TOKEN" in err
        code, out, err = await run_cli(capsys, "status", "--admin", url, "--token", "nope")
        assert code == 1 and out == ""
        assert "refused the token (401)" in err
    finally:
        await app.stop()


async def test_cli_status_as_a_process(ups: list[Upstream]) -> None:
    app, _ = await start_app(config_text(ups, '{listen: "127.0.0.1:0"}'))
    try:
        proc = await asyncio.create_subprocess_exec(
            *piuptime_cmd("status", "--admin", app.admin.address),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err
        assert b"upstream sensors" in out and b"upstream cams" in out
    finally:
        await app.stop()


def test_cli_status_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens here
    assert cli_main(["status", "--admin", f"127.0.0.1:{port}"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"cannot reach the admin listener at http://127.0.0.1:{port}" in captured.err
    assert "is piuptime running with an admin: section?" in captured.err


def test_cli_status_reads_the_address_from_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    path = tmp_path / "p.yaml"
    path.write_text(f"admin: {{listen: ':{port}', token: t}}\n")
    assert cli_main(["status", "-c", str(path)]) == 1
    # A wildcard listen address is asked on loopback.
    assert f"cannot reach the admin listener at http://127.0.0.1:{port}" in capsys.readouterr().err


def test_cli_status_without_admin_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("gateway: {listen: ['127.0.0.1:0']}\n")
    assert cli_main(["status", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert "has no admin: section" in err and "--admin" in err

    assert cli_main(["status", "-c", str(tmp_path / "missing.yaml")]) == 1
    assert "not found" in capsys.readouterr().err


def test_cli_status_reads_an_invalid_config_admin_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file may have been broken since the gateway started: its admin section still counts."""
    port = free_port()
    path = tmp_path / "p.yaml"
    path.write_text(f"admin: {{listen: '127.0.0.1:{port}'}}\nroutes: nonsense\n")
    assert cli_main(["status", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert "does not validate" in err
    assert f"cannot reach the admin listener at http://127.0.0.1:{port}" in err


def test_cli_status_help() -> None:
    res = subprocess.run(piuptime_cmd("status", "--help"), capture_output=True, text=True)
    assert res.returncode == 0
    for word in ("/status", "--admin", "--token", "--json", "PIUPTIME_ADMIN_TOKEN", "admin:"):
        assert word in res.stdout, word
    top = subprocess.run(piuptime_cmd("--help"), capture_output=True, text=True).stdout
    assert "status     show upstreams" in top


async def test_metrics_endpoint_renders_the_registry(ups: list[Upstream]) -> None:
    app, _ = await start_app(config_text(ups, '{listen: "127.0.0.1:0", token: s3cret}'))
    try:
        family = app.metrics.counter("test_things", "Things seen.\nTwo lines.", ("route",))
        family.labels('a"b').inc()
        family.labels("c").inc(2)
        app.metrics.gauge("test_level", "A level.").set(value=1.5)
        port = admin_port(app)
        assert (await fetch(port, "/metrics")).status == 401  # the token guards it
        reply = await fetch(port, "/metrics", headers=bearer("s3cret"))
        assert reply.status == 200
        assert reply.header(b"content-type") == b"text/plain; version=0.0.4; charset=utf-8"
        text = reply.body.decode()
        assert "# HELP piuptime_test_things Things seen.\\nTwo lines.\n" in text
        assert "# TYPE piuptime_test_things counter\n" in text
        assert 'piuptime_test_things_total{route="a\\"b"} 1\n' in text
        assert 'piuptime_test_things_total{route="c"} 2\n' in text
        assert "# TYPE piuptime_test_level gauge\npiuptime_test_level 1.5\n" in text
    finally:
        await app.stop()
