"""Types of the C fast lane (``_lane.c``); see ``piuptime.gateway.lane``."""

import asyncio
from collections.abc import Callable
from typing import Any

class Lane:
    sample_ratio: float
    log_lines: bool
    idle_timeout: float
    write_timeout: float
    header_timeout: float
    max_header_bytes: int
    max_header_count: int
    max_body_bytes: int
    @property
    def requests(self) -> int: ...
    @property
    def handovers(self) -> int: ...
    def __init__(
        self,
        *,
        resolve: Callable[[bytes, bytes, bytes], LaneRoute | None],
        pick: Callable[[LaneRoute], LaneTarget | None],
        done: Callable[..., None],
        connect: Callable[[LaneTarget], None],
        handover: Callable[..., None],
        server: Any,
        via: bytes,
        max_header_bytes: int,
        max_header_count: int,
        max_body_bytes: int,
        idle_timeout: float,
        write_timeout: float,
    ) -> None: ...
    def reset(
        self, resolve: Callable[[bytes, bytes, bytes], LaneRoute | None], via: bytes, /
    ) -> None: ...
    def sweep(self) -> int: ...
    def drain(self) -> None: ...

class LaneRoute:
    @property
    def payload(self) -> Any: ...
    @property
    def path(self) -> bytes: ...
    def __init__(
        self,
        *,
        payload: Any,
        path: bytes,
        host: bytes | None,
        host_target: bool,
        retry_statuses: frozenset[int],
        ttfb_timeout: float,
        read_timeout: float,
        total_timeout: float,
        max_body_bytes: int,
        keys: dict[bytes, tuple[bytes, str, bytes, bytes]] | None = None,
        key_headers: tuple[bytes, ...] = (),
        key_query: tuple[bytes, ...] = (),
        key_bearer: bool = False,
        key_hide: bool = False,
        access: Callable[[str | None, bytes], bytes | None] | None = None,
        log_route: bytes = b"null",
        log_upstream: bytes = b"null",
        rid_header: bytes | None = None,
        rid_trust: bool = True,
        rid_echo: bool = True,
    ) -> None: ...

class LaneTarget:
    max_connections: int
    max_idle: int
    idle_timeout: float
    @property
    def payload(self) -> Any: ...
    @property
    def connections(self) -> int: ...
    @property
    def idle(self) -> int: ...
    def __init__(
        self,
        *,
        payload: Any,
        authority: bytes,
        pool: Any,
        max_connections: int,
        max_idle: int,
        idle_timeout: float,
        log_label: bytes = b"null",
    ) -> None: ...
    def connected(self, up: UpConn, /) -> None: ...
    def connect_failed(self, kind: str, /) -> None: ...
    def new_conn(self) -> UpConn: ...
    def close_idle(self) -> None: ...
    def close_one_idle(self) -> bool: ...
    def expire(self, now: float, /) -> None: ...

class UpConn(asyncio.Protocol): ...

class LaneConn(asyncio.Protocol):
    _closing: bool
    @property
    def _transport(self) -> asyncio.Transport | None: ...
    def __init__(self, lane: Lane, /) -> None: ...
    def _drain_now(self) -> None: ...
