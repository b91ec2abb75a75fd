"""Render a finished (or interrupted) run into its folder: report.html and its PNG plots.

Which plots depends on the run's mode (gpuscope.reports.plots.render_plots): a diagnose sweep
writes memory_breakdown.png, memory_timeline.png and throughput_latency.png; a watch or
in-process profile memory_timeline.png and memory_breakdown.png; a compare compare.png.

Entry points for profiler/commands/app.py and gpuscope.profile():
  render_report(record, out_dir, samples_path=None) -> {"html": ..., "memory_breakdown": ..., ...}
  report_command(run_json_path, out_dir) -> exit code (0 ok, 2 unreadable run or samples file)
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from gpuscope.probes.samplefile import SampleColumns, SamplesFileError
from gpuscope.record.files import REPORT_FILES, write_bytes_atomic
from gpuscope.record.run import RunFileError, load_run

if TYPE_CHECKING:  # pragma: no cover
    from gpuscope.probes.samplefile import Timeline
    from gpuscope.record.run import RunRecord

def _write_atomic(path: str, data: bytes) -> None:
    write_bytes_atomic(path, data)


def _is_blank(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return not fh.read(4096).strip()
    except OSError:
        return False


def read_samples(samples_path: str | None) -> tuple["SampleColumns | None", list[str]]:
    """The run's samples, opened to be streamed (the header read and checked, the rows not yet), and
    notes for the report. Missing or empty files are notes, not errors.

    Raises SamplesFileError for a file that exists but is foreign or from a newer schema. Streamed, not
    loaded: a day at 5 ms is 17 million rows, which the report never needs as Python objects.
    """
    if not samples_path:
        return None, ["No samples file was recorded for this run: the memory timeline is empty."]
    if not os.path.exists(samples_path):
        return None, [f"Samples file {os.path.basename(samples_path)} is missing: the memory timeline is empty."]
    if _is_blank(samples_path):
        return None, [f"Samples file {os.path.basename(samples_path)} is empty (the run stopped before its "
                      "first tick): the memory timeline is empty."]
    return SampleColumns(samples_path), []


def _torn_note(timeline: "Timeline | SampleColumns") -> list[str]:
    """What the report says about unreadable lines, once the samples have been read."""
    if not timeline.torn_lines:
        return []
    many = timeline.torn_lines != 1
    return [f"{timeline.torn_lines} unreadable line{'s' if many else ''} in the samples file "
            f"{'were' if many else 'was'} skipped (a run killed mid-write leaves a torn last line)."]


def render_run(record: "RunRecord", out_dir: str) -> dict[str, str]:
    """The renderer every recording finishes with: the report of a run from its record and samples.jsonl."""
    return render_report(record, out_dir, os.path.join(out_dir, record.samples))


def render_report(record: "RunRecord", out_dir: str, samples_path: str | None = None) -> dict[str, str]:
    """Write report.html and the run's PNGs into out_dir; return {kind: path}.

    kinds: html, and per mode (see the module docstring) memory_breakdown, memory_timeline,
    throughput_latency (diagnose), compare (compare). Tolerant
    of a missing, empty, torn or unreadable samples file (the report and the
    timeline plot then say why it is empty), of zero steps, and of Unavailable
    readings.
    """
    try:
        timeline, notes = read_samples(samples_path)
    except (SamplesFileError, OSError, ValueError) as exc:
        timeline, notes = None, [f"Samples file unreadable ({exc}): the memory timeline is empty."]
    return render_timeline_report(record, out_dir, timeline, notes)


def render_timeline_report(record: "RunRecord", out_dir: str, timeline: "Timeline | SampleColumns | None",
                           notes: list[str] | None = None) -> dict[str, str]:
    """render_report for a caller that already holds the timeline (loaded, or opened by read_samples)
    and the notes about it. The plots read a stream first; the notes on torn lines and downsampling
    follow from that reading."""
    from gpuscope.reports.html import render_html
    from gpuscope.reports.plots import render_plots

    os.makedirs(out_dir, exist_ok=True)
    notes = list(notes or [])
    timeline_note = next((n for n in notes if timeline is None and "samples file" in n.lower()), "")
    try:
        plots = render_plots(record, timeline, note=timeline_note.rstrip("."))
    finally:
        if isinstance(timeline, SampleColumns):
            timeline.close()
    if timeline is not None:
        notes += _torn_note(timeline)
    notes += [note for plot in plots for note in plot.notes]
    if record.tuning:  # a tune run: tuning.png (drawn in its own module, from the tuning block alone)
        from gpuscope.reports.tuning_plot import tuning_png

        tuned = tuning_png(record)
        plots += [tuned] if tuned is not None else []
    paths: dict[str, str] = {}
    for plot in plots:
        path = os.path.join(out_dir, plot.name)
        _write_atomic(path, plot.png)
        paths[plot.name.rsplit(".", 1)[0]] = path
    html_path = os.path.join(out_dir, REPORT_FILES["html"])
    _write_atomic(html_path, render_html(record, plots, notes=notes).encode("utf-8"))
    return {"html": html_path, **paths}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def shape_problem(record: "RunRecord") -> str:
    """Why a loaded record cannot be rendered (wrong types where the report needs dicts/lists), or ''."""
    for name in ("host", "config", "model", "environment", "sharing", "recommendation", "sampler"):
        if not isinstance(getattr(record, name), dict):
            return f'"{name}" must be an object'
    for name in ("devices", "processes", "steps", "findings"):
        if not isinstance(getattr(record, name), list):
            return f'"{name}" must be a list'
    if record.check is not None and not isinstance(record.check, dict):
        return '"check" must be an object'
    for i, step in enumerate(record.steps):
        if not isinstance(step.predictors, int) or isinstance(step.predictors, bool):
            return f"steps[{i}].predictors must be an integer"
        for field in ("memory", "latency_ms"):
            if not isinstance(getattr(step, field), dict):
                return f"steps[{i}].{field} must be an object"
        for field in ("requests", "errors"):
            if not isinstance(getattr(step, field), int):
                return f"steps[{i}].{field} must be an integer"
    for i, finding in enumerate(record.findings):
        if not isinstance(finding.evidence, dict):
            return f"findings[{i}].evidence must be an object"
    return ""


def samples_path_for(record: "RunRecord", run_json_path: str) -> str | None:
    """The run's samples file, resolved relative to the folder holding run.json."""
    name = record.samples
    if not name or not isinstance(name, str):
        return None
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(run_json_path)), name)


def report_command(run_json_path: str, out_dir: str | None = None) -> int:
    """`gpuscope report RUN_JSON [--out DIR]`: re-render a saved run without rerunning anything.

    Prints the path of report.html and returns 0; on a corrupt or foreign
    run.json or samples file prints one line to stderr and returns 2.
    """
    try:
        try:
            record = load_run(run_json_path)
        except (AttributeError, TypeError, KeyError, ValueError) as exc:
            if isinstance(exc, RunFileError):
                raise
            raise RunFileError(f"{run_json_path}: malformed run record ({type(exc).__name__}: {exc})") from exc
        problem = shape_problem(record)
        if problem:
            raise RunFileError(f"{run_json_path}: malformed run record ({problem})")
        samples_path = samples_path_for(record, run_json_path)
        timeline, notes = read_samples(samples_path)
    except (RunFileError, SamplesFileError) as exc:
        print(f"gpuscope report: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gpuscope report: cannot read {run_json_path}: {_one_line(exc.strerror or exc)}", file=sys.stderr)
        return 2
    target = out_dir or os.path.dirname(os.path.abspath(run_json_path))
    try:
        paths = render_timeline_report(record, target, timeline, notes)
    except OSError as exc:
        print(f"gpuscope report: cannot write the report into {target}: {_one_line(exc.strerror or exc)}",
              file=sys.stderr)
        return 2
    print(paths["html"])
    return 0
