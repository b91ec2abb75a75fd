"""The saved runs of tests/fixtures/runs hold only what gpuscope's own code made of them.

Every finding, the sharing verdict and the recommendation in each committed run.json are what the rules
derive from that run's own record now (analysis is a pure function of the record), and a stored gate
outcome is what the gate says on it; and the GPU run, a deterministic replay, is byte for byte what
make_runs.py generates today but for what varies between generations (make_runs.VARIES). The CPU runs are
real sweeps whose figures differ on every run, so only their conclusions are re-derived.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from gpuscope.analysis.findings import conclude
from gpuscope.analysis.gate import evaluate
from gpuscope.analysis.limits import merge_limits
from gpuscope.probes.readings import reading_to_json
from gpuscope.record.run import RunRecord, sorted_findings
from tests.fixtures.runs import make_runs
from tests.report_fixtures import RUNS, saved_run


def _json(value: Any) -> Any:
    """As run.json holds it (Unavailable as its JSON shape, tuples as lists)."""
    return json.loads(json.dumps(reading_to_json(value)))


def _conclusions(record: RunRecord) -> dict[str, Any]:
    return _json({"findings": [f.to_json() for f in sorted_findings(record.findings)], "sharing": record.sharing,
                  "recommendation": record.recommendation})


def test_every_fixture_the_generator_makes_is_committed() -> None:
    assert sorted(p.name for p in RUNS.iterdir() if p.is_dir() and not p.name.startswith("_")) == sorted(make_runs.NAMES)
    for name in make_runs.NAMES:
        assert sorted(p.name for p in (RUNS / name).iterdir()) == sorted(make_runs.RUN_FILES), name


@pytest.mark.parametrize("name", make_runs.NAMES)
def test_the_findings_are_what_the_rules_derive_from_the_record(name: str) -> None:
    saved = saved_run(name)
    again = copy.deepcopy(saved)
    again.findings, again.sharing, again.recommendation = [], {}, {}
    conclude(again)
    assert _conclusions(again) == _conclusions(saved)


@pytest.mark.parametrize("name", [n for n in make_runs.NAMES if saved_run(n).check])
def test_a_stored_gate_outcome_is_what_the_gate_says_on_the_record(name: str) -> None:
    saved = saved_run(name)
    stored = saved.check
    outcome = evaluate(saved, merge_limits(stored["limits"], {}), at_predictors=None).to_json()
    for key in ("checked_at",):  # the time it ran
        outcome.pop(key), stored.pop(key)
    assert _json(outcome) == stored


def test_the_fixtures_show_what_the_tests_plant() -> None:
    """The causes make_runs.py plants, seen in the conclusions: a copy of the model per predictor and a foreign
    process, and no fail finding in the GPU run that the check tests gate on."""
    copies, gpu, interrupted = saved_run("cpu_copies"), saved_run("gpu"), saved_run("cpu_interrupted")
    assert copies.config["copy_model"] and not copies.sharing["verified"]
    assert {f.code: f.severity for f in copies.findings}.get("DUPLICATE_MODEL") == "fail"
    assert gpu.devices[0]["name"] == "NVIDIA H200" and gpu.sharing["verified"]
    assert [f.code for f in gpu.findings if f.severity != "info"] == ["FOREIGN_PROCESS"]
    assert interrupted.status == "interrupted" and not interrupted.steps


def _without(data: dict[str, Any], paths: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for path in paths:
        *parents, leaf = path.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return data


def test_the_gpu_run_is_what_make_runs_generates_now(tmp_path: Path) -> None:
    """The replay is deterministic: regenerate it and compare, leaving out only make_runs.VARIES."""
    make_runs.replay_gpu_run(str(tmp_path / "gpu"))
    committed = RUNS / "gpu"
    fresh = json.loads((tmp_path / "gpu" / "run.json").read_text(encoding="utf-8"))
    saved = json.loads((committed / "run.json").read_text(encoding="utf-8"))
    assert _without(fresh, make_runs.VARIES) == _without(saved, make_runs.VARIES), (
        "tests/fixtures/runs/gpu differs from what make_runs.py generates: "
        "regenerate with `python -m tests.fixtures.runs.make_runs gpu`")
    fresh_lines = (tmp_path / "gpu" / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    saved_lines = (committed / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert _without(json.loads(fresh_lines[0]), make_runs.SAMPLES_VARIES) == \
        _without(json.loads(saved_lines[0]), make_runs.SAMPLES_VARIES)
    assert fresh_lines[1:] == saved_lines[1:]
