"""The findings' words pinned: every rule's title, remedy and evidence on its scenario, the recommendation's
reason and conclude()'s sharing, compared with tests/fixtures/findings/golden.json.

The other tests check the numbers a reader needs; this one notices any change to what a user reads (a mutated
word, a dropped clause, a key renamed in the evidence). After a deliberate change to a text, regenerate with
`GPUSCOPE_REGEN_GOLDEN=1 python -m pytest tests/test_findings_text.py` and review the diff of golden.json.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from gpuscope.probes.readings import Unavailable, reading_to_json
from gpuscope.analysis.findings import DEFAULT_THRESHOLDS, RULES, _ms_text, conclude, evaluate, recommend
from tests import scenarios as S
from tests.test_findings import FIRES

GOLDEN = Path(__file__).parent / "fixtures" / "findings" / "golden.json"
REGEN = os.environ.get("GPUSCOPE_REGEN_GOLDEN") == "1"


def fresh(builder):
    made = builder()
    return made[0] if isinstance(made, tuple) else made


def plain(value):
    """JSON-comparable: Unavailable as its JSON form, floats rounded to 9 significant digits."""
    value = reading_to_json(value)
    if isinstance(value, float):
        return float(f"{value:.9g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def describe(found):
    return [plain({"code": f.code, "severity": f.severity, "title": f.title, "remedy": f.remedy,
                   "evidence": f.evidence, "at_predictors": f.at_predictors}) for f in found]


def every_count_failing():
    record = S.predictor_errors_run(1, 2)
    record.steps[0].requests, record.steps[0].errors = 90, 10
    return record


def interrupted():
    record = S.clean_cpu_run()
    for step in record.steps:
        step.partial = True
    return record


def variant(builder, change):
    """A scenario with one thing changed: the other arm of a plural, a figure missing, one more entity."""
    def build():
        record = fresh(builder)
        change(record)
        return record
    return build


def _one_grad_thread(record):
    for step in record.steps:
        step.outputs_with_grad = 1


def _two_foreign(record):
    other = next(p for p in record.processes if not p.get("self"))
    record.processes.append({**other, "pid": other["pid"] + 1, "name": None})
    del record.processes[-1]["name"]


def _six_missing_pids(record):
    base = record.processes[0]
    record.processes.extend({**base, "pid": 9000 + i, "exists": False, "self": False} for i in range(6))


def _one_core(record):
    record.host["usable_cores"] = 1


def _no_last_p50(record):
    record.steps[-1].latency_ms.pop("p50", None)


def _self_two_engine_entries(record):
    me = next(p for p in record.processes if p.get("self"))
    record.processes.append({**me, "self": False, "name": None})
    del record.processes[-1]["name"]


VARIANTS = {
    "grad_one_thread": variant(S.grad_enabled_run, _one_grad_thread),
    "foreign_two_processes": variant(S.foreign_process_run, _two_foreign),
    "pid_namespace_six_missing": variant(S.clean_gpu_run, _six_missing_pids),
    "oversubscribed_one_core": variant(S.oversubscribed_cpu_run, _one_core),
    "plateau_last_without_p50": variant(S.h200_shared_model_run, _no_last_p50),
    "engines_listed_twice": variant(S.engines_in_one_process_run, _self_two_engine_entries),
    "leak_at_one_predictor": variant(S.leaking_cpu_run, lambda r: r.steps.pop()),
    "gpu_run_without_nvml_rows": variant(lambda: S.h200_shared_model_run(False, counts=(1, 2)),
                                         lambda r: [s.memory.__setitem__("process_gpu_bytes", Unavailable("not_supported"))
                                                    for s in r.steps]),
    "cache_bloat_in_a_step": variant(S.clean_gpu_run, lambda r: (
        r.steps[-1].memory["layers"].update(allocator_cache_bytes=600 * S.MiB), r.baseline.update(end={}))),
}


def _no_outside_layer(record):
    for step in record.steps:
        step.memory["layers"].pop("outside_allocator_bytes", None)


def _a_step_with_copies(record):
    record.steps[-1].distinct_weight_sets = 2


def _unnamed_two_engine_neighbour(record):
    record.processes.append({**record.processes[0], "pid": 808, "self": False, "engines": ["torch", "jax"]})
    del record.processes[-1]["name"]


def _no_activations_layer(record):
    record.steps[-1].memory["layers"].update(allocator_cache_bytes=600 * S.MiB)
    record.steps[-1].memory["layers"].pop("activations_bytes", None)
    record.baseline["end"] = {}


def _foreign_one_byte(record):
    next(p for p in record.processes if not p.get("self"))["peak_used_bytes"] = 1


def _no_thread_count(record):
    for step in record.steps:
        step.intra_op_threads = None
    record.step_at(4).predictors = 3


def _tensorflow_too(record):
    jax = next(p for p in record.processes if "jax" in (p.get("engines") or []))
    jax["engines"] = ["jax", "tensorflow"]


VARIANTS.update({
    "context_only_without_layers": variant(S.context_only_run, _no_outside_layer),
    "growth_beside_copies": variant(S.h200_shared_model_run, _a_step_with_copies),
    "engines_in_an_unnamed_neighbour": variant(S.clean_gpu_run, _unnamed_two_engine_neighbour),
    "cache_bloat_without_activations": variant(S.clean_gpu_run, _no_activations_layer),
    "foreign_holding_one_byte": variant(S.foreign_process_run, _foreign_one_byte),
    "oversubscribed_without_thread_count": variant(S.oversubscribed_cpu_run, _no_thread_count),
    "two_preallocating_engines": variant(S.jax_sibling_run, _tensorflow_too),
    "no_steps": variant(S.clean_cpu_run, lambda r: r.steps.clear()),
})


RECORDS = {
    **VARIANTS,
    **{rule.__name__: FIRES[rule][0] for rule in RULES},
    "clean_gpu_run": S.clean_gpu_run, "clean_cpu_run": S.clean_cpu_run,
    "h200_streams_run": lambda: S.h200_shared_model_run(True),
    "p99_limited_run": lambda: S.cpu_record([S.cpu_step(1, 30.0, 30.0, rss=700 * S.MiB, model_bytes=S.CPU_MODEL),
                                             S.cpu_step(2, 50.0, 40.0, rss=701 * S.MiB, model_bytes=S.CPU_MODEL)],
                                            model_bytes=S.CPU_MODEL, max_p99_ms=45.0),
    "unmet_p99_run": lambda: S.cpu_record([S.cpu_step(1, 30.0, 60.0, rss=700 * S.MiB, model_bytes=S.CPU_MODEL)],
                                          model_bytes=S.CPU_MODEL, max_p99_ms=5.0),
    "every_count_failing_run": lambda: every_count_failing(),
    "interrupted_run": lambda: interrupted(),
    "too_few_steps_run": lambda: S.cpu_record([S.cpu_step(1, 30.0, 30.0, rss=700 * S.MiB, model_bytes=S.CPU_MODEL)],
                                              model_bytes=S.CPU_MODEL),
    "overloaded_run": S.overloaded_run,
}


def current() -> dict:
    out = {}
    for name, builder in RECORDS.items():
        record = fresh(builder)
        entry = {"recommendation": plain(recommend(record, DEFAULT_THRESHOLDS)),
                 "findings": describe(evaluate(record, DEFAULT_THRESHOLDS))}
        conclude(record)
        entry["sharing"] = plain(record.sharing)
        out[name] = entry
    return out


def test_findings_text_is_what_golden_json_says():
    now = json.loads(json.dumps(current()))
    if REGEN or not GOLDEN.exists():
        GOLDEN.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        if not REGEN:
            pytest.fail(f"{GOLDEN} did not exist: written; review and commit it")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(now) == sorted(golden)
    for name in golden:
        assert now[name] == golden[name], name


@pytest.mark.parametrize("value, text", [
    (10.0, "10.0 ms"), (9.99, "9.99 ms"), (0.1, "0.10 ms"), (0.0999, "100 us"), (0.0123, "12 us"), (0.09945, "99 us"),
    (123.456, "123 ms"), (Unavailable("error", "none"), "n/a")])
def test_milliseconds_are_shown_with_the_digits_that_matter(value, text):
    assert _ms_text(value) == text


# ---------------------------------------------------------------- the gate's words

GATE_GOLDEN = Path(__file__).parent / "fixtures" / "findings" / "gate-golden.json"


def gate_cases():
    from gpuscope.analysis.limits import Limits

    every = dict(max_device_memory=10 * 2**30, max_host_memory=4 * 2**30, min_headroom_pct=10.0, max_p99_ms=5.0,
                 min_throughput=1000.0, max_memory_per_predictor=64 * 2**20,
                 forbid=("DUPLICATE_MODEL", "FOREIGN_PROCESS", "PROCESSES_VS_THREADS", "MEMORY_GROWTH"))

    def concluded(builder):
        record = fresh(builder)
        conclude(record)
        return record

    return {
        "h200_every_limit": (lambda: concluded(S.h200_shared_model_run), Limits(**every)),
        "h200_fail_on_warn_at_1": (lambda: concluded(S.h200_shared_model_run), Limits(fail_on="warn", at_predictors=1)),
        "h200_not_measured_count": (lambda: concluded(S.h200_shared_model_run), Limits(max_p99_ms=1.0, at_predictors=3)),
        "cpu_every_limit": (lambda: concluded(S.clean_cpu_run), Limits(**every)),
        "oom_every_limit": (lambda: concluded(S.oom_run), Limits(**every, at_predictors=4)),
        "unmet_p99": (lambda: concluded(RECORDS["unmet_p99_run"]), Limits(max_p99_ms=5.0, fail_on="warn")),
        "every_count_failing": (lambda: concluded(every_count_failing), Limits(**every)),
        "interrupted": (lambda: concluded(interrupted), Limits(**every)),
        "copied_model_forbid": (lambda: concluded(S.copied_model_run), Limits(forbid=("DUPLICATE_MODEL",))),
        "watch_every_limit": (lambda: live_record("watch", 120, 5.0), Limits(**every, at_predictors=2)),
        "watch_unread_and_unfinished": (lambda: live_record("watch", 3, float("nan"), unread=True),
                                        Limits(**every)),
        "profile_no_samples": (lambda: live_record("profile", 0, 1.0), Limits(max_host_memory=2**30)),
        "gpu_unread_figures": (lambda: unread_gpu(), Limits(**every)),
        "no_request_at_the_count": (lambda: no_request(), Limits(max_p99_ms=5.0, at_predictors=2)),
        "cpu_gpu_only_limits": (lambda: concluded(S.clean_cpu_run),
                                Limits(max_device_memory=2**30, min_headroom_pct=5.0, forbid=("LOW_HEADROOM",))),
    }


def live_record(mode: str, ticks: int, peak_t_s: float, unread: bool = False):
    """A watch or profile record: no steps, the target's series in extra['live']."""
    record = S.clean_gpu_run()
    record.mode, record.steps = mode, []
    record.status = "running" if unread else "complete"
    rss = {"peak": Unavailable("process_gone", "pid 4242 exited")} if unread else {"peak": 900 * S.MiB,
                                                                                    "peak_t_s": peak_t_s}
    gpu = {} if unread else {"peak": 3 * 2**30, "peak_t_s": peak_t_s}
    record.extra["live"] = {"ticks": ticks, "series": {"rss_bytes": rss, "process_gpu_bytes": gpu}}
    record.findings = evaluate(record, DEFAULT_THRESHOLDS)
    return record


def unread_gpu():
    record = S.h200_shared_model_run(False, counts=(1, 2))
    for step in record.steps:
        step.memory["process_gpu_bytes"] = Unavailable("not_supported", "NVML lists no process here")
        step.memory["device_used_bytes"] = Unavailable("no_device", "GPU lost")
    conclude(record)
    return record


def no_request():
    record = S.clean_cpu_run()
    conclude(record)
    step = record.step_at(2)
    step.requests, step.errors, step.latency_ms = 0, 40, {}
    return record


def gate_now() -> dict:
    from gpuscope.analysis.gate import evaluate as gate
    from gpuscope.reports.text import format_lines

    out = {}
    for name, (build, limits) in gate_cases().items():
        outcome = gate(build(), limits)
        out[name] = {"exit_code": outcome.exit_code, "lines": format_lines(outcome), "notes": list(outcome.notes),
                     "at_predictors": outcome.at_predictors, "source": outcome.at_predictors_source,
                     "results": [plain({k: getattr(r, k) for k in ("name", "kind", "status", "measured",
                                                                   "measured_raw", "limit", "limit_raw", "unit",
                                                                   "at_predictors", "message")})
                                 for r in outcome.results]}
    return json.loads(json.dumps(out))


def test_the_gates_lines_are_what_gate_golden_json_says():
    now = gate_now()
    if REGEN or not GATE_GOLDEN.exists():
        GATE_GOLDEN.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        if not REGEN:
            pytest.fail(f"{GATE_GOLDEN} did not exist: written; review and commit it")
    golden = json.loads(GATE_GOLDEN.read_text())
    assert sorted(now) == sorted(golden)
    for name in golden:
        assert now[name] == golden[name], name


def test_a_memory_figure_that_is_not_a_finite_number_is_not_read():
    from gpuscope.analysis.findings import _mem
    from gpuscope.record.run import Step

    step = Step(predictors=1, memory={"a": float("nan"), "b": float("inf"), "c": True, "d": Unavailable("error"),
                                      "e": "12", "f": 12.7, "g": 3})
    assert [_mem(step, k) for k in "abcdefg"] + [_mem(step, "missing")] == [None, None, None, None, None, 12, 3, None]


def test_conclude_uses_the_thresholds_it_is_given():
    from gpuscope.analysis.findings import Thresholds

    record = fresh(S.h200_shared_model_run)
    conclude(record, Thresholds(plateau_share=0.5, stream_latency_ratio=100.0))
    assert record.recommendation["predictors"] == 1  # 1 predictor is within 50% of the best
    assert "DEFAULT_STREAM_SERIALIZATION" not in {f.code for f in record.findings}
