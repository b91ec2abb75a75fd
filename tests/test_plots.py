"""reports.plots: data preparation (layers per step and per tick, downsampling) and the PNGs themselves."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpuscope.probes.readings import NO_PERMISSION, Unavailable
from gpuscope.probes.samplefile import load_timeline
from gpuscope.probes.units import GiB
from gpuscope.record.layers import CPU_LAYERS, GPU_LAYERS
from gpuscope.record.run import Finding, load_run
from gpuscope.reports import plotdata, plots
from tests import report_fixtures as rf

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parent.parent


def _png_ok(png: bytes) -> None:
    assert png.startswith(PNG_MAGIC)
    assert len(png) > 5_000


def test_every_layer_has_one_distinct_colour() -> None:
    keys = [k for k, _ in GPU_LAYERS + CPU_LAYERS]
    assert set(keys) <= set(plots.LAYER_COLORS)
    colours = [plots.LAYER_COLORS[k] for k in dict.fromkeys(keys)]
    assert len(set(colours)) == len(colours)


def test_downsample_keeps_short_series_whole() -> None:
    t = np.arange(100.0)
    assert list(plotdata.downsample_minmax(t, t * 2)) == list(range(100))


def test_downsample_keeps_every_peak_of_a_long_series() -> None:
    n = 86_400
    rng = np.random.default_rng(0)
    a = rng.integers(0, 100, n).astype(float)
    b = rng.integers(0, 100, n).astype(float)
    a[12_345] = 10_000.0  # a one-tick spike in one layer only
    b[70_001] = -5.0       # the total's deepest trough
    total = a + b
    keep = plotdata.downsample_minmax(np.arange(n, dtype=float), total, {"a": a, "b": b}, max_buckets=1000)
    assert len(keep) < 5_000
    assert keep[0] == 0 and keep[-1] == n - 1
    assert total[keep].max() == total.max() and total[keep].min() == total.min()
    assert a[keep].max() == a.max() and b[keep].max() == b.max()
    assert np.all(np.diff(keep) > 0)  # time order, no duplicates


def test_gpu_timeline_layers_add_up_to_what_nvml_reported(tmp_path: Path) -> None:
    record, _run, samples = rf.gpu_run(str(tmp_path))
    timeline = load_timeline(samples)
    tl = plotdata.timeline_layers(record, timeline)
    assert tl is not None and tl.ticks == len(timeline.t_s)
    assert set(tl.keys) <= {k for k, _ in GPU_LAYERS}
    used = dict(zip(timeline.t_s, timeline.column(f"pid:{record.pid}/gpu:0", "used_bytes")))
    own = sum(tl.layers[k] for k in tl.keys if k in plotdata.PROCESS_KEYS)
    for t, value in zip(tl.t_s, own):
        assert value == used[t]
    # the other processes' layer is what NVML listed for the others at each tick (a neighbour came mid-run)
    others = [p["pid"] for p in record.processes if not p["self"]]
    listed = [dict(zip(timeline.t_s, timeline.column(f"pid:{pid}/gpu:0", "used_bytes"))) for pid in others]
    expected_others = [sum(col.get(t) or 0 for col in listed) for t in tl.t_s]
    assert tl.layers["other_processes_bytes"].tolist() == expected_others
    assert 0 in expected_others and max(expected_others) > 0
    reserve = {v for v in timeline.column("gpu:0", "driver_reserved_bytes") if v is not None}
    assert len(reserve) == 1 and np.all(tl.layers["driver_reserved_bytes"] == reserve.pop())
    assert tl.capacity_bytes == record.devices[0]["total_bytes"]
    # the layers add up to NVML's device `used` but for what no process row accounts for: on the H200 a few
    # MiB (8.8 MiB idle, 14 MiB with the neighbour), which no layer draws
    device_used = dict(zip(timeline.t_s, timeline.column("gpu:0", "used_bytes")))
    total = sum(tl.layers[k] for k in tl.keys)
    unlisted = [device_used[t] - drawn for t, drawn in zip(tl.t_s, total)]
    assert min(unlisted) >= 0 and max(unlisted) <= 16 * 2**20, (min(unlisted), max(unlisted))
    assert tl.peak_total == max(total)


def test_cpu_timeline_uses_only_ticks_with_rss(tmp_path: Path) -> None:
    record, _run, samples = rf.cpu_run(str(tmp_path))
    timeline = load_timeline(samples)
    tl = plotdata.timeline_layers(record, timeline)
    rss_ticks = sum(1 for v in timeline.column(f"pid:{record.pid}", "rss_bytes") if v is not None)
    assert tl.ticks == rss_ticks <= len(timeline.t_s)
    assert tl.keys == ["model_weights_bytes", "rest_of_process_bytes"]
    # USS on its slower cadence: drawn where it was read, never between
    uss_reads = sum(1 for v in timeline.column(f"pid:{record.pid}", "uss_bytes") if v is not None)
    assert tl.uss is not None and np.all(tl.uss > 0) and len(tl.uss) == uss_reads < tl.ticks


def test_step_spans_fall_back_to_events(tmp_path: Path) -> None:
    record, _run, samples = rf.gpu_run(str(tmp_path))
    expected = [(s.started_s, s.ended_s, s.predictors) for s in record.steps]
    for step in record.steps:
        step.started_s = step.ended_s = 0.0
    spans = plotdata.step_spans(record, load_timeline(samples))
    assert [n for _a, _b, n in spans] == [n for _a, _b, n in expected]
    for (a, b, _), (ea, eb, _) in zip(spans, expected):
        assert a == pytest.approx(ea, abs=1e-6) and b == pytest.approx(eb, abs=1e-6)


@pytest.mark.parametrize("name", ["gpu", "cpu"])
def test_step_layers_recomputed_when_the_step_has_none(name: str) -> None:
    """A step without its layers (an older run.json) gets the ones the run's own attribution stored."""
    record = rf.saved_run(name)
    for step in record.steps:
        stored = dict(step.memory.pop("layers"))
        again = plotdata.step_layers(record, step)
        # the same layers, this process's adding up to its peak; the stored ones are taken at the tick the
        # process peaked and the recomputed ones from the step's peaks, so inside the allocator the split, and
        # the other processes (a neighbour arriving after that tick), may differ
        assert stored and again.keys() == stored.keys()
        own = [k for k in stored if k in plotdata.PROCESS_KEYS]
        assert sum(again[k] for k in own) == sum(stored[k] for k in own)
        same = ("model_weights_bytes", "outside_allocator_bytes", "rest_of_process_bytes")
        assert {k: again[k] for k in stored if k in same} == {k: stored[k] for k in stored if k in same}


def test_unavailable_in_json_shapes_is_recognised() -> None:
    assert plotdata.as_unavailable({"unavailable": "no_permission"}) == Unavailable(NO_PERMISSION)
    assert plotdata.as_unavailable({"reason": "no_permission", "detail": "x"}) == Unavailable(NO_PERMISSION, "x")
    assert plotdata.as_unavailable({"reason": "bogus"}) is None
    assert plotdata.as_unavailable(5) is None


def test_gpu_plots_render_with_conclusions_as_titles(tmp_path: Path) -> None:
    record, _run, samples = rf.gpu_run(str(tmp_path))
    rendered = plots.render_plots(load_run(_run), load_timeline(samples))
    assert [p.name for p in rendered] == ["memory_breakdown.png", "memory_timeline.png", "throughput_latency.png"]
    for p in rendered:
        _png_ok(p.png)
    breakdown, timeline, throughput = (p.title for p in rendered)
    peak = max(record.steps, key=lambda s: s.memory["process_gpu_bytes"]).predictors
    assert breakdown.startswith("Peak device memory") and f"at {peak} predictors" in breakdown
    assert "each extra predictor adds" in breakdown
    assert "peaked at" in timeline
    assert throughput.startswith(f"Run {record.recommendation['predictors']} predictors")


def test_plots_render_without_steps_samples_or_readings(tmp_path: Path) -> None:
    record, _run, _samples = rf.unavailable_run(str(tmp_path / "u"))
    rendered = plots.render_plots(load_run(_run), None, note="no samples file was found")
    for p in rendered:
        _png_ok(p.png)
    assert "no memory figure could be read" in rendered[0].title
    assert "no samples" in rendered[1].title
    assert "no request completed" in rendered[2].title

    record, _run, samples = rf.interrupted_run(str(tmp_path / "i"))
    rendered = plots.render_plots(load_run(_run), load_timeline(samples))
    for p in rendered:
        _png_ok(p.png)
    assert "into the run" in rendered[0].title  # the peak from the samples stands in for the steps
    assert "no step" in rendered[2].title


def test_outside_text_cannot_trigger_mathtext(tmp_path: Path) -> None:
    record, _run, samples = rf.gpu_run(str(tmp_path))
    record.findings.append(Finding("WEIRD_$x^2$_$", "warn", "t", {}, "", at_predictors=2))
    _png_ok(plots.memory_timeline_png(record, plotdata.timeline_layers(record, load_timeline(samples))).png)
    assert plots._safe("$a$") == r"\$a\$"


def test_rendering_leaves_matplotlib_global_state_alone(tmp_path: Path) -> None:
    code = (
        "import sys, matplotlib\n"
        "snap = lambda: {k: matplotlib.rcParams[k] for k in matplotlib.rcParams if k != 'backend'}\n"
        "before = snap()\n"
        "from tests import report_fixtures as rf\n"
        "from reports.plots import render_plots\n"
        "record, run, samples = rf.cpu_run(sys.argv[1])\n"
        "render_plots(record, None)\n"
        "after = snap()\n"
        "changed = [k for k in before if before[k] != after[k]]\n"
        "assert not changed, changed\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_importing_the_report_modules_does_not_import_matplotlib() -> None:
    code = ("import sys\nimport reports, reports.render, reports.html, reports.plots\n"
            "assert 'matplotlib' not in sys.modules and 'numpy' not in sys.modules, "
            "[m for m in ('matplotlib', 'numpy') if m in sys.modules]\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- plots follow the run's mode; odd numbers


def test_a_watch_gets_its_memory_over_time_and_no_throughput_plot(tmp_path: Path) -> None:
    record, _run, samples = rf.long_watch_run(str(tmp_path), hours=0.05)
    rendered = plots.render_plots(load_run(_run), load_timeline(samples))
    assert [p.name for p in rendered] == ["memory_timeline.png", "memory_breakdown.png"]
    record = load_run(_run)
    record.mode = "profile"
    assert [p.name for p in plots.render_plots(record, None)] == ["memory_timeline.png"]  # no samples: no bars


def test_a_compare_gets_compare_png_and_no_empty_sweep_plots(tmp_path: Path) -> None:
    record, _run, _samples = rf.cpu_run(str(tmp_path))
    record.mode, record.steps = "compare", []
    record.extra = {"comparison": {"verdict": "threads win", "rows": [
        {"mode": m, "predictors": n, "throughput_rps": 10.0 * n, "host_uss_bytes": 100 * 2**20 * n}
        for m in ("threads", "processes") for n in (1, 2)]}}
    rendered = plots.render_plots(record, None)
    assert [p.name for p in rendered] == ["compare.png"] and rendered[0].title == "threads win"
    _png_ok(rendered[0].png)
    record.extra = {"comparison": {"rows": []}}
    assert plots.render_plots(record, None) == []


def test_non_finite_numbers_are_never_plotted(tmp_path: Path) -> None:
    record, _run, samples = rf.cpu_run(str(tmp_path))
    record = load_run(_run)
    record.steps[0].throughput_rps = float("inf")
    record.steps[1].throughput_rps = float("nan")
    record.steps[1].latency_ms["p99"] = float("inf")
    record.steps[-1].memory["rss_bytes"] = float("inf")
    record.steps[-1].memory.pop("layers", None)
    rendered = plots.render_plots(record, load_timeline(samples))
    for p in rendered:
        _png_ok(p.png)
    throughput = rendered[2].title
    assert "inf" not in throughput.lower() and "nan" not in throughput.lower()
    assert plotdata.step_layers(record, record.steps[-1]) == {}
    assert not plotdata.finite(float("inf")) and not plotdata.finite(float("nan")) and not plotdata.finite(10**400)
    assert plotdata.finite(3) and not plotdata.finite(True) and not plotdata.finite(None)


def test_titles_say_one_predictor_and_short_runs_keep_a_decimal(tmp_path: Path) -> None:
    from gpuscope.analysis.findings import conclude

    _record, _run, samples = rf.gpu_run(str(tmp_path))
    record = load_run(_run)
    record.steps = [s for s in record.steps if s.predictors == 1]  # a sweep of 1 predictor, concluded as such
    conclude(record)
    assert record.recommendation["predictors"] == 1
    rendered = plots.render_plots(record, load_timeline(samples))
    assert "1 predictors" not in " ".join(p.title for p in rendered)
    assert rendered[2].title.startswith("Run 1 predictor:")
    assert "at 1 predictor " in rendered[0].title
    lines = Path(samples).read_text().splitlines(True)
    ticks = [i for i, line in enumerate(lines) if '"event"' not in line][1:]
    Path(samples).write_text("".join(lines[:ticks[8] + 1]))  # the header and 9 ticks, 50 ms apart
    timeline = load_timeline(samples)
    title = plots.memory_timeline_png(record, plotdata.timeline_layers(record, timeline), timeline).title
    assert title.startswith("Over 0.4 s,"), title  # not "Over 0 s"


def test_a_samples_file_that_stops_after_one_tick_renders_quietly(tmp_path: Path) -> None:
    import warnings

    record, _run, samples = rf.gpu_run(str(tmp_path))
    lines = Path(samples).read_text().splitlines(True)
    Path(samples).write_text("".join(lines[:2]))  # the header and one tick, steps far beyond it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no constrained_layout UserWarning, no crash drawing far-off labels
        rendered = plots.render_plots(load_run(_run), load_timeline(samples))
    for p in rendered:
        _png_ok(p.png)


def test_a_gpu_lost_mid_run_shows_where_its_memory_readings_stop(tmp_path: Path) -> None:
    """The samples go on after NVML stops answering: the timeline's axis runs to the end of the samples
    and marks where the readings stop, instead of ending at the last reading as if the run ended there."""
    from gpuscope.analysis.findings import conclude
    from gpuscope.probes.samplefile import SampleWriter
    from tests import scenarios as S

    path = tmp_path / "samples.jsonl"
    writer = SampleWriter(str(path), {"started_at": "2026-11-26T06:00:00+00:00", "t0_ns": 0, "interval_s": 0.05,
                                      "pid": S.SELF_PID})
    record, _session = S.nvml_lost_run(lost_at=6, ticks=10, writer=writer)
    writer.close()
    conclude(record)
    timeline = load_timeline(str(path))
    tl = plotdata.timeline_layers(record, timeline)
    assert tl.extras["readings_stop_t_s"] == pytest.approx(0.30)  # tick 6 of 50 ms
    assert tl.extras["samples_end_t_s"] == pytest.approx(0.45)
    _png_ok(plots.memory_timeline_png(record, tl, timeline).png)
    # a run whose readings last to its end has no such mark
    _record, _run, samples = rf.gpu_run(str(tmp_path / "whole"))
    assert "readings_stop_t_s" not in plotdata.timeline_layers(load_run(_run), load_timeline(samples)).extras


def test_the_breakdown_title_leaves_out_a_step_that_ran_out_of_memory() -> None:
    """The slope is the run's own (the Sharing row's: the OOM step excluded), and the weights' share is
    given where the user would run: the recommended count, not the bar that ran out of memory."""
    from gpuscope.analysis.findings import conclude
    from tests import scenarios as S

    record = S.oom_run()
    conclude(record)
    assert record.recommendation["predictors"] == 2
    title = plots.memory_breakdown_png(record, None).title
    assert "each extra predictor adds 2.00 GiB" in title, title
    weights = 30 * GiB / (record.step_at(2).memory["process_gpu_bytes"])
    assert f"model weights are {weights:.0%} of this process at 2 predictors" in title, title


@pytest.mark.parametrize("sharing, copy_model, label", [
    ({"verified": True}, False, "predictors (threads sharing one model)"),
    ({"verified": False}, False, "predictors (threads not sharing one model)"),
    ({"verified": False}, True, "predictors (threads, each with its own copy of the model)"),
    ({}, False, "predictors (threads)"),
])
def test_the_predictor_axis_claims_sharing_only_where_the_run_showed_it(tmp_path: Path, sharing, copy_model,
                                                                        label) -> None:
    record = load_run(rf.gpu_run(str(tmp_path))[1])
    record.sharing, record.config["copy_model"] = sharing, copy_model
    assert plotdata.predictors_axis_label(record) == label
    assert plotdata.predictors_axis_label(record, starred=True) == label + "; \u2605 recommended"


def _savefig_png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=plots.DPI, metadata={"Software": "gpuscope"})
    return buf.getvalue()


def test_plots_are_the_pixels_savefig_gives_with_automatic_title_placement(tmp_path: Path) -> None:
    """plots._png draws once where savefig draws twice, and _RC fixes titles at the top of their axes where
    matplotlib would measure where to put them: neither may change a pixel (nor a byte) of any plot."""
    import matplotlib

    record, _run, samples = rf.gpu_run(str(tmp_path))
    record = load_run(_run)
    tl = plotdata.timeline_layers(record, load_timeline(samples))
    bodies = {
        "breakdown": lambda fig: plots._draw_breakdown(fig, record, tl),
        "timeline": lambda fig: plots._draw_timeline(fig, record, tl, None),
        "throughput": lambda fig: plots._draw_throughput(fig, record, record.steps),
        "placeholder": lambda fig: plots._placeholder(fig, "Memory over time: no samples to plot", "None here."),
    }
    automatic = {**plots._RC, "axes.titley": None}
    for name, draw in bodies.items():
        with matplotlib.rc_context(plots._RC):
            fig = plots._new_figure()
            draw(fig)
            ours = plots._png(fig)
        with matplotlib.rc_context(automatic):
            fig = plots._new_figure()
            draw(fig)
            theirs = _savefig_png(fig)
        assert ours == theirs, name
