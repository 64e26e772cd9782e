"""One exchange with a provider: send on its pool, read the answer, within a time; and the
guards around an adapter's translation of a request and reading of an answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from piuptime.http1.client import (
    ConnectError,
    ConnectTimeout,
    PoolTimeout,
    ReadTimeout,
    Response,
    UpstreamError,
)
from piuptime.llm.groups import DeploymentState, ProviderRuntime
from piuptime.llm.providers.base import (
    BAD_REQUEST,
    CONNECT,
    PROTOCOL,
    TIMEOUT,
    ProviderError,
    WireRequest,
)

__all__ = [
    "MAX_ANSWER",
    "MAX_ERROR_BODY",
    "SHAPE_ERRORS",
    "parsed",
    "read_all",
    "send",
    "translated",
]

#: largest provider answer read whole (a non-streamed completion, an error body)
MAX_ANSWER = 64 * 1024 * 1024
MAX_ERROR_BODY = 1024 * 1024


async def send(provider: ProviderRuntime, wire: WireRequest, timeout: float) -> Response:
    """The request on the provider's pool; the response head within ``timeout``."""
    headers = [(b"host", provider.authority), *wire.headers]
    try:
        async with asyncio.timeout(timeout):
            return await provider.pool.request(
                wire.method, wire.path, headers, wire.body, idempotent=True
            )
    except TimeoutError:
        raise ProviderError(TIMEOUT, f"no response within {timeout:.3g}s (first byte)") from None
    except (ConnectError, ConnectTimeout, PoolTimeout) as exc:
        raise ProviderError(CONNECT, f"cannot connect: {exc}") from None
    except ReadTimeout:
        raise ProviderError(TIMEOUT, "no response (read timeout)") from None
    except UpstreamError as exc:
        raise ProviderError(CONNECT, f"connection failed: {exc}") from None


async def read_all(up: Response, limit: int, timeout: float) -> bytes:
    """The whole body of ``up`` within ``timeout``; a body over ``limit`` is a protocol error."""
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await up.read()
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise ProviderError(PROTOCOL, f"answer over {limit} bytes")
                parts.append(chunk)
    except TimeoutError:
        raise ProviderError(TIMEOUT, f"the answer did not complete within {timeout:.3g}s") from None
    except UpstreamError as exc:
        raise ProviderError(CONNECT, f"the answer broke off: {exc}") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


#: what a translation of malformed input can raise (a list where a dict belongs, ...)
SHAPE_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError)


def translated(fn: Callable[..., WireRequest], dep: DeploymentState, *args: Any) -> WireRequest:
    """An adapter's request translation; a request it cannot read is the client's error."""
    try:
        return fn(*args)
    except ProviderError:
        raise
    except SHAPE_ERRORS as exc:
        raise ProviderError(
            BAD_REQUEST, f"the request cannot be sent to {dep.provider.kind}: {exc}"
        ) from None


def parsed(fn: Callable[..., dict[str, Any]], dep: DeploymentState, *args: Any) -> dict[str, Any]:
    """An adapter's reading of a 2xx answer; one it cannot read is the provider's fault."""
    try:
        return fn(*args)
    except ProviderError:
        raise
    except SHAPE_ERRORS as exc:
        raise ProviderError(PROTOCOL, f"unreadable answer: {exc!r}") from None
