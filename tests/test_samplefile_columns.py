"""probes/samplefile.py's streamed reader (`SampleColumns`) gives the readings `load_timeline` gives, as
numpy columns, chunk by chunk: on files of both schemas, keyframes, readings that stop and come back,
Unavailable and non-finite values, damaged and torn lines, and at any chunk size (what one chunk leaves
current is carried into the next)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpuscope.probes.readings import NO_DEVICE, NOT_SUPPORTED, Unavailable
from gpuscope.probes.samplefile import SampleColumns, SamplesFileError, SampleWriter, Tick, load_timeline

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "samples" / "samples-v1.jsonl"
T0 = 5_000_000_000


def streamed(path: Path, chunk_ticks: int, keep: Any = None) -> tuple[SampleColumns, Any, dict[Any, Any]]:
    """The whole stream glued back together (a column missing from a chunk is NaN there)."""
    reader = SampleColumns(str(path), chunk_ticks)
    chunks = list(reader.chunks(keep))
    keys = list(dict.fromkeys(key for chunk in chunks for key in chunk.columns))
    t_s = np.concatenate([c.t_s for c in chunks]) if chunks else np.zeros(0)
    columns = {key: np.concatenate([c.columns.get(key, np.full(len(c.t_s), np.nan)) for c in chunks])
               for key in keys}
    return reader, t_s, columns


def assert_stream_is_the_timeline(path: Path, chunk_sizes: tuple[int, ...] = (1, 3, 7, 64, 8192)) -> None:
    timeline = load_timeline(str(path))
    expected = next(timeline.chunks(), None)
    for size in chunk_sizes:
        reader, t_s, columns = streamed(path, size)
        assert t_s.tolist() == timeline.t_s
        assert reader.ticks == timeline.ticks and reader.last_t_s == timeline.last_t_s
        assert set(columns) == (set(expected.columns) if expected else set())
        for key, values in columns.items():
            assert np.array_equal(values, expected.columns[key], equal_nan=True), (size, key)
        assert reader.events == timeline.events
        assert reader.torn_lines == timeline.torn_lines
        assert reader.cadence_s == timeline.cadence_s
        assert reader.header == timeline.header


def test_the_file_written_before_the_compact_rows_streams_as_it_loads():
    assert_stream_is_the_timeline(FIXTURE_V1)


def _reading(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.06:
        return Unavailable(rng.choice([NO_DEVICE, NOT_SUPPORTED]))
    if roll < 0.08:
        return rng.choice([math.inf, -math.inf, math.nan, True, 10**400])
    if roll < 0.5:
        return rng.randrange(0, 4) * 1024**2  # mostly repeating: delta rows leave them out
    return rng.random() * 100


def _random_run(path: Path, ticks: int, seed: int) -> None:
    """A file through the real writer: readings that come, stop and come back, change type, repeat; a
    declared cadence; events; a keyframe every 11 ticks."""
    rng = random.Random(seed)
    keys = [(f"pid:{p}/gpu:{g}", m) for p in (1, 2) for g in (0, 1) for m in ("used_bytes", "sm_util_pct")]
    keys += [("gpu:0", "used_bytes"), ("gpu:1", "process_count"), ("host", "cpu_util_pct"), ("pid:1", "uss_bytes")]
    writer = SampleWriter(str(path), {"t0_ns": T0, "pid": 1}, keyframe_every_ticks=11)
    writer.cadence_s[("pid:1", "uss_bytes")] = 10.0
    present = set(keys[:6])
    for i in range(ticks):
        for key in keys:
            if rng.random() < 0.05:
                present ^= {key}
        values = [(scope, metric, _reading(rng)) for scope, metric in keys if (scope, metric) in present]
        if rng.random() < 0.02 and values:
            values.append(values[0][:2] + (_reading(rng),))  # a reading given twice in one tick
        writer.write(Tick(T0 + i * 5_000_000, values))
        if rng.random() < 0.03:
            writer.write({"t_ns": T0 + i * 5_000_000 + 1, "event": "step_start", "predictors": i})
    writer.close()


def _damage(path: Path, seed: int, lines: int) -> None:
    rng = random.Random(seed)
    rows = path.read_text(encoding="utf-8").splitlines()
    for _ in range(lines):
        n = rng.randrange(2, len(rows) - 1)
        rows[n] = rng.choice(["garbage", rows[n][: len(rows[n]) // 2], '{"schema":"gpuscope.samples/2","t0_ns":1}',
                              '{"t_ns":7,"v":[1]}', '{"t_ns":7,"v":[0,1],"k":[[0,"a"]]}', "[1,2]", ""])
    path.write_text("\n".join(rows) + "\n" + rows[-1][:7], encoding="utf-8")  # and a torn last line


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_random_run_streams_as_it_loads(tmp_path, seed):
    path = tmp_path / "samples.jsonl"
    _random_run(path, 400, seed)
    assert_stream_is_the_timeline(path)


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_a_damaged_run_streams_as_it_loads(tmp_path, seed):
    path = tmp_path / "samples.jsonl"
    _random_run(path, 300, seed)
    _damage(path, seed, 12)
    assert load_timeline(str(path)).torn_lines >= 10
    assert_stream_is_the_timeline(path)


def test_rows_of_both_schemas_in_one_file_stream_as_they_load(tmp_path):
    path = tmp_path / "samples.jsonl"
    writer = SampleWriter(str(path), {"t0_ns": T0})
    writer.write(Tick(T0, [("gpu:0", "used_bytes", 5), ("host", "n", 1)]))
    writer.close()
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"t_ns": T0 + 1, "v": {"gpu:0": {"used_bytes": 6}, "pid:3": {"rss_bytes": 9}}}) + "\n")
        fh.write(json.dumps({"t_ns": T0 + 2, "v": [1, 2]}) + "\n")  # index 1 (host n) still declared
    assert_stream_is_the_timeline(path)


def test_keep_chooses_the_columns_and_changes_no_value(tmp_path):
    path = tmp_path / "samples.jsonl"
    _random_run(path, 200, 9)
    _reader, _t, everything = streamed(path, 16)
    _reader, _t, some = streamed(path, 16, keep=lambda scope, metric: metric == "used_bytes")
    assert set(some) == {key for key in everything if key[1] == "used_bytes"}
    for key, values in some.items():
        assert np.array_equal(values, everything[key], equal_nan=True)


def test_a_foreign_or_newer_file_is_refused_as_load_timeline_refuses_it(tmp_path):
    for text in ('{"t_ns": 1}\n', '{"schema": "gpuscope.samples/9"}\n', ""):
        path = tmp_path / "x.jsonl"
        path.write_text(text)
        with pytest.raises(SamplesFileError):
            SampleColumns(str(path))
    with pytest.raises(SamplesFileError):
        SampleColumns(str(tmp_path / "missing.jsonl"))
