"""What a request used and cost: its tokens (the provider's usage, else counted offline) and
their price from the table in config (US dollars per million tokens)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from piuptime.config.llm import LlmConfig, Price
from piuptime.llm import tokens

__all__ = ["Prices", "tokens_of"]


def tokens_of(
    usage: Any, body: dict[str, Any], generated: Callable[[], str]
) -> tuple[int, int, str]:
    """``(prompt, completion, source)`` of one answer: the provider's ``usage`` when it gave
    one (source ``"provider"``), else counted offline from the request ``body`` and the
    ``generated()`` text (``"counted"``; the tokenizer loads only then)."""
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        return int(usage["prompt_tokens"]), int(usage.get("completion_tokens") or 0), "provider"
    return tokens.count_chat_prompt(body), tokens.count_completion(generated()), "counted"


# a dated snapshot answers under its family's price: gpt-4o-mini-2024-07-18, claude-...-20241022
_DATED = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$")


class Prices:
    """``llm.prices`` keyed by ``provider/model`` or the provider's model name; a deployment's
    own ``price`` wins over both."""

    __slots__ = ("_table",)

    def __init__(self, table: dict[str, Price]) -> None:
        self._table = dict(table)

    @classmethod
    def from_config(cls, cfg: LlmConfig) -> Prices:
        return cls(cfg.prices)

    def price(
        self, provider: str, model: str, deployment_price: Price | None = None
    ) -> Price | None:
        if deployment_price is not None:
            return deployment_price
        table = self._table
        if not table:
            return None
        found = table.get(f"{provider}/{model}") or table.get(model)
        if found is None:
            base = _DATED.sub("", model)
            if base != model:
                found = table.get(f"{provider}/{base}") or table.get(base)
        return found

    def cost(
        self,
        provider: str,
        model: str,
        deployment_price: Price | None,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> float | None:
        """US dollars for one request, rounded to 1e-9; None when no price is known."""
        price = self.price(provider, model, deployment_price)
        if price is None:
            return None
        usd = (prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000
        return round(usd, 9)
