"""TLS through the config: termination on a listener, and verified https upstreams."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from tests.support import RawClient, start_app


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_upstream(ca: trustme.CA) -> AsyncIterator[int]:
    """An https upstream with a cert for 'localhost' signed by the test CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecure")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    yield server.sockets[0].getsockname()[1]
    server.close()


def _config(tmp_path: Path, ca: trustme.CA, up_port: int, upstream_tls: str) -> str:
    cert = ca.issue_cert("localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "gw.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "gw.key"))
    return f"""
gateway:
  listen:
    - address: "127.0.0.1:0"
      tls: {{cert: "{tmp_path / "gw.pem"}", key: "{tmp_path / "gw.key"}"}}
  access_log: {{path: off}}
upstreams:
  secure:
    targets: [{{url: "https://localhost:{up_port}"}}]
    timeouts: {{connect: 1s, read: 2s}}
{upstream_tls}
routes:
  - name: all
    match: {{path: /}}
    upstream: secure
"""


def _client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_tls_termination_and_verified_upstream(
    tmp_path: Path, ca: trustme.CA, tls_upstream: int
) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    text = _config(tmp_path, ca, tls_upstream, f'    tls: {{ca: "{tmp_path / "ca.pem"}"}}')
    app, port = await start_app(text)
    try:
        assert app.addresses()[0].startswith("https://")
        c = await RawClient.connect(port, ssl=_client_ctx(ca))
        r = await c.request("GET", "/x")
        assert r.status == 200 and r.body == b"secure"
        r = await c.request("GET", "/again")  # keep-alive over TLS on both sides
        assert r.status == 200
        await c.close()
    finally:
        await app.stop()


async def test_upstream_certificate_is_verified_by_default(
    tmp_path: Path, ca: trustme.CA, tls_upstream: int
) -> None:
    """Without the CA the upstream's certificate is not trusted: 502, never a silent pass."""
    app, port = await start_app(_config(tmp_path, ca, tls_upstream, ""))
    try:
        c = await RawClient.connect(port, ssl=_client_ctx(ca))
        r = await c.request("GET", "/x")
        assert r.status == 502
        assert b"secure" in r.body and b"certificate" in r.body.lower()
        await c.close()
    finally:
        await app.stop()


async def test_verification_can_be_turned_off_explicitly(
    tmp_path: Path, ca: trustme.CA, tls_upstream: int
) -> None:
    app, port = await start_app(_config(tmp_path, ca, tls_upstream, "    tls: {verify: false}"))
    try:
        c = await RawClient.connect(port, ssl=_client_ctx(ca))
        assert (await c.request("GET", "/x")).body == b"secure"
        await c.close()
    finally:
        await app.stop()


async def test_plain_http_to_a_tls_listener_is_refused(
    tmp_path: Path, ca: trustme.CA, tls_upstream: int
) -> None:
    app, port = await start_app(_config(tmp_path, ca, tls_upstream, ""))
    try:
        c = await RawClient.connect(port)
        await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await c.is_closed_by_peer()
        await c.close()
    finally:
        await app.stop()


async def test_reload_rotates_the_listener_certificate(
    tmp_path: Path, ca: trustme.CA, tls_upstream: int
) -> None:
    """A renewed certificate on disk is served after a reload, without a restart; a broken
    one fails the reload and the old certificate stays in use."""
    text = _config(tmp_path, ca, tls_upstream, "    tls: {verify: false}")
    app, port = await start_app(text, tmp_path, watch_interval=0)
    try:
        old_ca = ca
        new_ca = trustme.CA()
        cert = new_ca.issue_cert("localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "gw.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / "gw.key"))
        assert await app.reload("test")
        c = await RawClient.connect(port, ssl=_client_ctx(new_ca))
        assert (await c.request("GET", "/x")).status == 200
        await c.close()
        with pytest.raises(ssl.SSLError):
            await RawClient.connect(port, ssl=_client_ctx(old_ca))
        (tmp_path / "gw.key").write_text("not a key\n")
        assert not await app.reload("test")
        assert "TLS certificate" in (app.reloads.last_error or "")
        c = await RawClient.connect(port, ssl=_client_ctx(new_ca))
        assert (await c.request("GET", "/y")).status == 200
        await c.close()
    finally:
        await app.stop()
