"""Server-side HTTP/1.1 errors and the JSON error body every gateway-generated error uses.

The request-body exceptions carry the HTTP status the server answers with when a handler lets
them propagate (``BodyTooLarge`` → 413, ``BodyTimeout`` → 408, ``MalformedBody`` → 400), so the
common case needs no ``try`` in the handler: the server sends ``error_body(...)`` with
``connection: close`` and calls its ``on_error`` hook. Upstream (client-side) errors live in
``piuptime.http1.client``.
"""

from __future__ import annotations

import orjson

__all__ = [
    "BodyTimeout",
    "BodyTooLarge",
    "ClientDisconnected",
    "MalformedBody",
    "RequestError",
    "error_body",
]


def error_body(status: int, code: str, message: str) -> bytes:
    """The JSON error document: ``{"error": {"status": .., "code": .., "message": ..}}``."""
    return orjson.dumps({"error": {"status": status, "code": code, "message": message}})


class RequestError(Exception):
    """Base of errors about the client's request or connection, raised to the handler.

    ``status`` and ``code`` say what the server answers when the handler does not catch it.
    """

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code.replace("_", " "))

    @property
    def message(self) -> str:
        """The human-readable reason (the exception's text)."""
        return str(self)


class BodyTooLarge(RequestError):
    """The request body is declared or counted over ``Request.max_body_bytes``."""

    status = 413
    code = "body_too_large"


class BodyTimeout(RequestError):
    """No request-body byte arrived for ``body_timeout`` while the handler waited."""

    status = 408
    code = "body_timeout"


class MalformedBody(RequestError):
    """The request body's framing is broken (bad chunk size, missing CRLF, ...)."""

    status = 400
    code = "malformed_body"


class ClientDisconnected(RequestError):
    """The client closed the connection (or it was aborted); nothing more can be sent.

    ``status`` 499 is nginx's convention for logs; it is never written to the wire.
    """

    status = 499
    code = "client_disconnected"
