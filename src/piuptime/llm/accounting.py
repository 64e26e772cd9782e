"""What a request cost, from the price table in config (US dollars per million tokens)."""

from __future__ import annotations

import re

from piuptime.config.llm import LlmConfig, Price

__all__ = ["Prices"]

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
