"""Transform plugins: request id, CORS, IP restriction, body size, header and path rewriting."""

from __future__ import annotations

import ipaddress
import re
import uuid
from typing import TYPE_CHECKING

from piuptime.gateway.clientip import parse_ip
from piuptime.gateway.plugins import register
from piuptime.gateway.plugins.base import Ctx, Headers, Plugin, PluginEnv, Reply, RequestResult

if TYPE_CHECKING:
    from piuptime.config.plugins.transform import (
        Cors,
        HeaderEdits,
        IpRestriction,
        ProxyRewrite,
        RequestId,
        RequestSize,
    )
    from piuptime.gateway.runtime import CompiledRoute

_SANE_ID = re.compile(rb"[!-~]{1,200}\Z")  # visible ASCII, bounded: never log a megabyte


@register
class RequestIdPlugin(Plugin):
    """Keep or make ``X-Request-ID``; send it upstream, back, and into the access log."""

    name = "request_id"
    priority = 12000  # first: every other plugin's refusal carries the id

    def __init__(self, config: RequestId, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        self.header = config.header.lower().encode()
        self.trust = config.trust_incoming
        self.echo = config.echo

    def on_request(self, ctx: Ctx) -> RequestResult:
        value = ctx.header(self.header) if self.trust else None
        if value is None or not _SANE_ID.match(value):
            value = uuid.uuid4().hex.encode()
            ctx.set_request_header(self.header, value)
        ctx.request_id = value.decode("ascii")
        if self.echo:
            ctx.response_headers.append((self.header, value))
        return None


@register
class IpRestrictionPlugin(Plugin):
    name = "ip_restriction"
    priority = 11000

    def __init__(self, config: IpRestriction, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        self.allow = tuple(ipaddress.ip_network(n) for n in config.allow)
        self.deny = tuple(ipaddress.ip_network(n) for n in config.deny)
        self.status = config.status
        self.message = config.message
        self._seen: dict[str, bool] = {}  # address → allowed (bounded below)

    def allowed(self, address: str) -> bool:
        verdict = self._seen.get(address)
        if verdict is None:
            ip = parse_ip(address)
            if ip is None or any(ip in n for n in self.deny):
                verdict = False
            else:
                verdict = not self.allow or any(ip in n for n in self.allow)
            if len(self._seen) >= 10_000:
                self._seen.clear()
            self._seen[address] = verdict
        return verdict

    def on_request(self, ctx: Ctx) -> RequestResult:
        if self.allowed(ctx.ip()):
            return None
        return Reply.error(self.status, "ip_restricted", self.message)


@register
class RequestSizePlugin(Plugin):
    name = "request_size"
    priority = 10500

    def __init__(self, config: RequestSize, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        self.max_bytes = config.max_bytes

    def on_request(self, ctx: Ctx) -> RequestResult:
        # the server enforces it while the body is read: 413 from a declared length at once,
        # or as soon as a chunked body crosses it
        ctx.req.max_body_bytes = self.max_bytes
        return None


@register
class CorsPlugin(Plugin):
    """Preflights answered here (204); simple and actual requests get the headers on the way
    back when the Origin is allowed."""

    name = "cors"
    priority = 4000  # before auth: a browser's preflight carries no credentials

    def __init__(self, config: Cors, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        self.any_origin = "*" in config.allow_origins
        self.exact = frozenset(o.lower().encode() for o in config.allow_origins if "*" not in o)
        patterns = [o for o in config.allow_origins if "*." in o]
        self.wildcards = tuple(
            re.compile(
                re.escape(o.split("*.", 1)[0]).encode()
                + rb"([A-Za-z0-9-]+\.)+"
                + re.escape(o.split("*.", 1)[1]).encode()
                + rb"\Z",
                re.IGNORECASE,
            )
            for o in patterns
        )
        self.methods = ", ".join(config.allow_methods).encode()
        self.allow_headers = ", ".join(config.allow_headers).encode()
        self.expose = ", ".join(config.expose_headers).encode()
        self.credentials = config.allow_credentials
        self.max_age = b"%d" % int(config.max_age)

    def _origin_ok(self, origin: bytes) -> bool:
        if self.any_origin or origin.lower() in self.exact:
            return True
        return any(p.match(origin) for p in self.wildcards)

    def _allow_origin(self, origin: bytes) -> bytes:
        # "*" cannot be used with credentials; echoing the origin then needs Vary: Origin
        if self.any_origin and not self.credentials:
            return b"*"
        return origin

    def on_request(self, ctx: Ctx) -> RequestResult:
        origin = ctx.header(b"origin")
        if origin is None:
            return None
        req = ctx.req
        asked = ctx.header(b"access-control-request-method")
        if req.method == b"OPTIONS" and asked is not None:
            if not self._origin_ok(origin):
                return Reply.error(403, "cors_forbidden", "origin not allowed by this route")
            headers: Headers = [
                (b"access-control-allow-origin", self._allow_origin(origin)),
                (b"access-control-allow-methods", self.methods),
                (b"access-control-max-age", self.max_age),
                (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
            ]
            wanted = self.allow_headers or ctx.header(b"access-control-request-headers")
            if wanted:
                headers.append((b"access-control-allow-headers", wanted))
            if self.credentials:
                headers.append((b"access-control-allow-credentials", b"true"))
            return Reply(204, b"", headers)
        if self._origin_ok(origin):
            out = ctx.response_headers
            allow = self._allow_origin(origin)
            out.append((b"access-control-allow-origin", allow))
            if allow != b"*":
                out.append((b"vary", b"Origin"))
            if self.credentials:
                out.append((b"access-control-allow-credentials", b"true"))
            if self.expose:
                out.append((b"access-control-expose-headers", self.expose))
        return None

    def on_response(self, ctx: Ctx, status: int, headers: Headers) -> None:
        # the gateway speaks for CORS on this route: upstream's own answers would contradict it
        if ctx.response_headers and any(n.startswith(b"access-control-") for n, _ in headers):
            headers[:] = [(n, v) for n, v in headers if not n.startswith(b"access-control-")]


def _edits(config: HeaderEdits) -> tuple[frozenset[bytes], Headers, Headers]:
    remove = frozenset(n.lower().encode() for n in config.remove)
    sets = [(n.lower().encode(), v.encode()) for n, v in config.set.items()]
    adds = [(n.lower().encode(), v.encode()) for n, v in config.add.items()]
    return remove, sets, adds


def _apply(headers: Headers, remove: frozenset[bytes], sets: Headers, adds: Headers) -> None:
    drop = remove.union(n for n, _ in sets) if sets else remove
    if drop:
        headers[:] = [(n, v) for n, v in headers if n not in drop]
    headers.extend(sets)
    headers.extend(adds)


@register
class RequestTransformerPlugin(Plugin):
    name = "request_transformer"
    priority = 800  # after auth: it may not forge the consumer headers auth sets

    def __init__(self, config: HeaderEdits, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        self.remove, self.sets, self.adds = _edits(config)

    def on_request(self, ctx: Ctx) -> RequestResult:
        _apply(ctx.req.headers, self.remove, self.sets, self.adds)
        return None


@register
class ResponseTransformerPlugin(Plugin):
    name = "response_transformer"
    priority = 800

    def __init__(self, config: HeaderEdits, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        self.remove, self.sets, self.adds = _edits(config)

    def on_response(self, ctx: Ctx, status: int, headers: Headers) -> None:
        _apply(headers, self.remove, self.sets, self.adds)


_DOLLAR = re.compile(r"\$(\d+|[A-Za-z_][A-Za-z0-9_]*)")


@register
class ProxyRewritePlugin(Plugin):
    """``regex`` + ``replace`` on the path (captures ``$1``, ``$name``); ``host`` sets Host."""

    name = "proxy_rewrite"
    priority = 1008

    def __init__(self, config: ProxyRewrite, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        self.regex = re.compile(config.regex.encode()) if config.regex else None
        # "$1" / "$name" → re's "\g<1>" / "\g<name>" (${...} is taken by the environment)
        template = _DOLLAR.sub(lambda m: "\\g<" + m.group(1) + ">", config.replace)
        self.template = template.encode()
        self.host = config.host.encode() if config.host else None

    def on_request(self, ctx: Ctx) -> RequestResult:
        if self.regex is not None:
            req = ctx.req
            path, n = self.regex.subn(self.template, req.path, count=1)
            if n:
                if not path.startswith(b"/"):
                    path = b"/" + path
                ctx.path = path + b"?" + req.query if req.query else path
        if self.host is not None:
            ctx.host = self.host
        return None
