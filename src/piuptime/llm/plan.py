"""The walk of one request through its model group and fallbacks: which deployment next, what
each failure does to it, and what the client is told when nothing answered (docs/llm.md,
"Failure semantics")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from piuptime.llm.errors import ApiError, from_provider
from piuptime.llm.groups import DeploymentState, Group
from piuptime.llm.providers.base import (
    AUTH,
    BAD_REQUEST,
    CONNECT,
    CONTENT_POLICY,
    CONTEXT_LENGTH,
    NOT_FOUND,
    OVERLOADED,
    PROTOCOL,
    RATE_LIMITED,
    SERVER,
    TIMEOUT,
    ProviderError,
)

if TYPE_CHECKING:
    from piuptime.llm.handler import LlmApi

__all__ = ["Outcome", "Plan"]

#: failures that retry on the same deployment (once by default) before moving on
_RETRY_SAME = frozenset((SERVER, CONNECT, PROTOCOL))
#: failures that say the deployment is unwell (count towards its breaker)
_UNWELL = frozenset((SERVER, CONNECT, PROTOCOL, TIMEOUT))
#: never retried anywhere: the answer goes to the client
_FINAL = frozenset((CONTENT_POLICY, BAD_REQUEST))
_perf = time.perf_counter


class Outcome:
    """What one request's walk through its plan learnt, for the log and the metrics."""

    __slots__ = (
        "attempts",
        "completion_tokens",
        "continued",
        "cost",
        "deployment",
        "error_kind",
        "fallbacks",
        "group",
        "prompt_tokens",
        "tried",
        "ttft",
        "upstream_time",
        "usage_source",
    )

    def __init__(self, group: str) -> None:
        self.group = group
        self.attempts = 0
        self.fallbacks = 0  # groups moved to after the first
        self.tried: list[str] = []
        self.deployment: DeploymentState | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost: float | None = None
        self.ttft: float | None = None
        self.error_kind: str | None = None
        self.upstream_time = 0.0
        self.usage_source: str | None = None  # "provider" or "counted"
        self.continued = False  # a broken stream was carried on by another deployment

    def log_fields(self) -> dict[str, Any]:
        dep = self.deployment
        return {
            "llm_model": self.group,
            "llm_deployment": dep.label if dep is not None else None,
            "llm_attempts": self.attempts,
            "llm_tried": self.tried,
            "llm_fallbacks": self.fallbacks,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "usage_source": self.usage_source,
            "cost_usd": self.cost,
            "ttft_ms": round(self.ttft * 1000, 3) if self.ttft is not None else None,
            "llm_error": self.error_kind,
            "llm_continued": self.continued,
        }


class Plan:
    """Walks the deployments of a group and its fallbacks until an attempt succeeds.

    ``attempt(dep, key, budget)`` raises ProviderError to go on; whatever it returns ends the
    walk. Raises ApiError when nothing answered (the first real failure is what the client
    sees, never a fallback's own rejection)."""

    def __init__(
        self, api: LlmApi, group: Group, outcome: Outcome, estimate: int, start: float
    ) -> None:
        self.api = api
        self.group = group
        self.outcome = outcome
        self.estimate = estimate
        self.deadline = start + group.timeouts.total
        self.first_error: ProviderError | None = None
        self.first_where = ""
        self.rate_limited: list[float] = []  # retry-after of deployments that said 429
        # a stream keeps its deployment busy until it ends (``Stream`` calls ``end``)
        self.keep_busy = False

    def groups(self) -> list[Group]:
        seen = {self.group.name}
        order = [self.group]
        for g in order:  # grows while iterating: fallbacks of fallbacks
            for name in g.fallbacks:
                if name not in seen and name in self.api.groups:
                    seen.add(name)
                    order.append(self.api.groups[name])
        return order

    async def run(
        self, attempt: Callable[[DeploymentState, str | None, float], Awaitable[Any]]
    ) -> tuple[Any, Any, DeploymentState]:
        outcome = self.outcome
        api = self.api
        visited: set[str] = set()
        queue = self.groups()
        held: list[tuple[float, DeploymentState, Group]] = []
        i = 0
        while i < len(queue):
            group = queue[i]
            i += 1
            if group.name in visited:
                continue
            visited.add(group.name)
            if group is not self.group:
                outcome.fallbacks += 1
            too_long: tuple[ProviderError, str] | None = None
            for dep in group.order():
                wait = dep.wait(self.estimate)
                if wait > 0:
                    held.append((wait, dep, group))
                    continue
                try:
                    return await self._on(dep, group, attempt)
                except ProviderError as exc:
                    if exc.kind == CONTEXT_LENGTH:
                        too_long = (exc, dep.label)
                        break
            if too_long is not None:
                # never retried in this group: the larger-context group, or a clear 400
                jump = group.context_fallback
                if jump and jump not in visited and jump in api.groups:
                    queue.insert(i, api.groups[jump])
                    continue
                raise from_provider(*too_long)
        # everything was tried or held: when a deployment is only held off (Retry-After,
        # back-off, rpm/tpm) and the deadline allows, wait for the soonest and ask it again
        soonest = self._soonest(visited)
        if soonest is not None and soonest[0] < self.deadline - _perf():
            wait, dep, group = soonest
            await asyncio.sleep(wait)
            try:
                return await self._on(dep, group, attempt)
            except ProviderError as exc:
                if exc.kind == CONTEXT_LENGTH:
                    raise from_provider(exc, dep.label) from None
        raise self._exhausted(held)

    def _soonest(self, visited: set[str]) -> tuple[float, DeploymentState, Group] | None:
        """The held-off deployment (of the groups tried) that may be asked again first: held
        by Retry-After, back-off or its rpm/tpm limit, not by an open breaker."""
        best: tuple[float, DeploymentState, Group] | None = None
        for name in visited:
            group = self.api.groups[name]
            for dep in group.deployments:
                if dep.breaker_state != "closed":
                    continue  # taken out for failing: not worth waiting for
                wait = dep.wait(self.estimate)
                if 0 < wait != float("inf") and (best is None or wait < best[0]):
                    best = (wait, dep, group)
        return best

    async def _on(
        self,
        dep: DeploymentState,
        group: Group,
        attempt: Callable[[DeploymentState, str | None, float], Awaitable[Any]],
    ) -> tuple[Any, Any, DeploymentState]:
        """Attempts on one deployment: the first, and same-deployment retries. Returns the
        attempt's result, or raises the ProviderError that moves the plan on."""
        outcome = self.outcome
        keys = dep.provider.keys
        tries = 0
        while True:
            budget = self.deadline - _perf()
            if budget <= 0:
                late = ProviderError(TIMEOUT, "the request's total deadline passed")
                self._remember(late, dep)
                raise late
            index, key = keys.pick()
            if index == -2:
                raise ProviderError(AUTH, "every API key of this provider is set aside")
            outcome.attempts += 1
            outcome.tried.append(dep.label)
            dep.begin()
            t0 = _perf()
            try:
                result = await attempt(dep, key, budget)
            except ProviderError as exc:
                dep.end()
                self._failed(dep, group, exc, index)
                if exc.kind in _FINAL:
                    dep.released_probe()
                    raise from_provider(exc, dep.label) from None
                if exc.kind in _RETRY_SAME and tries < group.retries:
                    tries += 1
                    continue
                if (
                    exc.kind in (AUTH, RATE_LIMITED)
                    and index >= 0
                    and len(keys.keys) > 1
                    and tries < len(keys.keys)
                ):
                    tries += 1
                    continue  # the same deployment with the next key (this one is set aside)
                raise
            except BaseException:
                dep.end()
                dep.released_probe()
                raise
            if not self.keep_busy:
                dep.end()
            value, t_first = result
            dep.succeeded(t_first - t0)
            return value, t_first, dep

    def _remember(self, exc: ProviderError, dep: DeploymentState) -> None:
        if self.first_error is None or (
            # a real failure wins over a later fallback's refusal or a timeout
            self.first_error.kind in (AUTH, NOT_FOUND) and exc.kind not in (AUTH, NOT_FOUND)
        ):
            self.first_error = exc
            self.first_where = dep.label

    def _failed(
        self, dep: DeploymentState, group: Group, exc: ProviderError, key_index: int
    ) -> None:
        kind = exc.kind
        self._remember(exc, dep)
        api = self.api
        if api.metrics is not None:
            api.metrics.error(group.name, dep.label, kind)
        if kind in (RATE_LIMITED, OVERLOADED):
            hold = dep.hold_off(exc.retry_after)
            if kind == RATE_LIMITED:
                self.rate_limited.append(hold)
                if key_index >= 0 and len(dep.provider.keys.keys) > 1:
                    dep.provider.keys.hold(key_index, hold)
                    dep.not_before = 0.0  # another key may serve this deployment
            dep.released_probe()
        elif kind == AUTH:
            dep.provider.keys.hold(key_index, 300.0)
            dep.released_probe()
        elif kind in _UNWELL:
            if dep.failed(group.breaker) and api.metrics is not None:
                api.metrics.breaker_opened(dep.label)
        else:
            dep.released_probe()

    def _exhausted(self, held: list[tuple[float, DeploymentState, Group]]) -> ApiError:
        first = self.first_error
        if first is not None and first.kind not in (RATE_LIMITED, OVERLOADED):
            err = from_provider(first, self.first_where)
            if first.kind == TIMEOUT:
                return err
            err.message = f"no deployment could answer; first failure: {err.message}"
            return err
        waits = [w for w, _, _ in held if w != float("inf")] + self.rate_limited
        retry_after = min(waits) if waits else None
        if first is not None:
            err = from_provider(first, self.first_where)
            err.message = f"every deployment is rate-limited or overloaded; {err.message}"
            err.retry_after = retry_after
            return err
        return ApiError(
            429 if self.rate_limited or held else 503,
            "every deployment of this model is busy, rate-limited or taken out by its breaker",
            "no_deployment_available",
            retry_after=retry_after,
            kind="unavailable",
        )
