"""Every threshold of the rules (profiler/analysis/findings.py's Thresholds) and of the gate (profiler/analysis/gate.py, _Evaluation),
on both sides of its edge.

Each test takes its edge from the Thresholds object (or the limit it sets), never from a literal, and puts one
record exactly at it and one a byte (or one float step) past it. FINDINGS.md decides which side the edge itself
is on: "warn above 85%" means 85% exactly is quiet. A mutant that moves a threshold or turns `>` into `>=`
fails here (docs/testing.md: the mutation run).
"""
from __future__ import annotations

import math

import pytest

from gpuscope.probes.units import GiB, MiB
from gpuscope.analysis.limits import Limits
from gpuscope.analysis.gate import evaluate as gate
from gpuscope.analysis.findings import DEFAULT_THRESHOLDS, Thresholds, bytes_per_extra_predictor, conclude, overloaded, recommend, rule_cache_bloat, rule_cpu_oversubscription, rule_default_stream_serialization, rule_duplicate_model, rule_engine_preallocation, rule_foreign_process, rule_fragmentation, rule_low_headroom, rule_memory_growth_in_steps, rule_outside_allocator, rule_overloaded, rule_per_predictor_growth, rule_pid_namespace, rule_predictor_errors, rule_throughput_plateau
from tests import scenarios as S

T = DEFAULT_THRESHOLDS


def codes(found) -> list[tuple[str, str]]:
    return [(f.code, f.severity) for f in found]


def below(x: float) -> float:
    """The largest float under x: a figure one step inside an edge."""
    return math.nextafter(x, -math.inf)


def above(x: float) -> float:
    return math.nextafter(x, math.inf)


def test_the_defaults_are_findings_md_starting_points():
    """The edges below are taken from T; this pins T itself to the catalogue."""
    assert (T.cache_share, T.cache_min_bytes) == (0.25, 256 * MiB)
    assert (T.headroom_warn, T.headroom_fail) == (0.85, 0.95)
    assert T.fragmentation_split_share == 0.20
    assert T.foreign_fail_share == 0.10
    assert T.growth_warn_device_share == 0.10
    assert T.duplicate_growth_share == 0.5
    assert (T.stream_gain, T.plateau_share) == (0.05, 0.05)
    assert T.pid_namespace_min_bytes == 64 * MiB
    assert T.recommend_max_error_rate == 0.01


# ---------------------------------------------------------------- CACHE_BLOAT: cached > 25% of reserved and > 256 MiB

def cache_run(cached: int, reserved: int):
    """A clean GPU run whose end state holds `cached` of `reserved` in the allocator's cache."""
    record = S.clean_gpu_run()
    record.baseline["end"] = {"torch_reserved_bytes": reserved, "torch_allocated_bytes": reserved - cached}
    return record


@pytest.mark.parametrize("cached, reserved, fires", [
    (T.cache_min_bytes + 1, 4 * (T.cache_min_bytes + 1), False),      # share exactly 25%: not above it
    (T.cache_min_bytes + 1, 4 * (T.cache_min_bytes + 1) - 1, True),   # share just above 25%
    (T.cache_min_bytes, 2 * T.cache_min_bytes, False),                # 50% of reserved, exactly the floor
    (T.cache_min_bytes + 1, 2 * T.cache_min_bytes, True),             # one byte over the floor
], ids=["share-at-edge", "share-past-edge", "floor-at-edge", "floor-past-edge"])
def test_cache_bloat_edges(cached, reserved, fires):
    assert rule_cache_bloat(S.clean_gpu_run(), T) == []  # the steps themselves are clean
    found = rule_cache_bloat(cache_run(cached, reserved), T)
    assert codes(found) == ([("CACHE_BLOAT", "warn")] if fires else [])
    if fires:
        assert found[0].evidence["cached_bytes"] == cached and found[0].evidence["when"] == "end of run"


def test_cache_bloat_reads_the_share_and_floor_from_thresholds():
    record = cache_run(T.cache_min_bytes + 1, 4 * (T.cache_min_bytes + 1) - 1)
    assert rule_cache_bloat(record, Thresholds(cache_share=0.26)) == []
    assert rule_cache_bloat(record, Thresholds(cache_min_bytes=T.cache_min_bytes + 1)) == []


# ---------------------------------------------------------------- FRAGMENTATION: retries > 0 or split > 20% of reserved

def fragmentation_run(retries: int, split: int, reserved: int):
    record = S.fragmentation_run(retries=0)
    step = record.steps[-1]
    step.memory.update(torch_alloc_retries=retries, torch_inactive_split_bytes=split, torch_reserved_bytes=reserved)
    return record


def test_fragmentation_one_retry_is_enough_and_none_is_quiet():
    reserved = 1000 * MiB
    assert rule_fragmentation(fragmentation_run(0, 0, reserved), T) == []
    [finding] = rule_fragmentation(fragmentation_run(1, 0, reserved), T)
    assert (finding.code, finding.severity) == ("FRAGMENTATION", "warn")
    assert "1 alloc retries" in finding.title and finding.evidence["alloc_retries"] == 1


def test_fragmentation_inactive_split_edge():
    reserved = 5 * GiB  # 20% of it is a whole number of bytes
    edge = T.fragmentation_split_share * reserved
    assert edge == int(edge)
    assert rule_fragmentation(fragmentation_run(0, int(edge), reserved), T) == []  # exactly 20%: not above
    [finding] = rule_fragmentation(fragmentation_run(0, int(edge) + 1, reserved), T)
    assert finding.evidence["inactive_split_bytes"] == int(edge) + 1
    assert "(20% of reserved)" in finding.title


def test_fragmentation_in_a_step_that_ran_out_of_memory_counts():
    record = S.oom_run()
    record.steps[-1].memory["torch_alloc_retries"] = 1
    assert codes(rule_fragmentation(record, T)) == [("FRAGMENTATION", "warn")]


# ---------------------------------------------------------------- LOW_HEADROOM: warn above 85%, fail above 95%

def headroom_run(used: int, total: int):
    record = S.headroom_run(0.90, total=total)
    step = record.step_at(2)
    step.memory["device_used_bytes"] = used
    return record


HEADROOM_TOTAL = 100 * GiB  # 85% and 95% of it are whole bytes: the edge itself is a device state


@pytest.mark.parametrize("share_attr, at_edge, past_edge", [
    ("headroom_warn", [], [("LOW_HEADROOM", "warn")]),
    ("headroom_fail", [("LOW_HEADROOM", "warn")], [("LOW_HEADROOM", "fail")]),
])
def test_low_headroom_edges(share_attr, at_edge, past_edge):
    edge = getattr(T, share_attr) * HEADROOM_TOTAL
    used = round(edge)
    assert used / HEADROOM_TOTAL == getattr(T, share_attr)  # the record is exactly at the edge
    assert codes(rule_low_headroom(headroom_run(used, HEADROOM_TOTAL), T)) == at_edge
    assert codes(rule_low_headroom(headroom_run(used + 1, HEADROOM_TOTAL), T)) == past_edge


def test_low_headroom_at_exactly_95_percent_of_the_h200():
    """The H200's total is not a multiple of 20: 95% of it is not a whole byte. The first byte above 95% fails,
    the byte below it warns (int() truncation used to put the '0.95' scenario below the edge)."""
    total = S.TOTAL
    edge = T.headroom_fail * total
    first_above = math.floor(edge) + 1
    assert codes(rule_low_headroom(headroom_run(math.floor(edge), total), T)) == [("LOW_HEADROOM", "warn")]
    assert codes(rule_low_headroom(headroom_run(first_above, total), T)) == [("LOW_HEADROOM", "fail")]
    assert codes(rule_low_headroom(S.headroom_run(0.96), T)) == [("LOW_HEADROOM", "fail")]


def test_low_headroom_reads_the_recommended_step():
    record = headroom_run(round(0.90 * HEADROOM_TOTAL), HEADROOM_TOTAL)
    record.recommendation = {"predictors": 1}  # 1 predictor's step is far emptier
    record.step_at(1).memory["device_used_bytes"] = HEADROOM_TOTAL // 2
    assert rule_low_headroom(record, T) == []


# ---------------------------------------------------------------- PID_NAMESPACE: 64 MiB used while NVML lists no process

def test_pid_namespace_floor_edge():
    record = S.clean_gpu_run()
    assert rule_pid_namespace(record, T) == []
    record.extra["pid_namespace"]["unlisted_used_bytes"] = T.pid_namespace_min_bytes - 1
    assert rule_pid_namespace(record, T) == []
    record.extra["pid_namespace"]["unlisted_used_bytes"] = T.pid_namespace_min_bytes
    [finding] = rule_pid_namespace(record, T)
    assert "64.0 MiB is used on the device while NVML lists no process" in finding.title


def test_pid_namespace_either_other_signal_alone_fires():
    record = S.clean_gpu_run()
    record.extra["pid_namespace"]["self_not_listed"] = True
    assert "NVML does not list its pid" in rule_pid_namespace(record, T)[0].title
    record = S.clean_gpu_run()
    record.processes[0]["exists"] = False
    assert "that this pid namespace does not have" in rule_pid_namespace(record, T)[0].title


# ---------------------------------------------------------------- DEFAULT_STREAM_SERIALIZATION: gain < 5% while p50 >= 1.7x

def stream_run(gain: float, ratio: float, *, streams: bool = False, rate: float | None = None):
    """2 and 4 predictors on the default stream: 4's throughput is 2's x (1 + gain), its p50 2's x ratio."""
    record = S.h200_shared_model_run(False, counts=(2, 4))
    two, four = record.step_at(2), record.step_at(4)
    two.throughput_rps, two.latency_ms = 1000.0, S.latency(1.0)
    four.throughput_rps, four.latency_ms = 1000.0 * (1 + gain), S.latency(ratio)
    record.config["streams"] = streams
    record.config["rate_rps"] = rate
    return record


def test_stream_serialization_fires_inside_both_edges():
    record = stream_run(0.0, T.stream_latency_ratio)
    record.step_at(4).throughput_rps = below(smallest_rate_with_gain(1000.0, T.stream_gain))
    [finding] = rule_default_stream_serialization(record, T)
    assert finding.evidence["throughput_gain"] < T.stream_gain
    assert finding.evidence["from_predictors"] == 2 and finding.evidence["to_predictors"] == 4
    assert finding.evidence["p50_ratio"] == T.stream_latency_ratio


def smallest_rate_with_gain(base: float, gain: float) -> float:
    """The smallest throughput x with x / base - 1 >= gain, computed as the rule computes it."""
    x = base * (1 + gain)
    while x / base - 1 >= gain:
        x = below(x)
    while x / base - 1 < gain:
        x = above(x)
    return x


def test_stream_serialization_gain_edge():
    """A gain of 5% or more is throughput: quiet, whatever the latency; one float step less fires."""
    edge = smallest_rate_with_gain(1000.0, T.stream_gain)
    record = stream_run(0.0, 2.0)
    record.step_at(4).throughput_rps = edge
    assert rule_default_stream_serialization(record, T) == []
    record.step_at(4).throughput_rps = below(edge)
    assert codes(rule_default_stream_serialization(record, T)) == [("DEFAULT_STREAM_SERIALIZATION", "warn")]


def test_stream_serialization_latency_clause_without_streams():
    """streams=False, so the rule reads the numbers: flat throughput with p50 just under 1.7x is not
    serialization (the latency clause keeps it quiet); at 1.7x it is."""
    flat = 0.0
    assert rule_default_stream_serialization(stream_run(flat, below(T.stream_latency_ratio)), T) == []
    assert codes(rule_default_stream_serialization(stream_run(flat, T.stream_latency_ratio), T)) == \
        [("DEFAULT_STREAM_SERIALIZATION", "warn")]
    assert rule_default_stream_serialization(stream_run(flat, 1.0), T) == []


def test_stream_serialization_is_quiet_with_streams_and_under_an_offered_rate():
    assert rule_default_stream_serialization(stream_run(0.0, 2.0, streams=True), T) == []
    # --rate: throughput is the offered rate at every count, so flat throughput says nothing; the same
    # numbers in a closed loop fire
    assert rule_default_stream_serialization(stream_run(0.0, 2.0, rate=1000.0), T) == []
    assert codes(rule_default_stream_serialization(stream_run(0.0, 2.0), T)) == [("DEFAULT_STREAM_SERIALIZATION", "warn")]


def test_stream_serialization_remedy_quotes_this_runs_measurement():
    [finding] = rule_default_stream_serialization(stream_run(-0.02, 2.5), T)
    assert "2 -> 4 predictors gained -2% throughput at 2.5x p50" in finding.remedy
    assert "--streams" in finding.remedy and "reference" in finding.remedy


# ---------------------------------------------------------------- THROUGHPUT_PLATEAU and the recommendation: within 5%

def plateau_run(second: float):
    """1 predictor at 500 req/s, 2 at `second`, 4 at 1,000 (the best)."""
    record = S.cpu_record([S.cpu_step(n, rps, 10.0 * n, rss=700 * MiB, model_bytes=S.CPU_MODEL)
                           for n, rps in ((1, 500.0), (2, second), (4, 1000.0))], model_bytes=S.CPU_MODEL, cores=8)
    return record


def test_plateau_and_recommendation_within_5_percent_edge():
    edge = 1000.0 * (1 - T.plateau_share)
    at = plateau_run(edge)
    assert only_evidence(rule_throughput_plateau(at, T))["knee_predictors"] == 2  # at the edge: within
    assert recommend(at, T)["predictors"] == 2
    past = plateau_run(below(edge))
    assert rule_throughput_plateau(past, T) == []  # the knee is 4, the largest count: nothing beyond it
    assert recommend(past, T)["predictors"] == 4


def only_evidence(found):
    assert len(found) == 1, codes(found)
    return found[0].evidence


def test_the_recommendation_skips_counts_with_1_percent_failed_requests():
    record = plateau_run(990.0)
    step = record.step_at(2)
    # error_rate = errors / (requests + errors): exactly 1% is out, just under it is in
    step.requests, step.errors = 990, 10
    assert step.error_rate == T.recommend_max_error_rate
    assert recommend(record, T)["predictors"] == 4
    step.requests, step.errors = 991, 10
    assert step.error_rate < T.recommend_max_error_rate
    assert recommend(record, T)["predictors"] == 2


# ---------------------------------------------------------------- OVERLOADED: served more than 5% below the offered rate

def test_overloaded_edge():
    record = S.rate_kept_up_run()
    step = record.steps[0]
    edge = step.offered_rps * (1 - T.overload_short_share)
    step.throughput_rps = edge
    assert not overloaded(step, T) and rule_overloaded(record, T) == []
    step.throughput_rps = below(edge)
    assert overloaded(step, T)
    assert codes(rule_overloaded(record, T)) == [("OVERLOADED", "warn")]
    step.throughput_rps, step.dropped_arrivals = step.offered_rps, 1  # one dropped arrival is enough
    assert overloaded(step, T)


# ---------------------------------------------------------------- CPU_OVERSUBSCRIPTION: busy share and the throughput drop

def test_cpu_oversubscription_busy_edge():
    """Quiet when the step used less than half the cores (the threads were not busy), whatever their count."""
    record = S.oversubscribed_cpu_run()
    cores = record.host["usable_cores"]
    busy_edge = T.oversubscription_busy_share * 100.0 * cores
    record.step_at(4).cpu_util_pct = busy_edge
    assert codes(rule_cpu_oversubscription(record, T)) == [("CPU_OVERSUBSCRIPTION", "warn")]
    record.step_at(4).cpu_util_pct = below(busy_edge)
    assert rule_cpu_oversubscription(record, T) == []
    record.step_at(4).cpu_util_pct = None  # not measured: the thread count alone speaks
    assert codes(rule_cpu_oversubscription(record, T)) == [("CPU_OVERSUBSCRIPTION", "warn")]


def test_cpu_oversubscription_threads_edge():
    """More busy threads than cores: exactly as many is not oversubscribed."""
    record = S.oversubscribed_cpu_run()
    cores = record.host["usable_cores"]
    record.step_at(4).intra_op_threads = 1
    record.step_at(4).predictors = cores  # cores x 1 thread: fits
    assert rule_cpu_oversubscription(record, T) == []
    record.step_at(cores).predictors = cores + 1
    assert codes(rule_cpu_oversubscription(record, T))[0][0] == "CPU_OVERSUBSCRIPTION"


def test_cpu_oversubscription_warns_only_when_throughput_falls_5_percent():
    record = S.oversubscribed_cpu_run()
    best_fitting = record.step_at(1).throughput_rps
    edge = best_fitting * (1 - T.oversubscription_drop)
    record.step_at(4).throughput_rps = edge
    assert codes(rule_cpu_oversubscription(record, T)) == [("CPU_OVERSUBSCRIPTION", "info")]
    record.step_at(4).throughput_rps = below(edge)
    assert codes(rule_cpu_oversubscription(record, T)) == [("CPU_OVERSUBSCRIPTION", "warn")]


# ---------------------------------------------------------------- PREDICTOR_ERRORS: fail at 50% failed requests

@pytest.mark.parametrize("failing, of, severity", [(1, 2, "fail"), (499, 1000, "warn")])
def test_predictor_errors_fail_rate_edge(failing, of, severity):
    record = S.predictor_errors_run(failing, of)
    assert (record.steps[1].error_rate >= T.error_fail_rate) == (severity == "fail")
    assert codes(rule_predictor_errors(record, T)) == [("PREDICTOR_ERRORS", severity)]


# ---------------------------------------------------------------- MEMORY_GROWTH: 32 MiB late growth in every step

def test_memory_growth_in_steps_floor_edge():
    record = S.leaking_cpu_run(late_growth=T.step_growth_min_bytes)  # 1 x and 2 x the floor
    assert codes(rule_memory_growth_in_steps(record, T)) == [("MEMORY_GROWTH", "warn")]
    record.step_at(1).memory["late_growth_bytes"] = T.step_growth_min_bytes - 1  # one step stays flat enough
    assert rule_memory_growth_in_steps(record, T) == []


# ---------------------------------------------------------------- PER_PREDICTOR_GROWTH: 4 MiB floor, 10% of the device

def growth_run(slope: int, total: int, recommended: int):
    """1 and 2 predictors, NVML growing by `slope` between them, on a device of `total` bytes."""
    record = S.h200_shared_model_run(False, counts=(1, 2), total=total)
    one, two = record.step_at(1), record.step_at(2)
    two.memory["process_gpu_bytes"] = one.memory["process_gpu_bytes"] + slope
    record.recommendation = {"predictors": recommended}
    return record


def test_per_predictor_growth_floor_edge():
    assert rule_per_predictor_growth(growth_run(T.growth_min_bytes - 1, S.TOTAL, 2), T) == []
    record = growth_run(T.growth_min_bytes, S.TOTAL, 2)
    assert bytes_per_extra_predictor(record, "process_gpu_bytes") == T.growth_min_bytes
    assert codes(rule_per_predictor_growth(record, T)) == [("PER_PREDICTOR_GROWTH", "info")]


def test_per_predictor_growth_device_share_edge():
    total = 16 * GiB
    recommended = 4
    edge = T.growth_warn_device_share * total / recommended  # slope x recommended == 10% of the card
    at = math.floor(edge)
    assert codes(rule_per_predictor_growth(growth_run(at, total, recommended), T)) == [("PER_PREDICTOR_GROWTH", "info")]
    assert codes(rule_per_predictor_growth(growth_run(at + 1, total, recommended), T)) == \
        [("PER_PREDICTOR_GROWTH", "warn")]


# ---------------------------------------------------------------- DUPLICATE_MODEL by growth: half a model, 8 MiB models

def growth_copy_run(model_bytes: int, slope: int):
    """Pointers unreadable (distinct 0): only the growth can say 'a copy per predictor'."""
    steps = [S.cpu_step(n, 30.0 * n, 30.0, rss=700 * MiB + (n - 1) * slope, model_bytes=model_bytes, distinct=0)
             for n in (1, 2)]
    return S.cpu_record(steps, model_bytes=model_bytes)


def test_duplicate_model_growth_share_edge():
    model = 64 * MiB
    half = int(T.duplicate_growth_share * model)
    assert codes(rule_duplicate_model(growth_copy_run(model, half), T)) == [("DUPLICATE_MODEL", "fail")]
    assert rule_duplicate_model(growth_copy_run(model, half - 1), T) == []


def test_duplicate_model_small_model_edge():
    small = T.duplicate_min_model_bytes
    assert codes(rule_duplicate_model(growth_copy_run(small, small), T)) == [("DUPLICATE_MODEL", "fail")]
    assert rule_duplicate_model(growth_copy_run(small - 1, small), T) == []  # drowned in allocator noise


def test_duplicate_model_two_weight_sets_fail_and_one_is_quiet():
    record = growth_copy_run(64 * MiB, 0)
    for step in record.steps:
        step.distinct_weight_sets = 1
    assert rule_duplicate_model(record, T) == []
    record.step_at(2).distinct_weight_sets = 2
    assert codes(rule_duplicate_model(record, T)) == [("DUPLICATE_MODEL", "fail")]


# ---------------------------------------------------------------- FOREIGN_PROCESS: 10% of the card, 5% SM

def foreign_run(held: int, sm: float):
    record = S.foreign_process_run()
    other = next(p for p in record.processes if not p.get("self"))
    other["peak_used_bytes"], other["peak_sm_util_pct"] = held, sm
    return record


def test_foreign_process_share_edge():
    total = S.TOTAL
    edge = math.floor(T.foreign_fail_share * total)
    idle_sm = below(T.foreign_busy_sm_pct)
    assert codes(rule_foreign_process(foreign_run(edge, idle_sm), T)) == [("FOREIGN_PROCESS", "warn")]
    assert codes(rule_foreign_process(foreign_run(edge + 1, idle_sm), T)) == [("FOREIGN_PROCESS", "fail")]


def test_foreign_process_busy_sm_edge():
    assert codes(rule_foreign_process(foreign_run(GiB, T.foreign_busy_sm_pct), T)) == [("FOREIGN_PROCESS", "fail")]
    assert codes(rule_foreign_process(foreign_run(GiB, below(T.foreign_busy_sm_pct)), T)) == \
        [("FOREIGN_PROCESS", "warn")]
    assert rule_foreign_process(foreign_run(0, 50.0), T) == []  # holds nothing: not on the card


# ---------------------------------------------------------------- ENGINE_PREALLOCATION with an unreadable environment

def test_engine_preallocation_unreadable_environment_edge():
    record = S.jax_sibling_run()
    jax = next(p for p in record.processes if "jax" in (p.get("engines") or []))
    jax["memory_env"] = {"unavailable": "no_permission"}
    total = S.TOTAL
    edge = T.preallocation_unreadable_share * total
    jax["peak_used_bytes"] = math.ceil(edge)
    assert [f.code for f in rule_engine_preallocation(record, T)] == ["ENGINE_PREALLOCATION"]
    jax["peak_used_bytes"] = math.ceil(edge) - 1
    assert rule_engine_preallocation(record, T) == []


# ---------------------------------------------------------------- OUTSIDE_ALLOCATOR: growth the count does not explain

def outside_run(jump: int):
    """Five counts with the layer outside the allocator flat but for the last: the robust slope is 0, so all of
    `jump` is unexplained by the predictor count."""
    record = S.h200_shared_model_run(False, counts=(1, 2, 4, 8, 16))
    for step in record.steps:
        step.memory["layers"]["outside_allocator_bytes"] = 700 * MiB
    record.steps[-1].memory["layers"]["outside_allocator_bytes"] = 700 * MiB + jump
    return record


def test_outside_allocator_growth_edge():
    at = rule_outside_allocator(outside_run(T.outside_growth_bytes), T)
    assert codes(at) == [("OUTSIDE_ALLOCATOR", "info")]
    assert at[0].evidence["unexplained_growth_bytes"] == T.outside_growth_bytes
    assert codes(rule_outside_allocator(outside_run(T.outside_growth_bytes + 1), T)) == [("OUTSIDE_ALLOCATOR", "warn")]


# ---------------------------------------------------------------- the gate: each limit exactly at its measured value

@pytest.fixture
def concluded():
    record = S.h200_shared_model_run(False)
    conclude(record)
    assert isinstance(record.recommendation.get("predictors"), int)
    return record


def status(outcome, name: str) -> str:
    [result] = [r for r in outcome.results if r.name == name]
    return result.status


def test_gate_upper_limits_pass_at_the_measured_value_and_fail_one_below(concluded):
    step = concluded.step_at(concluded.recommendation["predictors"])
    for name, value in (("max_device_memory", step.memory["process_gpu_bytes"]),
                        ("max_host_memory", step.memory["rss_bytes"]),
                        ("max_p99_ms", step.latency_ms["p99"]),
                        ("max_memory_per_predictor", concluded.sharing["bytes_per_extra_predictor"])):
        assert status(gate(concluded, Limits(**{name: value})), name) == "pass", name
        smaller = value - 1 if isinstance(value, int) else below(value)
        assert status(gate(concluded, Limits(**{name: smaller})), name) == "fail", name


def test_gate_lower_limits_pass_at_the_measured_value_and_fail_one_above(concluded):
    step = concluded.step_at(concluded.recommendation["predictors"])
    assert status(gate(concluded, Limits(min_throughput=step.throughput_rps)), "min_throughput") == "pass"
    assert status(gate(concluded, Limits(min_throughput=above(step.throughput_rps))), "min_throughput") == "fail"


@pytest.mark.parametrize("headroom_pct", [10, 5, 15])
def test_gate_headroom_exactly_at_the_limit_passes(concluded, headroom_pct):
    """A device exactly `headroom_pct` free passes --min-headroom-pct of that value; a byte less fails.
    (1 - 0.9 is 0.0999... in floats: headroom computed that way failed at exactly 10%.)"""
    step = concluded.step_at(concluded.recommendation["predictors"])
    total = 100 * GiB
    step.memory["device_total_bytes"] = total
    concluded.devices[0]["total_bytes"] = total
    step.memory["device_used_bytes"] = total * (100 - headroom_pct) // 100
    assert status(gate(concluded, Limits(min_headroom_pct=headroom_pct)), "min_headroom_pct") == "pass"
    step.memory["device_used_bytes"] += 1
    assert status(gate(concluded, Limits(min_headroom_pct=headroom_pct)), "min_headroom_pct") == "fail"


def test_gate_fail_on_takes_warn_findings_only_when_asked(concluded):
    warns = [f for f in concluded.findings if f.severity == "warn"]
    assert warns and not [f for f in concluded.findings if f.severity == "fail"]
    assert gate(concluded, Limits(fail_on="fail")).exit_code == 0
    outcome = gate(concluded, Limits(fail_on="warn"))
    assert outcome.exit_code == 1
    # exactly the warn findings are gated: none of the info ones
    assert {r.name.split(".")[1] for r in outcome.results if r.kind == "findings"} == {f.code for f in warns}
    assert [f for f in concluded.findings if f.severity == "info"]


# ---------------------------------------------------------------- survivors of the mutation run (docs/testing.md)
# Each test below kills mutants that survived the 2026-12 sample: an edge the scenarios never sat on exactly, a
# threshold object the rule must honour rather than the defaults, or the words a user reads.

def test_foreign_process_share_edge_where_the_share_is_exact():
    """10% of a 10 GiB card is exactly 1 GiB in floats: holding exactly that is not above it (warn)."""
    record = foreign_run(GiB, below(T.foreign_busy_sm_pct))
    record.device_entry()["total_bytes"] = 10 * GiB
    assert T.foreign_fail_share * (10 * GiB) == GiB
    assert codes(rule_foreign_process(record, T)) == [("FOREIGN_PROCESS", "warn")]
    record = foreign_run(GiB + 1, below(T.foreign_busy_sm_pct))
    record.device_entry()["total_bytes"] = 10 * GiB
    assert codes(rule_foreign_process(record, T)) == [("FOREIGN_PROCESS", "fail")]


def test_overloaded_and_the_recommendation_read_the_shortfall_from_thresholds():
    record = S.rate_kept_up_run()
    step = record.step_at(1)
    step.throughput_rps = below(step.offered_rps * (1 - T.overload_short_share))
    assert codes(rule_overloaded(record, T)) == [("OVERLOADED", "warn")]
    assert recommend(record, T)["predictors"] == 2  # 1 did not keep up
    lenient = Thresholds(overload_short_share=2 * T.overload_short_share)
    assert rule_overloaded(record, lenient) == []
    assert recommend(record, lenient)["predictors"] == 1  # 1 keeps up, within 5% of 2's throughput


def test_stream_serialization_skips_a_count_without_a_p50_and_reads_the_next():
    """A count whose p50 was not measured is passed over (not the end of the search, not a crash)."""
    record = stream_run(0.0, 2.0)
    record.steps.insert(0, S.h200_shared_model_run(False, counts=(1,)).step_at(1))
    record.step_at(1).throughput_rps, record.step_at(1).latency_ms = 900.0, {}
    [finding] = rule_default_stream_serialization(record, T)
    assert (finding.evidence["from_predictors"], finding.evidence["to_predictors"]) == (2, 4)


def test_stream_serialization_reads_a_missing_p50_at_the_doubled_count_as_no_slowdown():
    record = stream_run(0.0, 2.0)
    record.step_at(4).latency_ms = {}
    assert rule_default_stream_serialization(record, T) == []


@pytest.mark.parametrize("first, words", [(1000.0, "at 1 request in flight ("), (500.0, "at 2 requests in flight (")])
def test_plateau_of_observed_traffic_counts_requests_in_flight(first, words):
    record = plateau_run(1000.0)
    record.step_at(1).throughput_rps = first
    for step in record.steps:
        step.observed = True
    [finding] = rule_throughput_plateau(record, T)
    assert words in finding.title, finding.title


def test_sharing_says_nvml_listed_no_process_only_when_no_step_has_the_figure():
    from gpuscope.probes.readings import Unavailable

    record = S.h200_shared_model_run(False, counts=(1, 2))
    record.step_at(1).memory["process_gpu_bytes"] = Unavailable("not_supported")
    conclude(record)
    missing = record.sharing["bytes_per_extra_predictor"]
    assert isinstance(missing, Unavailable) and "NVML lists no process" not in missing.detail
    record.step_at(2).memory["process_gpu_bytes"] = Unavailable("not_supported")
    conclude(record)
    assert "(NVML lists no process here)" in record.sharing["bytes_per_extra_predictor"].detail


def test_outside_allocator_reads_an_environment_recorded_without_memory_settings():
    record = outside_run(T.outside_growth_bytes + 1)
    del record.environment["memory_env"]
    [finding] = rule_outside_allocator(record, T)
    assert finding.code == "OUTSIDE_ALLOCATOR"


def test_memory_growth_names_the_figure_that_grew():
    cpu = rule_memory_growth_in_steps(S.leaking_cpu_run(), T)
    assert "resident memory (RSS)" in cpu[0].title
    gpu = S.clean_gpu_run()
    for step in gpu.steps:
        step.memory["late_growth_bytes"], step.memory["late_growth_s"] = T.step_growth_min_bytes, 2.0
    [finding] = rule_memory_growth_in_steps(gpu, T)
    assert finding.title.startswith("this process's GPU memory kept growing"), finding.title


def test_engine_preallocation_names_this_process_as_such():
    record = S.jax_sibling_run()
    ours = next(p for p in record.processes if p.get("self"))
    ours["engines"], ours["memory_env"] = ["jax"], {}
    titles = [f.title for f in rule_engine_preallocation(record, T)]
    assert any(t.startswith("this process runs jax") for t in titles), titles


def test_thread_unsafe_says_what_differs_when_no_number_does():
    record = S.thread_unsafe_run(writes=(), sequential=(), concurrent=({"request": 3, "differs_in": "dtype"},))
    [finding] = [f for f in evaluate_rules(record) if f.code == "THREAD_UNSAFE"]
    assert "request 3 in dtype" in finding.title and "1 of 96 responses" in finding.title


def evaluate_rules(record):
    from gpuscope.analysis.findings import evaluate

    return evaluate(record, T)


def _watch(record, *, mode: str = "watch", rss_peak: int | None = 171 * MiB):
    """A live record as watch/profile write it: no predictor steps, the peaks in extra["live"]."""
    record.mode, record.steps, record.sharing, record.findings = mode, [], {}, []
    record.recommendation = {"predictors": None, "reason": f"a {mode}"}
    series = {"rss_bytes": {"peak": rss_peak, "peak_t_s": 3.6}} if rss_peak is not None else {}
    record.extra = {"live": {"ticks": 31, "series": series}}
    return record


def live_result(record, limits: Limits):
    [result] = [r for r in gate(record, limits).results if r.name == "max_host_memory"]
    return result


def test_gate_live_memory_limit_passes_at_the_peak_and_fails_a_byte_below():
    record = _watch(S.clean_gpu_run())
    at = live_result(record, Limits(max_host_memory=171 * MiB))
    assert (at.status, at.message) == ("pass", "peak RSS 171 MiB <= 171 MiB over the watch (peak at 3.6 s)")
    under = live_result(record, Limits(max_host_memory=171 * MiB - 1))
    assert (under.status, under.message) == ("fail", "peak RSS 171 MiB > 171 MiB over the watch (peak at 3.6 s)")
    record.extra["live"]["series"]["rss_bytes"]["peak_t_s"] = None  # when the peak came is not recorded
    assert live_result(record, Limits(max_host_memory=GiB)).message == "peak RSS 171 MiB <= 1.00 GiB over the watch"


def test_gate_live_device_limit_on_a_cpu_watch_says_no_gpu_was_measured():
    outcome = gate(_watch(S.clean_cpu_run()), Limits(max_device_memory=GiB))
    [result] = [r for r in outcome.results if r.name == "max_device_memory"]
    assert result.status == "unmeasured"
    assert result.message == "not measured: no GPU was measured (no_device: profiling on the CPU)"


def test_gate_a_profile_that_observed_levels_gates_its_step_limits(concluded):
    concluded.mode = "profile"
    for step in concluded.steps:
        step.observed = True
    step = concluded.step_at(concluded.recommendation["predictors"])
    assert status(gate(concluded, Limits(max_p99_ms=step.latency_ms["p99"])), "max_p99_ms") == "pass"
    [per] = [r for r in gate(concluded, Limits(max_memory_per_predictor=GiB)).results
             if r.name == "max_memory_per_predictor"]
    assert per.message == ("not measured: a profile run observes requests in flight, not predictor counts with "
                           "their memory (needs a diagnose run)")


def test_gate_a_code_a_compare_run_never_looks_for_says_which_run_does():
    record = S.clean_gpu_run()
    record.mode, record.steps, record.findings = "compare", [], []
    messages = [r.message for r in gate(record, Limits(forbid=("FOREIGN_PROCESS", "OOM"))).results if r.kind == "forbid"]
    assert messages == ["not measured: a compare run does not look for FOREIGN_PROCESS",
                        "not measured: a compare run does not look for OOM (its rule reads a predictor sweep: a "
                        "diagnose run)"]


def test_gate_a_code_the_profile_could_not_look_for_is_unmeasured_with_why():
    record = _watch(S.clean_gpu_run(), mode="profile")
    assert status(gate(record, Limits(forbid=("DUPLICATE_MODEL",))), "forbid.DUPLICATE_MODEL") == "pass"
    record.extra["unmeasured_codes"] = {"DUPLICATE_MODEL": "no model was registered"}
    [result] = [r for r in gate(record, Limits(forbid=("DUPLICATE_MODEL",))).results if r.kind == "forbid"]
    assert result.status == "unmeasured"
    assert result.message == "not measured: the profile could not look for DUPLICATE_MODEL: no model was registered"


def test_gate_forbidden_code_reports_its_worst_finding_and_counts_them(concluded):
    from gpuscope.record.run import Finding

    concluded.findings = [Finding("FOREIGN_PROCESS", "warn", "a warning"), Finding("FOREIGN_PROCESS", "fail", "a fail")]
    [two] = [r for r in gate(concluded, Limits(forbid=("FOREIGN_PROCESS",))).results if r.kind == "forbid"]
    assert (two.status, two.measured) == ("fail", "2 findings")
    assert two.message == "FOREIGN_PROCESS found (fail): a fail (+1 more)"
    concluded.findings = concluded.findings[:1]
    [one] = [r for r in gate(concluded, Limits(forbid=("FOREIGN_PROCESS",))).results if r.kind == "forbid"]
    assert (one.measured, one.message) == ("1 finding", "FOREIGN_PROCESS found (warn): a warning")


def test_gate_lists_gated_findings_worst_first_then_by_code(concluded):
    from gpuscope.record.run import Finding

    concluded.findings = [Finding("CACHE_BLOAT", "warn", "w"), Finding("PER_PREDICTOR_GROWTH", "fail", "f"),
                          Finding("CACHE_BLOAT", "warn", "w2")]
    gated = [r.name for r in gate(concluded, Limits(fail_on="warn")).results if r.kind == "findings"]
    assert gated == ["finding.PER_PREDICTOR_GROWTH", "finding.CACHE_BLOAT", "finding.CACHE_BLOAT.2"]


def test_gate_memory_per_predictor_of_a_one_count_sweep_says_why(concluded):
    concluded.steps = concluded.steps[:1]
    concluded.sharing = {}
    [result] = [r for r in gate(concluded, Limits(max_memory_per_predictor=GiB)).results
                if r.name == "max_memory_per_predictor"]
    assert result.status == "unmeasured"
    assert result.message == "not measured: the sweep measured fewer than two predictor counts"


def test_gate_headroom_without_a_device_total_is_unmeasured_never_0_percent(concluded):
    """A device whose total memory is unknown, or reported as 0 bytes, has no headroom to compare."""
    from gpuscope.probes.readings import Unavailable

    step = concluded.step_at(concluded.recommendation["predictors"])
    for total in (Unavailable("not_supported"), 0):
        step.memory["device_total_bytes"] = total
        concluded.devices[0]["total_bytes"] = total
        [result] = [r for r in gate(concluded, Limits(min_headroom_pct=10)).results if r.name == "min_headroom_pct"]
        assert result.status == "unmeasured" and result.measured is None, (total, result.message)
        assert result.message.startswith("not measured: headroom was not measured ("), result.message


def test_gate_a_tune_run_is_checked_on_its_best_configuration_unless_a_count_is_given(concluded):
    best = concluded.step_at(4).to_json()
    concluded.mode = "tune"
    concluded.tuning = {"best": {"label": "4 predictors x 2 threads", "step": best}}
    outcome = gate(concluded, Limits(max_p99_ms=1000.0))
    assert outcome.at_predictors == 4
    assert outcome.notes == ("a tune run: the limits are checked on its best configuration (4 predictors x 2 threads)",)
    given = gate(concluded, Limits(max_p99_ms=1000.0), at_predictors=1)
    assert given.at_predictors == 1 and given.notes == ()


def test_gate_a_level_with_too_few_requests_is_not_measured_and_says_so(concluded):
    n = concluded.recommendation["predictors"]
    step = concluded.step_at(n)
    step.too_few_requests, step.level, step.requests = True, "3-4", 7
    [result] = [r for r in gate(concluded, Limits(max_p99_ms=1000.0)).results if r.name == "max_p99_ms"]
    assert result.status == "unmeasured"
    assert result.message == "not measured: the level of 3-4 requests in flight had too few requests (7) to measure"


def test_gate_outcome_names_the_run_it_checked_and_when_in_utc(concluded):
    from datetime import datetime, timedelta

    outcome = gate(concluded, Limits())
    assert outcome.run == {"started_at": concluded.started_at, "tool_version": concluded.tool_version,
                           "status": concluded.status, "mode": "diagnose", "device": concluded.config["device"],
                           "hostname": concluded.host["hostname"]}
    assert datetime.fromisoformat(outcome.checked_at).utcoffset() == timedelta(0)
    del concluded.config["device"]
    concluded.host = None  # a record that does not say: the defaults, never a crash
    run = gate(concluded, Limits()).run
    assert (run["device"], run["hostname"]) == ("cpu", "")


@pytest.mark.parametrize("ticks, measured", [(5, True), (4, False), (None, False)])
def test_gate_forbidden_trend_needs_its_minimum_samples_exactly(ticks, measured):
    from gpuscope.record.catalogue import CODES

    assert CODES["MEMORY_GROWTH"].min_ticks == 5
    record = _watch(S.clean_gpu_run())
    record.extra["live"]["ticks"] = ticks
    [result] = [r for r in gate(record, Limits(forbid=("MEMORY_GROWTH",))).results if r.kind == "forbid"]
    if measured:
        assert result.status == "pass"
    else:
        assert result.status == "unmeasured"
        assert result.message == f"not measured: MEMORY_GROWTH needs at least 5 samples; the watch took {ticks or 0}"


def test_the_recommendation_keeps_a_count_whose_p99_is_exactly_the_limit():
    record = S.h200_shared_model_run(False)
    record.config["max_p99_ms"] = record.step_at(4).latency_ms["p99"]
    assert recommend(record, T)["predictors"] == 2
    record.config["max_p99_ms"] = record.step_at(1).latency_ms["p99"]  # only 1 meets it, exactly
    assert recommend(record, T)["predictors"] == 1
    record.config["max_p99_ms"] = below(record.step_at(1).latency_ms["p99"])
    assert recommend(record, T)["predictors"] is None


def test_thread_unsafe_names_each_write_and_counts_what_it_found():
    writes = (S.STATEFUL_WRITE, {**S.STATEFUL_WRITE, "attribute": "cache", "kind": "item_set"})
    record = S.thread_unsafe_run(writes=writes, sequential=(), concurrent=({"request": 1, "max_abs_diff": 0.5},))
    record.thread_safety["concurrent_mismatch_count"] = 9
    [finding] = [f for f in evaluate_rules(record) if f.code == "THREAD_UNSAFE"]
    assert finding.title.startswith("the predictor is not safe to share between threads: a request writes "
                                    "Stateful.last (rebound), cache (item set); 9 of 96 responses under 4 "), finding.title
    assert (finding.evidence["write_count"], finding.evidence["concurrent_mismatch_count"]) == (2, 9)


def test_per_predictor_growth_reports_the_cublas_workspace_setting():
    record = growth_run(512 * MiB, 80 * GiB, 2)
    record.environment["memory_env"] = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    [finding] = rule_per_predictor_growth(record, T)
    assert finding.evidence["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_gate_headroom_of_a_zero_byte_device_and_of_a_cpu_run_say_why(concluded):
    step = concluded.step_at(concluded.recommendation["predictors"])
    step.memory["device_total_bytes"] = 0
    concluded.devices[0]["total_bytes"] = 0
    [zero] = [r for r in gate(concluded, Limits(min_headroom_pct=10)).results if r.name == "min_headroom_pct"]
    assert zero.message == ("not measured: headroom was not measured (error: the device reported 0 bytes of total "
                            "memory) (at 2 predictors)")
    cpu = S.clean_cpu_run()
    conclude(cpu)
    [none] = [r for r in gate(cpu, Limits(min_headroom_pct=10)).results if r.name == "min_headroom_pct"]
    assert none.message == "not measured: no GPU was measured (no_device: profiling on the CPU) (at 2 predictors)"


def test_robust_slope_takes_the_mean_of_the_two_middle_slopes_of_an_even_count():
    from gpuscope.analysis.findings import robust_slope

    # pairwise slopes 10, 10, 16.67, 20, 20, 30: the median of six is (16.67 + 20) / 2
    assert robust_slope([(1, 0), (2, 10), (3, 40), (4, 50)]) == pytest.approx(55 / 3)
    assert robust_slope([(1, 0), (2, 10), (3, 30)]) == 15  # three slopes 10, 15, 20: the middle one
    assert robust_slope([(1, 5), (1, 9)]) is None  # no two distinct counts: no slope


# ---------------------------------------------------------------- NONDETERMINISTIC_OUTPUT: rounding under concurrency

def rounding_run(mismatches, **check):
    """Responses that agree one at a time and differ under 4 concurrent predictors (measure/thread_safety.py)."""
    record = S.thread_unsafe_run(writes=(), sequential=(), concurrent=mismatches)
    record.thread_safety.update(check)
    return record


ROUNDING = {"request": 1, "predictor": 2, "max_abs_diff": 4.8e-7, "rounding": True}


def test_rounding_only_under_concurrency_is_nondeterministic_info_with_its_evidence():
    from gpuscope.analysis.findings import rule_nondeterministic_output, rule_thread_unsafe

    record = rounding_run([ROUNDING], concurrent_beyond_rounding_count=0)
    assert rule_thread_unsafe(record, T) == []
    [finding] = rule_nondeterministic_output(record, T)
    assert (finding.code, finding.severity, finding.at_predictors) == ("NONDETERMINISTIC_OUTPUT", "info", None)
    assert finding.title == (
        "1 of 96 responses under 4 concurrent predictors differ from the same requests run one at a time by float "
        "rounding only (request 1 (predictor 2) by up to 4.8e-07): the intra-op threads split their sums "
        "differently when predictors share the cores; no request wrote shared state")
    assert finding.evidence == {"concurrent_mismatches": [ROUNDING], "concurrent_mismatch_count": 1,
                                "concurrent_predictors": 4, "requests": 8, "tolerance": 0.0, "rounding_only": True}
    assert finding.remedy == (
        "nothing to fix if the last bits of a response may vary; to compare within rounding pass --output-tolerance "
        "1e-5; for bitwise repeatable responses give each predictor one intra-op thread (torch.set_num_threads(1))")


@pytest.mark.parametrize("mismatches, check", [
    ([ROUNDING], {"concurrent_beyond_rounding_count": 1}),                    # one beyond rounding: a race
    ([ROUNDING, {**ROUNDING, "rounding": False}], {"concurrent_beyond_rounding_count": 0}),  # not all rounding
    ([{k: v for k, v in ROUNDING.items() if k != "rounding"}], {}),           # a record from before the mark
    ([], {"concurrent_beyond_rounding_count": 0}),                            # nothing differed
], ids=["beyond-one", "one-not-rounding", "before-the-mark", "none"])
def test_rounding_only_needs_every_mismatch_within_rounding(mismatches, check):
    from gpuscope.analysis.findings import rule_nondeterministic_output

    assert rule_nondeterministic_output(rounding_run(mismatches, **check), T) == []


def test_a_record_without_the_beyond_count_counts_every_mismatch_as_beyond():
    from gpuscope.analysis.findings import rule_nondeterministic_output

    record = rounding_run([ROUNDING])  # scenarios' thread_check predates the mark: no beyond count
    assert "concurrent_beyond_rounding_count" not in record.thread_safety
    record.thread_safety["concurrent_mismatch_count"] = 0  # said explicitly: none beyond
    assert codes(rule_nondeterministic_output(record, T)) == [("NONDETERMINISTIC_OUTPUT", "info")]
    del record.thread_safety["concurrent_mismatch_count"]  # not said: the list's length (1) counts
    assert rule_nondeterministic_output(record, T) == []
