"""`gpuscope report RUN_JSON [--out DIR]` (reports.render.report_command): re-render a saved run."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from gpuscope.reports.render import report_command
from tests import report_fixtures as rf

FILES = ["memory_breakdown.png", "memory_timeline.png", "report.html", "throughput_latency.png"]
WATCH_FILES = ["memory_breakdown.png", "memory_timeline.png", "report.html"]


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".html", ".png"))


def test_renders_beside_run_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record, run, _samples = rf.copies_run(str(tmp_path))
    assert report_command(run, None) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / "report.html")
    assert out.err == ""
    assert _files(tmp_path) == FILES
    html = (tmp_path / "report.html").read_text()
    assert rf.EVIL_NAME not in html and "&lt;img src=x onerror=alert(1)&gt;.pt" in html


def test_out_dir_and_rerender_is_reproducible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record, run, _samples = rf.cpu_run(str(tmp_path / "run"))
    assert report_command(run, str(tmp_path / "a")) == 0
    assert report_command(run, str(tmp_path / "b" / "nested")) == 0
    assert _files(tmp_path / "a") == FILES == _files(tmp_path / "b" / "nested")
    for name in FILES[:1] + FILES[3:]:  # the PNGs are the same bytes: rendered from the record alone
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / "nested" / name).read_bytes()
    strip = lambda text: text.split("<footer>")[0]  # noqa: E731 (the footer holds the render time)
    assert strip((tmp_path / "a" / "report.html").read_text()) == \
        strip((tmp_path / "b" / "nested" / "report.html").read_text())


def test_samples_resolved_relative_to_run_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _record, run, _samples = rf.gpu_run(str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)  # somewhere else: samples.jsonl is not in the cwd
    assert report_command(os.path.join("run", "run.json"), "out") == 0
    html = (tmp_path / "out" / "report.html").read_text()
    assert "memory timeline is empty" not in html


def test_interrupted_run_with_torn_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record, run, samples = rf.interrupted_run(str(tmp_path))
    rf.tear_last_line(samples)  # killed mid-write after the interruption: half a line at the end
    assert report_command(run, None) == 0
    assert _files(tmp_path) == FILES
    html = (tmp_path / "report.html").read_text()
    assert "Interrupted run." in html and "1 unreadable line in the samples file" in html


@pytest.mark.parametrize("samples_content", [None, ""])
def test_missing_or_empty_samples_still_render(tmp_path: Path, samples_content: str | None) -> None:
    _record, run, samples = rf.gpu_run(str(tmp_path))
    if samples_content is None:
        os.unlink(samples)
    else:
        Path(samples).write_text(samples_content)
    assert report_command(run, None) == 0
    assert _files(tmp_path) == FILES
    assert "memory timeline is empty" in (tmp_path / "report.html").read_text()


def test_unavailable_everywhere_renders(tmp_path: Path) -> None:
    _record, run, _samples = rf.unavailable_run(str(tmp_path))
    assert report_command(run, None) == 0
    assert _files(tmp_path) == FILES


def _one_line_exit_2(capsys: pytest.CaptureFixture[str], run: str, out: str | None = None) -> str:
    assert report_command(run, out) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ("\x00\x01binary", "not valid JSON"),
    (json.dumps({"hello": "world"}), "not a gpuscope run record"),
    (json.dumps([1, 2, 3]), "not a gpuscope run record"),
    (json.dumps({"schema": "otherapp/3"}), "not a gpuscope run record"),
    (json.dumps({"schema": "gpuscope.run/99"}), "newer"),
    (json.dumps({"schema": "gpuscope.run/1", "steps": "nope"}), "malformed"),
    (json.dumps({"schema": "gpuscope.run/1", "tool_version": "0.1.0", "started_at": "x", "config": "cpu"}),
     "malformed"),
    (json.dumps({"schema": "gpuscope.run/1", "tool_version": "0.1.0", "started_at": "x",
                 "steps": [{"predictors": 1, "memory": [1]}]}), "malformed"),
])
def test_corrupt_or_foreign_run_json_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                                             expected: str) -> None:
    path = tmp_path / "run.json"
    path.write_text(content)
    line = _one_line_exit_2(capsys, str(path))
    assert expected in line
    assert _files(tmp_path) == []


def test_missing_run_json_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "no such file" in _one_line_exit_2(capsys, str(tmp_path / "nope.json"))


def test_foreign_samples_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record, run, samples = rf.gpu_run(str(tmp_path))
    Path(samples).write_text('{"schema": "someone-else/1"}\n{"t_ns": 1, "v": {}}\n')
    assert "samples" in _one_line_exit_2(capsys, run)
    Path(samples).write_text("just some text\n")
    assert "not a gpuscope samples file" in _one_line_exit_2(capsys, run)


def test_unwritable_out_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record, run, _samples = rf.cpu_run(str(tmp_path / "run"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write" in _one_line_exit_2(capsys, run, str(blocker / "out"))


def test_24_hours_of_1s_samples_render_quickly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """86,400 ticks: the real figure is measured by the benchmark script; this is a generous sanity bound."""
    _record, run, _samples = rf.long_watch_run(str(tmp_path))
    started = time.process_time()  # CPU seconds: other processes on the cores cannot make it look slow
    assert report_command(run, None) == 0
    elapsed = time.process_time() - started
    assert elapsed < 20.0, f"rendering 24 h of samples took {elapsed:.1f} s of CPU"
    assert _files(tmp_path) == WATCH_FILES  # a watch swept nothing: no throughput plot
    html = (tmp_path / "report.html").read_text()
    assert html.count("draws 86,400 ticks as") == 1  # the report says, once, that the timeline was downsampled
    assert len(html) < 2_000_000  # and stays small: no per-tick data in the page


def test_a_compare_run_is_rendered_with_compare_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record, run, _samples = rf.cpu_run(str(tmp_path))
    record.mode, record.steps = "compare", []
    record.extra = {"comparison": {"verdict": "threads win", "rows": [
        {"mode": m, "predictors": n, "throughput_rps": 10.0 * n, "host_uss_bytes": 100 * 2**20 * n}
        for m in ("threads", "processes") for n in (1, 2)]}}
    rf.save_run(record, run)
    assert report_command(run, None) == 0
    assert _files(tmp_path) == ["compare.png", "report.html"]  # the caption's "also saved as compare.png" holds
    assert "compare.png" in (tmp_path / "report.html").read_text()


def test_infinity_and_nan_in_a_record_render_as_n_a(tmp_path: Path) -> None:
    # run.json with Infinity is refused when loaded (profiler/record/run.py); a record built in memory can still hold one
    from gpuscope.reports.render import render_report

    record, _run, samples = rf.cpu_run(str(tmp_path))
    record.steps[0].throughput_rps = float("inf")  # matplotlib: "Axis limits cannot be NaN or Inf"
    record.steps[1].throughput_rps = float("nan")
    paths = render_report(record, str(tmp_path / "out"), samples)
    html = Path(paths["html"]).read_text()
    assert "nan requests/s" not in html and "inf requests/s" not in html and "n/a" in html
