"""Two gateways on one PostgreSQL: a change made through one gateway's admin API answers on the
other's data plane within a second (create, update, delete); a gateway whose listener connection
is killed keeps serving and catches up once it reconnects; the audit log is shared; two gateways
starting on an empty database seed it once. One database per module, created with a random
name on 127.0.0.1:5432 and dropped at the end."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from piuptime.app import App
from piuptime.config import load_config
from piuptime.configstore.postgres import LISTENER_NAME, PostgresConfigStore
from tests.configstore.support import Admin, body, bootstrap, route
from tests.support import Upstream, fetch, wait_until

# uvloop keeps pytest-timeout's SIGALRM from firing: a hang ends the run instead
pytestmark = pytest.mark.timeout(90, method="thread")

PG = "postgresql://postgres@127.0.0.1:5432"
ROUTES = """\
  - name: one
    match: {path: /one}
    upstream: a
"""


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    try:
        admin = psycopg.connect(f"{PG}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {exc}")
    name = f"piuptime_cfg_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def dsn(database: str) -> Iterator[str]:
    """The module's database, emptied for each test."""
    url = f"{PG}/{database}"
    try:
        sql(
            url,
            "DROP TABLE IF EXISTS piuptime_config, piuptime_config_entities, "
            "piuptime_config_history, admin_audit",
        )
    except psycopg.errors.LockNotAvailable:
        sessions = sql(
            f"{PG}/postgres",
            "SELECT application_name, state, query FROM pg_stat_activity "
            f"WHERE datname = '{database}'",
        )
        raise AssertionError(f"a session of an earlier test holds a lock: {sessions}") from None
    yield url


def sql(dsn: str, statement: str) -> list[tuple[object, ...]]:
    """One statement on a connection of its own (never waiting long for a lock: the gateways
    under test share the event loop this blocks)."""
    with psycopg.connect(dsn, autocommit=True, options=_TIMEOUTS, connect_timeout=5) as conn:
        cur = conn.execute(statement.encode())
        return cur.fetchall() if cur.description else []


_TIMEOUTS = "-c lock_timeout=5s -c statement_timeout=10s"


@pytest.fixture
async def ups() -> AsyncIterator[dict[str, Upstream]]:
    servers = {name: await Upstream(name=name).start() for name in ("a", "b")}
    yield servers
    for server in servers.values():
        await server.stop()


@pytest.fixture
async def pair(
    ups: dict[str, Upstream], tmp_path: Path, dsn: str
) -> AsyncIterator[tuple[App, App]]:
    """Two gateways (each its own bootstrap file and state) on one database."""
    apps = []
    ports = {"a": ups["a"].port, "b": ups["b"].port}
    for name in ("gw1", "gw2"):
        folder = tmp_path / name
        folder.mkdir()
        path = bootstrap(folder, "postgres", ports, ROUTES, dsn=dsn)
        app = App(load_config(path), path, watch_interval=0)
        await app.start()
        apps.append(app)
    try:
        yield apps[0], apps[1]
    finally:
        for app in apps:
            await app.stop()


def port_of(app: App) -> int:
    port: int = app.servers[0].sockets[0].getsockname()[1]
    return port


async def answers(app: App, path: str, expected: str | int, within: float = 1.0) -> float:
    """Poll ``path`` on ``app``'s data plane until it answers ``expected`` (a body, or a status);
    returns how long that took and fails past ``within`` seconds."""
    start = time.monotonic()
    deadline = start + within
    while True:
        reply = await fetch(port_of(app), path)
        got: str | int = reply.body.decode() if reply.status == 200 else reply.status
        if got == expected:
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} answered {got!r}, not {expected!r}, after {within}s")
        await asyncio.sleep(0.01)


async def test_a_change_through_one_gateway_answers_on_the_other_within_a_second(
    pair: tuple[App, App],
) -> None:
    gw1, gw2 = pair
    assert gw1.config_version == gw2.config_version == 1  # seeded once
    admin = Admin(gw1)
    assert await answers(gw2, "/two", 404) < 1.0

    created = await admin.post("/routes", {"name": "two", "config": route("/two", "a")})
    assert created.status == 201
    took = await answers(gw2, "/two", "a")
    assert took < 1.0 and gw2.config_version == 2

    assert (await admin.put("/routes/two", route("/two", "b"))).status == 200
    assert await answers(gw2, "/two", "b") < 1.0

    assert (await admin.delete("/routes/two")).status == 200
    assert await answers(gw2, "/two", 404) < 1.0
    assert gw2.config_version == 4 and gw2.reloads.succeeded == 3

    # and the other way round, with the version the second gateway reports
    other = Admin(gw2)
    version = int(body(await other.get("/routes"))["version"])
    assert (await other.put("/routes/one", route("/one", "b"), version=version)).status == 200
    assert await answers(gw1, "/one", "b") < 1.0
    # both gateways record into one audit log and one history
    entries = body(await fetch(other.port, "/api/v1/audit?limit=10"))["entries"]
    assert [e["action"] for e in entries][:4] == [
        "route.update",
        "route.delete",
        "route.update",
        "route.create",
    ]
    history = body(await admin.get("/history"))["entries"]
    assert [h["version"] for h in history] == [5, 4, 3, 2, 1]


async def test_concurrent_writers_on_two_gateways(pair: tuple[App, App]) -> None:
    gw1, gw2 = pair
    replies = await asyncio.gather(
        Admin(gw1).put("/routes/one", route("/one", "a"), version=1),
        Admin(gw2).put("/routes/one", route("/one", "b"), version=1),
    )
    assert sorted(r.status for r in replies) == [200, 409]
    winner = "a" if replies[0].status == 200 else "b"
    await answers(gw1, "/one", winner)
    await answers(gw2, "/one", winner)
    # without If-Match both changes land, one after the other
    replies = await asyncio.gather(
        Admin(gw1).post("/routes", {"name": "x", "config": route("/x", "a")}),
        Admin(gw2).post("/routes", {"name": "y", "config": route("/y", "b")}),
    )
    assert [r.status for r in replies] == [201, 201]
    await answers(gw1, "/y", "b")
    await answers(gw2, "/x", "a")
    assert gw1.config_version == gw2.config_version == 4


async def test_the_listener_killed_keeps_serving_and_catches_up(
    pair: tuple[App, App], database: str, dsn: str
) -> None:
    gw1, gw2 = pair
    store = gw2.config_service.store
    assert isinstance(store, PostgresConfigStore)
    await wait_until(lambda: store.listening, 5, "the listener")
    reconnects = store.reconnects
    # no new connection to the database for now: the listener cannot come back
    sql(f"{PG}/postgres", f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
    try:
        killed = sql(
            dsn.replace(database, "postgres"),
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE application_name = '{LISTENER_NAME}' AND datname = '{database}' "
            f"AND pid <> pg_backend_pid()",
        )
        assert len(killed) == 2  # one listener per gateway
        await wait_until(lambda: not store.listening, 5, "the listener to notice")
        assert (await fetch(gw2.admin.port, "/metrics")).body.count(
            b"piuptime_config_store_connected 0"
        ) == 1
        # gw1's own connection for writes is still open: it changes the configuration
        created = await Admin(gw1).post("/routes", {"name": "two", "config": route("/two", "b")})
        assert created.status == 201
        await answers(gw1, "/two", "b")
        for _ in range(3):  # gw2 keeps serving what it has
            assert (await fetch(port_of(gw2), "/one")).body == b"a"
            assert (await fetch(port_of(gw2), "/two")).status == 404
        assert gw2.config_version == 1
    finally:
        sql(f"{PG}/postgres", f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
    # back with the reconnect back-off (at most 5 s), then caught up at once
    await answers(gw2, "/two", "b", within=8.0)
    assert store.listening and store.reconnects > reconnects
    assert gw2.config_version == 2 and gw2.reloads.failed == 0


async def test_two_gateways_starting_on_an_empty_database_seed_it_once(
    ups: dict[str, Upstream], tmp_path: Path, dsn: str
) -> None:
    paths = []
    for name in ("gw1", "gw2"):
        folder = tmp_path / name
        folder.mkdir()
        paths.append(bootstrap(folder, "postgres", {"a": ups["a"].port}, ROUTES, dsn=dsn))
    apps = [App(load_config(p), p, watch_interval=0) for p in paths]
    try:
        await asyncio.gather(*(app.start() for app in apps))
        assert [app.config_version for app in apps] == [1, 1]
        assert sql(dsn, "SELECT version, action FROM piuptime_config_history") == [(1, "seed")]
        for app in apps:
            assert (await fetch(port_of(app), "/one")).body == b"a"
    finally:
        for app in apps:
            await app.stop()
