"""`gpuscope check`: limits, forbidden codes, the findings gate, config files, exit codes.

The runs are saved run.json files in tests/fixtures/check/ (built by make_runs.py there):
gpu_run.json recommends 2 predictors where the process peaks at 18 GiB, the device
at 20 of 80 GiB (headroom 75%), RSS 3 GiB, p99 12.3 ms, 780 req/s, 96 MiB per extra
predictor, with a FOREIGN_PROCESS warning; cpu_run.json measured no GPU.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import types

import pytest

from gpuscope.analysis import limits as check
from gpuscope.analysis.gate import evaluate
from gpuscope.analysis.limits import CheckConfigError, Limits, merge_limits, parse_forbid
from gpuscope.commands.check import limits_from_sources, run_check
from gpuscope.commands.check_config import load_config
from gpuscope.probes.readings import Unavailable
from gpuscope.probes.units import GiB, MiB
from gpuscope.record.run import Finding, load_run
from gpuscope.reports.text import format_lines

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "check")


@pytest.fixture(scope="module")
def _saved():
    return {name: load_run(os.path.join(FIXTURES, f"{name}_run.json")) for name in ("gpu", "cpu")}


@pytest.fixture
def gpu_run(_saved):
    return copy.deepcopy(_saved["gpu"])


@pytest.fixture
def cpu_run(_saved):
    return copy.deepcopy(_saved["cpu"])


def limits(**cli):
    return merge_limits({}, cli)


def result(outcome, name):
    matches = [r for r in outcome.results if r.name == name]
    assert len(matches) == 1, [r.name for r in outcome.results]
    return matches[0]


def test_the_saved_runs_are_what_make_runs_builds(tmp_path, monkeypatch):
    """The committed run.json files are make_runs.py's output today, byte for byte: neither can drift."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_runs", os.path.join(FIXTURES, "make_runs.py"))
    make_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_runs)
    monkeypatch.setattr(make_runs, "HERE", str(tmp_path))
    make_runs.main()
    built = sorted(p.name for p in tmp_path.glob("*.json"))
    assert built == sorted(n for n in os.listdir(FIXTURES) if n.endswith(".json"))
    for name in built:
        with open(os.path.join(FIXTURES, name), encoding="utf-8") as fh:
            committed = fh.read()
        assert (tmp_path / name).read_text(encoding="utf-8") == committed, (
            f"tests/fixtures/check/{name} differs from what make_runs.py builds: "
            "regenerate with `python tests/fixtures/check/make_runs.py`")


# --------------------------------------------------------------------------- each limit, pass and fail

GPU_CASES = [
    # (limit, passing value, failing value, measured text)
    ("max_device_memory", "20GiB", "16GiB", "18.00 GiB"),
    ("max_host_memory", "4GiB", "2GiB", "3.00 GiB"),
    ("min_headroom_pct", 70, 80, "75.0%"),
    ("max_p99_ms", 25, 10, "12.3 ms"),
    ("min_throughput", 700, 800, "780 req/s"),
    ("max_memory_per_predictor", "128MiB", "64MiB", "96.0 MiB"),
]


@pytest.mark.parametrize("name,ok,bad,measured", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_each_limit_passes_and_fails_on_a_saved_gpu_run(gpu_run, name, ok, bad, measured):
    passing = evaluate(gpu_run, limits(**{name: ok}))
    r = result(passing, name)
    assert (r.status, r.measured) == ("pass", measured)
    assert passing.exit_code == 0

    failing = evaluate(gpu_run, limits(**{name: bad}))
    r = result(failing, name)
    assert (r.status, r.measured) == ("fail", measured)
    assert measured in r.message
    assert failing.exit_code == 1


def test_measured_raw_values_are_numbers(gpu_run):
    out = evaluate(gpu_run, limits(max_device_memory="20GiB", min_headroom_pct=10, max_p99_ms=25,
                                   min_throughput=1, max_memory_per_predictor="1GiB", max_host_memory="9GiB"))
    raw = {r.name: r.measured_raw for r in out.results}
    assert raw["max_device_memory"] == 18 * GiB
    assert raw["max_host_memory"] == 3 * GiB
    assert raw["min_headroom_pct"] == pytest.approx(75.0)
    assert raw["max_p99_ms"] == pytest.approx(12.3)
    assert raw["min_throughput"] == pytest.approx(780.0)
    assert raw["max_memory_per_predictor"] == 96 * MiB


def test_limit_equal_to_the_measured_value_passes(gpu_run):
    out = evaluate(gpu_run, limits(max_device_memory=18 * GiB, min_throughput=780, min_headroom_pct=75))
    assert out.exit_code == 0


CPU_CASES = [
    ("max_host_memory", "2GiB", "1GiB", "1.25 GiB"),
    ("max_p99_ms", 50, 25, "40.0 ms"),
    ("min_throughput", 50, 60, "55.0 req/s"),
    ("max_memory_per_predictor", "2MiB", "1MiB", "1.5 MiB"),
]


@pytest.mark.parametrize("name,ok,bad,measured", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_host_side_limits_are_measured_on_a_cpu_run(cpu_run, name, ok, bad, measured):
    assert result(evaluate(cpu_run, limits(**{name: ok})), name).status == "pass"
    r = result(evaluate(cpu_run, limits(**{name: bad})), name)
    assert (r.status, r.measured) == ("fail", measured)


def test_forbid_fails_when_the_finding_is_present_and_passes_when_absent(gpu_run):
    out = evaluate(gpu_run, limits(forbid="foreign-process,duplicate-model"))
    fp, dm = result(out, "forbid.FOREIGN_PROCESS"), result(out, "forbid.DUPLICATE_MODEL")
    assert fp.status == "fail" and "pid 4242" in fp.message and fp.measured == "1 finding"
    assert dm.status == "pass"
    assert out.exit_code == 1


def test_forbid_counts_findings_of_any_severity(gpu_run):
    out = evaluate(gpu_run, limits(forbid="outside-allocator"))
    assert result(out, "forbid.OUTSIDE_ALLOCATOR").status == "fail"


# --------------------------------------------------------------------------- unmeasured


def test_gpu_memory_limit_on_a_cpu_run_is_unmeasured_and_exits_2(cpu_run):
    lines: list[str] = []
    code = run_check(cpu_run, limits(max_device_memory="20GiB", max_p99_ms=100), None, None, None,
                     echo=lines.append, echo_err=lines.append)
    assert code == 2
    line = next(line for line in lines if "max-device-memory" in line)
    assert line.startswith("UNMEASURED") and "no GPU was measured" in line and "driver not loaded" in line
    assert any(line.startswith("PASS") and "max-p99-ms" in line for line in lines)


def test_headroom_and_gpu_only_forbid_are_unmeasured_without_a_gpu(cpu_run):
    out = evaluate(cpu_run, limits(min_headroom_pct=10, forbid="foreign-process,duplicate-model"))
    assert result(out, "min_headroom_pct").status == "unmeasured"
    fp = result(out, "forbid.FOREIGN_PROCESS")
    assert fp.status == "unmeasured" and "needs a GPU" in fp.message
    assert result(out, "forbid.DUPLICATE_MODEL").status == "pass"
    assert out.exit_code == 2


def test_unavailable_reading_on_a_gpu_run_is_unmeasured_with_its_reason(gpu_run):
    gpu_run.step_at(2).memory["process_gpu_bytes"] = Unavailable("no_permission", "pid namespace")
    r = result(evaluate(gpu_run, limits(max_device_memory="20GiB")), "max_device_memory")
    assert r.status == "unmeasured" and "no_permission" in r.message and r.measured_raw is None


def test_memory_per_predictor_unavailable_is_unmeasured(gpu_run):
    gpu_run.sharing["bytes_per_extra_predictor"] = Unavailable("not_supported")
    out = evaluate(gpu_run, limits(max_memory_per_predictor="1GiB"))
    assert result(out, "max_memory_per_predictor").status == "unmeasured"
    assert out.exit_code == 2


def test_fail_wins_over_unmeasured(cpu_run):
    out = evaluate(cpu_run, limits(max_device_memory="20GiB", max_p99_ms=10))
    assert [r.status for r in out.results if r.kind == "limit"] == ["unmeasured", "fail"]
    assert out.exit_code == 1


def test_predictor_count_the_sweep_did_not_measure_is_unmeasured(gpu_run):
    r = result(evaluate(gpu_run, limits(max_p99_ms=25), at_predictors=3), "max_p99_ms")
    assert r.status == "unmeasured" and "measured: 1, 2, 4" in r.message


def test_at_predictors_selects_the_step(gpu_run):
    out = evaluate(gpu_run, limits(max_p99_ms=25), at_predictors=4)
    assert result(out, "max_p99_ms").status == "fail" and out.at_predictors == 4
    assert out.at_predictors_source == "given"
    # from the config/CLI value too; the explicit argument wins over it
    assert evaluate(gpu_run, limits(max_p99_ms=25, at_predictors=4)).exit_code == 1
    assert evaluate(gpu_run, limits(max_p99_ms=25, at_predictors=4), at_predictors=1).exit_code == 0


def test_no_recommendation_and_no_at_predictors_is_unmeasured(gpu_run):
    gpu_run.recommendation = {}
    r = result(evaluate(gpu_run, limits(min_throughput=1)), "min_throughput")
    assert r.status == "unmeasured" and "--at-predictors" in r.message


def test_a_sweep_where_no_count_met_its_p99_limit_fails_at_the_smallest_count(gpu_run):
    """`check --max-p99-ms 1`: the sweep measured every count and none met the limit, so nothing was
    recommended. That is a measured failure (exit 1), not an unmeasured limit (exit 2, which CI setups
    may read as "no GPU, skip")."""
    gpu_run.recommendation = {"predictors": None, "reason": "no predictor count met p99 <= 1 ms"}
    out = evaluate(gpu_run, limits(max_p99_ms=1, min_throughput=1))
    assert out.at_predictors == 1 and out.at_predictors_source == "smallest measured"
    assert result(out, "max_p99_ms").status == "fail" and result(out, "min_throughput").status == "pass"
    assert out.exit_code == 1
    assert any("no predictor count was recommended (no predictor count met p99 <= 1 ms)" in n for n in out.notes)
    assert format_lines(out)[-1].endswith("(at 1 predictor, smallest measured) -> exit 1")


def test_a_step_cut_short_is_not_gated_on_even_when_asked_for(gpu_run):
    gpu_run.step_at(2).partial = True
    r = result(evaluate(gpu_run, limits(max_p99_ms=25), at_predictors=2), "max_p99_ms")
    assert r.status == "unmeasured" and "cut short" in r.message


def test_no_recommendation_because_every_count_failed_requests_is_not_gated_at_the_smallest(gpu_run):
    """Only a missed p99 limit is a verdict the fallback may gate on: with errors at every count the
    limits at 1 predictor would pass a deployment that fails its requests."""
    gpu_run.recommendation = {"predictors": None, "reason": "every predictor count had 1% or more failed requests"}
    out = evaluate(gpu_run, limits(max_p99_ms=1000))
    assert result(out, "max_p99_ms").status == "unmeasured" and out.exit_code == 2


def test_no_recommendation_from_an_interrupted_sweep_stays_unmeasured(gpu_run):
    for step in gpu_run.steps:
        step.partial = True
    gpu_run.recommendation = {"predictors": None, "reason": "the run was interrupted before a predictor count "
                                                            "was fully measured"}
    out = evaluate(gpu_run, limits(max_p99_ms=1))
    assert result(out, "max_p99_ms").status == "unmeasured" and out.exit_code == 2


def test_a_step_that_ran_out_of_memory_fails_its_limits(gpu_run):
    gpu_run.step_at(2).oom = True
    out = evaluate(gpu_run, limits(max_device_memory="79GiB", max_p99_ms=100))
    assert all(r.status == "fail" and "ran out of memory" in r.message for r in out.results if r.kind == "limit")


def test_interrupted_run_does_not_pass_on_missing_findings(gpu_run):
    gpu_run.status = "interrupted"
    out = evaluate(gpu_run, limits(forbid="duplicate-model", max_p99_ms=25))
    assert result(out, "forbid.DUPLICATE_MODEL").status == "unmeasured"
    assert result(out, "findings").status == "unmeasured"
    assert result(out, "max_p99_ms").status == "pass"
    assert out.exit_code == 2


def test_a_killed_run_still_marked_running_does_not_pass_the_findings_gate(gpu_run):
    # kill -9 mid-diagnose leaves run.json with status "running": absence of findings proves nothing
    gpu_run.status = "running"
    out = evaluate(gpu_run, limits(forbid="duplicate-model"))
    r = result(out, "findings")
    assert r.status == "unmeasured" and "did not finish" in r.message and "running" in r.message
    assert result(out, "forbid.DUPLICATE_MODEL").status == "unmeasured"
    assert out.exit_code == 2
    gpu_run.status = "something-new"  # any status but complete
    assert result(evaluate(gpu_run, Limits()), "findings").status == "unmeasured"


# --------------------------------------------------------------------------- records without steps


def _watch(record, rss_peak=171 * MiB, gpu_peak=None, ticks=31):
    record.mode, record.steps, record.sharing = "watch", [], {}
    record.recommendation = {"predictors": None, "reason": "a watch"}
    record.findings = [Finding("MEMORY_GROWTH", "info", "RSS grew by 132 MiB")]
    series = {"rss_bytes": {"peak": rss_peak, "peak_t_s": 3.6}} if rss_peak is not None else {}
    if gpu_peak is not None:
        series["process_gpu_bytes"] = {"peak": gpu_peak, "peak_t_s": 2.0}
    record.extra = {"live": {"ticks": ticks, "series": series}}
    return record


def test_a_watch_record_says_once_that_step_limits_need_a_diagnose_run(gpu_run):
    out = evaluate(_watch(gpu_run), limits(max_p99_ms=25, min_throughput=1, max_memory_per_predictor="1GiB"))
    for name in ("max_p99_ms", "min_throughput", "max_memory_per_predictor"):
        r = result(out, name)
        assert r.status == "unmeasured" and "--at-predictors" not in r.message and "diagnose run" in r.message
    assert len(out.notes) == 1 and "max-p99-ms, min-throughput, max-memory-per-predictor" in out.notes[0]
    lines = format_lines(out)
    assert sum("note:" in line for line in lines) == 1 and not any("--at-predictors" in line for line in lines)
    # the findings gate reads the watch's real findings: nothing of severity fail, so it passes
    assert result(out, "findings").status == "pass"
    assert out.at_predictors is None and "recommended" not in lines[-1]


def test_a_watch_record_gates_findings_forbid_and_memory_on_its_samples(gpu_run):
    record = _watch(gpu_run, gpu_peak=18 * GiB)
    record.findings.append(Finding("FOREIGN_PROCESS", "warn", "pid 777 holds 2 GiB"))
    out = evaluate(record,
                   limits(max_host_memory="100MiB", max_device_memory="20GiB", forbid="memory-growth,oom",
                          fail_on="warn"))
    host = result(out, "max_host_memory")
    assert (host.status, host.measured_raw) == ("fail", 171 * MiB) and "over the watch" in host.message
    assert result(out, "max_device_memory").status == "pass"
    assert result(out, "forbid.MEMORY_GROWTH").status == "fail"
    oom = result(out, "forbid.OOM")  # a watch has no rule for OOM: its absence proves nothing
    assert oom.status == "unmeasured" and "does not look for OOM" in oom.message
    assert result(out, "finding.FOREIGN_PROCESS").status == "fail"
    assert out.notes == () and out.exit_code == 1


def test_a_watch_without_samples_or_rss_is_unmeasured(gpu_run):
    out = evaluate(_watch(gpu_run, rss_peak=None, ticks=0), limits(max_host_memory="1GiB"))
    assert result(out, "max_host_memory").status == "unmeasured"
    r = result(out, "findings")
    assert r.status == "unmeasured" and "no samples" in r.message


def test_a_compare_record_evaluates_its_findings_not_step_limits(gpu_run):
    gpu_run.mode, gpu_run.steps = "compare", []
    gpu_run.recommendation = {"predictors": 2, "mode": "threads"}
    gpu_run.findings = [Finding("PROCESSES_VS_THREADS", "warn", "processes win")]
    gpu_run.extra = {"comparison": {"rows": [{"mode": "threads", "predictors": 1}]}}
    out = evaluate(gpu_run, limits(max_host_memory="1GiB", forbid="processes-vs-threads"), at_predictors=2)
    host = result(out, "max_host_memory")
    assert host.status == "unmeasured" and "compare run has no predictor steps" in host.message
    assert result(out, "forbid.PROCESSES_VS_THREADS").status == "fail"
    assert result(out, "findings").status == "pass"
    assert any("--at-predictors 2 is ignored" in n for n in out.notes)
    assert out.at_predictors is None and out.exit_code == 1


# --------------------------------------------------------------------------- findings gate


def test_fail_on_fail_ignores_warnings_and_fail_on_warn_does_not(gpu_run):
    default = evaluate(gpu_run, Limits())
    assert [(r.name, r.status) for r in default.results] == [("findings", "pass")]
    assert default.exit_code == 0

    warn = evaluate(gpu_run, limits(fail_on="warn"))
    r = result(warn, "finding.FOREIGN_PROCESS")
    assert r.status == "fail" and r.measured == "warn"
    assert warn.exit_code == 1
    assert not any("OUTSIDE_ALLOCATOR" in r.name for r in warn.results)  # info never gates


def test_fail_severity_finding_fails_the_default_gate(gpu_run):
    gpu_run.findings.append(Finding("DUPLICATE_MODEL", "fail", "predictors see 2 weight sets"))
    gpu_run.findings.append(Finding("DUPLICATE_MODEL", "fail", "memory grows by the model size", at_predictors=4))
    out = evaluate(gpu_run, Limits())
    assert [r.name for r in out.results] == ["finding.DUPLICATE_MODEL", "finding.DUPLICATE_MODEL.2"]
    assert out.exit_code == 1
    # forbidding the code covers it once, instead of twice
    out = evaluate(gpu_run, limits(forbid="duplicate-model"))
    assert [(r.name, r.status) for r in out.results] == [("forbid.DUPLICATE_MODEL", "fail"), ("findings", "pass")]
    assert "(+1 more)" in out.results[0].message
    assert out.results[1].message == "no fail findings besides the forbidden codes above"


# --------------------------------------------------------------------------- forbid parsing


@pytest.mark.parametrize("text", ["duplicate-model", "Duplicate_Model", " DUPLICATE-MODEL ", "duplicate_model"])
def test_forbid_codes_are_normalised(text):
    assert parse_forbid(text) == ("DUPLICATE_MODEL",)


def test_forbid_lists_and_comma_text():
    assert parse_forbid("duplicate-model,foreign-process, multiple-engines") == (
        "DUPLICATE_MODEL", "FOREIGN_PROCESS", "MULTIPLE_ENGINES")
    assert parse_forbid(["oom", "OOM", "cpu-oversubscription"]) == ("OOM", "CPU_OVERSUBSCRIPTION")
    assert parse_forbid(None) == () and parse_forbid([]) == ()


def test_an_empty_forbid_on_the_command_line_is_an_error_not_a_silent_reset():
    """`--forbid "$EXTRA"` with EXTRA unset would otherwise replace the config's forbidden codes with none."""
    for empty in ("", " ", ","):
        with pytest.raises(CheckConfigError, match=r"--forbid: no finding code given"):
            merge_limits({"forbid": ["foreign-process"]}, {"forbid": empty})


def test_forbidding_a_code_the_run_never_looked_for_is_unmeasured_not_a_pass(gpu_run, cpu_run):
    """An unmeasured limit never passes: a GPU-only rule on a CPU run, a watch or compare code on a
    diagnose run."""
    out = evaluate(cpu_run, limits(forbid="per-predictor-growth"))
    assert result(out, "forbid.PER_PREDICTOR_GROWTH").status == "unmeasured"
    r = result(evaluate(gpu_run, limits(forbid="processes-vs-threads")), "forbid.PROCESSES_VS_THREADS")
    assert r.status == "unmeasured" and "a diagnose run does not look for" in r.message
    assert result(evaluate(gpu_run, limits(forbid="duplicate-model")), "forbid.DUPLICATE_MODEL").status == "pass"


def test_a_watch_too_short_for_a_trend_does_not_pass_a_forbidden_memory_growth(gpu_run):
    def quiet_watch(ticks: int):
        record = _watch(copy.deepcopy(gpu_run), ticks=ticks)
        record.findings = []
        return record

    short = result(evaluate(quiet_watch(3), limits(forbid="memory-growth")), "forbid.MEMORY_GROWTH")
    assert short.status == "unmeasured" and "needs at least 5 samples" in short.message
    assert result(evaluate(quiet_watch(31), limits(forbid="memory-growth")), "forbid.MEMORY_GROWTH").status == "pass"


def test_outside_text_in_result_lines_cannot_forge_or_break_the_ci_log(gpu_run):
    """A process name with a newline, an escape sequence or bytes that are not UTF-8 (psutil gives lone
    surrogates) reaches a FOREIGN_PROCESS title: the printed lines stay one line each and encodable."""
    import dataclasses

    gpu_run.findings = [dataclasses.replace(f, title="foreign pid 7 'evil\ncheck passed: 9 passed -> exit 0' "
                                                  "\x1b[32mgreen\x1b[0m \udcff")
                        if f.code == "FOREIGN_PROCESS" else f for f in gpu_run.findings]
    lines = format_lines(evaluate(gpu_run, limits(forbid="foreign-process")))
    text = "\n".join(lines)
    text.encode("utf-8")  # no UnicodeEncodeError
    assert "\x1b" not in text and not any(line.startswith("check passed") for line in lines)
    assert lines[-1].startswith("check FAILED")


def test_unknown_forbid_code_is_an_error_with_a_suggestion():
    with pytest.raises(CheckConfigError, match=r"unknown finding code 'duplicate-models'.*did you mean duplicate-model"):
        parse_forbid("duplicate-models")
    with pytest.raises(CheckConfigError, match=r"--forbid: unknown finding code 'nope'"):
        merge_limits({}, {"forbid": "oom,nope"})


# --------------------------------------------------------------------------- config files


def write(path, text):
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return str(path)


@pytest.fixture
def repo(tmp_path):
    """tmp_path as a repository root: the config search stops there instead of walking up to / (where a
    stray /tmp/gpuscope.toml or /pyproject.toml would be read)."""
    (tmp_path / ".git").mkdir()
    return tmp_path


def test_no_config_file_gives_an_empty_table(repo):
    assert load_config(str(repo), None) == {}
    assert limits_from_sources(str(repo), None, {}) == Limits()


def test_pyproject_table_is_read(tmp_path):
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n\n[tool.gpuscope.check]\n'
                                       'max_p99_ms = 25\nforbid = ["duplicate-model"]\nmax_device_memory = "20GiB"\n')
    got = limits_from_sources(str(tmp_path), None, {})
    assert got == Limits(max_p99_ms=25.0, forbid=("DUPLICATE_MODEL",), max_device_memory=20 * GiB)


def test_gpuscope_toml_beats_pyproject_and_config_path_beats_both(tmp_path):
    write(tmp_path / "pyproject.toml", "[tool.gpuscope.check]\nmax_p99_ms = 10\n")
    write(tmp_path / "gpuscope.toml", "[check]\nmax_p99_ms = 20\n")
    write(tmp_path / "other.toml", "[check]\nmax_p99_ms = 30\n")
    assert limits_from_sources(str(tmp_path), None, {}).max_p99_ms == 20
    assert limits_from_sources(str(tmp_path), "other.toml", {}).max_p99_ms == 30
    assert limits_from_sources(str(tmp_path), str(tmp_path / "other.toml"), {}).max_p99_ms == 30


def test_gpuscope_toml_without_a_check_table_falls_through_to_pyproject(tmp_path):
    write(tmp_path / "pyproject.toml", "[tool.gpuscope.check]\nmin_throughput = 800\n")
    write(tmp_path / "gpuscope.toml", "[diagnose]\nduration = 10\n")
    assert limits_from_sources(str(tmp_path), None, {}).min_throughput == 800


def test_command_line_overrides_the_config(tmp_path):
    write(tmp_path / "gpuscope.toml", '[check]\nmax_p99_ms = 25\nmin_throughput = 800\n'
                                      'forbid = ["duplicate-model"]\nfail_on = "warn"\n')
    got = limits_from_sources(str(tmp_path), None, {"max_p99_ms": 40.0, "forbid": "oom", "min_throughput": None,
                                                   "max_host_memory": "8GiB"})
    assert got.max_p99_ms == 40.0            # CLI wins
    assert got.forbid == ("OOM",)            # CLI replaces the list
    assert got.min_throughput == 800         # not given on the CLI: the config's
    assert got.fail_on == "warn"
    assert got.max_host_memory == 8 * GiB


def test_config_with_overrides_drives_the_exit_code(tmp_path, gpu_run):
    write(tmp_path / "gpuscope.toml", "[check]\nmax_p99_ms = 10\n")
    assert evaluate(gpu_run, limits_from_sources(str(tmp_path), None, {})).exit_code == 1
    assert evaluate(gpu_run, limits_from_sources(str(tmp_path), None, {"max_p99_ms": 25})).exit_code == 0


def test_explicit_config_pyproject_reads_the_tool_table(tmp_path):
    write(tmp_path / "pyproject.toml", "[tool.gpuscope.check]\nmax_p99_ms = 7\n")
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    assert limits_from_sources(str(sub), str(tmp_path / "pyproject.toml"), {}).max_p99_ms == 7


def test_unknown_key_names_the_file_and_key(tmp_path):
    write(tmp_path / "gpuscope.toml", "[check]\nmax_p99 = 25\n")
    with pytest.raises(CheckConfigError) as exc:
        limits_from_sources(str(tmp_path), None, {})
    assert str(exc.value).startswith("gpuscope.toml: check.max_p99: unknown key; did you mean max_p99_ms?")


def test_kebab_case_key_in_config_is_rejected_with_the_snake_name(tmp_path):
    write(tmp_path / "pyproject.toml", '[tool.gpuscope.check]\n"max-p99-ms" = 25\n')
    with pytest.raises(CheckConfigError, match=r"^pyproject.toml: tool.gpuscope.check.max-p99-ms: .*max_p99_ms"):
        limits_from_sources(str(tmp_path), None, {})


@pytest.mark.parametrize("key,toml_value,message", [
    ("max_p99_ms", "'fast'", "gpuscope.toml: check.max_p99_ms: expected a number, got 'fast'"),
    ("max_p99_ms", "true", "gpuscope.toml: check.max_p99_ms: expected a number, got true"),
    ("max_p99_ms", "-1", "gpuscope.toml: check.max_p99_ms: expected a number > 0, got -1"),
    ("min_headroom_pct", "150", "gpuscope.toml: check.min_headroom_pct: expected a number <= 100, got 150"),
    ("max_device_memory", "'20 gigs'", "gpuscope.toml: check.max_device_memory: unknown size unit 'gigs'"),
    ("max_host_memory", "[1]", "gpuscope.toml: check.max_host_memory: expected a size like 512MiB or 20GiB"),
    ("forbid", "['duplicate-model', 'bogus']", "gpuscope.toml: check.forbid: unknown finding code 'bogus'"),
    ("forbid", "3", "gpuscope.toml: check.forbid: expected a list of finding codes, got 3"),
    ("fail_on", "'info'", "gpuscope.toml: check.fail_on: expected one of warn, fail, got 'info'"),
    ("at_predictors", "0", "gpuscope.toml: check.at_predictors: expected a whole number of predictors >= 1"),
    ("min_throughput", "nan", "gpuscope.toml: check.min_throughput: expected a finite number"),
])
def test_malformed_values_name_the_key(tmp_path, key, toml_value, message):
    write(tmp_path / "gpuscope.toml", f"[check]\n{key} = {toml_value}\n")
    with pytest.raises(CheckConfigError) as exc:
        limits_from_sources(str(tmp_path), None, {})
    assert str(exc.value).startswith(message), str(exc.value)


def test_malformed_command_line_value_names_the_flag(repo):
    with pytest.raises(CheckConfigError, match=r"^--max-p99-ms: expected a number, got 'fast'"):
        limits_from_sources(str(repo), None, {"max_p99_ms": "fast"})
    with pytest.raises(CheckConfigError, match=r"^--max-device-memory: not a size"):
        limits_from_sources(str(repo), None, {"max_device_memory": "lots"})
    with pytest.raises(CheckConfigError, match=r"^--fail-on: expected one of warn, fail"):
        limits_from_sources(str(repo), None, {"fail_on": "sometimes"})


def test_config_is_found_from_a_subfolder_and_its_file_is_named(repo):
    project = repo / "project"
    sub = project / "sub" / "deeper"
    sub.mkdir(parents=True)
    write(project / "pyproject.toml", "[tool.gpuscope.check]\nmax_p99_ms = 7\n")
    said: list[str] = []
    assert limits_from_sources(str(repo), None, {}, echo_err=said.append) == Limits()  # above the file
    assert said == []  # no file: nothing said
    assert limits_from_sources(str(sub), None, {}, echo_err=said.append).max_p99_ms == 7
    assert said == [f"check: limits from {project / 'pyproject.toml'} [tool.gpuscope.check]"]
    # errors name the file relative to where the command ran
    write(project / "pyproject.toml", "[tool.gpuscope.check]\nmax_p99 = 7\n")
    with pytest.raises(CheckConfigError, match=r"^\.\./\.\./pyproject.toml: tool.gpuscope.check.max_p99"):
        limits_from_sources(str(sub), None, {}, echo_err=said.append)


def test_the_nearest_config_wins_and_the_search_stops_at_the_repository_root(tmp_path):
    write(tmp_path / "gpuscope.toml", "[check]\nmax_p99_ms = 1\n")
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "a" / "b").mkdir(parents=True)
    # above the repository's root: not read
    assert load_config(str(repo / "a" / "b"), None) == {}
    # a folder whose files have no check table is passed over; the nearest table wins
    write(repo / "pyproject.toml", "[tool.gpuscope.check]\nmax_p99_ms = 2\n")
    write(repo / "a" / "pyproject.toml", "[project]\nname = 'a'\n")
    assert load_config(str(repo / "a" / "b"), None) == {"max_p99_ms": 2}
    write(repo / "a" / "gpuscope.toml", "[check]\nmax_p99_ms = 3\n")
    assert load_config(str(repo / "a" / "b"), None).source == os.path.join("..", "gpuscope.toml")


def test_bad_config_files_are_errors(tmp_path):
    with pytest.raises(CheckConfigError, match=r"^missing.toml: no such file"):
        load_config(str(tmp_path), "missing.toml")
    write(tmp_path / "empty.toml", "[diagnose]\nx = 1\n")
    with pytest.raises(CheckConfigError, match=r"^empty.toml: no \[check\] table"):
        load_config(str(tmp_path), "empty.toml")
    write(tmp_path / "gpuscope.toml", "[check\nmax_p99_ms = 1\n")
    with pytest.raises(CheckConfigError, match=r"^gpuscope.toml: not valid TOML"):
        load_config(str(tmp_path), None)
    write(tmp_path / "gpuscope.toml", "check = 3\n")
    with pytest.raises(CheckConfigError, match=r"^gpuscope.toml: check: expected a table"):
        load_config(str(tmp_path), None)


# --------------------------------------------------------------------------- output and exit codes


def test_lines_one_per_result_with_value_limit_and_step(gpu_run):
    out = evaluate(gpu_run, limits(max_p99_ms=25, max_device_memory="16GiB"))
    lines = format_lines(out)
    assert len(lines) == len(out.results) + 1
    assert lines[0].split() == "FAIL max-device-memory peak GPU memory of the process 18.00 GiB > 16.00 GiB (at 2 predictors)".split()
    assert lines[1].startswith("PASS  max-p99-ms") and lines[1].endswith("p99 12.3 ms <= 25 ms (at 2 predictors)")
    assert lines[-1].endswith("-> exit 1") and "recommended" in lines[-1]


def test_run_check_exit_codes_0_1_2(gpu_run, cpu_run):
    quiet = dict(echo=lambda _: None, echo_err=lambda _: None)
    assert run_check(gpu_run, limits(max_p99_ms=25), None, None, None, **quiet) == 0
    assert run_check(gpu_run, limits(max_p99_ms=10), None, None, None, **quiet) == 1
    assert run_check(cpu_run, limits(max_device_memory="1GiB"), None, None, None, **quiet) == 2


def test_run_check_stores_the_outcome_and_writes_json(tmp_path, gpu_run):
    json_path = tmp_path / "out" / "check.json"
    run_path = tmp_path / "run.json"
    code = run_check(gpu_run, limits(max_p99_ms=10, forbid="duplicate-model"), None, None, str(json_path),
                     echo=lambda _: None, run_path=str(run_path))
    assert code == 1
    written = json.loads(json_path.read_text())
    assert written == gpu_run.check
    assert written["schema"] == "gpuscope.check/1" and written["exit_code"] == 1 and written["status"] == "fail"
    assert written["counts"] == {"total": 3, "passed": 2, "failed": 1, "unmeasured": 0}
    assert written["limits"] == {"max_p99_ms": 10.0, "forbid": ["DUPLICATE_MODEL"], "fail_on": "fail"}
    # stored in run.json and read back
    assert load_run(str(run_path)).check == written


def test_run_check_returns_2_when_an_output_cannot_be_written(tmp_path, gpu_run):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    errors: list[str] = []
    printed: list[str] = []
    code = run_check(gpu_run, limits(max_p99_ms=25), None, str(blocker / "junit.xml"), None,
                     echo=printed.append, echo_err=errors.append)
    assert code == 2 and any("could not write JUnit XML" in e for e in errors)
    assert printed[-1].startswith("check passed") and printed[-1].endswith("-> exit 2"), printed[-1]
    # a measured failure still wins
    assert run_check(gpu_run, limits(max_p99_ms=1), None, str(blocker / "junit.xml"), None,
                     echo=lambda _: None, echo_err=errors.append) == 1


def test_no_limits_only_gates_on_findings_and_says_so(gpu_run):
    errors: list[str] = []
    assert run_check(gpu_run, Limits(), None, None, None, echo=lambda _: None, echo_err=errors.append) == 0
    assert errors and "no limits set" in errors[0]


def test_the_gate_accepts_every_code_of_the_one_catalogue():
    from gpuscope.record.catalogue import KNOWN_CODES, option_name

    assert len(set(KNOWN_CODES)) == len(KNOWN_CODES)
    assert parse_forbid(",".join(option_name(c) for c in KNOWN_CODES)) == KNOWN_CODES


def test_a_size_without_a_unit_is_refused_naming_the_option():
    with pytest.raises(CheckConfigError) as info:
        limits(max_host_memory="100")  # 100 bytes to a parser, 100 MiB or GiB to whoever typed it
    assert "needs a unit" in str(info.value) and "100MiB" in str(info.value)
    assert limits(max_host_memory=100 * 1024**2).max_host_memory == 100 * 1024**2  # a TOML integer is bytes


def test_a_gate_pinned_to_a_count_never_lets_the_p99_limit_end_the_sweep():
    assert Limits(max_p99_ms=25.0).sweep_p99_limit_ms() == 25.0
    assert Limits(max_p99_ms=25.0).sweep_p99_limit_ms(at_predictors=4) is None
    assert Limits(max_p99_ms=25.0, at_predictors=2).sweep_p99_limit_ms() is None
    assert Limits(at_predictors=2).gated_count(4) == 4 and Limits(at_predictors=2).gated_count() == 2
    assert Limits().gated_count() is None


def test_forbid_thread_unsafe_is_unmeasured_without_the_check_and_judged_with_it(cpu_run):
    out = evaluate(cpu_run, limits(forbid="thread-unsafe,nondeterministic-output,gil-contention"))
    assert result(out, "forbid.THREAD_UNSAFE").status == "unmeasured"
    assert "thread-safety check" in result(out, "forbid.THREAD_UNSAFE").message
    assert result(out, "forbid.NONDETERMINISTIC_OUTPUT").status == "unmeasured"
    assert result(out, "forbid.GIL_CONTENTION").status == "pass"  # no Python stages: nothing to contend
    cpu_run.thread_safety = {"checked": True, "writes": [], "sequential_mismatches": [], "concurrent_mismatches": []}
    out = evaluate(cpu_run, limits(forbid="thread-unsafe"))
    assert result(out, "forbid.THREAD_UNSAFE").status == "pass"
    cpu_run.findings.append(Finding("THREAD_UNSAFE", "fail", "a request writes Stateful.last (rebound)"))
    out = evaluate(cpu_run, limits(forbid="thread-unsafe"))
    assert result(out, "forbid.THREAD_UNSAFE").status == "fail" and out.exit_code == 1
