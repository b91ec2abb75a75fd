"""The tuning search as a pure function of scripted measurements: plateau stops, limits, dominance, budget, ties.

Each test scripts a "machine" (a table of throughput and p99 per configuration) and drives the
search as `gpuscope tune` does; no clock and no model are involved, so every outcome is exact.
"""
from __future__ import annotations

import pytest

from gpuscope.analysis.search import (
    FAILED,
    MEASURED,
    OVER_LIMIT,
    SKIPPED,
    Constraints,
    Group,
    Measurement,
    Outcome,
    Search,
    Settings,
    Space,
    default_threads,
    pareto_front,
    rank,
)

T2, T1 = Group(2), Group(1)
COUNTS = (1, 2, 4, 8)


def drive(search: Search, table: dict[tuple[int, int], tuple[float, float]], step_s: float = 1.0,
          memory: dict[tuple[int, int], int] | None = None, failing: set[tuple[int, int]] = frozenset()) -> list[Settings]:
    """Run the search against a table {(predictors, threads): (throughput_rps, p99_ms)}; returns what it measured."""
    elapsed, measured = 0.0, []
    while (s := search.next(elapsed)) is not None:
        key = (s.predictors, s.intra_op_threads)
        rps, p99 = table[key]
        elapsed += step_s
        measured.append(s)
        search.record(Measurement(s, rps, p99 / 2, p99, host_bytes=(memory or {}).get(key, 1000 * s.predictors),
                                  wall_s=step_s, failure="OOM" if key in failing else None))
    return measured


def status(search: Search, predictors: int, threads: int) -> Outcome:
    return next(o for o in search.configurations() if o.settings == Settings(predictors, threads))


# The machine: 2 cores; torch's default (2 threads) plateaus at 2 predictors, 1 thread does better there.
MACHINE = {(1, 2): (8.0, 120), (2, 2): (10.2, 238), (4, 2): (9.0, 500), (8, 2): (8.0, 900),
           (1, 1): (6.0, 170), (2, 1): (12.0, 200), (4, 1): (12.1, 390), (8, 1): (11.0, 800)}


def test_the_default_sweep_climbs_and_stops_at_a_plateau_then_the_other_threads_start_at_the_best_count():
    search = Search(Space(COUNTS, (T2, T1)), Constraints(), budget_s=100, step_estimate_s=1)
    measured = drive(search, MACHINE)
    assert [(s.predictors, s.intra_op_threads) for s in measured] == [(1, 2), (2, 2), (4, 2), (2, 1), (4, 1), (1, 1)]
    assert "plateaued" in status(search, 8, 2).reason and "-12%" in status(search, 8, 2).reason
    assert status(search, 8, 1).status == SKIPPED and "plateaued" in status(search, 8, 1).reason
    best = search.best()
    assert best is not None and best.settings == Settings(2, 1)  # 12.0 and 12.1 tie: 2 predictors use less memory
    assert search.measured_count == 6 < len(Space(COUNTS, (T2, T1)).cells())


def test_a_climb_that_pays_skips_the_counts_below_its_anchor():
    table = {**MACHINE, (4, 1): (16.0, 300), (8, 1): (16.1, 600)}
    search = Search(Space(COUNTS, (T2, T1)), Constraints(), budget_s=100, step_estimate_s=1)
    measured = drive(search, table)
    assert Settings(1, 1) not in measured
    assert "rose above 2 predictors" in status(search, 1, 1).reason
    assert search.best().settings == Settings(4, 1)


def test_p99_over_its_limit_stops_the_climb_with_exceeded_never_passed():
    search = Search(Space(COUNTS, (T2, T1)), Constraints(max_p99_ms=300), budget_s=100, step_estimate_s=1)
    drive(search, MACHINE)
    over = status(search, 4, 2)
    assert over.status == OVER_LIMIT and over.reason == "p99 500 ms at 4 predictors exceeded --max-p99-ms 300"
    assert "passed" not in over.reason
    skipped = status(search, 8, 2)
    assert skipped.status == SKIPPED and "exceeded --max-p99-ms 300" in skipped.reason
    assert search.best().settings == Settings(2, 1)


def test_nothing_within_the_limits_has_no_best_but_a_closest():
    search = Search(Space((1, 2), (T2,)), Constraints(max_p99_ms=100), budget_s=100, step_estimate_s=1)
    drive(search, MACHINE)
    assert search.best() is None
    assert search.closest().settings == Settings(1, 2)  # 120 ms is the nearest miss of 100
    assert status(search, 2, 2).status == SKIPPED  # the climb stopped where p99 broke the limit


def test_a_memory_limit_stops_the_climb_too():
    search = Search(Space(COUNTS, (T2,)), Constraints(max_host_bytes=2500), budget_s=100, step_estimate_s=1)
    table = {k: (v[0] * k[0], v[1]) for k, v in MACHINE.items()}  # throughput keeps climbing
    drive(search, table)
    assert status(search, 4, 2).status == OVER_LIMIT and "exceeded --max-host-memory" in status(search, 4, 2).reason
    assert status(search, 8, 2).status == SKIPPED


def test_a_sweep_dominated_at_two_counts_is_dropped_and_says_by_what():
    t3 = Group(3)
    table = {**MACHINE, (2, 3): (7.0, 300), (4, 3): (6.0, 600), (1, 3): (5.0, 200), (8, 3): (5.0, 999)}
    search = Search(Space(COUNTS, (T2, T1, t3)), Constraints(), budget_s=100, step_estimate_s=1)
    measured = drive(search, table)
    threes = [s for s in measured if s.intra_op_threads == 3]
    assert len(threes) == 2  # one count alone never drops a sweep; the second does
    dropped = status(search, 8, 3)
    assert dropped.status == SKIPPED and "dominated by" in dropped.reason and "at 2 and 4 predictors" in dropped.reason


def test_the_budget_cuts_the_search_off_before_a_step_that_would_not_fit():
    search = Search(Space(COUNTS, (T2, T1)), Constraints(), budget_s=3.5, step_estimate_s=1)
    measured = drive(search, MACHINE, step_s=1.0)
    assert len(measured) == 3  # 3 s used; a fourth 1 s step would end at 4 s > 3.5 s
    cut = status(search, 2, 1)
    assert cut.status == SKIPPED and cut.reason.startswith("skipped: budget: 3 of 3.5 s used")
    assert search.stopped_by.startswith("budget")


def test_the_budget_uses_the_costliest_step_measured_so_far():
    search = Search(Space(COUNTS, (T2,)), Constraints(), budget_s=10, step_estimate_s=1)
    first = search.next(0.0)
    search.record(Measurement(first, 8.0, 1, 2, wall_s=6.0))
    assert search.next(6.0) is None  # another 6 s step would end at 12 s


def test_a_failed_step_stops_the_climb_and_never_wins():
    search = Search(Space(COUNTS, (T2,)), Constraints(), budget_s=100, step_estimate_s=1)
    drive(search, {k: (v[0] * k[0], v[1]) for k, v in MACHINE.items()}, failing={(4, 2)})
    assert status(search, 4, 2).status == FAILED and status(search, 4, 2).reason == "OOM"
    assert status(search, 8, 2).status == SKIPPED and "failed at 4 predictors" in status(search, 8, 2).reason
    assert search.best().settings == Settings(2, 2)


def test_ties_go_to_less_memory_then_lower_p99():
    a, b, c = Settings(1, 1), Settings(2, 1), Settings(4, 1)
    outcomes = [Outcome(a, MEASURED, measurement=Measurement(a, 100.0, 1, 50, host_bytes=300)),
                Outcome(b, MEASURED, measurement=Measurement(b, 101.0, 1, 40, host_bytes=200)),
                Outcome(c, MEASURED, measurement=Measurement(c, 100.5, 1, 30, host_bytes=200))]
    assert [o.settings for o in rank(outcomes)] == [c, b, a]  # c and b tie on memory: c's p99 is lower
    clear = [Outcome(a, MEASURED, measurement=Measurement(a, 120.0, 1, 90, host_bytes=900)), *outcomes[1:]]
    assert rank(clear)[0].settings == a  # 19% more throughput is no tie: memory does not matter then


def test_interruption_keeps_what_was_measured_and_skips_the_rest():
    search = Search(Space(COUNTS, (T2, T1)), Constraints(), budget_s=100, step_estimate_s=1)
    s = search.next(0.0)
    search.record(Measurement(s, 8.0, 1, 2, wall_s=1))
    s = search.next(1.0)
    search.record(Measurement(s, 3.0, 1, 2, wall_s=0.4, interrupted=True))
    assert search.next(1.4) is None
    assert search.best().settings == Settings(1, 2)
    assert all(o.status == SKIPPED for o in search.configurations() if o.settings != Settings(1, 2))
    assert search.stopped_by == "interrupted"


def test_record_must_answer_the_proposal():
    search = Search(Space(COUNTS, (T2,)), Constraints(), budget_s=100, step_estimate_s=1)
    search.next(0.0)
    with pytest.raises(RuntimeError):
        search.record(Measurement(Settings(8, 2), 1.0))


def test_every_cell_has_a_status_and_skipped_ones_a_reason():
    search = Search(Space(COUNTS, (T2, T1)), Constraints(max_p99_ms=300), budget_s=100, step_estimate_s=1)
    drive(search, MACHINE)
    configurations = search.configurations()
    assert len(configurations) == 8
    assert all(o.reason for o in configurations if o.status != MEASURED)
    data = configurations[0].to_json()
    assert data["settings"] == {"predictors": 1, "intra_op_threads": 2, "streams": False, "env": {}}
    assert set(data) >= {"status", "throughput_rps", "latency_ms", "memory"}


def test_pareto_front_and_default_threads():
    points = [(100.0, 10.0), (200.0, 12.0), (150.0, 9.0), (300.0, 12.0), (50.0, 5.0)]
    assert pareto_front(points) == [4, 0, 1]
    assert default_threads(2, (1, 2, 4), 2) == (1, 2)
    assert default_threads(8, (1, 2, 4, 8), 8) == (1, 2, 4, 8)
