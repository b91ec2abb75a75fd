"""A tick's layout: the (scope, metric) of each reading in order, kept from one tick to the next.

Why: the probes give the same readings in the same order tick after tick, and most values repeat
(memory that did not move, a counter that did not count). The samples writer and `PeakTracker` only
need the readings that changed. One pass over the tick checks the keys by position and finds the
changed readings (about 4 us for the 28 readings of a one-GPU node on the 2-core development machine),
where looking each key up in a dict and judging it cost about twice that, per consumer.

A reading has changed when its value or its type differs (1, 1.0 and True are different readings for
the samples file). A layout is only kept when every key of the tick is distinct: a key given twice
keeps its last value, which a comparison by position cannot follow.
"""
from __future__ import annotations

from typing import Any

ScopedValue = tuple[str, str, Any]


class TickLayout:
    """The previous tick's keys and readings, by position; empty until `remember()` and after `forget()`."""

    __slots__ = ("scopes", "metrics", "values")

    def __init__(self) -> None:
        self.scopes: list[str] | None = None
        self.metrics: list[str] = []
        self.values: list[Any] = []

    def changed(self, values: list[ScopedValue]) -> list[int] | None:
        """The positions whose reading differs from the remembered tick's, and this tick's readings
        remembered in their place; None (nothing remembered) when the tick's keys are not the
        remembered ones, in the same order."""
        scopes, metrics, held = self.scopes, self.metrics, self.values
        if scopes is None or len(values) != len(scopes):
            return None
        out: list[int] = []
        position = 0
        for scope, metric, value in values:
            if scope != scopes[position] or metric != metrics[position]:
                return None
            before = held[position]
            if value is not before and (type(value) is not type(before) or value != before):
                out.append(position)
            position += 1
        for position in out:
            held[position] = values[position][2]
        return out

    def remember(self, values: list[ScopedValue]) -> None:
        """Keep this tick's layout and readings for the next tick (none when a key is given twice)."""
        scopes = [scope for scope, _metric, _value in values]
        metrics = [metric for _scope, metric, _value in values]
        if len(set(zip(scopes, metrics))) != len(scopes):
            self.forget()
            return
        self.scopes, self.metrics = scopes, metrics
        self.values = [value for _scope, _metric, value in values]

    def forget(self) -> None:
        self.scopes = None
        self.metrics, self.values = [], []
