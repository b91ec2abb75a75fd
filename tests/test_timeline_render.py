"""The report's memory timeline at scale: a streamed samples file gives the timeline a loaded one gives,
single-tick spikes survive downsampling (in the envelope and the kept ticks) and the report says it
downsampled, a reading on a slower cadence is drawn only where it was read, and sample files written
before the compact format still render with the same findings."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gpuscope.analysis.findings import conclude
from gpuscope.probes.samplefile import SampleColumns, SampleWriter, Tick, load_timeline
from gpuscope.record.run import Finding, RunRecord
from gpuscope.reports import plotdata
from gpuscope.reports.render import render_report
from tests import report_fixtures as rf
from tests.test_samplefile_formats import FIXTURE_V1, rewrite_as_v2

MiB = 1024**2


def _same_layers(a: plotdata.TimelineLayers, b: plotdata.TimelineLayers) -> None:
    assert a.keys == b.keys and a.ticks == b.ticks
    assert np.array_equal(a.t_s, b.t_s)
    for key in a.keys:
        assert np.array_equal(a.layers[key], b.layers[key]), key
    assert (a.peak_total, a.peak_t_s, a.capacity_bytes, a.extras) == (b.peak_total, b.peak_t_s, b.capacity_bytes,
                                                                     b.extras)


def test_a_streamed_file_gives_the_timeline_a_loaded_one_gives(tmp_path: Path) -> None:
    record, _run, samples = rf.gpu_run(str(tmp_path))
    _same_layers(plotdata.timeline_layers(record, load_timeline(samples)),
                 plotdata.timeline_layers(record, SampleColumns(samples, chunk_ticks=5)))
    record, _run, samples = rf.cpu_run(str(tmp_path / "cpu"))
    loaded = plotdata.timeline_layers(record, load_timeline(samples))
    streamed = plotdata.timeline_layers(record, SampleColumns(samples, chunk_ticks=3))
    _same_layers(loaded, streamed)
    assert np.array_equal(loaded.uss, streamed.uss) and np.array_equal(loaded.uss_t_s, streamed.uss_t_s)


def _long_run(path: Path, ticks: int, spike_at: int) -> RunRecord:
    """A watch of `ticks` ticks at 1 s, flat but for a 10 GiB spike one tick long, and USS every 10 ticks."""
    writer = SampleWriter(str(path), {"t0_ns": 0, "pid": 7})
    writer.cadence_s[("pid:7", "uss_bytes")] = 10.0
    for i in range(ticks):
        spike = 10 * 1024 * MiB if i == spike_at else 0
        values = [("gpu:0", "used_bytes", 3_000 * MiB + spike), ("gpu:0", "process_count", 1),
                  ("gpu:0", "total_bytes", 80_000 * MiB), ("pid:7/gpu:0", "used_bytes", 2_000 * MiB + spike),
                  ("pid:7/gpu:0", "torch_allocated_bytes", 1_000 * MiB + spike + (i % 7) * MiB),
                  ("pid:7/gpu:0", "torch_reserved_bytes", 1_500 * MiB + spike), ("pid:7", "rss_bytes", 900 * MiB)]
        if i % 10 == 0:
            values.append(("pid:7", "uss_bytes", 800 * MiB + i))
        writer.write(Tick(i * 1_000_000_000, values))
    writer.close()
    record = RunRecord(tool_version="t", started_at="2026-12-03T00:00:00+00:00", status="complete", pid=7,
                       mode="watch", config={"device": "cuda:0", "gpu_index": 0}, model={"model_bytes": 512 * MiB},
                       devices=[{"index": 0, "total_bytes": 80_000 * MiB}])
    record.samples = path.name
    return record


def test_a_single_tick_spike_survives_downsampling_and_the_report_says_it_downsampled(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    record = _long_run(path, 20_000, spike_at=12_345)
    tl = plotdata.timeline_layers(record, SampleColumns(str(path)), max_buckets=500)
    assert tl.downsampled and len(tl.t_s) < tl.ticks == 20_000
    spike_total = 2_000 * MiB + 10 * 1024 * MiB  # the process's NVML figure, which its layers add up to
    assert tl.peak_total == spike_total and tl.peak_t_s == 12_345.0
    env_t, low, high = tl.envelope
    assert high.max() == spike_total and low.min() == 2_000 * MiB  # the band holds the spike and the floor
    assert np.sum(np.vstack([tl.layers[k] for k in tl.keys]), axis=0).max() == spike_total  # a kept tick, too
    paths = render_report(record, str(tmp_path), str(path))
    html = Path(paths["html"]).read_text(encoding="utf-8")
    assert "draws 20,000 ticks as" in html and "single-tick spikes stay visible" in html
    # a short run is drawn tick by tick, and says nothing about downsampling
    short = tmp_path / "short"
    short.mkdir()
    record = _long_run(short / "samples.jsonl", 300, spike_at=100)
    html = Path(render_report(record, str(short), str(short / "samples.jsonl"))["html"]).read_text(encoding="utf-8")
    assert "draws" not in html


def test_uss_on_its_slower_cadence_is_drawn_only_where_it_was_read(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    record = _long_run(path, 95, spike_at=-1)
    record.config["device"], record.devices = "cpu", []
    assert not record.gpu
    tl = plotdata.timeline_layers(record, SampleColumns(str(path)))
    assert tl.uss_t_s.tolist() == [float(i) for i in range(0, 95, 10)]  # the reads, and no tick between them
    assert tl.uss.tolist() == [800 * MiB + i for i in range(0, 95, 10)]
    assert tl.ticks == 95  # RSS, read every tick, still gives every tick its layers


def test_a_file_written_before_the_compact_rows_renders_with_the_same_findings(tmp_path: Path) -> None:
    """The old-format fixture (a real sampler's file) and the same samples rewritten in today's format
    render the same timeline, and the run's findings (a watch's come from its live rules, kept in run.json;
    the report derives none from the samples) are drawn at the same moment in both reports."""
    import json

    header = json.loads(FIXTURE_V1.read_text(encoding="utf-8").splitlines()[0])
    new = tmp_path / "v2.jsonl"
    rewrite_as_v2(FIXTURE_V1, new)
    reports = []
    for name, samples in (("old", FIXTURE_V1), ("new", new)):
        # NVML gives no per-process figure for the fixture's pid: its memory timeline is RSS, with USS on its cadence
        record = RunRecord(tool_version="t", started_at=header["started_at"], status="complete", pid=header["pid"],
                           mode="watch", config={"device": "cpu"}, model={"model_bytes": 0})
        conclude(record)  # the samples add no finding of their own to a re-rendered run
        assert record.findings == []
        record.findings = [Finding("MEMORY_GROWTH", "warn", "memory grows", {"t_s": 2.0}, "look")]
        tl = plotdata.timeline_layers(record, SampleColumns(str(samples)))
        assert tl is not None and tl.keys and tl.ticks == 100 and 0 < len(tl.uss) < 100
        out = tmp_path / name
        html = Path(render_report(record, str(out), str(samples))["html"]).read_text(encoding="utf-8")
        moments = [(t, f.code) for t, f in plotdata.finding_moments(record, plotdata.step_spans(record, None))]
        reports.append((tl, (sorted(f.code for f in record.findings), moments), html))
    (old_tl, old_codes, old_html), (new_tl, new_codes, new_html) = reports
    _same_layers(old_tl, new_tl)
    assert np.array_equal(old_tl.uss, new_tl.uss) and np.array_equal(old_tl.uss_t_s, new_tl.uss_t_s)
    assert old_codes == new_codes and old_codes[0] == ["MEMORY_GROWTH"] and old_codes[1] == [(2.0, "MEMORY_GROWTH")]
    for code in old_codes[0]:
        assert code in old_html and code in new_html

