"""Traffic plugins: fault injection (traffic split and mirroring join here)."""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING

from piuptime.gateway.plugins import register
from piuptime.gateway.plugins.base import Ctx, Plugin, PluginEnv, Reply, RequestResult

if TYPE_CHECKING:
    from piuptime.config.plugins.traffic import FaultInjection
    from piuptime.gateway.runtime import CompiledRoute


@register
class FaultInjectionPlugin(Plugin):
    """For drills: abort a share of requests with a status, or hold a share before they go
    upstream (the client waits; nothing is sent upstream meanwhile)."""

    name = "fault_injection"
    priority = 11500

    def __init__(self, config: FaultInjection, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        abort, delay = config.abort, config.delay
        self.abort_percent = abort.percent if abort is not None else 0.0
        self.abort_status = abort.status if abort is not None else 503
        self.delay_percent = delay.percent if delay is not None else 0.0
        self.delay = delay.duration if delay is not None else 0.0

    def on_request(self, ctx: Ctx) -> RequestResult:
        if self.abort_percent and random.random() < self.abort_percent:
            return Reply.error(self.abort_status, "fault_injected", "aborted by fault_injection")
        if self.delay_percent and random.random() < self.delay_percent:
            return _hold(self.delay)
        return None


async def _hold(seconds: float) -> Reply | None:
    await asyncio.sleep(seconds)
    return None
