"""Ticks' layouts: the (scope, metric) of each reading in order, kept from one tick to the next.

Why: the probes give the same readings in the same order tick after tick, and most values repeat
(memory that did not move, a counter that did not count). The samples writer and `PeakTracker` only
need the readings that changed. One pass over the tick checks the keys by position and finds the
changed readings (about 4 us for the 28 readings of a one-GPU node on the 2-core development machine),
where looking each key up in a dict and judging it cost about twice that, per consumer.

A tick does not always have the layout of the tick before: readings taken on a slower cadence (host
CPU every 0.25 s, USS every 30 s) are in some ticks and not in others, so a 50 ms sampler alternates
between a few layouts. The last few layouts are kept (`MAX_LAYOUTS`), and the last reading of each key
is held once, shared by all of them: a tick is compared with what its keys last read, whichever layout
that tick had, and a key the tick before did not have counts as changed (it is back). `gone` gives the
keys the tick before had and this one has not, which the samples file must say stopped.

A reading has changed when its value or its type differs (1, 1.0 and True are different readings for
the samples file). A layout is only kept when every key of the tick is distinct: a key given twice
keeps its last value, which a comparison by position cannot follow.
"""
from __future__ import annotations

from typing import Any

ScopedValue = tuple[str, str, Any]
Key = tuple[str, str]

# held for a key the last tick did not have: never equal to a reading, so a key that comes back is changed
_MISSING: Any = object()


class Layout:
    """One layout: each position's scope, metric and slot (the key's place in `TickLayout.held`)."""

    __slots__ = ("scopes", "metrics", "slots", "slot_set", "gone_after")

    def __init__(self, scopes: list[str], metrics: list[str], slots: list[int]) -> None:
        self.scopes, self.metrics, self.slots = scopes, metrics, slots
        self.slot_set = frozenset(slots)
        self.gone_after: dict[Layout, list[int]] = {}  # the previous layout -> its slots this one lacks

    def gone_since(self, previous: "Layout") -> list[int]:
        gone = self.gone_after.get(previous)
        if gone is None:
            gone = self.gone_after[previous] = [s for s in previous.slots if s not in self.slot_set]
        return gone


def _changed_against(layout: Layout, values: list[ScopedValue], held: list[Any]) -> list[int] | None:
    """The positions of `values` whose reading differs from what its key last read (a gone key's _MISSING
    included), in one pass; None at the first key that is not `layout`'s at that position."""
    scopes, metrics, slots = layout.scopes, layout.metrics, layout.slots
    out: list[int] = []
    position = 0
    for scope, metric, value in values:
        if scope != scopes[position] or metric != metrics[position]:
            return None
        before = held[slots[position]]
        if value is not before and (type(value) is not type(before) or value != before):
            out.append(position)
        position += 1
    return out


class TickLayout:
    """The last ticks' layouts (the current one first) and the last reading of each key; empty until
    `remember()` and after `forget()`. `keys[slot]` is the key of a slot (slots only grow until
    `forget()`: a consumer may keep its own figure per slot); `current` is the last tick's layout."""

    MAX_LAYOUTS = 6

    __slots__ = ("keys", "held", "current", "gone", "_slot_of", "_recent")

    def __init__(self) -> None:
        self.forget()

    def changed(self, values: list[ScopedValue]) -> list[int] | None:
        """The positions whose reading differs from its key's last reading (or whose key the tick before
        lacked), with this tick's readings held in their place and `gone` set to the slots of the keys
        the tick before had and this one lacks; None, holding nothing, when the tick's keys are not
        those of a kept layout, in the same order."""
        layout = self.current
        if layout is None:
            return None
        held = self.held
        if len(values) == len(layout.slots):
            found = _changed_against(layout, values, held)
            if found is not None:
                slots = layout.slots
                for position in found:
                    held[slots[position]] = values[position][2]
                self.gone = []
                return found
        out: list[int] = []
        gone = None
        for other in self._recent:  # another kept layout: a reading on a slower cadence came or went
            if other is layout or len(other.slots) != len(values):
                continue
            found = _changed_against(other, values, held)
            if found is not None:
                out = found
                gone = other.gone_since(layout)
                break
        if gone is None:
            return None
        for slot in gone:
            held[slot] = _MISSING
        slots = other.slots
        for position in out:
            held[slots[position]] = values[position][2]
        self._recent.remove(other)
        self._recent.insert(0, other)
        self.current, self.gone = other, gone
        return out

    def remember(self, values: list[ScopedValue]) -> None:
        """Keep this tick's layout and readings for the next ticks (all forgotten when a key is given twice)."""
        keys = [(scope, metric) for scope, metric, _value in values]
        if len(set(keys)) != len(keys):
            self.forget()
            return
        slot_of, held = self._slot_of, self.held
        slots = []
        for key in keys:
            slot = slot_of.get(key)
            if slot is None:
                slot = slot_of[key] = len(self.keys)
                self.keys.append(key)
                held.append(_MISSING)
            slots.append(slot)
        layout = next((kept for kept in self._recent if kept.slots == slots), None)
        if layout is None:
            layout = Layout([key[0] for key in keys], [key[1] for key in keys], slots)
            self._recent.insert(0, layout)
            while len(self._recent) > self.MAX_LAYOUTS:
                dropped = self._recent.pop()
                for kept in self._recent:  # nothing keeps a dropped layout alive
                    kept.gone_after.pop(dropped, None)
        else:
            self._recent.remove(layout)
            self._recent.insert(0, layout)
        previous = self.current
        self.gone = [] if previous is None or previous is layout else layout.gone_since(previous)
        for slot in self.gone:
            held[slot] = _MISSING
        for slot, (_scope, _metric, value) in zip(slots, values):
            held[slot] = value
        self.current = layout

    def forget(self) -> None:
        """Hold nothing: the next tick matches no layout."""
        self.keys: list[Key] = []
        self.held: list[Any] = []
        self.current: Layout | None = None
        self.gone: list[int] = []
        self._slot_of: dict[Key, int] = {}
        self._recent: list[Layout] = []
