"""Cost per request from the price table: lookup order and rounding."""

from __future__ import annotations

from piuptime.config.llm import LlmConfig, Price
from piuptime.llm.accounting import Prices


def _cfg() -> LlmConfig:
    return LlmConfig.model_validate(
        {
            "providers": {
                "openai": {"kind": "openai", "keys": ["sk-1"]},
                "azure": {"kind": "openai", "base_url": "https://az.example/v1", "keys": ["k"]},
            },
            "models": {
                "small": {
                    "deployments": [
                        {"provider": "openai", "model": "gpt-4o-mini"},
                        {
                            "provider": "azure",
                            "model": "gpt-4o-mini",
                            "price": {"input": 1.0, "output": 2.0},
                        },
                    ]
                }
            },
            "prices": {
                "gpt-4o-mini": {"input": 0.15, "output": 0.6},
                "azure/gpt-4o-mini": {"input": 0.2, "output": 0.8},
                "claude-sonnet-4": {"input": 3, "output": 15},
            },
        }
    )


def test_cost_by_model_name() -> None:
    prices = Prices.from_config(_cfg())
    # 1,000 prompt tokens at $0.15/M + 500 completion tokens at $0.60/M
    assert prices.cost("openai", "gpt-4o-mini", None, 1000, 500) == 0.00045


def test_provider_qualified_key_wins_over_model_name() -> None:
    prices = Prices.from_config(_cfg())
    assert prices.cost("azure", "gpt-4o-mini", None, 1_000_000, 0) == 0.2


def test_deployment_price_wins() -> None:
    cfg = _cfg()
    dep_price = cfg.models["small"].deployments[1].price
    prices = Prices.from_config(cfg)
    assert prices.cost("azure", "gpt-4o-mini", dep_price, 1_000_000, 1_000_000) == 3.0


def test_unknown_model_has_no_cost() -> None:
    prices = Prices.from_config(_cfg())
    assert prices.cost("openai", "gpt-5", None, 10, 10) is None
    assert Prices({}).cost("openai", "gpt-4o-mini", None, 10, 10) is None
    # a deployment's own price needs no table
    assert Prices({}).cost("x", "y", Price(input=1, output=1), 1, 1) == 2e-06


def test_dated_snapshot_uses_its_family_price() -> None:
    prices = Prices.from_config(_cfg())
    assert prices.cost("openai", "gpt-4o-mini-2024-07-18", None, 1000, 0) == 0.00015
    assert prices.cost("anthropic", "claude-sonnet-4-20250514", None, 1000, 1000) == 0.018


def test_rounded_to_a_nanodollar() -> None:
    prices = Prices({"m": Price(input=0.1, output=0.3)})
    assert prices.cost("p", "m", None, 7, 3) == round((7 * 0.1 + 3 * 0.3) / 1e6, 9)
    assert prices.cost("p", "m", None, 1, 0) == 1e-07
    assert Prices({"m": Price(input=0.0001, output=0)}).cost("p", "m", None, 1, 0) == 0.0
    assert prices.cost("p", "m", None, 0, 0) == 0.0
