"""The benchmark's statistics: a slot's rate from completion times, and the seeded bootstrap interval."""
from __future__ import annotations

from types import SimpleNamespace

from benchmarks.suite import _bootstrap_mean_ci, _slot_rate


def test_a_slot_rate_counts_intervals_between_completions_not_requests():
    # 10 requests 0.1 s apart inside a 1.05 s slot: 9 intervals in 0.9 s = 10 req/s, not 10 / 1.05
    predictor = SimpleNamespace(end_times_ns=[int(0.1e9 * i) for i in range(1, 11)] + [int(5e9)])
    assert abs(_slot_rate([predictor], 0, int(1.05e9)) - 10.0) < 1e-9
    assert abs(_slot_rate([predictor, predictor], 0, int(1.05e9)) - 20.0) < 1e-9  # predictors add up
    assert _slot_rate([SimpleNamespace(end_times_ns=[1, 2])], 0, 10) is None  # too few to say


def test_the_bootstrap_interval_brackets_the_mean_and_narrows_with_more_pairs():
    few = [1.0, 0.98, 1.02, 0.99, 1.01]
    low, high = _bootstrap_mean_ci(few)
    assert low <= sum(few) / len(few) <= high
    assert _bootstrap_mean_ci(few) == (low, high)  # seeded
    many_low, many_high = _bootstrap_mean_ci(few * 16)
    assert many_high - many_low < high - low
