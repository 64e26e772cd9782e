"""TLS termination with a trustme certificate; the client verifies it against the trustme CA."""

from __future__ import annotations

import ssl

import pytest
import trustme

from piuptime.http1.server import Request, Responder, ServerLimits
from tests.http1.server_helpers import echo, record_then, request, serve


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


async def test_requests_over_tls_keep_alive(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls
    flags: list[bool] = []

    async def handler(req: Request, resp: Responder) -> None:
        flags.append(req.tls)
        resp.start(200, [])
        resp.write(req.path)
        resp.end()

    async with serve(record_then(handler), ssl_server=server_ctx, ssl_client=client_ctx) as sut:
        client = await sut.connect()
        for path in ("/a", "/b"):
            await client.send(request("GET", path))
            resp = await client.response()
            assert resp.chunked and resp.body == path.encode()
        assert flags == [True, True]


async def test_tls_body_echo_and_error_close(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls
    limits = ServerLimits(max_body_bytes=1000)
    async with serve(echo, limits, ssl_server=server_ctx, ssl_client=client_ctx) as sut:
        client = await sut.connect()
        await client.send(request("POST", "/e", body=b"z" * 500))
        assert (await client.response()).json() == {
            "method": "POST",
            "path": "/e",
            "body": "z" * 500,
        }
        await client.send(request("POST", "/e", body=b"z" * 5000))
        resp = await client.response()
        assert resp.status == 413
        assert await client.closed()


async def test_untrusted_client_fails_the_handshake(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, _ = tls
    async with serve(echo, ssl_server=server_ctx, ssl_client=ssl.create_default_context()) as sut:
        with pytest.raises(ssl.SSLCertVerificationError):
            await sut.connect()
