"""JUnit XML from `gpuscope check --junit`: parses with a standard parser and counts right.

The runs are tests/fixtures/runs' real runs (see make_runs.py there); the limits that must fail or pass are
set from each run's own figures."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import pytest

from gpuscope.analysis.findings import conclude
from gpuscope.analysis.gate import evaluate
from gpuscope.analysis.limits import merge_limits
from gpuscope.commands.check import run_check
from gpuscope.reports.junit import write_junit
from tests.report_fixtures import reads_as, recommended_step, saved_run


def run(name):
    return saved_run(name)


def suite_of(path):
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    return root, suites[0]


def cases(suite):
    return {case.get("name"): case for case in suite.findall("testcase")}


def _mixed(record):
    step = recommended_step(record)
    return merge_limits({}, {
        "max_device_memory": "20GiB",                            # unmeasured: no GPU
        "max_host_memory": step.memory["rss_bytes"] * 2,         # pass
        "max_p99_ms": step.latency_ms["p99"] / 2,                # fail
        "min_throughput": step.throughput_rps * 2,               # fail
        "forbid": "duplicate-model,foreign-process",             # pass, unmeasured
    })


def test_mixed_outcome_counts_and_cases(tmp_path):
    record = run("cpu")
    step = recommended_step(record)
    outcome = evaluate(record, _mixed(record))
    path = tmp_path / "check.xml"
    write_junit(outcome, str(path))
    root, suite = suite_of(str(path))
    assert suite.get("name") == "gpuscope.check"
    expected = {"tests": "7", "failures": "2", "errors": "2", "skipped": "0"}
    for attrs in (root.attrib, suite.attrib):
        assert {k: attrs[k] for k in expected} == expected
    by_name = cases(suite)
    assert set(by_name) == {"max_device_memory", "max_host_memory", "max_p99_ms", "min_throughput",
                            "forbid.DUPLICATE_MODEL", "forbid.FOREIGN_PROCESS", "findings"}
    assert all(case.get("classname") == "gpuscope.check" for case in suite.findall("testcase"))

    results = {r.name: r for r in outcome.results}
    failure = by_name["max_p99_ms"].find("failure")
    assert failure is not None and reads_as(results["max_p99_ms"].measured, step.latency_ms["p99"])
    assert results["max_p99_ms"].measured in failure.get("message") and results["max_p99_ms"].limit in failure.get("message")
    throughput = by_name["min_throughput"].find("failure").get("message")
    assert reads_as(results["min_throughput"].measured, step.throughput_rps)
    assert results["min_throughput"].measured in throughput
    error = by_name["max_device_memory"].find("error")
    assert error is not None and "no GPU was measured" in error.get("message")
    assert by_name["forbid.FOREIGN_PROCESS"].find("error") is not None
    passed = by_name["max_host_memory"]
    assert passed.find("failure") is None and passed.find("error") is None and passed.find("skipped") is None


def test_counts_match_the_cases(tmp_path):
    outcome = evaluate(run("cpu"), _mixed(run("cpu")))
    path = tmp_path / "check.xml"
    write_junit(outcome, str(path))
    _, suite = suite_of(str(path))
    testcases = suite.findall("testcase")
    assert int(suite.get("tests")) == len(testcases) == len(outcome.results) == 7
    assert int(suite.get("failures")) == sum(1 for c in testcases if c.find("failure") is not None) == 2
    assert int(suite.get("errors")) == sum(1 for c in testcases if c.find("error") is not None) == 2


def test_all_passing_run_has_no_failures(tmp_path):
    record = run("gpu")
    step = recommended_step(record)
    outcome = evaluate(record, merge_limits({}, {
        "max_device_memory": step.memory["process_gpu_bytes"] * 2, "max_p99_ms": step.latency_ms["p99"] * 2,
        "min_throughput": step.throughput_rps / 2, "min_headroom_pct": 1,
        "max_memory_per_predictor": int(record.sharing["bytes_per_extra_predictor"] * 2),
        "forbid": "duplicate-model"}))
    assert outcome.exit_code == 0
    path = tmp_path / "junit.xml"
    write_junit(outcome, str(path))
    _, suite = suite_of(str(path))
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("7", "0", "0")
    assert set(cases(suite)) == {"max_device_memory", "min_headroom_pct", "max_p99_ms", "min_throughput",
                                 "max_memory_per_predictor", "forbid.DUPLICATE_MODEL", "findings"}


def test_findings_become_cases_and_hostile_text_stays_valid_xml(tmp_path):
    # a process name is outside text (NVML's, /proc's): the neighbour's reaches FOREIGN_PROCESS's title
    record = run("gpu")
    neighbour = next(p for p in record.processes if not p["self"])
    neighbour["name"] = "copy in \x00proc <evil> & \"x\"\x1b[31m"
    conclude(record)
    outcome = evaluate(record, merge_limits({}, {"fail_on": "warn"}))
    path = tmp_path / "j.xml"
    write_junit(outcome, str(path))
    _, suite = suite_of(str(path))
    by_name = cases(suite)
    assert set(by_name) == {f"finding.{f.code}" for f in record.findings if f.severity in ("warn", "fail")}
    message = by_name["finding.FOREIGN_PROCESS"].find("failure").get("message")
    assert "<evil> & \"x\"" in message and "\x00" not in message
    assert suite.get("failures") == str(len(by_name))


def test_written_from_the_json_stored_in_run_json_and_atomically(tmp_path):
    record = run("gpu")
    run_check(record, merge_limits({}, {"max_p99_ms": recommended_step(record).latency_ms["p99"] / 2}), None, None,
              None, echo=lambda _: None)
    nested = tmp_path / "reports" / "ci"
    path = nested / "check.xml"
    write_junit(record.check, str(path))  # the dict form, as a re-render from run.json would pass it
    _, suite = suite_of(str(path))
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    assert os.listdir(nested) == ["check.xml"]  # no temp file left behind


def test_run_check_writes_junit(tmp_path):
    path = tmp_path / "check.xml"
    code = run_check(run("cpu"), merge_limits({}, {"max_device_memory": "1GiB"}), None, str(path), None,
                     echo=lambda _: None)
    assert code == 2
    _, suite = suite_of(str(path))
    assert suite.get("errors") == "1" and suite.get("failures") == "0"


def test_rejects_something_that_is_not_an_outcome(tmp_path):
    with pytest.raises(TypeError):
        write_junit(42, str(tmp_path / "x.xml"))
