"""Remedies verified (analysis/remedies.py) and tune's plot data (reports/tuning_plot.py), on scripted tuning
blocks: the issue's own numbers, a remedy that did not help, one never measured, and the GPU slope."""
from __future__ import annotations

from gpuscope.analysis.remedies import verify_remedies
from gpuscope.record.run import Finding, RunRecord
from gpuscope.reports.tuning_plot import heatmap, tuning_points
from gpuscope.reports.tuning_section import tuning_section

MiB = 1024 * 1024


def row(n, t, rps, p99, status="measured", env=None, streams=False, device=None, reason=""):
    out = {"settings": {"predictors": n, "intra_op_threads": t, "streams": streams, "env": env or {}},
           "status": status, "label": f"{n}/{t}", "reason": reason}
    if rps is not None:
        out.update(throughput_rps=rps, latency_ms={"p50": p99 / 2, "p99": p99},
                   memory={"device_bytes": device, "host_bytes": 100 * MiB})
    return out


def record(rows, default=(2, 2), device="cpu", findings=None):
    r = RunRecord(tool_version="t", started_at="now", mode="tune", config={"device": device})
    r.tuning = {"configurations": rows, "default": {"settings": {"predictors": default[0], "intra_op_threads": default[1],
                                                                 "streams": False, "env": {}}}}
    r.findings = findings or [Finding("CPU_OVERSUBSCRIPTION", "warn", "2 x 2 on 2 cores", {}, "torch.set_num_threads")]
    return r


def test_cpu_oversubscription_quotes_what_one_thread_measured():
    rows = [row(2, 2, 10.2, 238), row(2, 1, 12.0, 200), row(1, 2, 8.0, 120)]
    [finding] = verify_remedies(record(rows), usable_cores=2)
    measured = finding.evidence["remedy_measured"]
    assert measured["text"] == "with 1 intra-op thread: 12.0 req/s vs 10.2 (+18%), p99 200 ms vs 238 ms"
    assert measured["helped"] is True
    assert finding.remedy.startswith("torch.set_num_threads") and "Measured by this tune: with 1" in finding.remedy


def test_a_remedy_that_did_not_help_says_so():
    rows = [row(2, 2, 10.2, 238), row(2, 1, 10.3, 240)]
    [finding] = verify_remedies(record(rows), usable_cores=2)
    assert finding.evidence["remedy_measured"]["text"].endswith(": it did not help")
    assert finding.evidence["remedy_measured"]["helped"] is False


def test_a_remedy_the_search_skipped_says_why_it_was_not_measured():
    rows = [row(2, 2, 10.2, 238), row(2, 1, None, 0, status="skipped", reason="skipped: budget: 90 of 90 s used")]
    [finding] = verify_remedies(record(rows), usable_cores=2)
    assert finding.evidence["remedy_measured"] == {
        "text": "not measured by this tune (skipped: budget: 90 of 90 s used)", "helped": None}


def test_gpu_workspace_remedy_compares_memory_per_extra_predictor():
    base = 1000 * MiB
    rows = [row(1, 8, 100, 10, device=base), row(2, 8, 150, 12, device=base + 104 * MiB),
            row(1, 8, 100, 10, env={"CUBLAS_WORKSPACE_CONFIG": ":0:0"}, device=base),
            row(2, 8, 149, 12, env={"CUBLAS_WORKSPACE_CONFIG": ":0:0"}, device=base)]
    finding = Finding("PER_PREDICTOR_GROWTH", "warn", "104 MiB per predictor", {}, "set CUBLAS_WORKSPACE_CONFIG=:0:0")
    [out] = verify_remedies(record(rows, default=(2, 8), device="cuda:0", findings=[finding]), usable_cores=16)
    assert out.evidence["remedy_measured"]["text"] == \
        "with CUBLAS_WORKSPACE_CONFIG=:0:0: 0 MiB per extra predictor vs 104"


def test_findings_without_a_searched_remedy_are_unchanged():
    other = Finding("DUPLICATE_MODEL", "fail", "copies", {"a": 1}, "share it")
    rows = [row(2, 2, 10.2, 238)]
    assert verify_remedies(record(rows, findings=[other]), usable_cores=2) == [other]


def test_plot_data_flags_the_winner_and_leaves_skipped_cells_blank():
    rows = [row(1, 2, 8.0, 120), row(2, 2, 10.2, 238), row(2, 1, 12.0, 200),
            row(1, 1, None, 0, status="skipped", reason="dominated")]
    tuning = {"configurations": rows, "best": {"settings": rows[2]["settings"]}}
    points = tuning_points(tuning)
    assert [p.best for p in points] == [False, False, True]
    counts, threads, grid = heatmap(tuning)
    assert counts == [1, 2] and threads == [1, 2]
    assert grid == [[None, 12.0], [8.0, 10.2]]


def test_the_section_escapes_what_users_typed():
    rows = [row(1, 1, 5.0, 10, env={"X": "<script>"})]
    rows[0]["label"] = "1 predictor, X=<script>"
    html = tuning_section(record(rows), {})
    assert "<script>" not in html and "X=&lt;script&gt;" in html
