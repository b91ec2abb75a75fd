"""The diagnose rules, both ways: each fires on its scenario (tests/scenarios.py, built from the H200's
readings) with the right code, severity and number, and stays quiet on a clean GPU run and a clean CPU run.
Also the recommendation, conclude(), and the decomposition at the peak tick of a replayed timeline."""
from __future__ import annotations

import json

import pytest

from gpuscope.analysis import findings
from gpuscope.analysis.findings import (
    DEFAULT_THRESHOLDS,
    RULES,
    Thresholds,
    conclude,
    evaluate,
    recommend,
    rule_cache_bloat,
    rule_cpu_oversubscription,
    rule_default_stream_serialization,
    rule_duplicate_model,
    rule_engine_preallocation,
    rule_foreign_process,
    rule_fragmentation,
    rule_grad_enabled,
    rule_low_headroom,
    rule_measurement_gap,
    rule_memory_growth_in_steps,
    rule_multiple_engines,
    rule_oom,
    rule_outside_allocator,
    rule_overloaded,
    rule_per_predictor_growth,
    rule_pid_namespace,
    rule_predictor_errors,
    rule_gil_contention,
    rule_nondeterministic_output,
    rule_thread_unsafe,
    rule_throughput_plateau,
)
from gpuscope.probes.readings import Unavailable
from gpuscope.probes.units import GiB, MiB
from gpuscope.record.catalogue import KNOWN_CODES
from gpuscope.record.layers import layers_total
from gpuscope.record.run import RunRecord
from tests import scenarios as S

T = DEFAULT_THRESHOLDS


def only(found, code: str):
    matching = [f for f in found if f.code == code]
    assert len(matching) == 1, f"expected one {code}, got {[(f.code, f.severity, f.title) for f in found]}"
    return matching[0]


def fresh(builder):
    made = builder()
    return made[0] if isinstance(made, tuple) else made


# rule -> (scenario, code, severity, numbers the title must show)
FIRES = {
    rule_oom: (S.oom_run, "OOM", "fail", ["out of memory at 4 predictors", "2 is the ceiling"]),
    rule_memory_growth_in_steps: (S.leaking_cpu_run, "MEMORY_GROWTH", "warn",
                                  ["kept growing while every step ran", "+850 MiB in the last 0.5 s at 2 predictors",
                                   "(1.66 GiB/s)"]),
    rule_overloaded: (S.overloaded_run, "OVERLOADED", "warn",
                      ["offered 500 req/s but 1 predictor served 80 req/s", "840 arrivals were dropped"]),
    rule_predictor_errors: (lambda: S.predictor_errors_run(1, 10), "PREDICTOR_ERRORS", "warn",
                            ["10.0% of requests failed at 2 predictors"]),
    rule_duplicate_model: (S.copied_model_run, "DUPLICATE_MODEL", "fail",
                           ["4 distinct copies", "256 MiB per extra predictor", "the model is 256 MiB"]),
    rule_foreign_process: (S.foreign_process_run, "FOREIGN_PROCESS", "warn",  # holds 2 GiB at 1% SM: idle
                           ["1 other process", "2.51 GiB", "pid 576"]),
    rule_multiple_engines: (S.engines_in_one_process_run, "MULTIPLE_ENGINES", "warn",
                            ["this process has 2 GPU engines", "torch, cupy"]),
    rule_engine_preallocation: (S.jax_sibling_run, "ENGINE_PREALLOCATION", "warn",
                                ["pid 527", "jax at default memory settings", "105.39 GiB"]),
    rule_low_headroom: (lambda: S.headroom_run(0.90), "LOW_HEADROOM", "warn", ["90% full at 2 predictors"]),
    rule_cache_bloat: (S.cache_bloat_run, "CACHE_BLOAT", "warn", ["1.06 GiB", "92% of reserved"]),
    rule_fragmentation: (S.fragmentation_run, "FRAGMENTATION", "warn", ["at 4 predictors", "3 alloc retries"]),
    rule_per_predictor_growth: (S.h200_shared_model_run, "PER_PREDICTOR_GROWTH", "info",
                                ["97.5 MiB of device memory", "33.4 MiB in PyTorch's pool", "64.1 MiB outside it"]),
    rule_default_stream_serialization: (S.h200_shared_model_run, "DEFAULT_STREAM_SERIALIZATION", "warn",
                                        ["from 2 to 4 predictors", "-1%", "2.0x"]),
    rule_cpu_oversubscription: (S.oversubscribed_cpu_run, "CPU_OVERSUBSCRIPTION", "warn",
                                ["4 predictors x 2 intra-op threads = 8 busy threads on 2 usable cores",
                                 "falls to 31 req/s at 4"]),
    rule_grad_enabled: (S.grad_enabled_run, "GRAD_ENABLED", "warn", ["2 predictor threads returned outputs with grad_fn"]),
    rule_pid_namespace: (S.container_run, "PID_NAMESPACE", "warn",
                         ["1.60 GiB is used on the device while NVML lists no process",
                          "NVML does not list its pid"]),
    rule_measurement_gap: (S.nvml_lost_run, "MEASUREMENT_GAP", "warn",
                           ["gpu:0 used_bytes (no_device, 4 ticks)", "gpu:0 process_count (no_device, 4 ticks)"]),
    rule_outside_allocator: (S.context_only_run, "OUTSIDE_ALLOCATOR", "info",
                             ["610 MiB of this process's GPU memory", "612 MiB right after initialisation"]),
    rule_thread_unsafe: (S.thread_unsafe_run, "THREAD_UNSAFE", "fail", ["a request writes Stateful.last (rebound)"]),
    rule_nondeterministic_output: (S.nondeterministic_run, "NONDETERMINISTIC_OUTPUT", "info",
                                   ["8 of 8 responses differ between two passes run one at a time",
                                    "request 0 by up to 3.04", "could not be judged"]),
    rule_gil_contention: (S.gil_contention_run, "GIL_CONTENTION", "warn",
                          ["Python stages are 98% of a request", "at most 1.03x one predictor's throughput",
                           "1.01x at 2 on 2 cores", "measured 1.01x"]),
    rule_throughput_plateau: (S.h200_shared_model_run, "THROUGHPUT_PLATEAU", "info",
                              ["stops growing at 2 predictors (2552 req/s)", "32 add only latency",
                               "p50 0.78 ms -> 15.0 ms"]),
}


def test_every_rule_and_code_has_a_scenario():
    assert set(FIRES) == set(RULES)
    from gpuscope.analysis.verdict import FINDING_CODE as COMPARE_CODE  # tested in test_compare.py
    assert {code for _, code, _, _ in FIRES.values()} | {COMPARE_CODE} == set(KNOWN_CODES)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_rule_fires_on_its_scenario(rule):
    builder, code, severity, numbers = FIRES[rule]
    found = rule(fresh(builder), T)
    finding = only(found, code)
    assert finding.severity == severity
    for number in numbers:
        assert number in finding.title, f"{number!r} not in {finding.title!r}"
    assert finding.remedy


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_rule_quiet_on_a_clean_gpu_run(rule):
    found = rule(S.clean_gpu_run(), T)
    if rule is rule_outside_allocator:  # FINDINGS.md: info always, "where did my memory go"
        assert [(f.code, f.severity) for f in found] == [("OUTSIDE_ALLOCATOR", "info")]
        assert "630 MiB" in found[0].title
    else:
        assert found == []


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_rule_quiet_on_a_clean_cpu_run(rule):
    assert rule(S.clean_cpu_run(), T) == []


def test_clean_runs_concluded_have_no_warnings():
    for record in (S.clean_gpu_run(), S.clean_cpu_run()):
        conclude(record)
        assert [f for f in record.findings if f.severity != "info"] == []
        assert record.recommendation["predictors"] == 2
        assert record.sharing["verified"] is True


@pytest.mark.parametrize("builder", [v[0] for v in FIRES.values()] + [S.replayed_h200_run, S.host_pid_listed_run],
                         ids=lambda b: getattr(b, "__name__", "lambda"))
def test_rules_are_pure_functions_of_the_saved_record(builder):
    """`gpuscope report run.json` re-derives findings from the file: the JSON round trip changes nothing."""
    record = fresh(builder)
    reloaded = RunRecord.from_json(json.loads(json.dumps(record.to_json(), default=str)))
    before = [(f.code, f.severity, f.title) for f in evaluate(record)]
    after = [(f.code, f.severity, f.title) for f in evaluate(reloaded)]
    assert before == after
    assert not [t for t in before if "could not run" in t[2]]


# ---------------------------------------------------------------- DUPLICATE_MODEL

def test_duplicate_model_by_distinct_weight_sets():
    finding = only(rule_duplicate_model(S.copied_model_run(), T), "DUPLICATE_MODEL")
    assert finding.evidence["distinct_weight_sets"] == 4
    assert finding.evidence["bytes_per_extra_predictor"] == pytest.approx(256 * MiB, rel=0.01)  # +768 MiB / 3
    assert finding.at_predictors == 4


def test_duplicate_model_by_growth_when_pointers_could_not_be_read():
    finding = only(rule_duplicate_model(S.duplicate_by_growth_run(), T), "DUPLICATE_MODEL")
    assert finding.severity == "fail"
    assert finding.title.startswith("memory grows by about one model per predictor")
    assert "256 MiB per extra predictor" in finding.title
    assert finding.evidence["distinct_weight_sets"] == 0


def test_duplicate_model_growth_threshold_is_half_the_model():
    record = S.duplicate_by_growth_run()
    record.model["model_bytes"] = 513 * MiB  # 256 MiB per predictor is now just under half of it
    assert rule_duplicate_model(record, T) == []
    record.model["model_bytes"] = 4 * MiB    # too small to tell from allocator noise
    assert rule_duplicate_model(record, T) == []


def test_duplicate_model_quiet_when_one_verified_weight_set_and_threads_cost_workspace():
    """remedies-h200: a shared 16 MiB Linear(2048) costs 104 MiB per extra thread in cuBLAS workspaces.
    With the pointers showing one weight set that is per-thread growth, not a copy of the model."""
    record = S.remedies_run()
    assert rule_duplicate_model(record, T) == []
    growth = only(rule_per_predictor_growth(record, T), "PER_PREDICTOR_GROWTH")
    assert growth.evidence["nvml_bytes_per_predictor"] == pytest.approx(103.73 * MiB, abs=1 * MiB)
    assert rule_duplicate_model(S.h200_shared_model_run(), T) == []


# ---------------------------------------------------------------- CPU_OVERSUBSCRIPTION

def test_cpu_oversubscription_4x2_on_2_cores_fires_and_2x1_does_not():
    finding = only(rule_cpu_oversubscription(S.oversubscribed_cpu_run(), T), "CPU_OVERSUBSCRIPTION")
    assert finding.evidence["usable_cores"] == 2
    assert finding.evidence["oversubscribed_predictors"] == [4]
    assert finding.at_predictors == 4
    assert "set_num_threads(max(1, 2 // predictors))" in finding.remedy
    assert rule_cpu_oversubscription(S.fitting_cpu_run(), T) == []


def test_cpu_oversubscription_without_a_fitting_step_is_info():
    record = S.oversubscribed_cpu_run()
    record.steps = record.steps[1:]
    finding = only(rule_cpu_oversubscription(record, T), "CPU_OVERSUBSCRIPTION")
    assert finding.severity == "info"
    assert "falls" not in finding.title


def test_cpu_oversubscription_on_a_gpu_counts_predictors_not_intra_op_threads():
    # On a GPU the intra-op pool idles: 4 predictors x 16 threads on 16 cores is not oversubscribed,
    # however busy the waiting threads look.
    assert rule_cpu_oversubscription(S.gpu_oversubscribed_run(cpu_util=95.0), T) == []
    # The H200 sweep: 32 predictors on 16 cores, each spinning a core while it waits; throughput falls to 2068.
    finding = only(rule_cpu_oversubscription(S.h200_shared_model_run(), T), "CPU_OVERSUBSCRIPTION")
    assert finding.severity == "warn"
    assert "32 predictors each spin a CPU core while they wait on the GPU, on 16 usable cores" in finding.title
    assert "falls to 2068 req/s at 32" in finding.title


# ---------------------------------------------------------------- LOW_HEADROOM

@pytest.mark.parametrize("share, extra_mib, expected", [
    (0.80, 0, None), (0.85, 0, None), (0.85, 1, "warn"), (0.95, 0, "warn"), (0.95, 1, "fail"), (0.99, 0, "fail")])
def test_low_headroom_boundaries(share, extra_mib, expected):
    record = S.headroom_run(share)
    step = record.step_at(2)
    step.memory["device_used_bytes"] += extra_mib * MiB
    found = rule_low_headroom(record, T)
    if expected is None:
        assert found == []
        return
    finding = only(found, "LOW_HEADROOM")
    assert finding.severity == expected
    assert finding.at_predictors == 2
    assert finding.evidence["used_share"] == pytest.approx(share, abs=1e-4)
    assert f"{finding.evidence['used_share']:.0%} full at 2 predictors" in finding.title


def test_low_headroom_reads_the_recommended_count_not_the_peak():
    record = S.headroom_run(0.90)
    record.recommendation = {"predictors": 1}
    record.step_at(1).memory["device_used_bytes"] = int(S.TOTAL * 0.5)
    assert rule_low_headroom(record, T) == []


# ---------------------------------------------------------------- FOREIGN_PROCESS / engines

def test_foreign_process_fail_with_sm_utilisation_warn_without():
    computing = S.foreign_process_run(sm_util=True)
    for process in computing.processes:
        if not process["self"]:
            process["peak_sm_util_pct"] = 40  # the other process computes on the card
    busy = only(rule_foreign_process(computing, T), "FOREIGN_PROCESS")
    assert busy.severity == "fail"
    # The real reading of a process that only holds 2 GiB: 1% SM. An idle holder warns, it does not fail.
    holder = only(rule_foreign_process(S.foreign_process_run(sm_util=True), T), "FOREIGN_PROCESS")
    assert holder.severity == "warn"
    assert busy.evidence["held_bytes"] == 2566 * MiB
    idle = only(rule_foreign_process(S.foreign_process_run(sm_util=False), T), "FOREIGN_PROCESS")
    assert idle.severity == "warn"
    assert "holds 2.51 GiB: pid 576 (/opt/torch/.venv/bin/python3, 2.51 GiB)" in idle.title


def test_foreign_process_fail_above_a_tenth_of_the_card():
    finding = only(rule_foreign_process(S.jax_sibling_run(), T), "FOREIGN_PROCESS")
    assert finding.severity == "fail"  # 107,918 of 143,771 MiB, no SM use
    assert finding.evidence["held_bytes"] == S.JAX_HELD
    small = S.jax_sibling_run(preallocate="false")  # 1,130 MiB, idle
    assert only(rule_foreign_process(small, T), "FOREIGN_PROCESS").severity == "warn"
    assert only(rule_foreign_process(small, Thresholds(foreign_fail_share=0.005)), "FOREIGN_PROCESS").severity == "fail"


def test_foreign_process_ignores_our_children_and_other_gpus():
    record = S.foreign_process_run()
    record.processes[1]["self"] = True  # a child of the profiled process counts as ours
    assert rule_foreign_process(record, T) == []
    record = S.foreign_process_run()
    record.processes[1]["gpu"] = 1
    assert rule_foreign_process(record, T) == []


@pytest.mark.parametrize("env, fires", [
    ({}, True), ({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, False), ({"XLA_PYTHON_CLIENT_PREALLOCATE": "0"}, False),
    ({"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}, True), ({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".3"}, False),
    ({"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}, False)])
def test_engine_preallocation_follows_the_jax_variables(env, fires):
    record = S.jax_sibling_run()
    record.processes[1]["memory_env"] = env
    found = rule_engine_preallocation(record, T)
    assert bool(found) is fires
    if fires:
        assert only(found, "ENGINE_PREALLOCATION").evidence["engine"] == "jax"


def test_engine_preallocation_quiet_with_preallocate_false():
    assert rule_engine_preallocation(S.jax_sibling_run(preallocate="false"), T) == []


def test_engine_preallocation_tensorflow_and_unreadable_environments():
    record = S.jax_sibling_run()
    record.processes[1]["engines"] = ["tensorflow"]
    record.processes[1]["memory_env"] = {}
    assert "TensorFlow maps nearly all" in only(rule_engine_preallocation(record, T), "ENGINE_PREALLOCATION").title
    record.processes[1]["memory_env"] = {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    assert rule_engine_preallocation(record, T) == []
    record = S.jax_sibling_run()
    record.processes[1]["memory_env"] = {"unavailable": "no_permission"}
    finding = only(rule_engine_preallocation(record, T), "ENGINE_PREALLOCATION")  # it holds 75% of the card
    assert finding.evidence["env_readable"] is False
    # unreadable settings and a modest footprint: no evidence of preallocation, so no finding
    record.processes[1]["peak_used_bytes"] = 2 * 1024**3
    assert rule_engine_preallocation(record, T) == []


def test_multiple_engines_in_another_process_and_not_for_one_engine():
    record = S.jax_sibling_run()
    record.processes[1]["engines"] = ["torch", "cupy", "jax"]  # engines_in_one_process, seen from outside
    finding = only(rule_multiple_engines(record, T), "MULTIPLE_ENGINES")
    assert "pid 527" in finding.title and "3 GPU engines" in finding.title
    assert rule_multiple_engines(S.jax_sibling_run(), T) == []


# ---------------------------------------------------------------- stream serialization, plateau, growth

def test_default_stream_serialization_from_the_h200_numbers():
    finding = only(rule_default_stream_serialization(S.h200_shared_model_run(), T), "DEFAULT_STREAM_SERIALIZATION")
    assert finding.evidence["from_predictors"] == 2 and finding.evidence["to_predictors"] == 4
    assert finding.evidence["throughput_gain"] == pytest.approx(2538.8 / 2551.6 - 1)
    assert finding.evidence["p50_ratio"] == pytest.approx(1.569 / 0.782)
    assert finding.at_predictors == 4


def test_default_stream_serialization_only_without_streams():
    assert rule_default_stream_serialization(S.h200_shared_model_run(False, record_streams=True), T) == []
    assert rule_default_stream_serialization(S.h200_shared_model_run(True), T) == []


def test_per_thread_streams_gain_30_percent_over_the_default_stream():
    # the best throughput as the product reads it from each H200 sweep, and the gain its remedy promises
    default_run, streams_run = S.h200_shared_model_run(False), S.h200_shared_model_run(True)
    best_default = only(rule_throughput_plateau(default_run, T), "THROUGHPUT_PLATEAU").evidence["best_throughput_rps"]
    best_streams = only(rule_throughput_plateau(streams_run, T), "THROUGHPUT_PLATEAU").evidence["best_throughput_rps"]
    assert (best_default, best_streams) == (pytest.approx(2551.6), pytest.approx(3304.7))
    gain = best_streams / best_default - 1
    assert gain == pytest.approx(0.30, abs=0.02)
    finding = only(rule_default_stream_serialization(default_run, T), "DEFAULT_STREAM_SERIALIZATION")
    # the remedy's reference figure is what these sweeps show, and it is said to be a reference ...
    assert f"+{gain:.0%} with per-thread streams" in finding.remedy and "reference" in finding.remedy
    # ... beside this run's own measurement
    ev = finding.evidence
    assert f"gained {ev['throughput_gain']:+.0%} throughput at {ev['p50_ratio']:.1f}x p50" in finding.remedy


def test_per_predictor_growth_slope_from_the_h200():
    finding = only(rule_per_predictor_growth(S.h200_shared_model_run(), T), "PER_PREDICTOR_GROWTH")
    ev = finding.evidence
    assert ev["outside_bytes_per_predictor"] == pytest.approx(64 * MiB, abs=3 * MiB)
    assert ev["nvml_bytes_per_predictor"] == pytest.approx(97.5 * MiB, abs=3 * MiB)
    assert ev["reserved_bytes_per_predictor"] < ev["nvml_bytes_per_predictor"] / 2
    assert finding.severity == "info"  # ~100 MiB x 2 recommended is far below 10% of 141 GiB


def test_per_predictor_growth_warns_when_the_recommended_count_would_eat_the_card():
    record = S.h200_shared_model_run(total=16 * GiB)
    record.recommendation = {"predictors": 32}  # 32 x 97.5 MiB = 3 GiB > 1.6 GiB
    assert only(rule_per_predictor_growth(record, T), "PER_PREDICTOR_GROWTH").severity == "warn"


def test_per_predictor_growth_quiet_without_workspaces_or_with_copies():
    assert rule_per_predictor_growth(S.remedies_run(cublas_workspace_off=True), T) == []
    assert rule_per_predictor_growth(S.copied_model_run(), T) == []  # DUPLICATE_MODEL explains that growth


def test_throughput_plateau_per_thread_streams():
    finding = only(rule_throughput_plateau(S.h200_shared_model_run(True), T), "THROUGHPUT_PLATEAU")
    assert finding.evidence["knee_predictors"] == 2
    assert finding.evidence["best_predictors"] == 8
    assert "(3165 req/s)" in finding.title


# ---------------------------------------------------------------- memory rules

def test_outside_allocator_growth_explained_by_predictors_is_info():
    # The H200 sweep: the layer grows ~2 GiB from 1 to 32 predictors, all of it per-thread cuBLAS state,
    # which PER_PREDICTOR_GROWTH reports; OUTSIDE_ALLOCATOR stays info.
    finding = only(rule_outside_allocator(S.h200_shared_model_run(), T), "OUTSIDE_ALLOCATOR")
    assert finding.severity == "info"
    assert finding.evidence["growth_bytes"] == (4340 - 1612 - (1318 - 578)) * MiB
    assert abs(finding.evidence["unexplained_growth_bytes"]) < 512 * MiB
    assert rule_outside_allocator(S.clean_cpu_run(), T) == []


def test_outside_allocator_warns_on_growth_the_predictor_count_does_not_explain():
    record = S.h200_shared_model_run()
    last = max(record.steps, key=lambda s: s.predictors)
    last.memory["layers"]["outside_allocator_bytes"] += 3 * 1024 * MiB  # e.g. another engine's pool appeared
    finding = only(rule_outside_allocator(record, T), "OUTSIDE_ALLOCATOR")
    assert finding.severity == "warn"
    assert "more than the predictor count explains" in finding.title
    assert finding.evidence["unexplained_growth_bytes"] > 1024 * MiB


def test_cache_bloat_evidence_and_threshold():
    finding = only(rule_cache_bloat(S.cache_bloat_run(), T), "CACHE_BLOAT")
    assert finding.evidence["cached_bytes"] == 1090 * MiB
    assert finding.evidence["when"] == "end of run"
    record = S.cache_bloat_run()
    record.baseline["end"]["torch_allocated_bytes"] = 1186 * MiB - 200 * MiB  # 200 MiB cached: below 256 MiB
    assert rule_cache_bloat(record, T) == []


def test_cache_bloat_from_the_replayed_peak_of_a_step():
    step, _ = S.replayed_cached_step()
    record = S.gpu_record([step], model_bytes=512 * MiB, end={})
    finding = only(rule_cache_bloat(record, T), "CACHE_BLOAT")
    assert finding.evidence["when"] == "peak of step"
    assert finding.evidence["cached_bytes"] == step.memory["layers"]["allocator_cache_bytes"]
    assert finding.evidence["cached_bytes"] == pytest.approx(4101 * MiB, abs=2 * MiB)


def test_fragmentation_by_inactive_split_share():
    finding = only(rule_fragmentation(S.fragmentation_run(retries=0, split_share=0.25), T), "FRAGMENTATION")
    assert "25% of reserved" in finding.title
    assert rule_fragmentation(S.fragmentation_run(retries=0, split_share=0.10), T) == []


def test_oom_evidence_and_ceiling():
    finding = only(rule_oom(S.oom_run(), T), "OOM")
    assert finding.evidence["last_good_predictors"] == 2
    assert "CUDA out of memory" in finding.evidence["messages"][0]
    assert "layers" not in finding.evidence["peak_memory"]
    # the OOM step is not a candidate for errors, the plateau or the recommendation
    assert rule_predictor_errors(S.oom_run(), T) == []
    assert recommend(S.oom_run())["predictors"] == 2


def test_predictor_errors_warn_fail_and_dead_threads():
    assert only(rule_predictor_errors(S.predictor_errors_run(6, 10), T), "PREDICTOR_ERRORS").severity == "fail"
    dead = only(rule_predictor_errors(S.predictor_errors_run(1, 10, dead=1), T), "PREDICTOR_ERRORS")
    assert dead.severity == "fail"
    assert "1 predictor thread(s) died" in dead.title
    assert "predictor died: RuntimeError: boom" in dead.evidence["messages"]


def test_pid_namespace_evidence_from_the_gap_tracker():
    record, session = S.container_run()
    finding = only(rule_pid_namespace(record, T), "PID_NAMESPACE")
    assert finding.evidence["unlisted_used_bytes"] == 1636 * MiB
    assert finding.evidence["self_not_listed"] is True
    assert finding.evidence["self_not_listed_ticks"] == 10
    # no NVML row for us: the step's process figure says why instead of a 0
    assert isinstance(record.steps[0].memory["process_gpu_bytes"], Unavailable)


def test_without_a_process_list_the_decomposition_falls_back_to_the_device():
    """A container without the host pid namespace: the layers still add up to NVML's device `used`,
    torch's own figures split off, the rest unattributed; not a bar of driver reserve alone."""
    from gpuscope.analysis.findings import conclude

    record, _session = S.container_run()
    conclude(record)
    for step in record.steps:
        layers = step.memory["layers"]
        assert sum(layers.values()) == step.memory["device_used_bytes"] == S.DRIVER + 1636 * MiB
        assert layers["model_weights_bytes"] == 1024 * MiB and layers["allocator_cache_bytes"] == 2 * MiB
        assert layers["driver_reserved_bytes"] == S.DRIVER
        assert layers["unattributed_device_bytes"] == 1636 * MiB - 1026 * MiB
        assert "other_processes_bytes" not in layers  # unknown here, not 0
    missing = record.sharing["bytes_per_extra_predictor"]
    assert isinstance(missing, Unavailable) and "NVML lists no process here" in missing.detail


def test_pid_namespace_host_pid_listed():
    record, _ = S.host_pid_listed_run()
    finding = only(rule_pid_namespace(record, T), "PID_NAMESPACE")
    assert finding.evidence["missing_pids"] == [4_000_123]
    assert "NVML lists pid 4000123" in finding.title


def test_measurement_gap_keeps_the_figures_from_before_the_loss():
    record, session = S.nvml_lost_run(lost_at=6, ticks=10)
    finding = only(rule_measurement_gap(record, T), "MEASUREMENT_GAP")
    assert set(finding.evidence["gaps"]) == {"gpu:0 used_bytes", "gpu:0 util_pct", "gpu:0 process_count"}
    assert all(g["reason"] == "no_device" for g in finding.evidence["gaps"].values())
    step2 = record.step_at(2)
    assert step2.memory["process_gpu_bytes"] == 1222 * MiB  # the peak before NVML went away, not 0


def test_a_crashing_rule_is_reported_not_fatal(monkeypatch):
    def broken(record, t):
        raise KeyError("layers")

    monkeypatch.setattr(findings, "RULES", (broken, rule_oom))
    found = evaluate(S.oom_run())
    assert [f.code for f in found] == ["MEASUREMENT_GAP", "OOM"]
    assert "rule broken could not run" in found[0].title


# ---------------------------------------------------------------- recommendation and conclude()

def test_recommendation_is_the_smallest_count_within_5_percent_of_the_best():
    rec = recommend(S.h200_shared_model_run())
    assert rec["predictors"] == 2
    assert rec["throughput_rps"] == pytest.approx(2551.6)
    assert "the best throughput measured" in rec["reason"]  # 2 predictors are the best here
    streams = recommend(S.h200_shared_model_run(True))
    assert streams["predictors"] == 2  # 3165 >= 0.95 x 3305 (at 8)
    assert "within 5% of the best (3305 req/s)" in streams["reason"]


def synthetic(rps_by_n: dict[int, float], p99_by_n: dict[int, float] | None = None) -> RunRecord:
    steps = [S.cpu_step(n, rps, 10.0, (p99_by_n or {}).get(n, 12.0), rss=700 * MiB, model_bytes=S.CPU_MODEL,
                        intra_op_threads=1) for n, rps in rps_by_n.items()]
    return S.cpu_record(steps, model_bytes=S.CPU_MODEL, cores=16)


def test_recommendation_plateau_share_is_a_threshold():
    record = synthetic({1: 100.0, 2: 190.0, 4: 196.0, 8: 200.0})
    assert recommend(record)["predictors"] == 2          # 190 >= 0.95 x 200
    assert recommend(record, Thresholds(plateau_share=0.01))["predictors"] == 8


@pytest.mark.parametrize("limit, expected", [(None, 2), (3.7, 2), (1.0, 2), (0.5, 1), (0.1, None)])
def test_recommendation_meets_max_p99_ms(limit, expected):
    record = S.h200_shared_model_run(max_p99_ms=limit)
    rec = recommend(record)
    assert rec["predictors"] == expected
    if expected is None:
        assert rec["reason"] == "no predictor count met p99 <= 0.1 ms"
    elif limit is not None:
        assert rec["p99_ms"] <= limit
        assert f"(limit {limit} ms)" in rec["reason"]


def test_recommendation_best_is_taken_among_steps_meeting_the_limit():
    # only 1 and 2 meet 5 ms; 2 is the best of those even though 8 is faster overall
    record = synthetic({1: 100.0, 2: 150.0, 4: 190.0, 8: 200.0}, {1: 3.0, 2: 4.0, 4: 9.0, 8: 20.0})
    record.config["max_p99_ms"] = 5.0
    assert recommend(record)["predictors"] == 2


def test_recommendation_skips_steps_with_errors():
    record = S.h200_shared_model_run()
    record.step_at(2).errors = record.step_at(2).requests // 10
    assert recommend(record)["predictors"] == 4  # the best of the rest is 4 (2539); 1 (2385) is not within 5%


def test_recommendation_says_how_many_more_would_fit():
    record = S.h200_shared_model_run()
    rec = recommend(record)
    step = record.step_at(2)
    slope = findings.bytes_per_extra_predictor(record)
    free = step.memory["device_total_bytes"] - step.memory["device_used_bytes"]
    assert rec["more_would_fit"] == int(free / slope)
    assert rec["memory_bytes"] == 1416 * MiB


def test_recommendation_when_nothing_completed():
    record = S.oom_run()
    record.steps = record.steps[2:]
    assert recommend(record) == {"predictors": None, "reason": "no step completed requests"}


def test_conclude_fills_sharing_recommendation_and_findings():
    record = S.h200_shared_model_run()
    conclude(record)
    assert record.sharing["verified"] is True
    assert record.sharing["distinct_weight_sets"] == 1
    assert record.sharing["memory_figure"] == "process_gpu_bytes"
    assert record.sharing["model_bytes"] == S.H200_MODEL
    assert record.sharing["bytes_per_extra_predictor"] == pytest.approx(97.5 * MiB, abs=3 * MiB)
    assert record.recommendation["predictors"] == 2
    assert {f.code for f in record.findings} == {"PER_PREDICTOR_GROWTH", "DEFAULT_STREAM_SERIALIZATION",
                                                 "OUTSIDE_ALLOCATOR", "THROUGHPUT_PLATEAU", "CPU_OVERSUBSCRIPTION"}


def test_conclude_on_copies_and_on_one_step():
    record = S.copied_model_run()
    conclude(record)
    assert record.sharing["verified"] is False
    assert record.sharing["distinct_weight_sets"] == 4
    assert only(record.findings, "DUPLICATE_MODEL").severity == "fail"
    record = S.clean_cpu_run()
    record.steps = record.steps[:1]
    conclude(record)
    assert record.sharing["memory_figure"] == "rss_bytes"
    assert isinstance(record.sharing["bytes_per_extra_predictor"], Unavailable)
    assert record.recommendation["predictors"] == 1


# ---------------------------------------------------------------- the replayed H200 timeline

def process_layers(layers: dict[str, int]) -> int:
    return sum(layers.get(k, 0) for k in ("model_weights_bytes", "activations_bytes", "allocator_cache_bytes",
                                           "outside_allocator_bytes", "unattributed_process_bytes"))


def nvml_row(line: dict, pid: int) -> int:
    return next(int(p["used"]) for p in line["procs"] if int(p["pid"]) == pid)


@pytest.mark.parametrize("phase, predictors", [("1-predictor", 1), ("4-predictors-streams", 4),
                                               ("foreign-2GiB", 4), ("4GiB-held", 4), ("4GiB-freed-cached", 4)])
def test_replayed_layers_add_up_to_nvml_at_the_peak_tick(phase, predictors):
    replay = S.ReplayNvml()
    session = S.DrivenSession(replay, S.FakeTorchCuda.from_timeline(replay.lines, follow=replay), S.TIMELINE_PID,
                              512 * MiB)
    ticks = S.phase_ticks(replay)[phase]
    step = session.measure_step(predictors, ticks, 1000.0, 1.0)
    # the peak tick: the first tick where NVML showed this process at its highest in the step
    peak_tick = max(ticks, key=lambda t: (nvml_row(replay.lines[t], S.TIMELINE_PID), -t))
    line = replay.lines[peak_tick]
    mine = nvml_row(line, S.TIMELINE_PID)
    layers = step.memory["layers"]
    assert step.memory["process_gpu_bytes"] == mine
    assert process_layers(layers) == mine  # exactly, to the byte
    weights = min(512 * MiB, int(line["alloc"]))
    assert layers["model_weights_bytes"] == weights
    assert layers["activations_bytes"] == int(line["alloc"]) - weights
    assert layers["allocator_cache_bytes"] == int(line["reserved"]) - int(line["alloc"])
    assert layers["outside_allocator_bytes"] == mine - int(line["reserved"])
    others = sum(int(p["used"]) for p in line["procs"] if int(p["pid"]) != S.TIMELINE_PID)
    assert layers["other_processes_bytes"] == others
    assert layers["driver_reserved_bytes"] == S.DRIVER
    assert layers_total(layers) == mine + others + S.DRIVER
    # peaks are the step's maxima, never below what the peak tick showed
    assert step.memory["torch_reserved_bytes"] >= int(line["reserved"])
    assert step.memory["torch_allocated_bytes"] >= int(line["alloc"])
    assert step.memory["device_used_bytes"] == max(int(replay.lines[t]["dev_used"]) for t in ticks)


def test_replayed_foreign_phase_shows_the_other_process_in_its_layer():
    replay = S.ReplayNvml()
    session = S.DrivenSession(replay, S.FakeTorchCuda.from_timeline(replay.lines, follow=replay), S.TIMELINE_PID,
                              512 * MiB)
    step = session.measure_step(4, S.phase_ticks(replay)["foreign-2GiB"], 1000.0, 1.0)
    assert step.memory["layers"]["other_processes_bytes"] == 2566 * MiB
    assert step.memory["other_processes_bytes"] == 2566 * MiB


def test_replayed_h200_run_concludes_like_the_real_card():
    record, session = S.replayed_h200_run()
    assert record.baseline["context_bytes"] == 612 * MiB
    step1, step4 = record.steps
    assert step1.memory["process_gpu_bytes"] == 1222 * MiB
    assert step4.memory["process_gpu_bytes"] == 1620 * MiB
    assert step4.distinct_weight_sets == 1
    assert step4.throughput_rps == pytest.approx(3249.4, rel=0.01)
    conclude(record)
    foreign = only(record.findings, "FOREIGN_PROCESS")
    assert foreign.severity == "fail"
    assert {p["pid"] for p in foreign.evidence["processes"]} == {505, 527}
    assert foreign.evidence["held_bytes"] == 2566 * MiB + 107_918 * MiB
    prealloc = only(record.findings, "ENGINE_PREALLOCATION")
    assert prealloc.evidence["pid"] == 527
    outside = only(record.findings, "OUTSIDE_ALLOCATOR")
    assert "612 MiB right after initialisation" in outside.title
    assert "DUPLICATE_MODEL" not in {f.code for f in record.findings}
    assert record.sharing["verified"] is True


def test_process_readings_in_json_form_do_not_crash_the_rules():
    # record.processes holds JSON: a reading NVML could not take is {"unavailable": ...}, never 0 and never a crash.
    record = S.foreign_process_run(sm_util=True)
    for process in record.processes:
        if not process["self"]:
            process["peak_sm_util_pct"] = {"unavailable": "not_supported"}
    finding = only(rule_foreign_process(record, T), "FOREIGN_PROCESS")
    assert finding.severity == "warn"  # SM use unknown: it holds memory, nothing says it computes
    record.processes[1]["peak_used_bytes"] = {"unavailable": "not_supported"}
    assert rule_foreign_process(record, T) == []  # no readable memory: nothing to report, and no crash
    assert all(f.code != "MEASUREMENT_GAP" for f in evaluate(record))


@pytest.mark.parametrize("process, expected", [
    (1000 * MiB, {"model_weights_bytes": 500 * MiB, "activations_bytes": 100 * MiB,
                  "allocator_cache_bytes": 100 * MiB, "outside_allocator_bytes": 300 * MiB}),
    # torch read a moment after NVML, 50 MiB allocated in between: the cache gives way, nothing negative
    (650 * MiB, {"model_weights_bytes": 500 * MiB, "activations_bytes": 100 * MiB,
                 "allocator_cache_bytes": 50 * MiB, "outside_allocator_bytes": 0}),
    (550 * MiB, {"model_weights_bytes": 500 * MiB, "activations_bytes": 50 * MiB,
                 "allocator_cache_bytes": 0, "outside_allocator_bytes": 0}),
])
def test_layers_add_up_to_nvml_and_are_never_negative_when_torch_was_read_later(process, expected):
    from gpuscope.record.layers import gpu_layers

    layers = gpu_layers(process, 600 * MiB, 700 * MiB, 500 * MiB)
    assert layers == expected and sum(layers.values()) == process


def test_a_rate_served_short_without_drops_is_overloaded_and_never_recommended():
    """--rate 50 on a 50 ms model: 20 and 40 req/s served, nothing dropped (the backlog holds 64 per
    predictor), p99 mostly queueing. That is overload; before, only drops counted and the report said
    healthy. A rate that is kept up with stays quiet."""
    from gpuscope.analysis.findings import conclude

    short = S.rate_kept_up_run(served=(20.0, 40.0))
    conclude(short)
    found = only(rule_overloaded(short, T), "OVERLOADED")
    assert "served 20 req/s; the backlog queued the rest" in found.title
    assert short.recommendation["predictors"] is None
    assert short.recommendation["reason"] == "no predictor count kept up with --rate 50 req/s"
    kept = S.rate_kept_up_run()
    conclude(kept)
    assert rule_overloaded(kept, T) == [] and kept.recommendation["predictors"] == 1


def test_threads_that_sleep_are_not_an_oversubscription():
    """4 predictors x 2 intra-op threads on 2 cores, but the model sleeps (I/O, a remote call): the step's
    measured CPU is 4% of one core, so the cores were free and nothing is oversubscribed."""
    busy = S.oversubscribed_cpu_run()
    assert only(rule_cpu_oversubscription(busy, T), "CPU_OVERSUBSCRIPTION")
    sleeping = S.oversubscribed_cpu_run()
    for step in sleeping.steps:
        step.cpu_util_pct = 4.0
    assert rule_cpu_oversubscription(sleeping, T) == []


def test_a_steady_process_does_not_grow_in_its_steps():
    """2 MiB over the second half of a step is allocator noise, not a leak; and a step without the
    figure (a record from before it was measured) gives no verdict."""
    assert rule_memory_growth_in_steps(S.leaking_cpu_run(late_growth=2 * MiB), T) == []
    old = S.leaking_cpu_run()
    del old.steps[0].memory["late_growth_bytes"]
    assert rule_memory_growth_in_steps(old, T) == []


# ---------------------------------------------------------------- GIL_CONTENTION

def test_gil_contention_evidence_shows_the_shares_the_bound_the_scaling_and_the_cpu():
    finding = only(rule_gil_contention(S.gil_contention_run(), T), "GIL_CONTENTION")
    ev = finding.evidence
    assert ev["stage_shares_at_1"]["preprocess"] == pytest.approx(3.2 / 3.352, rel=1e-3)
    assert ev["python_share_at_1"] == pytest.approx(3.27 / 3.352, rel=1e-3)
    assert ev["amdahl_limit"] == pytest.approx(3.352 / 3.27, rel=1e-3)
    p = 3.27 / 3.352
    assert ev["amdahl_bound_by_predictors"]["2"] == pytest.approx(1 / (p + (1 - p) / 2), rel=1e-6)
    assert ev["measured_scaling_by_predictors"]["2"] == pytest.approx(301 / 298)
    assert ev["cpu_cores_by_predictors"] == {"1": pytest.approx(0.495), "2": pytest.approx(0.5)}
    # blocked 0.2 s of the 1.19 s the threads were not queued for a core; 0 of 0.98 s at 1
    assert ev["gil_wait_share_by_predictors"]["2"] == pytest.approx(0.2 / 1.19, rel=1e-3)
    assert finding.at_predictors == 2
    assert "numpy" in finding.remedy and "gpuscope compare" in finding.remedy


def test_gil_contention_on_a_contended_machine_says_so_beside_the_measured_scaling():
    """The threads waited 51% (1 predictor) and 70% (2) of their time for a core: raw scaling 1.01x says as
    much about the other work as about the GIL. The title says so; the evidence has the scaling per second
    the threads were not waiting, (301 / (1 - 2.81/4)) / (298 / (1 - 1.02/2))."""
    finding = rule_gil_contention(S.gil_contention_run(), T)[0]
    unqueued = (301 / (1 - 2.81 / 4)) / (298 / (1 - 1.02 / 2))
    assert finding.evidence["unqueued_scaling_by_predictors"]["2"] == pytest.approx(unqueued)
    assert finding.evidence["unqueued_scaling_by_predictors"]["1"] == pytest.approx(1.0)
    assert finding.title.endswith("measured 1.01x on a busy machine (its threads waited for a core up to 70% of "
                                  "the time: the measured scaling says as much about the other work as about the GIL)")


@pytest.mark.parametrize("runqueue_at_2, quoted", [(0.2, False), (0.39, False), (0.4, True), (0.9, True)])
def test_gil_contention_says_busy_machine_only_from_a_tenth_of_the_time_in_the_run_queue(
        runqueue_at_2, quoted):
    # on free cores (1% queued at 1 predictor): 0.39 s of 4 s is 9.75%, 0.4 s is 10%; signal B fires up to 25%
    finding = rule_gil_contention(S.gil_on_free_cores_run(runqueue_at_2=runqueue_at_2), T)[0]
    assert ("on a busy machine" in finding.title) == quoted
    assert finding.title.split("measured ")[1].startswith(f"{310 / 300:.2f}x")


@pytest.mark.parametrize("blocked_s, fires", [(0.05, False), (0.118, False), (0.12, True), (0.4, True)])
def test_gil_contention_blocked_share_threshold(blocked_s, fires):
    # share = blocked / (on_cpu + blocked) = blocked / (4 - 2.81): 0.118 s -> 0.099, 0.12 s -> 0.101
    record = S.gil_contention_run(blocked_at_2=blocked_s)
    share = blocked_s / (4.0 - 2.81)
    assert (share >= T.gil_wait_share) == fires
    assert bool(rule_gil_contention(record, T)) == fires


def test_gil_contention_quiet_when_the_threads_waited_for_cores_not_the_gil():
    """numpy preprocessing on the busy machine: everything extra is run-queue time, nothing blocked."""
    assert rule_gil_contention(S.gil_contention_run(blocked_at_2=0.0, runqueue_at_2=3.3), T) == []


@pytest.mark.parametrize("python_ms, fires", [(0.02, False), (0.05, True)])
def test_gil_contention_needs_python_stages_to_be_a_share_of_the_request(python_ms, fires):
    # model 0.2 ms: Python 0.02 ms is 9% (< 20%), 0.05 ms is 20% (at the threshold: fires)
    record = S.gil_contention_run()
    base = record.steps[0]
    base.stages_ms = S.stages({"preprocess": python_ms, "model": 0.2})
    assert bool(rule_gil_contention(record, T)) == fires


def test_gil_contention_signal_a_only_where_busy_threads_fit_the_cores():
    # 2 predictors x 2 intra-op threads on 2 cores: blocked time may be the intra-op pool's joins
    assert rule_gil_contention(S.gil_contention_run(blocked_at_2=0.4, intra_op_threads=2), T) == []


@pytest.mark.parametrize("cpu, runqueue, rps, fires", [
    (104.0, 0.2, 310.0, True),     # one core, cores free, flat throughput
    (140.0, 0.2, 310.0, False),    # 1.40 cores > 1.35
    (104.0, 1.2, 310.0, False),    # the threads waited 30% of their time for a core: cores were not free
    (104.0, 0.2, 390.0, False),    # +30% is not a plateau
    (104.0, 0.2, 388.0, True),     # +29% is
])
def test_gil_contention_one_core_signal_thresholds(cpu, runqueue, rps, fires):
    record = S.gil_on_free_cores_run(cpu_at_2=cpu, runqueue_at_2=runqueue, rps_at_2=rps)
    assert bool(rule_gil_contention(record, T)) == fires


def test_gil_contention_quiet_without_stage_times_or_scheduler_times_or_in_open_loop():
    assert rule_gil_contention(S.clean_cpu_run(), T) == []  # the built-in model: no stages
    record = S.gil_contention_run(blocked_at_2=0.4)
    for step in record.steps:
        step.thread_times_s = Unavailable("not_supported", "no schedstat")
    assert rule_gil_contention(record, T) == []
    record = S.gil_contention_run(blocked_at_2=0.4)
    record.config["rate_rps"] = 100.0
    assert rule_gil_contention(record, T) == []


def test_gil_thresholds_are_parameters():
    record = S.gil_contention_run(blocked_at_2=0.05)  # 4% blocked
    assert rule_gil_contention(record, T) == []
    assert rule_gil_contention(record, Thresholds(gil_wait_share=0.04)) != []


# ---------------------------------------------------------------- THREAD_UNSAFE and NONDETERMINISTIC_OUTPUT

def test_thread_unsafe_from_a_translator_write_even_when_outputs_agree():
    write = {"attribute": "StatefulTranslator.current", "path": "translator", "kind": "rebound",
             "owner": "translator", "requests": 4}
    finding = only(rule_thread_unsafe(S.thread_unsafe_run(writes=[write], sequential=()), T), "THREAD_UNSAFE")
    assert "StatefulTranslator.current" in finding.title
    assert finding.evidence["writes"] == [write]
    assert "locals" in finding.remedy and "lock" in finding.remedy and "one translator per predictor" in finding.remedy
    assert rule_nondeterministic_output(S.thread_unsafe_run(writes=[write], sequential=()), T) == []


def test_thread_unsafe_from_outputs_that_differ_only_under_concurrency():
    concurrent = [{"request": 2, "predictor": 1, "max_abs_diff": 0.375}, {"request": 0, "predictor": 3,
                                                                          "max_abs_diff": 0.175}]
    finding = only(rule_thread_unsafe(S.thread_unsafe_run(writes=(), sequential=(), concurrent=concurrent), T),
                   "THREAD_UNSAFE")
    assert "2 of 96 responses under 4 concurrent predictors differ" in finding.title
    assert "request 2 (predictor 1) by up to 0.375" in finding.title


def test_outputs_that_differ_one_at_a_time_are_nondeterministic_not_thread_unsafe():
    record = S.nondeterministic_run()
    assert rule_thread_unsafe(record, T) == []
    # concurrent mismatches are not judged once sequential passes already disagree
    record.thread_safety["concurrent_mismatches"] = [{"request": 0, "predictor": 0, "max_abs_diff": 1.0}]
    assert rule_thread_unsafe(record, T) == []


def test_thread_rules_quiet_on_a_clean_check_and_without_one():
    for record in (S.thread_unsafe_run(writes=(), sequential=(), concurrent=()), S.clean_cpu_run()):
        assert rule_thread_unsafe(record, T) == [] and rule_nondeterministic_output(record, T) == []
    record = S.clean_cpu_run()
    record.thread_safety = {"checked": False, "error": "RuntimeError: boom"}
    assert rule_thread_unsafe(record, T) == [] and rule_nondeterministic_output(record, T) == []
