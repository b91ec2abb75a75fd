"""Readings: a number, or Unavailable with a reason; never a 0 or NaN standing in for "could not read"."""
from __future__ import annotations

import json

import pytest

from gpuscope.probes.readings import (
    ERROR,
    NO_DEVICE,
    NOT_SUPPORTED,
    PROCESS_GONE,
    REASONS,
    Unavailable,
    is_available,
    max_reading,
    reading_from_json,
    reading_to_json,
)


def test_the_reasons_are_the_closed_set_of_the_design():
    assert set(REASONS) == {"no_device", "not_supported", "no_permission", "process_gone", "not_initialized", "error"}


def test_an_unknown_reason_is_refused():
    with pytest.raises(ValueError, match="unknown Unavailable reason 'broken'"):
        Unavailable("broken")


def test_unavailable_is_falsy_and_never_equal_to_zero():
    missing = Unavailable(NO_DEVICE)
    assert not missing
    assert missing != 0 and missing != 0.0 and missing is not None
    assert not is_available(missing)


def test_unavailable_is_a_frozen_hashable_value():
    assert Unavailable(ERROR, "x") == Unavailable(ERROR, "x")
    assert len({Unavailable(ERROR, "x"), Unavailable(ERROR, "x"), Unavailable(ERROR)}) == 2
    with pytest.raises(AttributeError):
        Unavailable(ERROR).reason = NO_DEVICE  # type: ignore[misc]


def test_unavailable_reads_well():
    assert str(Unavailable(NOT_SUPPORTED)) == "unavailable (not_supported)"
    assert str(Unavailable(PROCESS_GONE, "pid 7 exited")) == "unavailable (process_gone: pid 7 exited)"


@pytest.mark.parametrize("value, available", [
    (0, True), (612 * 1024**2, True), (0.5, True), (True, False), (False, False), (None, False),
    ("12", False), (Unavailable(ERROR), False),
])
def test_is_available(value, available):
    assert is_available(value) is available


def test_json_round_trip_of_nested_readings():
    data = {"gpu:0": {"used_bytes": 5, "util_pct": Unavailable(NOT_SUPPORTED, "MIG")},
            "list": [1, Unavailable(ERROR), (2, Unavailable(NO_DEVICE))]}
    encoded = reading_to_json(data)
    assert encoded["gpu:0"]["util_pct"] == {"unavailable": "not_supported", "detail": "MIG"}
    assert encoded["list"][1] == {"unavailable": "error"}
    decoded = reading_from_json(json.loads(json.dumps(encoded)))
    assert decoded == {"gpu:0": {"used_bytes": 5, "util_pct": Unavailable(NOT_SUPPORTED, "MIG")},
                       "list": [1, Unavailable(ERROR), [2, Unavailable(NO_DEVICE)]]}


def test_a_dict_that_merely_has_an_unavailable_key_is_not_decoded():
    data = {"unavailable": "error", "count": 3}
    assert reading_from_json(data) == data


def test_max_reading_takes_the_largest_real_value():
    assert max_reading([Unavailable(ERROR), 3, 7.5, Unavailable(NO_DEVICE), 1]) == 7.5


def test_max_reading_of_nothing_readable_keeps_the_reason():
    assert max_reading([None, Unavailable(NO_DEVICE, "lost"), Unavailable(ERROR)]) == Unavailable(NO_DEVICE, "lost")
    assert max_reading([]) == Unavailable(ERROR, "no readings")


@pytest.mark.parametrize("value_ms, shown", [(250.0, "250 ms"), (18.04, "18.0 ms"), (0.45, "0.45 ms"),
                                             (0.085, "85 us"), (float("nan"), "n/a"), (float("inf"), "n/a"),
                                             (None, "n/a"), ("12", "n/a"), (True, "n/a"), (3, "3.00 ms")])
def test_a_latency_is_shown_with_the_digits_that_matter_and_never_as_nan_us(value_ms, shown):
    from gpuscope.probes.units import format_ms

    assert format_ms(value_ms) == shown
