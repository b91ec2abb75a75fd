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


# -- a few layouts: readings on a slower cadence come and go --------------------------------------------

LEAN = [("pid:7", "rss_bytes", 10), ("gpu:0", "used_bytes", 5)]


def _whole(cpu, rss, used):
    return [("host", "cpu_util_pct", cpu), ("pid:7", "rss_bytes", rss), ("gpu:0", "used_bytes", used)]


def _feed(layout, values):
    """What the writer and PeakTracker do: a kept layout's changes, else remember the tick ("new")."""
    changed = layout.changed(values)
    if changed is None:
        layout.remember(values)
        return "new"
    return changed


def test_a_tick_with_a_kept_layout_is_compared_with_what_each_key_last_read_not_with_that_layout_s_last_tick():
    """whole (cpu 50, rss 10), lean (rss 10), lean (rss 11), whole again (cpu 50, rss 10): rss moved since
    the whole tick before, so it changed; cpu was away, so it changed although it reads what it read then."""
    layout = TickLayout()
    assert _feed(layout, _whole(50.0, 10, 5)) == "new"
    assert _feed(layout, LEAN) == "new" and layout.gone == [0]  # cpu stopped
    assert _feed(layout, [("pid:7", "rss_bytes", 11), ("gpu:0", "used_bytes", 5)]) == [0]
    assert _feed(layout, _whole(50.0, 10, 5)) == [0, 1] and layout.gone == []
    assert _feed(layout, _whole(50.0, 10, 5)) == []
    assert _feed(layout, LEAN) == [] and layout.gone == [0]
    assert _feed(layout, [("pid:7", "rss_bytes", 10), ("host", "cpu_util_pct", 50.0)]) == "new"  # another order
    assert layout.gone == [2]  # used_bytes stopped
    assert _feed(layout, LEAN) == [1]  # used_bytes is back; cpu stopped
    assert layout.gone == [0] and layout.keys[0] == ("host", "cpu_util_pct") and layout.current.scopes == ["pid:7", "gpu:0"]


def test_peaks_follow_the_last_reading_across_layouts():
    """PeakTracker's last value of a key shared by two layouts is the last tick's, whichever layout it had."""
    from gpuscope.probes.sampler import PeakTracker

    peaks = PeakTracker()
    ticks = [_whole(50.0, 10, 5), [("pid:7", "rss_bytes", 12), ("gpu:0", "used_bytes", 5)], _whole(20.0, 10, 5),
             [("pid:7", "rss_bytes", 12), ("gpu:0", "used_bytes", 4)]]
    for n, tick in enumerate(ticks):
        peaks(n, tick)
        assert peaks.last() == {**peaks.last(), **{(s, m): v for s, m, v in tick}}, n
    assert peaks.peaks() == {("host", "cpu_util_pct"): 50.0, ("pid:7", "rss_bytes"): 12, ("gpu:0", "used_bytes"): 5}
    assert peaks.last()[("host", "cpu_util_pct")] == 20.0  # the last reading it had, kept while it is away


def test_a_dropped_layout_is_not_kept_alive_and_keys_come_back_as_changed():
    """More layouts than MAX_LAYOUTS (a process on the GPU at every tick, each new): the oldest are dropped,
    nothing refers to them, and the current one always matches."""
    import gc

    from gpuscope.probes.ticklayout import Layout

    layout = TickLayout()
    for pid in range(TickLayout.MAX_LAYOUTS * 3):
        tick = LEAN + [(f"pid:{pid}/gpu:0", "dropped_layout_test", 1)]  # a metric no other test's layout has
        assert _feed(layout, tick) == "new"
        assert _feed(layout, tick) == []
        assert _feed(layout, LEAN) == ("new" if pid == 0 else []) and layout.gone == [2 + pid]
        assert _feed(layout, tick) == [2]  # back
    gc.collect()
    alive = [kept for kept in gc.get_objects() if isinstance(kept, Layout) and "dropped_layout_test" in kept.metrics]
    assert 0 < len(alive) <= TickLayout.MAX_LAYOUTS and layout.current in alive
