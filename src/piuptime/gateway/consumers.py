"""Consumers: the people and programs that use the gateway, compiled from ``consumers:``.

The auth plugins find a consumer from a credential and put it on the request context; ACLs,
rate limits keyed by consumer and the access log read it from there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from piuptime.config.schema import Config


class Consumer:
    __slots__ = ("groups", "name", "name_bytes")

    def __init__(self, name: str, groups: frozenset[str]) -> None:
        self.name = name
        self.name_bytes = name.encode()
        self.groups = groups

    def __repr__(self) -> str:
        return f"<Consumer {self.name}>"


class Consumers:
    """Every consumer by name."""

    def __init__(self, consumers: dict[str, Consumer]) -> None:
        self.by_name = consumers

    @classmethod
    def from_config(cls, config: Config) -> Consumers:
        return cls(
            {name: Consumer(name, frozenset(c.groups)) for name, c in config.consumers.items()}
        )

    def get(self, name: str) -> Consumer | None:
        return self.by_name.get(name)
