"""The thread-safety check before the sweep, on real predictors (tests/predictor_models.py).

Each predictor is run for real: its writes are seen or not, its responses compared
one at a time and under 4 concurrent predictors; the rules then read the record the
check leaves, so a predictor's verdict here is the one `gpuscope diagnose` gives.
"""
from __future__ import annotations

import math

import pytest
import torch

from gpuscope.analysis.findings import DEFAULT_THRESHOLDS, rule_nondeterministic_output, rule_thread_unsafe
from gpuscope.measure.models import load_model, validate_model
from gpuscope.measure.thread_safety import SafetyConfig, check_thread_safety, difference, keep
from tests import scenarios as S

M = "tests.predictor_models:"


def checked(spec: str, **config) -> dict:
    model = load_model(spec, "cpu")
    validate_model(model)
    return check_thread_safety(model, SafetyConfig(**config))


def codes(check: dict) -> list[str]:
    record = S.clean_cpu_run()
    record.thread_safety = check
    found = rule_thread_unsafe(record, DEFAULT_THRESHOLDS) + rule_nondeterministic_output(record, DEFAULT_THRESHOLDS)
    return [f.code for f in found]


def test_a_stateful_module_writes_its_attribute_and_is_thread_unsafe():
    check = checked(M + "stateful")
    assert [(w["attribute"], w["kind"], w["owner"]) for w in check["writes"]] == [("Stateful.last", "rebound", "model")]
    assert check["writes"][0]["requests"] == check["requests"]
    assert codes(check) == ["THREAD_UNSAFE"]


def test_a_buffer_updated_in_place_is_seen_by_its_version_counter():
    check = checked(M + "running_mean")
    assert [(w["attribute"], w["kind"]) for w in check["writes"]] == [("RunningMean.mean", "in_place")]
    assert codes(check) == ["THREAD_UNSAFE"]


def test_a_stateful_translator_writes_its_attribute_and_is_thread_unsafe():
    check = checked(M + "stateful_translator")
    assert [(w["attribute"], w["owner"]) for w in check["writes"]] == [("StatefulTranslator.current", "translator")]
    assert codes(check) == ["THREAD_UNSAFE"]


def test_state_outside_every_watched_object_shows_in_the_concurrent_outputs():
    check = checked(M + "racy_global")
    assert check["writes"] == [] and check["sequential_mismatches"] == []
    assert check["concurrent_mismatch_count"] > 0
    assert codes(check) == ["THREAD_UNSAFE"]


def test_dropout_left_on_is_nondeterministic_not_thread_unsafe():
    check = checked(M + "dropout")
    assert check["writes"] == [] and check["sequential_mismatch_count"] == check["requests"]
    assert check["concurrent_judged"] is False and check["rounds"] == 0
    assert codes(check) == ["NONDETERMINISTIC_OUTPUT"]


@pytest.mark.parametrize("spec", [M + "clean", M + "text", "builtin:mlp"])
def test_predictors_that_only_read_are_quiet(spec):
    check = checked(spec)
    assert check["writes"] == [] and check["sequential_mismatches"] == [] and check["concurrent_mismatches"] == []
    assert check["rounds"] >= 1 and check["concurrent_requests"] >= 4 * 2
    assert codes(check) == []


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_torchscript_and_export_models_are_quiet(tmp_path, kind):
    from tests.predictor_models import Clean

    module, example = Clean().eval(), torch.randn(2, 16)
    path = tmp_path / ("clean.pt" if kind == "torchscript" else "clean.pt2")
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(module), str(path))
    else:
        torch.export.save(torch.export.export(module, (example,)), str(path))
    model = load_model(str(path), "cpu", (2, 16))
    validate_model(model)
    check = check_thread_safety(model, SafetyConfig())
    assert codes(check) == [] and check["writes"] == []


def test_the_check_is_bounded_by_its_budget_for_a_slow_predictor():
    """A budget shorter than the first requests: fewer requests, at least two, and one concurrent round."""
    check = checked("builtin:mlp", budget_s=0.05)
    assert check["requests"] == 2 and check["rounds"] == 1


def test_responses_compared_exactly_or_within_the_tolerance():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert difference(a, a.clone(), 0.0) is None
    assert difference(a + 1e-6, a, 0.0) == pytest.approx(1e-6, rel=0.1)
    assert difference(a + 1e-6, a, 1e-5) is None  # within the tolerance
    assert difference(a + 1e-4, a, 1e-5) == pytest.approx(1e-4, rel=0.1)  # beyond it
    assert math.isinf(difference(a, a[:2], 1.0))  # shapes differ
    assert difference({"label": "cat", "score": 0.5}, {"label": "cat", "score": 0.5}, 0.0) is None
    assert math.isinf(difference({"label": "cat"}, {"label": "dog"}, 0.0))
    assert difference([0.5, 0.25], [0.5, 0.2500001], 1e-6) is None
    assert difference([0.5, 0.25], [0.5, 0.2501], 1e-6) == pytest.approx(1e-4, rel=0.01)


def test_a_kept_response_does_not_change_when_the_predictor_reuses_its_buffer():
    buffer = torch.zeros(3)
    kept = keep({"out": buffer, "ids": [buffer]})
    buffer.add_(1)
    assert torch.equal(kept["out"], torch.zeros(3)) and torch.equal(kept["ids"][0], torch.zeros(3))


# ---------------------------------------------------------------- rounding under concurrency is not a race

def test_float_rounding_is_told_from_a_real_difference():
    from gpuscope.measure.thread_safety import ROUNDING_EPS_MULTIPLE, rounding_only

    x = torch.linspace(-3.0, 3.0, 64)
    eps = torch.finfo(torch.float32).eps
    assert rounding_only(x + 8 * eps * 3.0, x)  # a few units of rounding at the tensor's scale
    assert not rounding_only(x + 2 * ROUNDING_EPS_MULTIPLE * eps * 3.0, x)  # past the bound
    assert not rounding_only(x + 1e-3, x)  # another request's answer is off by far more
    assert rounding_only({"logits": x.clone(), "ids": torch.arange(4)}, {"logits": x, "ids": torch.arange(4)})
    assert not rounding_only({"ids": torch.arange(4) + 1}, {"ids": torch.arange(4)})  # integers must be equal
    assert not rounding_only(x[:10], x[:11]) and not rounding_only([x], [x, x])
    half = torch.ones(8, dtype=torch.bfloat16)
    assert not rounding_only(half * 1.03125, half)  # half precision: the 1% cap, not 64 x 2^-7 = 50%


def test_rounding_is_told_the_same_in_numpy_arrays_lists_and_floats_and_never_across_infinities():
    """A postprocess returning numpy, .tolist() or float(): the same few units of float32 rounding are
    rounding there too (they were a race before: numpy was never rounding, Python floats were held to
    float64's); a sign flip of an infinity or a NaN where another request had inf is never rounding."""
    from gpuscope.measure.thread_safety import ROUNDING_EPS_MULTIPLE, rounding_only

    x = torch.linspace(-3.0, 3.0, 64)
    eps = torch.finfo(torch.float32).eps
    near, far = x + 8 * eps * 3.0, x + 2 * ROUNDING_EPS_MULTIPLE * eps * 3.0
    assert rounding_only(near.numpy(), x.numpy()) and not rounding_only(far.numpy(), x.numpy())
    assert rounding_only(near.tolist(), x.tolist()) and not rounding_only(far.tolist(), x.tolist())
    assert rounding_only(float(near[-1]), float(x[-1])) and not rounding_only(float(far[-1]), float(x[-1]))
    assert not rounding_only(x.numpy().astype("float64"), x.numpy())  # another dtype
    inf, nan = float("inf"), float("nan")
    assert rounding_only(torch.tensor([1.0, inf, nan]), torch.tensor([1.0, inf, nan]))
    assert not rounding_only(torch.tensor([1.0, inf]), torch.tensor([1.0, -inf]))
    assert not rounding_only(torch.tensor([1.0, nan]), torch.tensor([1.0, inf]))
    assert not rounding_only([1.0, 2.0], [1.0, 2.0, 3.0]) and rounding_only([1, 2], [1, 2])


def record_with(mismatches: list[dict], **check) -> object:
    record = S.clean_cpu_run()
    record.thread_safety = {"checked": True, "requests": 4, "concurrent_predictors": 4, "rounds": 2,
                                        "tolerance": 0.0, "writes": [], "sequential_mismatches": [],
                                        "concurrent_judged": True, "concurrent_mismatches": mismatches,
                                        "concurrent_mismatch_count": len(mismatches), "concurrent_requests": 32,
                                        **check}
    return record


def test_responses_differing_by_rounding_alone_under_concurrency_are_not_thread_unsafe():
    rounding = [{"request": 1, "predictor": 2, "max_abs_diff": 4.8e-7, "rounding": True}]
    record = record_with(rounding, concurrent_beyond_rounding_count=0)
    assert rule_thread_unsafe(record, DEFAULT_THRESHOLDS) == []
    [finding] = rule_nondeterministic_output(record, DEFAULT_THRESHOLDS)
    assert finding.severity == "info" and "by float rounding only" in finding.title
    assert finding.evidence["rounding_only"] is True


def test_one_response_beyond_rounding_under_concurrency_is_thread_unsafe():
    mixed = [{"request": 0, "predictor": 1, "max_abs_diff": 0.7, "rounding": False},
             {"request": 1, "predictor": 2, "max_abs_diff": 4.8e-7, "rounding": True}]
    record = record_with(mixed, concurrent_beyond_rounding_count=1)
    [finding] = rule_thread_unsafe(record, DEFAULT_THRESHOLDS)
    assert finding.severity == "fail" and "1 of 32 responses" in finding.title and "by up to 0.7" in finding.title
    assert rule_nondeterministic_output(record, DEFAULT_THRESHOLDS) == []


def test_a_record_from_before_the_rounding_mark_still_judges_every_mismatch():
    record = record_with([{"request": 0, "predictor": 1, "max_abs_diff": 4.8e-7}])
    assert [f.code for f in rule_thread_unsafe(record, DEFAULT_THRESHOLDS)] == ["THREAD_UNSAFE"]
    assert rule_nondeterministic_output(record, DEFAULT_THRESHOLDS) == []
