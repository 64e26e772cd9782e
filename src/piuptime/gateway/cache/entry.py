"""A stored response, and its compact byte form for Redis.

The byte form (no JSON, no msgpack: one ``struct`` head, then length-prefixed fields):

``entry``  ``b"PCE1"`` status:u16 created:f64 fresh_until:f64 swr_until:f64 sie_until:f64
           n_vary:u16 n_headers:u16 vary_key_len:u32 body_len:u32, then the vary key, each vary
           name (u16 length + bytes), each header (u16 name length, u32 value length, name,
           value) and the body.
``vary``   ``b"PCV1"`` n:u16, then each name (u16 length + bytes): the Vary names of a URL whose
           variants are stored under keys of their own.

Anything that does not parse (an older format, a damaged value) reads as a miss.
"""

from __future__ import annotations

import struct

Headers = list[tuple[bytes, bytes]]

_ENTRY = b"PCE1"
_VARY = b"PCV1"
_HEAD = struct.Struct(">4sHddddHHII")
_U16 = struct.Struct(">H")
_FIELD = struct.Struct(">HI")
_OVERHEAD = 200  # bytes of bookkeeping counted per entry in the memory store
_PER_HEADER = 16


class Entry:
    """One cached response (a variant, when the response has ``Vary``)."""

    __slots__ = (
        "body",
        "created",
        "etag",
        "fresh_until",
        "headers",
        "keep_until",
        "last_modified",
        "sie_until",
        "size",
        "status",
        "swr_until",
        "vary",
        "vary_key",
    )

    def __init__(
        self,
        status: int,
        headers: Headers,
        body: bytes,
        created: float,
        fresh_until: float,
        swr_until: float,
        sie_until: float,
        vary: tuple[bytes, ...] = (),
        vary_key: bytes = b"",
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.created = created
        self.fresh_until = fresh_until
        self.swr_until = swr_until
        self.sie_until = sie_until
        self.keep_until = max(fresh_until, swr_until, sie_until)
        self.vary = vary
        self.vary_key = vary_key
        etag = last_modified = None
        size = len(body) + len(vary_key) + _OVERHEAD
        for name, value in headers:
            size += len(name) + len(value) + _PER_HEADER
            if name == b"etag":
                etag = value
            elif name == b"last-modified":
                last_modified = value
        self.etag = etag
        self.last_modified = last_modified
        self.size = size

    def age(self, now: float) -> int:
        return max(0, int(now - self.created))

    def __repr__(self) -> str:
        return f"<Entry {self.status} {len(self.body)} bytes vary={self.vary}>"


def dump(entry: Entry) -> bytes:
    parts = [
        _HEAD.pack(
            _ENTRY,
            entry.status,
            entry.created,
            entry.fresh_until,
            entry.swr_until,
            entry.sie_until,
            len(entry.vary),
            len(entry.headers),
            len(entry.vary_key),
            len(entry.body),
        ),
        entry.vary_key,
    ]
    for name in entry.vary:
        parts.append(_U16.pack(len(name)))
        parts.append(name)
    for name, value in entry.headers:
        parts.append(_FIELD.pack(len(name), len(value)))
        parts.append(name)
        parts.append(value)
    parts.append(entry.body)
    return b"".join(parts)


def load(blob: bytes) -> Entry | None:
    """The entry in ``blob``; None when it is not one (or is damaged)."""
    try:
        (magic, status, created, fresh, swr, sie, n_vary, n_headers, vk_len, body_len) = (
            _HEAD.unpack_from(blob, 0)
        )
        if magic != _ENTRY:
            return None
        pos = _HEAD.size
        vary_key = blob[pos : pos + vk_len]
        pos += vk_len
        vary = []
        for _ in range(n_vary):
            (n,) = _U16.unpack_from(blob, pos)
            pos += 2
            vary.append(blob[pos : pos + n])
            pos += n
        headers: Headers = []
        for _ in range(n_headers):
            n, v = _FIELD.unpack_from(blob, pos)
            pos += _FIELD.size
            headers.append((blob[pos : pos + n], blob[pos + n : pos + n + v]))
            pos += n + v
        body = blob[pos:]
        if len(body) != body_len or len(vary_key) != vk_len:
            return None
    except struct.error:
        return None
    return Entry(status, headers, body, created, fresh, swr, sie, tuple(vary), vary_key)


def dump_vary(names: tuple[bytes, ...]) -> bytes:
    parts = [_VARY, _U16.pack(len(names))]
    for name in names:
        parts.append(_U16.pack(len(name)))
        parts.append(name)
    return b"".join(parts)


def load_vary(blob: bytes) -> tuple[bytes, ...] | None:
    """The Vary names in a ``vary`` record; None when ``blob`` is not one."""
    if blob[:4] != _VARY:
        return None
    try:
        (count,) = _U16.unpack_from(blob, 4)
        pos = 6
        names = []
        for _ in range(count):
            (n,) = _U16.unpack_from(blob, pos)
            pos += 2
            name = blob[pos : pos + n]
            if len(name) != n:
                return None
            names.append(name)
            pos += n
    except struct.error:
        return None
    return tuple(names)
