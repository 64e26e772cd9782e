"""Plugin schemas: one pydantic model per plugin, grouped by area in this package.

``PluginsConfig`` is the ``plugins:`` mapping of a route and of the top-level (global) section.
Each plugin is a field; an unknown name is an error with a suggestion. On a route, ``false`` as
a plugin's value turns off the global plugin of that name for the route (kept in ``disabled``);
a route's own configuration of a plugin replaces the global one entirely (APISIX's rule).
The handlers live in ``piuptime.gateway.plugins`` (Kong's split of schema and handler).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, model_validator

from ..types import _model
from .auth import Acl, BasicAuth, JwtAuth, KeyAuth
from .cache import Cache
from .ratelimit import LimitConcurrency, RateLimit
from .traffic import FaultInjection, Mirror, TrafficSplit
from .transform import (
    Cors,
    IpRestriction,
    ProxyRewrite,
    RequestId,
    RequestSize,
    RequestTransformer,
    ResponseTransformer,
)

__all__ = ["PluginsConfig"]


class PluginsConfig(BaseModel):
    model_config = _model()

    # names of global plugins turned off for this route (written ``name: false``)
    disabled: frozenset[str] = frozenset()

    # transforms (transform.py)
    request_id: RequestId | None = None
    cors: Cors | None = None
    ip_restriction: IpRestriction | None = None
    request_size: RequestSize | None = None
    request_transformer: RequestTransformer | None = None
    response_transformer: ResponseTransformer | None = None
    proxy_rewrite: ProxyRewrite | None = None
    # auth (auth.py)
    key_auth: KeyAuth | None = None
    jwt_auth: JwtAuth | None = None
    basic_auth: BasicAuth | None = None
    acl: Acl | None = None
    # traffic (traffic.py)
    fault_injection: FaultInjection | None = None
    traffic_split: TrafficSplit | None = None
    mirror: Mirror | None = None
    # rate limiting (ratelimit.py)
    rate_limit: RateLimit | None = None
    limit_concurrency: LimitConcurrency | None = None
    # response cache (cache.py)
    cache: Cache | None = None

    @model_validator(mode="before")
    @classmethod
    def _switches(cls, value: Any) -> Any:
        """``name: false`` disables a global plugin here; ``name:`` (null) or ``name: true``
        means the plugin with its defaults."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        disabled = set(value.get("disabled") or ())
        for key, item in value.items():
            if key == "disabled":
                continue
            if item is False:
                disabled.add(key)
            elif item is None or item is True:
                out[key] = {}
            else:
                out[key] = item
        unknown = sorted(n for n in disabled if n not in cls.model_fields or n == "disabled")
        if unknown:
            # let the field check name them: an unknown plugin switched off is still a typo
            for name in unknown:
                out.setdefault(name, {})
        if disabled:
            out["disabled"] = frozenset(disabled)
        return out

    def enabled(self) -> dict[str, BaseModel]:
        """The configured plugins, by name (``disabled`` not included)."""
        return {
            name: getattr(self, name)
            for name in type(self).model_fields
            if name != "disabled" and getattr(self, name) is not None
        }


def merged(global_: PluginsConfig, route: PluginsConfig) -> dict[str, BaseModel]:
    """The plugins a route runs: the global ones unless the route turns them off or configures
    them itself, plus the route's own."""
    out = {n: c for n, c in global_.enabled().items() if n not in route.disabled}
    out.update(route.enabled())
    return out


PLUGIN_NAMES = tuple(n for n in PluginsConfig.model_fields if n != "disabled")
