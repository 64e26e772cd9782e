"""What a plugin is, and the per-request context it works on.

A plugin is a small class: a ``name``, a ``priority`` (higher runs first), the config model it is
built from (in ``piuptime.config.plugins``, the schema; this package holds the handlers, Kong's
split), and any of these hooks, looked up once when a route's pipeline is compiled:

``on_request(ctx)``
    The access phase, before anything goes upstream. Return ``None`` to go on, a ``Reply`` to
    answer here (the upstream is never asked), or an awaitable (of ``Reply | None``) when the
    plugin must wait (a Redis call, a JWKS fetch, reading the body): the rest of the pipeline
    then continues in a coroutine. Most plugins stay synchronous, so a request whose plugins
    all are keeps the proxy's callback fast path.
``on_response(ctx, status, headers)``
    The response phase, before the head is written: edit ``headers`` (a list of lower-cased
    ``(name, value)`` byte pairs) in place. Runs for upstream answers, for replies of other
    plugins and for the gateway's own errors.
``on_failure(ctx, status)``
    The upstream could not give a usable answer (``status`` is the 502/503/504 the gateway is
    about to send, or the upstream's own 5xx). Return a ``Reply`` to answer instead (the cache
    serves a stale copy here), else ``None``.
``on_log(ctx)``
    After the response is on the wire (or the request failed): count, release, record. Never
    raises into the request; runs exactly once per request that reached the pipeline.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

from piuptime.gateway.clientip import TrustedProxies

if TYPE_CHECKING:
    from piuptime.gateway.consumers import Consumer, Consumers
    from piuptime.gateway.router import Match
    from piuptime.gateway.runtime import CompiledRoute, UpstreamRuntime
    from piuptime.http1.server import Request, Responder
    from piuptime.observe.metrics import Metrics
    from piuptime.state import Stores
    from piuptime.state.memory import MemoryStores

Headers = list[tuple[bytes, bytes]]


class Reply:
    """A whole response made by the gateway (a plugin's refusal, a cached answer)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes = b"", headers: Headers | None = None) -> None:
        self.status = status
        self.body = body
        self.headers: Headers = headers if headers is not None else []

    @classmethod
    def error(cls, status: int, code: str, message: str, headers: Headers | None = None) -> Reply:
        """The gateway's JSON error shape (``{"error": {status, code, message}}``)."""
        from piuptime.http1.errors import error_body

        out = [(b"content-type", b"application/json")]
        if headers:
            out.extend(headers)
        return cls(status, error_body(status, code, message), out)

    def __repr__(self) -> str:
        return f"<Reply {self.status} {len(self.body)} bytes>"


RequestResult = Reply | Awaitable["Reply | None"] | None


class Ctx:
    """One request's state while it passes through a route's plugins.

    Made only for routes that have plugins. Plugins read the request through ``req`` and change
    what goes upstream by editing ``req.headers`` in place (the list belongs to this request),
    setting ``path`` (the upstream request-target, query included) or ``upstream``.
    """

    __slots__ = (
        "body",
        "cache",
        "capture",
        "capture_limit",
        "client_ip",
        "consumer",
        "deferred",
        "env",
        "finished",
        "host",
        "match",
        "path",
        "req",
        "request_id",
        "resp",
        "response_headers",
        "route",
        "upstream",
        "vars",
    )

    def __init__(
        self,
        req: Request,
        resp: Responder,
        route: CompiledRoute,
        match: Match | None,
        env: PluginEnv,
    ) -> None:
        self.req = req
        self.env = env
        self.resp = resp
        self.route = route
        self.match = match
        self.upstream: UpstreamRuntime = route.upstream
        self.path: bytes | None = None  # set by a plugin: the upstream request-target
        self.body: bytes | None = None  # set by a plugin that had to read the body first
        self.consumer: Consumer | None = None
        self.request_id: str | None = None
        self.cache: str | None = None  # X-Cache status, for the access log
        # headers added to whatever response goes back (rate-limit state, CORS, request id)
        self.response_headers: Headers = []
        # a plugin that wants the upstream answer whole (the cache): called once with the
        # status, the response headers after the response phase and the body, if the body
        # was complete and at most ``capture_limit`` bytes
        self.capture: Callable[[int, Headers, bytes], None] | None = None
        self.capture_limit = 0
        self.deferred: list[Callable[[], None]] | None = None
        self.vars: dict[str, Any] | None = None
        self.client_ip: str | None = None
        self.host: bytes | None = None  # set by a plugin: the Host sent upstream
        self.finished = False

    def ip(self) -> str:
        """The client's address, after ``gateway.trusted_proxies`` (computed once)."""
        ip = self.client_ip
        if ip is None:
            req = self.req
            trusted = self.env.trusted_proxies
            ip = trusted.client_ip(req.client_addr, req.headers) if trusted else req.client_addr
            self.client_ip = ip
        return ip

    def defer(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the request is over, however it ended (release a slot, ...)."""
        if self.deferred is None:
            self.deferred = [fn]
        else:
            self.deferred.append(fn)

    def header(self, name: bytes) -> bytes | None:
        """The first request header called ``name`` (lower-case), or None."""
        for n, v in self.req.headers:
            if n == name:
                return v
        return None

    def set_request_header(self, name: bytes, value: bytes) -> None:
        """Replace every ``name`` header going upstream with one ``value``."""
        headers = self.req.headers
        headers[:] = [(n, v) for n, v in headers if n != name]
        headers.append((name, value))

    def remove_request_header(self, name: bytes) -> None:
        headers = self.req.headers
        if any(n == name for n, _ in headers):
            headers[:] = [(n, v) for n, v in headers if n != name]


class PluginEnv:
    """What plugins may use besides the request: shared state and registries, built by the
    app and handed to every route's pipeline (the same objects across reloads where state
    must survive one, such as in-memory counters and the cache)."""

    def __init__(
        self,
        *,
        stores: MemoryStores,
        shared: Stores | None,
        metrics: Metrics,
        consumers: Consumers,
        upstreams: dict[str, UpstreamRuntime],
        spawn: Callable[[Awaitable[Any]], None],
        trusted_proxies: TrustedProxies | None = None,
        keep: dict[str, Any] | None = None,
    ) -> None:
        self.stores = stores  # this process (memory)
        self.shared = shared  # Redis, when store.redis is set
        self.metrics = metrics
        self.consumers = consumers
        self.upstreams = upstreams
        self.spawn = spawn  # run a background coroutine (kept referenced, cancelled at stop)
        # long-lived objects a plugin keeps across reloads, by a key of its choosing
        self.keep: dict[str, Any] = keep if keep is not None else {}
        self.trusted_proxies = trusted_proxies or TrustedProxies(())
        self.via = b"1.1 piuptime"  # the gateway's Via hop (set from gateway.via at compile)


class Plugin:
    """Base class of every plugin handler. Subclasses set ``name``, ``priority`` and define
    the hooks they need; a hook left undefined costs nothing per request."""

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0

    def __init__(self, config: Any, env: PluginEnv, route: CompiledRoute | None) -> None:
        self.config = config
        self.env = env
        self.route = route

    # Hooks (defined by subclasses as needed; the pipeline only binds those that exist):
    #   def on_request(self, ctx: Ctx) -> RequestResult
    #   def on_response(self, ctx: Ctx, status: int, headers: Headers) -> None
    #   def on_failure(self, ctx: Ctx, status: int) -> Reply | None
    #   def on_log(self, ctx: Ctx) -> None
