"""TLS to the upstream against a local server with a trustme certificate: verification on by
default, ca_file, SNI, server_hostname override, tls_verify=False, keep-alive over TLS."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from piuptime.http1.client import ConnectError, Pool, PoolOptions, UpstreamError
from tests.http1.client_helpers import Server, get


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


class TLSServer:
    """Server-side context for a certificate; records the SNI name of each handshake."""

    def __init__(self, ca: trustme.CA, *names: str) -> None:
        self.sni: list[str | None] = []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(self.context)
        self.context.sni_callback = self._on_sni

    def _on_sni(self, sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        self.sni.append(name)


@pytest.fixture
def tls(ca: trustme.CA) -> Iterator[TLSServer]:
    yield TLSServer(ca, "localhost", "upstream.test")


async def test_verification_is_on_by_default(tls: TLSServer) -> None:
    async with Server(ssl=tls.context) as server:
        pool = Pool("https", "localhost", server.port, PoolOptions())
        with pytest.raises(ConnectError) as info:
            await get(pool)
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        assert not info.value.request_sent
        assert pool.in_use == 0
        await pool.aclose()


async def test_ca_file_is_trusted_and_sni_is_the_host(tls: TLSServer, ca_file: str) -> None:
    async with Server(ssl=tls.context) as server:
        pool = Pool("https", "localhost", server.port, PoolOptions(ca_file=ca_file))
        assert await get(pool) == b"ok"
        assert await get(pool) == b"ok"
        assert server.accepts == 1  # keep-alive over TLS
        assert tls.sni == ["localhost"]
        await pool.aclose()


async def test_server_hostname_overrides_sni_and_verification(tls: TLSServer, ca_file: str) -> None:
    async with Server(ssl=tls.context) as server:
        options = PoolOptions(ca_file=ca_file, server_hostname="upstream.test")
        pool = Pool("https", "127.0.0.1", server.port, options)
        assert await get(pool) == b"ok"
        assert tls.sni == ["upstream.test"]
        await pool.aclose()


async def test_name_mismatch_fails_verification(ca: trustme.CA, ca_file: str) -> None:
    other = TLSServer(ca, "other.test")
    async with Server(ssl=other.context) as server:
        pool = Pool("https", "localhost", server.port, PoolOptions(ca_file=ca_file))
        with pytest.raises(ConnectError) as info:
            await get(pool)
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        await pool.aclose()


async def test_tls_verify_false_accepts_any_certificate(ca: trustme.CA) -> None:
    other = TLSServer(ca, "other.test")
    async with Server(ssl=other.context) as server:
        pool = Pool("https", "localhost", server.port, PoolOptions(tls_verify=False))
        assert await get(pool) == b"ok"
        assert other.sni == ["localhost"]  # SNI is still sent
        await pool.aclose()


async def test_plain_http_to_a_tls_port_is_an_error(tls: TLSServer) -> None:
    async with Server(ssl=tls.context) as server:
        pool = Pool("http", "127.0.0.1", server.port, PoolOptions(read_timeout=2))
        with pytest.raises(UpstreamError):  # the TLS server's alert is not HTTP
            await get(pool)
        await pool.aclose()
