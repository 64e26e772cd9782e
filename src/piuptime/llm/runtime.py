"""Build the LLM API from the ``llm:`` section: providers, groups, the handler, its routes.

The app calls ``build_llm`` at start and on every reload (beside the gateway's own compile);
unchanged providers keep their pools and keys, unchanged deployments their breakers and
latency averages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from piuptime.config.llm import LLM_ROUTE_PLUGINS_REFUSED
from piuptime.config.plugins import merged
from piuptime.gateway.runtime import HandlerRoute
from piuptime.llm.groups import Group, ProviderRuntime, build_groups, retired

if TYPE_CHECKING:
    from piuptime.config.schema import Config
    from piuptime.llm.handler import LlmApi
    from piuptime.observe.metrics import Metrics

__all__ = ["LlmRuntime", "build_llm", "retired_providers"]


class LlmRuntime:
    """One compiled ``llm:`` section."""

    def __init__(
        self,
        providers: dict[str, ProviderRuntime],
        groups: dict[str, Group],
        api: LlmApi,
        routes: list[HandlerRoute],
    ) -> None:
        self.providers = providers
        self.groups = groups
        self.api = api
        self.routes = routes

    def snapshot(self) -> dict[str, Any]:
        """Live state of every deployment (admin /status)."""
        return {
            name: [
                {
                    "deployment": d.label,
                    "breaker": d.breaker_state,
                    "in_flight": d.in_flight,
                    "ttft_ewma_ms": round(d.ttft_ewma * 1000, 3) if d.ttft_ewma else None,
                    "requests_total": d.requests_total,
                    "failures_total": d.failures_total,
                }
                for d in g.deployments
            ]
            for name, g in self.groups.items()
        }


def build_llm(
    config: Config, previous: LlmRuntime | None, metrics: Metrics | None
) -> LlmRuntime | None:
    """The LLM runtime for ``config`` (None without an ``llm:`` section)."""
    llm = config.llm
    if llm is None:
        return None
    from piuptime.llm.accounting import Prices
    from piuptime.llm.handler import LlmApi
    from piuptime.llm.metrics import LlmMetrics

    if llm.preload_tokenizer:
        from piuptime.llm import tokens

        tokens.preload()  # before serving (at start), or once on the reload that asks for it
    providers, groups = build_groups(
        llm,
        previous.providers if previous is not None else None,
        previous.groups if previous is not None else None,
    )
    api = LlmApi(
        providers,
        groups,
        Prices.from_config(llm),
        LlmMetrics(metrics) if metrics is not None else None,
        llm.max_body_bytes,
    )
    routes = []
    for route in llm.routes:
        plugins = {
            name: cfg
            for name, cfg in merged(config.plugins, route.plugins).items()
            if name not in LLM_ROUTE_PLUGINS_REFUSED
        }
        hosts: tuple[str, ...]
        if route.host is None:
            hosts = ()
        elif isinstance(route.host, str):
            hosts = (route.host,)
        else:
            hosts = tuple(route.host)
        routes.append(
            HandlerRoute(
                name=route.name or f"llm:{route.path}",
                path=route.path,
                handler=api.route_handler(route.path),
                hosts=hosts,
                priority=route.priority,
                max_body_bytes=route.max_body_bytes or llm.max_body_bytes,
                plugins=plugins,
            )
        )
    return LlmRuntime(providers, groups, api, routes)


def retired_providers(old: LlmRuntime | None, new: LlmRuntime | None) -> list[ProviderRuntime]:
    """Providers of ``old`` that ``new`` no longer uses (their pools can be closed)."""
    if old is None:
        return []
    return retired(old.providers.values(), new.providers if new is not None else {})
