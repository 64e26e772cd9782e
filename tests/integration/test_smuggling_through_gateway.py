"""The smuggling table again, through the whole gateway: the upstream must never receive the
hidden second request, whatever the framing trick, and the client connection must close."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.http1.test_server_smuggling import CASES
from tests.support import RawClient, Upstream, gateway_yaml, start_app

ROUTES = "  - name: all\n    match: {path: /}\n    upstream: main\n"
LIMITS = "  limits: {max_header_bytes: 2KiB, max_header_count: 10, max_body_bytes: 1KiB}"


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[int, Upstream]]:
    up = await Upstream(name="u0").start()
    app, port = await start_app(gateway_yaml({"main": [up.port]}, ROUTES, gateway=LIMITS))
    yield port, up
    await app.stop()
    await up.stop()


@pytest.mark.parametrize(("raw", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_upstream_never_sees_the_smuggled_request(
    gateway: tuple[int, Upstream], raw: bytes, status: int
) -> None:
    port, up = gateway
    c = await RawClient.connect(port)
    await c.send(raw)
    r = await c.read_response()
    assert r.status == status
    assert r.header(b"connection") == b"close"
    assert await c.is_closed_by_peer()
    await c.close()
    paths = [s.path for s in up.seen]
    assert all(p == b"/first" for p in paths), paths
