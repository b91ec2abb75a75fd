"""samples.jsonl: streamed line by line, read back into columns, robust to a torn last line."""
from __future__ import annotations

import errno
import json
import threading

import pytest

from gpuscope.probes.readings import NO_DEVICE, Unavailable
from gpuscope.probes.samplefile import SAMPLES_SCHEMA, Sample, SamplesFileError, SampleWriter, load_timeline

T0 = 1_000_000_000_000


def write_run(path, ticks: list[dict], events: list[dict] = ()) -> SampleWriter:
    writer = SampleWriter(str(path), {"t0_ns": T0, "interval_s": 0.05})
    for tick in ticks:
        writer.write(tick)
    for event in events:
        writer.write(event)
    writer.close()
    return writer


def test_round_trip_of_ticks_events_and_unavailable_readings(samples_path):
    lost = Unavailable(NO_DEVICE, "GPU is lost")
    writer = write_run(samples_path, [
        {"t_ns": T0, "v": {"gpu:0": {"used_bytes": 100}, "host": {"cpu_util_pct": 12.5}}},
        {"t_ns": T0 + 50_000_000, "v": {"gpu:0": {"used_bytes": lost}, "host": {"cpu_util_pct": 30.0}}},
    ], events=[{"t_ns": T0 + 60_000_000, "event": "step_start", "predictors": 2}])
    assert writer.lines_written == 4 and writer.error is None
    timeline = load_timeline(str(samples_path))
    assert timeline.header["schema"] == SAMPLES_SCHEMA and timeline.header["interval_s"] == 0.05
    assert timeline.t_s == [0.0, 0.05]
    assert timeline.column("gpu:0", "used_bytes") == [100, lost]
    assert timeline.column("host", "cpu_util_pct") == [12.5, 30.0]
    assert timeline.events == [{"t_ns": T0 + 60_000_000, "event": "step_start", "predictors": 2, "t_s": 0.06}]
    assert timeline.scopes() == {"gpu:0", "host"}
    assert timeline.torn_lines == 0


def test_columns_line_up_when_metrics_come_and_go(samples_path):
    write_run(samples_path, [
        {"t_ns": T0, "v": {"gpu:0": {"used_bytes": 1}}},
        {"t_ns": T0 + 1, "v": {"gpu:0": {"used_bytes": 2}, "pid:505/gpu:0": {"used_bytes": 7}}},
        {"t_ns": T0 + 2, "v": {"gpu:0": {"used_bytes": 3}}},
    ])
    timeline = load_timeline(str(samples_path))
    assert timeline.column("pid:505/gpu:0", "used_bytes") == [None, 7, None]
    assert timeline.column("gpu:0", "used_bytes") == [1, 2, 3]
    assert timeline.column("gpu:9", "used_bytes") == [None, None, None]
    assert all(len(column) == 3 for column in timeline.series.values())


def test_samples_keep_their_exact_timestamps(samples_path):
    # offsets whose float seconds truncate one ns short (int(1.000000007e9) == 1000000006), up to a day in
    stamps = [T0 + offset for offset in (0, 1, 1_000_000_007, 1_000_000_010, 86_399_999_999_999)]
    write_run(samples_path, [{"t_ns": t, "v": {"host": {"x": i}}} for i, t in enumerate(stamps)])
    samples = list(load_timeline(str(samples_path)).samples())
    assert [s.t_ns for s in samples] == stamps
    assert samples[2] == Sample(stamps[2], "host", "x", 2)


def test_a_torn_last_line_is_skipped(samples_path):
    write_run(samples_path, [{"t_ns": T0 + i, "v": {"gpu:0": {"used_bytes": i}}} for i in range(3)])
    with open(samples_path, "a", encoding="utf-8") as fh:
        fh.write('{"t_ns": 1000000000003, "v": {"gpu:0": {"used_by')  # killed mid-write
    timeline = load_timeline(str(samples_path))
    assert timeline.column("gpu:0", "used_bytes") == [0, 1, 2]
    assert timeline.torn_lines == 1


def test_lines_that_are_json_but_not_ticks_are_counted_not_trusted(samples_path):
    write_run(samples_path, [{"t_ns": T0, "v": {"gpu:0": {"used_bytes": 1}}}])
    with open(samples_path, "a", encoding="utf-8") as fh:
        fh.write('[1, 2]\n{"v": {}}\n{"t_ns": 5, "v": 3}\n\n')
    timeline = load_timeline(str(samples_path))
    assert timeline.torn_lines == 3 and len(timeline.t_s) == 1


def test_a_newer_schema_is_refused_with_a_clear_message(samples_path):
    samples_path.write_text(json.dumps({"schema": "gpuscope.samples/3", "t0_ns": 0}) + "\n")
    with pytest.raises(SamplesFileError) as info:
        load_timeline(str(samples_path))
    message = str(info.value)
    assert "gpuscope.samples/3" in message and "not supported" in message and SAMPLES_SCHEMA in message
    assert "upgrade gpuscope" in message


@pytest.mark.parametrize("content", ["", '{"t_ns": 1, "v": {}}\n', "not json at all\n"])
def test_a_file_without_a_header_is_not_a_samples_file(samples_path, content):
    samples_path.write_text(content)
    with pytest.raises(SamplesFileError, match="not a gpuscope samples file"):
        load_timeline(str(samples_path))


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(SamplesFileError, match="no such samples file"):
        load_timeline(str(tmp_path / "nope.jsonl"))


def test_disk_full_is_recorded_not_raised():
    writer = SampleWriter("/dev/full", {"t0_ns": 0})
    writer.write({"t_ns": 1, "v": {"host": {"x": 1}}})
    assert isinstance(writer.error, OSError) and writer.error.errno == errno.ENOSPC
    assert writer.lines_written == 0
    writer.close()


def test_writes_after_close_are_ignored(samples_path):
    writer = write_run(samples_path, [])
    writer.write({"t_ns": 1, "v": {}})
    writer.close()
    assert writer.lines_written == 1
    assert len(samples_path.read_text().splitlines()) == 1


def test_each_line_is_flushed_as_it_is_written(samples_path):
    writer = SampleWriter(str(samples_path), {"t0_ns": T0})
    writer.write({"t_ns": T0, "v": {"gpu:0": {"used_bytes": 1}}})
    assert load_timeline(str(samples_path)).column("gpu:0", "used_bytes") == [1]  # readable before close
    writer.close()


def test_concurrent_writers_never_interleave_lines(samples_path):
    writer = SampleWriter(str(samples_path), {"t0_ns": 0})

    def hammer(k: int) -> None:
        for i in range(200):
            writer.write({"t_ns": i, "event": "e", "who": k, "pad": "x" * 500})

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    timeline = load_timeline(str(samples_path))
    assert timeline.torn_lines == 0 and len(timeline.events) == 800
