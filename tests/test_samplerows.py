"""probes/samplerows.py reads the plain rows of a samples file as text, many at once: it must take the
rows the writer makes (or the report is slow again), and read exactly what JSON reads, refusing what JSON
refuses: checked against `load_timeline` (the line-by-line reference) on the writer's rows, on lines one
character away from a plain row, on every cut of a torn last row, and with both decoders of the numbers
(json, and orjson where installed)."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from gpuscope.probes.samplefile import SampleColumns, SampleWriter, Tick, load_timeline
from gpuscope.probes.samplerows import plain_rows

try:
    import orjson
except ImportError:  # pragma: no cover - the project depends on it; the json path is tested either way
    orjson = None

DECODERS = [pytest.param(json.loads, id="json")] + (
    [pytest.param(orjson.loads, id="orjson")] if orjson is not None else [])
T0 = 7_000_000_000
HEADER = '{"schema":"gpuscope.samples/2","t0_ns":7000000000}\n'
KEYFRAME = ('{"t_ns":7000000000,"f":1,"k":[[0,"gpu:0","used_bytes"],[1,"pid:1/gpu:0","used_bytes"],'
            '[2,"host","cpu_util_pct"]],"v":[0,1000,1,500,2,12.5]}\n')


def assert_streams_as_it_loads(path: Path, loads: Callable[[Any], Any],
                               chunk_sizes: tuple[int, ...] = (1, 2, 5, 64, 8192)) -> None:
    """SampleColumns, at each chunk size, gives what load_timeline gives (NaN where it holds no number);
    a file load_timeline cannot read (an int of more digits than Python converts) it cannot read either."""
    try:
        timeline = load_timeline(str(path))
    except ValueError as exc:
        for size in chunk_sizes:
            with pytest.raises(type(exc)):
                list(SampleColumns(str(path), size, loads=loads).chunks())
        return
    expected = next(timeline.chunks(), None)
    for size in chunk_sizes:
        reader = SampleColumns(str(path), size, loads=loads)
        chunks = list(reader.chunks())
        t_s = np.concatenate([c.t_s for c in chunks]) if chunks else np.zeros(0)
        assert t_s.tolist() == timeline.t_s, size
        keys = {key for c in chunks for key in c.columns}
        assert keys == (set(expected.columns) if expected else set()), size
        for key in keys:
            column = np.concatenate([c.columns.get(key, np.full(len(c.t_s), np.nan)) for c in chunks])
            assert np.array_equal(column, expected.columns[key], equal_nan=True), (size, key)
        assert (reader.torn_lines, reader.events, reader.cadence_s) == \
            (timeline.torn_lines, timeline.events, timeline.cadence_s), size


def _writer_file(path: Path, ticks: int, seed: int) -> None:
    """Rows as the writer makes them: changes only, readings that stop ("x") and come back, ticks where
    nothing changed (an empty "v"), ints and floats, big and negative numbers."""
    rng = random.Random(seed)
    writer = SampleWriter(str(path), {"t0_ns": T0})
    keys = [("gpu:0", "used_bytes"), ("pid:1/gpu:0", "used_bytes"), ("host", "cpu_util_pct"), ("pid:1", "uss_bytes")]
    values = {key: 0 for key in keys}
    for i in range(ticks):
        for key in keys:
            if rng.random() < 0.3:
                values[key] = rng.choice([rng.randrange(10**12), -rng.randrange(100), rng.random() * 1e-3,
                                          rng.random() * 10**rng.randrange(-300, 300), 2**70, 0])
        present = [key for key in keys if key != ("pid:1", "uss_bytes") or i % 7 == 0]
        writer.write(Tick(T0 + i * 5_000_000, [(s, m, values[(s, m)]) for s, m in present]))
    writer.close()


@pytest.mark.parametrize("loads", DECODERS)
def test_the_writers_rows_are_read_as_text_and_give_what_json_gives(tmp_path, loads):
    path = tmp_path / "samples.jsonl"
    _writer_file(path, 700, seed=1)
    lines = path.read_bytes().splitlines(keepends=True)[1:]
    rows = plain_rows(lines, {}, np, loads)
    assert rows is not None
    taken = rows.plain.tolist()
    # everything but the keyframes (and a row that declares a key for the first time) is read as text
    assert [i for i, take in enumerate(taken) if not take] == \
        [i for i, line in enumerate(lines) if b'"k":' in line]
    assert any(b'"x":[' in line for line, take in zip(lines, taken) if take)
    assert any(b'"v":[]' in line for line, take in zip(lines, taken) if take)
    assert_streams_as_it_loads(path, loads)


# Lines one edit away from a plain row, and rows JSON reads that are no plain row: each must be read as
# load_timeline reads it (torn, skipped, or a row), never as the plain row it resembles.
NEAR_MISSES = [
    '{"t_ns":7000000005,"v":[0,1001]}',  # a plain row, for reference
    '5{"t_ns":7000000005,"v":[0,1001]}', '{"t_ns":7000000005,"v":[0,1001]}5', '{"t_ns":70000000 05,"v":[0,1001]}',
    '{"t_n5s":,"v":[0,1001]}', '{"t_ns"5:,"v":[0,1001]}', '{5"t_ns":,"v":[0,1001]}', '{"t_ns":,"v":[0,1001]}',
    '{"t_ns":7000000005,"v1":[0,1001]}', '{"t_ns":7000000005,"v"1:[0,1001]}', '{"t_ns":7000000005,"v":1[0,1001]}',
    '{"t_ns":7000000005,"v":[0,1001]1}', '{"t_ns":7000000005,"v":[0,,1001]}', '{"t_ns":7000000005,"v":[,0,1001]}',
    '{"t_ns":7000000005,"v":[0,1001,]}', '{"t_ns":7000000005,"v":[0]}', '{"t_ns":7000000005,"v":[0,1001,2]}',
    '{"t_ns":7000000005,"v":[0,01]}', '{"t_ns":7000000005,"v":[0,1.]}', '{"t_ns":7000000005,"v":[0,.5]}',
    '{"t_ns":7000000005,"v":[0,+5]}', '{"t_ns":7000000005,"v":[0,1-2]}', '{"t_ns":7000000005,"v":[0,1e]}',
    '{"t_ns":7000000005,"v":[0,--1]}', '{"t_ns":7000000005,"v":[0,1e5e5]}', '{"t_ns":7000000005,"v":[0,1.5.5]}',
    '{"t_ns":7000000005,"v":[0,-]}', '{"t_ns":7000000005,"v":[0,NaN]}', '{"t_ns":7000000005,"v":[0,Infinity]}',
    '{"t_ns":7000000005,"v":[0,1e999]}', '{"t_ns":7000000005,"v":[0,-1e999]}', '{"t_ns":7000000005,"v":[0,1E+2]}',
    '{"t_ns":7000000005,"v":[0,' + "9" * 400 + ']}', '{"t_ns":7000000005,"v":[0,' + "9" * 5000 + ']}',
    '{"t_ns":7000000005,"v":[0,18446744073709551616]}', '{"t_ns":7000000005,"v":[0,-0.0]}',
    '{"t_ns":7000000005,"v":[1.0,7,2e0,8,0.5,9,-1,3,99,4,1e20,5]}', '{"t_ns":7000000005,"v":[0,true]}',
    '{"t_ns":7000000005,"v":[0,null]}', '{"t_ns":7000000005,"v":[0,"1"]}', '{"t_ns":7000000005,"v":[0,[1]]}',
    '{"t_ns":7000000005, "v":[0,1001]}', '{"t_ns":7000000005,"v":[0,1001]} ', '{"t_ns":7000000005,"v":[0,\t1]}',
    '{"t_ns":7000000005.0,"v":[0,1001]}', '{"t_ns":7e9,"v":[0,1001]}', '{"t_ns":-7000000005,"v":[0,1001]}',
    '{"t_ns":18446744073709551616,"v":[0,1001]}', '{"t_ns":99999999999999999999999,"v":[0,1001]}',
    '{"t_ns":7000000005,"v":[]}', '{"t_ns":7000000005,"v":[ ]}', '{"t_ns":7000000005,"x":[],"v":[]}',
    '{"t_ns":7000000005,"x":[0],"v":[]}', '{"t_ns":7000000005,"x":[0],"v":[0,5]}', '{"t_ns":7000000005,"x":[0,2]]}',
    '{"t_ns":7000000005,"x":[0]5,"v":[1,5]}', '{"t_ns":7000000005,"x":[1]5,"v":[1,5]}',
    '{"t_ns":7000000005,"x"2:[1],"v":[1,5]}', '{"t_ns":7000000005,"x":[1],"v"3:[1,5]}',
    '{"t_ns":7000000005,"x":[1],3"v":[1,5]}', '{"t_ns":7000000005,3"x":[1],"v":[1,5]}',
    '{"t_ns":7000000005,"x":3[1],"v":[1,5]}', '{"t_ns":7000000005,"x":[1],"v":[1,5]}', '{"t_ns":7000000005,"x":[0,],"v":[1,5]}', '{"t_ns":7000000005,"x":[1.0],"v":[]}',
    '{"t_ns":7000000005,"x":[0.5],"v":[]}', '{"t_ns":7000000005,"x":[-1],"v":[]}', '{"t_ns":7000000005,"x":[7],"v":[]}',
    '{"t_ns":7000000005,"v":[0,1001],"x":[1]}', '{"t_ns":7000000005,"x":[1],"x":[2],"v":[]}',
    '{"t_ns":7000000005,"v":[0,1],"v":[0,2]}', '{"t_ns":7000000005,"t_ns":7000000006,"v":[0,1]}',
    '{"t_ns":7000000005,"v":[0,1001]}{"t_ns":7000000006,"v":[0,1002]}', '{"t_ns":7000000005,"v":[0,1001]]}',
    '{"t_ns":7000000005,"v":[[0,1001]]}', '{"t_ns":7000000005,"v":{"0":1}}', '{"t_ns":7000000005}',
    '{"t_ns":7000000005,"v":[0,1001],"event":"step_start"}', '[7000000005,[0,1001]]', '7000000005', '',
    '{"t_ns":7000000005,"v":[0,1001]\r}', '{"t_ns":7000000005,"v":[0,10\r01]}', '\ufeff{"t_ns":7000000005,"v":[0,1]}',
    '{"t_ns":7000000005,"v":[0,１]}', '{"t_ns":7000000005,"v":[9999999,1001]}', '{"t_ns":7000000005,"v":[70000,1]}',
]


@pytest.mark.parametrize("loads", DECODERS)
def test_bytes_that_are_no_utf8_and_carriage_returns_are_read_as_text_mode_reads_them(tmp_path, loads):
    """The reader reads bytes; load_timeline reads text (errors replaced, universal newlines)."""
    rows = [b'{"t_ns":7000000002,"v":[0,\xff1]}', b'{"t_ns":7000000003,"v":[0,1\xc3]}', b'\xe2\x82{"t_ns":7000000004,"v":[0,2]}',
            b'{"t_ns":7000000005,"v":[0,3]}\r', b'{"t_ns":7000000006,"v":[0,4]}\r{"t_ns":7000000007,"v":[0,5]}',
            b'{"t_ns":7000000008,"v":[0,6]}\r\r\n', b'\r', b'{"t_ns":7000000009,"event":"\xc3\xa9t\xe9"}',
            b'{"t_ns":7000000010,"v":[0,7]}']
    for header_end in (b"\n", b"\r\n", b'\r{"t_ns":7000000001,"v":[1,1]}\n'):
        path = tmp_path / "samples.jsonl"
        path.write_bytes(HEADER.rstrip("\n").encode() + header_end + KEYFRAME.encode() + b"\n".join(rows) + b"\n")
        assert_streams_as_it_loads(path, loads, (1, 3, 8192))


@pytest.mark.parametrize("loads", DECODERS)
def test_lines_near_a_plain_row_are_read_as_json_reads_them(tmp_path, loads):
    for n, line in enumerate(NEAR_MISSES):
        path = tmp_path / f"near-{n}.jsonl"
        path.write_text(HEADER + KEYFRAME + '{"t_ns":7000000001,"v":[0,1001]}\n' + line + "\n"
                        + '{"t_ns":7000000009,"v":[1,501]}\n', encoding="utf-8")
        try:
            assert_streams_as_it_loads(path, loads, (1, 8192))
        except AssertionError as exc:
            raise AssertionError(f"line {line!r}: {exc}") from exc


def _mutated(line: str, rng: random.Random) -> str:
    pool = '0123456789.eE+-,[]{}":xvtns_ \\'
    at = rng.randrange(len(line) + 1)
    roll = rng.random()
    if roll < 0.4:
        return line[:at] + rng.choice(pool) + line[at:]
    if roll < 0.7 and at < len(line):
        return line[:at] + line[at + 1:]
    if at < len(line):
        return line[:at] + rng.choice(pool) + line[at + 1:]
    return line


@pytest.mark.parametrize("loads", DECODERS)
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_rows_damaged_one_character_at_a_time_are_read_as_json_reads_them(tmp_path, loads, seed):
    path = tmp_path / "samples.jsonl"
    _writer_file(path, 400, seed)
    rng = random.Random(seed)
    lines = path.read_text(encoding="utf-8").splitlines()
    for _ in range(120):
        n = rng.randrange(2, len(lines))
        lines[n] = _mutated(lines[n], rng)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_timeline(str(path)).torn_lines > 20
    assert_streams_as_it_loads(path, loads, (1, 7, 64, 8192))


@pytest.mark.parametrize("loads", DECODERS)
def test_every_cut_of_a_torn_last_row_is_read_as_json_reads_it(tmp_path, loads):
    last = '{"t_ns":7000000005,"x":[2],"v":[0,1.25e+20,1,-17]}'
    for cut in range(len(last) + 1):
        path = tmp_path / f"torn-{cut}.jsonl"
        path.write_text(HEADER + KEYFRAME + '{"t_ns":7000000001,"v":[0,1001]}\n' + last[:cut], encoding="utf-8")
        try:
            assert_streams_as_it_loads(path, loads, (1, 8192))
        except AssertionError as exc:
            raise AssertionError(f"cut {last[:cut]!r}: {exc}") from exc


def test_numbers_the_fast_decoder_refuses_are_decoded_by_json(tmp_path):
    """orjson refuses 1e999, which json reads as inf (NaN in a column): a chunk the decoder refuses is
    decoded again by json, so the readings are json's either way."""
    path = tmp_path / "samples.jsonl"
    _writer_file(path, 50, seed=3)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"t_ns":9000000000,"v":[0,1e999]}\n{"t_ns":9000000001,"v":[0,5]}\n')
    refused = []

    def refuses(text: Any) -> Any:
        refused.append(text)
        raise ValueError("refused")

    rows = plain_rows(path.read_bytes().splitlines(keepends=True)[1:], {}, np, refuses)
    assert rows is not None and refused and np.isinf(rows.pairs).any()
    assert_streams_as_it_loads(path, refuses)
    assert_streams_as_it_loads(path, json.loads)
