"""The response ``date`` header, formatted once per second instead of once per response.

Each helper returns the *end* of a response head: the date line, an optional connection line,
and the blank line, so the server appends one ready-made bytes object to every head.
"""

from __future__ import annotations

from email.utils import formatdate
from time import time

__all__ = ["tail_close", "tail_keep_alive", "tail_plain"]

_second = -1
_plain = b""
_close = b""
_keep_alive = b""


def _refresh(now: int) -> None:
    """Re-render the three cached tails for the second ``now``."""
    global _second, _plain, _close, _keep_alive
    date = b"date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
    _plain = date + b"\r\n"
    _close = b"connection: close\r\n" + date + b"\r\n"
    _keep_alive = b"connection: keep-alive\r\n" + date + b"\r\n"
    _second = now


def tail_plain() -> bytes:
    """``date: ...\\r\\n\\r\\n``."""
    now = int(time())
    if now != _second:
        _refresh(now)
    return _plain


def tail_close() -> bytes:
    """``connection: close\\r\\ndate: ...\\r\\n\\r\\n``."""
    now = int(time())
    if now != _second:
        _refresh(now)
    return _close


def tail_keep_alive() -> bytes:
    """``connection: keep-alive\\r\\ndate: ...\\r\\n\\r\\n`` (for HTTP/1.0 keep-alive clients)."""
    now = int(time())
    if now != _second:
        _refresh(now)
    return _keep_alive
