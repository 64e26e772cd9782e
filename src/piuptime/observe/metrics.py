"""In-process metrics: counters and gauges kept as plain numbers, rendered at scrape time in
the Prometheus text format (``piuptime_`` names).

Hot paths bind a labelled child once (``counter.labels("route-a")``) and call ``inc()``: an
attribute add, no look-up. Families are created once per process and survive reloads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class _Child:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Counter:
    """A monotonically increasing family of values, one per label combination."""

    kind = "counter"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: tuple[str, ...] = (),
        read: Callable[[], Iterable[tuple[tuple[str, ...], float]]] | None = None,
    ) -> None:
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self.children: dict[tuple[str, ...], _Child] = {}
        # values kept elsewhere (a store's failure count), read at scrape time
        self.read = read

    def labels(self, *values: str) -> _Child:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = _Child()
        return child

    def inc(self, *values: str, amount: float = 1.0) -> None:
        self.labels(*values).value += amount

    def value(self, *values: str) -> float:
        child = self.children.get(values)
        return child.value if child is not None else 0.0

    def samples(self) -> Iterable[tuple[str, tuple[str, ...], float]]:
        name = self.name + ("_total" if self.kind == "counter" else "")
        if self.read is not None:
            for values, v in self.read():
                yield name, values, v
        for values, child in self.children.items():
            yield name, values, child.value


class Gauge(Counter):
    """A value that goes up and down, or one read from a callback at scrape time."""

    kind = "gauge"

    def set(self, *values: str, value: float) -> None:
        self.labels(*values).value = value


class Metrics:
    """The process's metric families, by name."""

    def __init__(self) -> None:
        self.families: dict[str, Counter] = {}

    def counter(
        self,
        name: str,
        help: str,
        labelnames: tuple[str, ...] = (),
        read: Callable[[], Iterable[tuple[tuple[str, ...], float]]] | None = None,
    ) -> Counter:
        family = self._family(Counter, name, help, labelnames)
        if read is not None:
            family.read = read
        return family

    def gauge(
        self,
        name: str,
        help: str,
        labelnames: tuple[str, ...] = (),
        read: Callable[[], Iterable[tuple[tuple[str, ...], float]]] | None = None,
    ) -> Gauge:
        family = self._family(Gauge, name, help, labelnames)
        assert isinstance(family, Gauge)
        if read is not None:
            family.read = read
        return family

    def _family(
        self, cls: type[Counter], name: str, help: str, labelnames: tuple[str, ...]
    ) -> Counter:
        full = name if name.startswith("piuptime_") else f"piuptime_{name}"
        family = self.families.get(full)
        if family is None:
            family = self.families[full] = cls(full, help, labelnames)
        elif type(family) is not cls or family.labelnames != labelnames:
            raise ValueError(f"metric {full} already exists with another type or labels")
        return family

    def snapshot(self) -> dict[str, dict[str, float]]:
        """``{sample name: {"label=value,...": value}}`` for JSON status pages and tests."""
        out: dict[str, dict[str, float]] = {}
        for family in self.families.values():
            for name, values, v in family.samples():
                key = ",".join(f"{k}={x}" for k, x in zip(family.labelnames, values, strict=True))
                out.setdefault(name, {})[key] = v
        return out

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        for family in self.families.values():
            lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for name, values, v in family.samples():
                if values:
                    labels = ",".join(
                        f'{k}="{_escape_label(x)}"'
                        for k, x in zip(family.labelnames, values, strict=True)
                    )
                    lines.append(f"{name}{{{labels}}} {_number(v)}")
                else:
                    lines.append(f"{name} {_number(v)}")
        return "\n".join(lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    return str(int(v)) if v == int(v) and abs(v) < 2**53 else repr(v)
