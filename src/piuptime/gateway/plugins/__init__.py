"""Plugin handlers and the per-route pipeline they are compiled into.

At config load each route's plugins (the global ones merged with the route's own, see
``piuptime.config.plugins.merged``) are instantiated and sorted by priority (higher first, as
in APISIX and Kong), and their hooks bound into tuples: per request the proxy runs plain
tuples of bound methods, with no look-ups and no config parsing.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from piuptime.gateway.plugins.base import Ctx, Headers, Plugin, PluginEnv, Reply, RequestResult

if TYPE_CHECKING:
    from pydantic import BaseModel

    from piuptime.gateway.runtime import CompiledRoute

__all__ = [
    "REGISTRY",
    "Ctx",
    "Pipeline",
    "Plugin",
    "PluginEnv",
    "Reply",
    "compile_pipeline",
    "register",
]

log = logging.getLogger("piuptime.plugins")

#: plugin name → handler class; filled by ``register`` as the handler modules are imported
REGISTRY: dict[str, type[Plugin]] = {}


def register(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator: make a handler known under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls


class Pipeline:
    """A route's plugins, as tuples of bound hooks in run order."""

    __slots__ = ("failure", "log", "plugins", "request", "response")

    def __init__(self, plugins: list[Plugin]) -> None:
        ordered = sorted(plugins, key=lambda p: -p.priority)
        self.plugins = tuple(ordered)
        self.request: tuple[Callable[[Ctx], RequestResult], ...] = tuple(
            p.on_request for p in ordered if hasattr(p, "on_request")
        )
        self.response: tuple[Callable[[Ctx, int, Headers], None], ...] = tuple(
            p.on_response for p in ordered if hasattr(p, "on_response")
        )
        self.failure: tuple[Callable[[Ctx, int], Reply | None], ...] = tuple(
            p.on_failure for p in ordered if hasattr(p, "on_failure")
        )
        # the log phase runs in reverse: the plugin that ran first releases last
        self.log: tuple[Callable[[Ctx], None], ...] = tuple(
            p.on_log for p in reversed(ordered) if hasattr(p, "on_log")
        )

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plugins]

    # -- running ----------------------------------------------------------------------------

    def access(self, ctx: Ctx) -> RequestResult:
        """Run the access phase: ``None`` (go upstream), a ``Reply``, or an awaitable of
        either when a hook had to wait (the remaining hooks run inside it)."""
        hooks = self.request
        for hook in hooks:
            r = hook(ctx)
            if r is None:
                continue
            if type(r) is Reply:
                return r
            return self._continue(ctx, r, hooks.index(hook) + 1)  # type: ignore[arg-type]
        return None

    async def _continue(
        self, ctx: Ctx, pending: Awaitable[Reply | None], start: int
    ) -> Reply | None:
        r = await pending
        if r is not None:
            return r
        for hook in self.request[start:]:
            step = hook(ctx)
            if step is None:
                continue
            if type(step) is Reply:
                return step
            r = await step  # type: ignore[misc]
            if r is not None:
                return r  # type: ignore[no-any-return]
        return None

    def on_response(self, ctx: Ctx, status: int, headers: Headers) -> None:
        """The response phase: hooks edit ``headers``; then the headers plugins queued on
        ``ctx.response_headers`` are appended."""
        for hook in self.response:
            hook(ctx, status, headers)
        if ctx.response_headers:
            headers.extend(ctx.response_headers)

    def on_failure(self, ctx: Ctx, status: int) -> Reply | None:
        for hook in self.failure:
            reply = hook(ctx, status)
            if reply is not None:
                return reply
        return None

    def finish(self, ctx: Ctx) -> None:
        """The log phase and deferred calls, once per request; never raises."""
        if ctx.finished:
            return
        ctx.finished = True
        deferred = ctx.deferred
        ctx.deferred = None
        for hook in self.log:
            try:
                hook(ctx)
            except Exception:
                log.exception("plugin log hook failed")
        if deferred:
            for fn in deferred:
                try:
                    fn()
                except Exception:
                    log.exception("deferred plugin call failed")


def compile_pipeline(
    configs: dict[str, BaseModel], env: PluginEnv, route: CompiledRoute | None
) -> Pipeline | None:
    """Instantiate the configured plugins for one route; None when it has none."""
    plugins: list[Plugin] = []
    for name, cfg in configs.items():
        plugins.append(handler(name)(cfg, env, route))
    return Pipeline(plugins) if plugins else None


#: plugin name → the module of its handler, imported the first time a config uses the plugin:
#: a gateway without jwt_auth never loads PyJWT and cryptography, one without the cache never
#: loads the cache (start-up time and memory on a Pi)
HANDLER_MODULES = {
    "request_id": "transform",
    "cors": "transform",
    "ip_restriction": "transform",
    "request_size": "transform",
    "request_transformer": "transform",
    "response_transformer": "transform",
    "proxy_rewrite": "transform",
    "key_auth": "auth",
    "basic_auth": "auth",
    "acl": "auth",
    "jwt_auth": "jwt",
    "rate_limit": "ratelimit",
    "limit_concurrency": "ratelimit",
    "fault_injection": "traffic",
    "traffic_split": "traffic",
    "mirror": "traffic",
    "cache": "cache",
}


def handler(name: str) -> type[Plugin]:
    """The handler class of plugin ``name``, importing its module on first use."""
    cls = REGISTRY.get(name)
    if cls is None:
        module = HANDLER_MODULES.get(name)
        if module is not None:
            importlib.import_module(f"piuptime.gateway.plugins.{module}")
            cls = REGISTRY.get(name)
        if cls is None:  # a schema without a handler is a bug of ours, not the user's
            raise RuntimeError(f"plugin {name!r} has a schema but no handler")
    return cls


def _load_handlers() -> None:
    """Import every handler module (tests and tools that list the plugins)."""
    for module in dict.fromkeys(HANDLER_MODULES.values()):
        importlib.import_module(f"piuptime.gateway.plugins.{module}")
