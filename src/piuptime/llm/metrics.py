"""The AI gateway's metrics (names prefixed ``piuptime_llm_``; see docs/metrics.md).

- ``llm_requests_total{model,deployment,status}``: finished requests by group, the deployment
  that answered ("" when none did) and outcome (``ok`` or the error kind)
- ``llm_tokens_total{model,deployment,consumer,type}``: prompt and completion tokens
- ``llm_cost_usd_total{model,deployment,consumer}``: from the price table
- ``llm_ttft_seconds{model}``: request received → first token (streams) or whole answer
- ``llm_fallbacks_total{model}``: requests answered by a fallback group
- ``llm_errors_total{model,deployment,kind}``: failed attempts by kind (rate_limited, server,
  timeout, connect, context_length, stream_interrupted, ...)
- ``llm_breaker_opened_total{deployment}``
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from piuptime.observe.metrics import Metrics

if TYPE_CHECKING:
    from piuptime.llm.plan import Outcome

__all__ = ["LlmMetrics"]

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class LlmMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.requests = metrics.counter(
            "llm_requests",
            "LLM API requests by model group, the deployment that answered and the outcome",
            ("model", "deployment", "status"),
        )
        self.tokens = metrics.counter(
            "llm_tokens",
            "Tokens by model group, deployment, consumer and type (prompt or completion)",
            ("model", "deployment", "consumer", "type"),
        )
        self.cost = metrics.counter(
            "llm_cost_usd",
            "Cost in US dollars from llm.prices, by model group, deployment and consumer",
            ("model", "deployment", "consumer"),
        )
        self.ttft = metrics.histogram(
            "llm_ttft_seconds",
            "Time to first token (streams) or to the whole answer, by model group",
            ("model",),
            buckets=_TTFT_BUCKETS,
        )
        self.fallbacks = metrics.counter(
            "llm_fallbacks", "Requests that moved on to a fallback group", ("model",)
        )
        self.errors = metrics.counter(
            "llm_errors",
            "Failed LLM attempts by model group, deployment and kind",
            ("model", "deployment", "kind"),
        )
        self.breaker = metrics.counter(
            "llm_breaker_opened", "Times a deployment's breaker opened", ("deployment",)
        )

    def record(self, outcome: Outcome, consumer: str) -> None:
        dep = outcome.deployment
        label = dep.label if dep is not None else ""
        model = outcome.group
        self.requests.inc(model, label, outcome.error_kind or "ok")
        if dep is not None:
            if outcome.prompt_tokens:
                self.tokens.inc(model, label, consumer, "prompt", amount=outcome.prompt_tokens)
            if outcome.completion_tokens:
                self.tokens.inc(
                    model, label, consumer, "completion", amount=outcome.completion_tokens
                )
            if outcome.cost:
                self.cost.inc(model, label, consumer, amount=outcome.cost)
        if outcome.ttft is not None:
            self.ttft.observe(model, value=outcome.ttft)
        if outcome.fallbacks and dep is not None:
            self.fallbacks.inc(model)

    def error(self, model: str, deployment: str, kind: str) -> None:
        self.errors.inc(model, deployment, kind)

    def breaker_opened(self, deployment: str) -> None:
        self.breaker.inc(deployment)
