"""TickLayout: the readings that changed since the tick before, found by position; no layout where keys differ."""
from __future__ import annotations

import math

from gpuscope.probes.readings import NO_DEVICE, NOT_SUPPORTED, Unavailable
from gpuscope.probes.ticklayout import TickLayout


def _layout(values):
    layout = TickLayout()
    layout.remember(values)
    return layout


def test_only_the_readings_that_changed_in_value_or_type_are_given():
    layout = _layout([("gpu:0", "used_bytes", 1), ("host", "x", 1), ("host", "y", 2.5), ("host", "z", 7)])
    assert layout.changed([("gpu:0", "used_bytes", 1), ("host", "x", 1.0), ("host", "y", 2.5), ("host", "z", 8)]) == [1, 3]
    assert layout.changed([("gpu:0", "used_bytes", 1), ("host", "x", True), ("host", "y", 2.5), ("host", "z", 8)]) == [1]
    assert layout.changed([("gpu:0", "used_bytes", 1), ("host", "x", True), ("host", "y", 2.5), ("host", "z", 8)]) == []


def test_a_reason_that_changes_is_a_change_and_an_equal_one_is_not():
    layout = _layout([("gpu:0", "util_pct", Unavailable(NO_DEVICE, "lost"))])
    assert layout.changed([("gpu:0", "util_pct", Unavailable(NO_DEVICE, "lost"))]) == []
    assert layout.changed([("gpu:0", "util_pct", Unavailable(NOT_SUPPORTED, "lost"))]) == [0]
    assert layout.changed([("gpu:0", "util_pct", 3)]) == [0]


def test_nan_is_never_equal_to_an_earlier_nan():
    layout = _layout([("host", "x", float("nan"))])
    assert layout.changed([("host", "x", float("nan"))]) == [0]
    assert layout.changed([("host", "x", math.inf)]) == [0]


def test_other_keys_or_another_order_or_length_give_no_layout_and_change_nothing():
    layout = _layout([("host", "x", 1), ("host", "y", 2)])
    assert layout.changed([("host", "y", 2), ("host", "x", 1)]) is None
    assert layout.changed([("host", "x", 5), ("pid:1", "y", 2)]) is None
    assert layout.changed([("host", "x", 1)]) is None
    assert layout.changed([("host", "x", 1), ("host", "y", 2), ("host", "z", 3)]) is None
    assert layout.changed([("host", "x", 1), ("host", "y", 2)]) == []  # the failed ones remembered nothing


def test_a_key_given_twice_keeps_no_layout():
    layout = _layout([("host", "x", 1), ("host", "x", 2)])
    assert layout.changed([("host", "x", 1), ("host", "x", 2)]) is None


def test_forget_and_an_empty_layout_match_nothing():
    assert TickLayout().changed([]) is None
    layout = _layout([("host", "x", 1)])
    layout.forget()
    assert layout.changed([("host", "x", 1)]) is None
