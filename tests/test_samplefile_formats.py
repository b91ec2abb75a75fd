"""samples.jsonl formats: today's compact rows (gpuscope.samples/2) and the files written before them
(gpuscope.samples/1) load through the same `load_timeline` into the same Timeline; a torn last line and
a kill -9 lose at most one tick; a reading taken on a slower cadence is declared, and never shown
between its reads."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import gpuscope.probes.samplefile as samplefile
from gpuscope.probes.readings import ERROR, NO_DEVICE, NOT_SUPPORTED, Unavailable, reading_to_json
from gpuscope.probes.samplefile import (SAMPLES_SCHEMA, SAMPLES_SCHEMA_V1, SampleColumns, SampleWriter, Tick, Timeline,
                                        load_timeline)

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "samples" / "samples-v1.jsonl"
ROOT = Path(__file__).resolve().parent.parent
T0 = 1_000_000_000_000


def write_v1(path: Path, header: dict[str, Any], lines: list[dict[str, Any]]) -> None:
    """A file exactly as gpuscope.samples/1's writer wrote it: header, then each tick and event as one object."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"schema": SAMPLES_SCHEMA_V1, **header}, separators=(",", ":")) + "\n")
        for line in lines:
            fh.write(json.dumps(reading_to_json(line), separators=(",", ":"), default=str) + "\n")


def rewrite_as_v2(v1_path: Path, v2_path: Path, keyframe_every_ticks: int = samplefile.KEYFRAME_EVERY_TICKS) -> None:
    """The same samples and events through today's SampleWriter."""
    lines = [json.loads(raw) for raw in v1_path.read_text(encoding="utf-8").splitlines()]
    header = {k: v for k, v in lines[0].items() if k != "schema"}
    writer = SampleWriter(str(v2_path), header, keyframe_every_ticks)
    for line in lines[1:]:
        if "event" in line:
            writer.write(line)
        else:
            writer.write({"t_ns": line["t_ns"], "v": {scope: {metric: _decoded(value) for metric, value in metrics.items()}
                                                      for scope, metrics in line["v"].items()}})
    writer.close()


def _decoded(value: Any) -> Any:
    from gpuscope.probes.readings import reading_from_json

    return reading_from_json(value)


def assert_same_timeline(a: Timeline, b: Timeline) -> None:
    assert a.t_s == b.t_s
    assert list(a.series) == list(b.series)  # the same columns, in the same order
    for key in a.series:
        assert a.series[key] == b.series[key], key
        assert [type(v) for v in a.series[key]] == [type(v) for v in b.series[key]], key
    assert a.events == b.events
    assert a.torn_lines == b.torn_lines == 0
    assert {k: v for k, v in a.header.items() if k != "schema"} == {k: v for k, v in b.header.items() if k != "schema"}


# -- files written before the change -----------------------------------------------------------------

def test_a_file_written_in_the_old_format_still_loads():
    timeline = load_timeline(str(FIXTURE_V1))
    pid = timeline.header["pid"]
    assert timeline.header["schema"] == SAMPLES_SCHEMA_V1
    assert len(timeline.t_s) == 100 and timeline.torn_lines == 0
    assert timeline.t_s[1] == pytest.approx(0.05)
    assert [e["event"] for e in timeline.events] == ["process", "step_start", "process", "step_end"]
    util = timeline.column("gpu:0", "util_pct")
    assert [i for i, v in enumerate(util) if isinstance(v, Unavailable)] == [40, 41, 42, 43, 44, 45]
    assert util[40].reason == NOT_SUPPORTED
    assert sum(v is not None for v in timeline.column(f"pid:{pid}", "uss_bytes")) == 10  # read every 0.5 s
    foreign = timeline.column("pid:505/gpu:0", "used_bytes")
    assert foreign[0] is None and foreign[-1] is None and sum(v is not None for v in foreign) == 67
    assert all(len(column) == 100 for column in timeline.series.values())
    assert timeline.cadence_s == {}  # the old format did not say


def test_old_and_new_formats_of_the_same_samples_give_the_same_timeline(tmp_path):
    new = tmp_path / "samples.jsonl"
    rewrite_as_v2(FIXTURE_V1, new)
    assert json.loads(new.read_text().splitlines()[0])["schema"] == SAMPLES_SCHEMA
    assert_same_timeline(load_timeline(str(FIXTURE_V1)), load_timeline(str(new)))


def test_keyframes_in_the_middle_change_nothing(tmp_path):
    new = tmp_path / "samples.jsonl"
    rewrite_as_v2(FIXTURE_V1, new, keyframe_every_ticks=7)
    rows = [json.loads(raw) for raw in new.read_text().splitlines()[1:]]
    assert sum(1 for row in rows if row.get("f")) == 15  # 100 ticks / 7
    assert_same_timeline(load_timeline(str(FIXTURE_V1)), load_timeline(str(new)))


def test_readings_that_change_type_go_and_come_back_survive_the_compact_rows(tmp_path):
    """What the delta encoding could get wrong: 1 then 1.0 then True, a reading that becomes Unavailable
    and back, NaN, a key that goes and comes back, a metric given twice in one tick."""
    lost = Unavailable(NO_DEVICE, "GPU is lost")
    ticks = [
        {"gpu:0": {"used_bytes": 1, "util_pct": 5}, "host": {"x": 1}},
        {"gpu:0": {"used_bytes": 1, "util_pct": 5}, "host": {"x": 1.0}},
        {"gpu:0": {"used_bytes": lost, "util_pct": 5}, "host": {"x": True}},
        {"gpu:0": {"used_bytes": lost}, "host": {"x": float("nan")}},
        {"gpu:0": {"used_bytes": 3, "util_pct": 5}, "pid:9/gpu:0": {"used_bytes": 2}},
        {"gpu:0": {"used_bytes": 3, "util_pct": 5}, "host": {"x": float("nan")}},
    ]
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    write_v1(old, {"t0_ns": T0}, [{"t_ns": T0 + i, "v": v} for i, v in enumerate(ticks)])
    writer = SampleWriter(str(new), {"t0_ns": T0})
    for i, v in enumerate(ticks):
        writer.write(Tick(T0 + i, [(scope, metric, value) for scope, metrics in v.items()
                                   for metric, value in metrics.items()]))
    writer.close()
    a, b = load_timeline(str(old)), load_timeline(str(new))
    assert_same_timeline(a, b)
    x = b.column("host", "x")
    assert [type(v) for v in x[:3]] == [int, float, bool]
    assert x[3].reason == ERROR and x[4] is None and x[5].reason == ERROR
    assert b.column("gpu:0", "util_pct") == [5, 5, 5, None, 5, 5]


def test_a_reading_given_twice_in_a_tick_keeps_the_last_as_v1_did(samples_path):
    writer = SampleWriter(str(samples_path), {"t0_ns": T0})
    writer.write(Tick(T0, [("gpu:0", "used_bytes", 1)]))
    writer.write(Tick(T0 + 1, [("gpu:0", "used_bytes", 2), ("host", "x", 0), ("gpu:0", "used_bytes", 1)]))
    writer.write(Tick(T0 + 2, [("host", "y", 5), ("host", "y", 6)]))
    writer.close()
    timeline = load_timeline(str(samples_path))
    assert timeline.column("gpu:0", "used_bytes") == [1, 1, None]
    assert timeline.column("host", "y") == [None, None, 6]


def test_new_rows_take_at_most_60_percent_of_the_old_bytes_per_tick(tmp_path):
    new = tmp_path / "samples.jsonl"
    rewrite_as_v2(FIXTURE_V1, new)

    def tick_bytes(path: Path) -> int:
        return sum(len(raw) + 1 for raw in path.read_text().splitlines()[1:] if '"event"' not in raw)

    assert tick_bytes(new) <= 0.6 * tick_bytes(FIXTURE_V1), (tick_bytes(new), tick_bytes(FIXTURE_V1))


class _EveryTickByKey(SampleWriter):
    """The writer with its short path turned off: every tick looked up key by key, as before it had one."""

    def _layout_row(self, t_ns, values, changed):
        raise AssertionError("the short path was taken")

    def _row_line(self, tick):
        self._layout.forget()
        return super()._row_line(tick)


def _steady_ticks(seed: int, count: int) -> list[Tick]:
    """Ticks that keep their layout for runs of ticks (the usual case), with values that repeat, change type,
    become Unavailable, NaN or infinite, and now and then a key that comes, goes, or is given twice."""
    rng = random.Random(seed)
    keys = [("host", "cpu_util_pct"), ("host", "core0_util_pct"), ("pid:7", "rss_bytes"), ("gpu:0", "used_bytes"),
            ("gpu:0", "util_pct"), ("pid:7/gpu:0", "used_bytes"), ("pid:7/gpu:0", "torch_ooms")]
    present = list(keys)
    ticks = []
    for i in range(count):
        if rng.random() < 0.05:
            present = [key for key in keys if rng.random() < 0.8] or keys[:1]
        values = []
        for scope, metric in present:
            roll = rng.random()
            value: Any = (Unavailable(rng.choice([NO_DEVICE, NOT_SUPPORTED]), "x") if roll < 0.03 else
                          rng.choice([math.nan, math.inf, -math.inf]) if roll < 0.05 else
                          rng.choice([1, 1.0, True, 0, 0.0, False]) if roll < 0.3 else
                          rng.randrange(3) * 1024 if roll < 0.7 else round(rng.random() * 100, 1))
            values.append((scope, metric, value))
        if rng.random() < 0.02:
            values.append(values[0][:2] + (7,))
        ticks.append(Tick(T0 + i * 50_000_000, values))
    return ticks


def _cadenced_ticks(seed: int, count: int) -> list[Tick]:
    """Ticks as a 50 ms sampler gives them: host CPU, memory and context switches every 5th tick, USS every
    13th, a GPU process that comes and goes; values that often repeat across the gaps (a key that comes
    back with the value it left with) and shared keys that move while the slower ones are away."""
    rng = random.Random(seed)
    ticks = []
    for i in range(count):
        values: list[tuple[str, str, Any]] = []
        if i % 5 == 0:
            values += [("host", "cpu_util_pct", rng.choice([10.0, 12.5])), ("host", "core0_util_pct", rng.choice([0.0, 50.0])),
                       ("host", "mem_used_bytes", rng.choice([1024, 2048]))]
        values.append(("pid:7", "rss_bytes", rng.choice([4096, 8192, 4096.0])))
        if i % 13 == 0:
            values.append(("pid:7", "uss_bytes", rng.choice([100, 200])))
        values.append(("pid:7", "num_threads", rng.choice([3, 4])))
        if i % 5 == 0:
            values.append(("pid:7", "ctx_switches_voluntary", i // 20))
        values.append(("gpu:0", "used_bytes", rng.choice([1, 2, Unavailable(NO_DEVICE, "lost")])))
        if (i // 40) % 2:
            values.append(("pid:9/gpu:0", "used_bytes", rng.choice([5, 6])))
        ticks.append(Tick(T0 + i * 50_000_000, values))
    return ticks


@pytest.mark.parametrize("seed", [3, 4])
def test_ticks_that_alternate_layouts_take_the_short_path_and_write_the_bytes_the_key_by_key_path_writes(
        tmp_path, seed):
    class CountsShortRows(SampleWriter):
        short_rows = 0

        def _layout_row(self, *args):
            self.short_rows += 1
            return super()._layout_row(*args)

    short, by_key = tmp_path / "short.jsonl", tmp_path / "by_key.jsonl"
    writers = [CountsShortRows(str(short), {"t0_ns": T0}, 97), _EveryTickByKey(str(by_key), {"t0_ns": T0}, 97)]
    ticks = _cadenced_ticks(seed, 800)
    for tick in ticks:
        for writer in writers:
            writer.write(tick)
    for writer in writers:
        writer.close()
    assert short.read_bytes() == by_key.read_bytes()
    assert writers[0].short_rows > 600  # most rows by a kept layout (the rest: keyframes, new keys, new layouts)
    lines = short.read_text().splitlines()[1:]
    # declarations only where the format needs them: a keyframe every 97 rows, and a row between keyframes
    # only when it brings a key the file has not declared since the last keyframe
    needed, declared = 0, set()
    for row, tick in enumerate(ticks):
        keys = {(scope, metric) for scope, metric, _value in tick.values}
        if row % 97 == 0:
            declared = keys
        elif keys - declared:
            needed += 1
            declared |= keys
    assert sum(1 for line in lines if '"k"' in line and '"f"' not in line) == needed
    assert sum(1 for line in lines if '"f"' in line) == len(range(0, len(ticks), 97))
    timeline = load_timeline(str(short))
    for key in [("host", "cpu_util_pct"), ("pid:7", "uss_bytes"), ("pid:7", "rss_bytes"), ("pid:9/gpu:0", "used_bytes")]:
        expected = [dict(((s, m), v) for s, m, v in tick.values).get(key) for tick in ticks]
        assert timeline.column(*key) == expected, key  # None exactly where the tick had no reading


@pytest.mark.parametrize("seed", [1, 2])
def test_the_short_path_writes_the_bytes_the_key_by_key_path_writes(tmp_path, seed):
    short, by_key = tmp_path / "short.jsonl", tmp_path / "by_key.jsonl"
    writers = [SampleWriter(str(short), {"t0_ns": T0}, 37), _EveryTickByKey(str(by_key), {"t0_ns": T0}, 37)]
    for tick in _steady_ticks(seed, 600):
        for writer in writers:
            writer.write(tick)
    for writer in writers:
        writer.close()
    assert short.read_bytes() == by_key.read_bytes()
    lines = short.read_text().splitlines()
    assert all(json.dumps(json.loads(line), separators=(",", ":")) == line for line in lines)  # canonical JSON
    assert sum(1 for line in lines[1:] if '"k"' not in line and '"x"' not in line) > 400  # mostly the short path


# -- crash safety --------------------------------------------------------------------------------------

def _ticks(path: Path, count: int, every: int = samplefile.KEYFRAME_EVERY_TICKS) -> None:
    writer = SampleWriter(str(path), {"t0_ns": T0}, every)
    for i in range(count):
        writer.write(Tick(T0 + i * 50_000_000, [("gpu:0", "used_bytes", 100 + i // 3), ("host", "n", i)]))
    writer.close()


def test_a_torn_last_line_is_tolerated(samples_path):
    _ticks(samples_path, 5)
    with open(samples_path, "a", encoding="utf-8") as fh:
        fh.write('{"t_ns":1000250000000,"v":[0,102,1')  # killed mid-write
    timeline = load_timeline(str(samples_path))
    assert timeline.torn_lines == 1
    assert timeline.column("host", "n") == [0, 1, 2, 3, 4]
    assert timeline.column("gpu:0", "used_bytes") == [100, 100, 100, 101, 101]


def test_a_damaged_line_in_the_middle_never_leaves_an_old_value_shown_as_current(samples_path):
    _ticks(samples_path, 10, every=8)
    lines = samples_path.read_text().splitlines()
    lines[4] = "garbage"  # tick 3, which changed used_bytes to 101 (ticks 4 and 5 then leave it out)
    samples_path.write_text("\n".join(lines) + "\n")
    timeline = load_timeline(str(samples_path))
    assert timeline.torn_lines == 1 and len(timeline.t_s) == 9
    # after the damage, what rows give again is known (n changes every tick; used_bytes at tick 6) and the
    # rest is None, not the 100 of before the damage, until it changes or the keyframe at tick 8 comes
    assert timeline.column("host", "n") == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert timeline.column("gpu:0", "used_bytes") == [100, 100, 100, None, None, 102, 102, 102, 103]


_CHILD = """
import sys
sys.path.insert(0, {root!r})
from gpuscope.probes.samplefile import SampleWriter
from gpuscope.probes.sampler import Sampler

class Probe:
    def __init__(self): self.i = 0
    def read(self):
        self.i += 1
        return [("host", "n", self.i), ("gpu:0", "used_bytes", 1000 + self.i // 5)]

writer = SampleWriter({path!r}, {{"t0_ns": 0}})
sampler = Sampler({{"p": Probe()}}, 0.05, writer)
while True:
    sampler.tick()
    print(sampler.ticks, flush=True)
"""


def test_kill_9_loses_at_most_the_tick_being_written(tmp_path):
    """Every tick the sampler has finished is on disk: a SIGKILL right after the 300th leaves >= 300."""
    path = tmp_path / "samples.jsonl"
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=str(ROOT), path=str(path))],
                             stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if int(line) >= 300:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    timeline = load_timeline(str(path))
    assert len(timeline.t_s) >= 300 and timeline.torn_lines <= 1
    n = timeline.column("host", "n")
    assert n == list(range(1, len(n) + 1))
    assert timeline.column("gpu:0", "used_bytes") == [1000 + i // 5 for i in n]


# -- the slower cadence is in the record ---------------------------------------------------------------

def _fake_proc(root: Path, pid: int) -> Path:
    (root / str(pid)).mkdir(parents=True)
    (root / "stat").write_text("cpu  20 0 20 160 0 0 0 0 0 0\ncpu0 10 0 10 80 0 0 0 0 0 0\n"
                               "cpu1 10 0 10 80 0 0 0 0 0 0\nintr 0\n")
    (root / "meminfo").write_text("MemTotal:       1000 kB\nMemFree:         400 kB\nMemAvailable:    600 kB\n")
    (root / str(pid) / "stat").write_text(
        f"{pid} (my (odd) server) S 1 1 1 0 -1 0 0 0 0 0 150 50 0 0 20 0 7 0 100 4096 300 0\n")
    (root / str(pid) / "statm").write_text("4096 300 20 1 0 100 0\n")
    (root / str(pid) / "status").write_text("Name:\tserver\nThreads:\t7\nvoluntary_ctxt_switches:\t11\n"
                                            "nonvoluntary_ctxt_switches:\t3\n")
    return root


def _rollup(root: Path, pid: int, private_kib: int) -> None:
    (root / str(pid) / "smaps_rollup").write_text(
        f"Rss: {private_kib + 100} kB\nPss: {private_kib + 50} kB\nPrivate_Clean: 0 kB\nPrivate_Dirty: {private_kib} kB\n")


def test_uss_cadence_is_declared_and_its_value_is_never_shown_between_reads(tmp_path, samples_path):
    """50 ms ticks over 30 s of an injected clock: USS (every 10 s) appears on exactly the ticks it was
    read, holding what smaps_rollup said at that tick, the key table says every 10 s, and the ticks between
    hold None, not the last reading."""
    from gpuscope.probes.host import HostProbe
    from gpuscope.probes.sampler import Sampler

    pid = 4242
    root = _fake_proc(tmp_path / "proc", pid)
    clock = {"ns": T0}
    probe = HostProbe(pid, uss_every_s=10.0, clock_s=lambda: clock["ns"] / 1e9, proc_root=str(root),
                      cost_clock_s=lambda: 0.0)  # each read as instant, however busy the machine
    writer = SampleWriter(str(samples_path), {"t0_ns": T0, "interval_s": 0.05})
    sampler = Sampler({"host": probe}, 0.05, writer, clock_ns=lambda: clock["ns"])
    for tick in range(600):
        _rollup(root, pid, private_kib=1000 + tick)  # a different USS at every tick
        sampler.tick()
        clock["ns"] += 50_000_000
    writer.close()
    timeline = load_timeline(str(samples_path))
    scope = f"pid:{pid}"
    assert timeline.cadence_s == {(scope, "uss_bytes"): 10.0}
    declared = [entry for raw in samples_path.read_text().splitlines()[1:] for entry in json.loads(raw).get("k", [])
                if entry[2] == "uss_bytes"]
    assert declared and all(entry[3] == 10.0 for entry in declared)
    uss = timeline.column(scope, "uss_bytes")
    read_at = [i for i, value in enumerate(uss) if value is not None]
    assert read_at == [0, 200, 400]
    assert [uss[i] for i in read_at] == [(1000 + i) * 1024 for i in read_at]  # the reading of that very tick
    assert timeline.column(scope, "rss_bytes") == [300 * os.sysconf("SC_PAGE_SIZE")] * 600  # every tick


def test_a_probe_without_a_slower_cadence_declares_none(samples_path):
    from gpuscope.probes.host import HostProbe

    assert HostProbe(uss_every_s=None).cadence_s() == {}
    _ticks(samples_path, 3)
    assert load_timeline(str(samples_path)).cadence_s == {}


def test_the_header_line_of_a_reused_file_does_not_confuse_the_rows(samples_path):
    """A second run appending to the same file (the writer opens it for append): its first row is a keyframe."""
    _ticks(samples_path, 3)
    writer = SampleWriter(str(samples_path), {"t0_ns": T0})
    writer.write(Tick(T0 + 10**9, [("host", "n", 99)]))
    writer.close()
    timeline = load_timeline(str(samples_path))
    assert timeline.torn_lines == 1  # the second header, as before
    assert timeline.column("host", "n") == [0, 1, 2, 99]
    assert timeline.column("gpu:0", "used_bytes") == [100, 100, 100, None]


def test_host_cpu_memory_and_the_process_cpu_threads_and_switches_come_every_quarter_second_at_50ms(
        tmp_path, samples_path):
    """At 50 ms the host-wide readings and the process's CPU, threads and context switches are read every 5th
    tick (0.25 s), never shown between (RSS at every tick, from statm between the reads), declared so,
    and the ticks between hold None; each read holds what /proc said at that very tick, and the per-core busy
    share covers the whole quarter second since the read before (not the last 50 ms)."""
    from gpuscope.probes.host import HostProbe
    from gpuscope.probes.sampler import Sampler

    pid = 4243
    root = _fake_proc(tmp_path / "proc", pid)
    clock = {"ns": T0}
    probe = HostProbe(pid, uss_every_s=None, clock_s=lambda: clock["ns"] / 1e9, proc_root=str(root), interval_s=0.05)
    writer = SampleWriter(str(samples_path), {"t0_ns": T0, "interval_s": 0.05})
    sampler = Sampler({"host": probe}, 0.05, writer, clock_ns=lambda: clock["ns"])
    for tick in range(40):
        busy = 20 + 3 * (tick + 1)  # core0: 3 busy jiffies and 2 idle a tick (60%); core1 idle
        (root / "stat").write_text(f"cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 {busy} 0 20 {160 + 2 * (tick + 1)} 0 0 0 0 0 0\n"
                                   f"cpu1 10 0 10 {80 + 5 * (tick + 1)} 0 0 0 0 0 0\nintr 0\n")
        (root / "meminfo").write_text(f"MemTotal:       1000 kB\nMemFree:         1 kB\nMemAvailable:    {600 - tick} kB\n")
        (root / str(pid) / "status").write_text(f"Name:\tserver\nvoluntary_ctxt_switches:\t{tick}\n"
                                                f"nonvoluntary_ctxt_switches:\t{2 * tick}\n")
        (root / str(pid) / "stat").write_text(f"{pid} (server) S 1 1 1 0 -1 0 0 0 0 0 {10 * tick} 0 0 0 20 0 "
                                              f"{100 + tick} 0 100 4096 {1000 + tick} 0 0\n")
        (root / str(pid) / "statm").write_text(f"4096 {1000 + tick} 20 1 0 100 0\n")
        sampler.tick()
        clock["ns"] += 50_000_000
    writer.close()
    timeline = load_timeline(str(samples_path))
    scope = f"pid:{pid}"
    slower = [("host", "cpu_util_pct"), ("host", "core0_util_pct"), ("host", "core1_util_pct"),
              ("host", "mem_used_bytes"), ("host", "mem_available_bytes"),
              (scope, "cpu_util_pct"), (scope, "num_threads"),
              (scope, "ctx_switches_voluntary"), (scope, "ctx_switches_involuntary")]
    assert timeline.cadence_s == {key: 0.25 for key in slower}
    for key in slower:
        column = timeline.column(*key)
        assert [i for i, value in enumerate(column) if value is not None] == list(range(0, 40, 5)), key
    assert [timeline.column(scope, "ctx_switches_involuntary")[i] for i in range(0, 40, 5)] == [2 * i for i in range(0, 40, 5)]
    assert [timeline.column("host", "mem_available_bytes")[i] for i in range(0, 40, 5)] == \
        [(600 - i) * 1024 for i in range(0, 40, 5)]
    assert [timeline.column("host", "core0_util_pct")[i] for i in range(5, 40, 5)] == [60.0] * 7  # 15 of 25 jiffies
    assert [timeline.column("host", "core1_util_pct")[i] for i in range(5, 40, 5)] == [0.0] * 7
    assert [timeline.column(scope, "num_threads")[i] for i in range(0, 40, 5)] == [100 + i for i in range(0, 40, 5)]
    page = os.sysconf("SC_PAGE_SIZE")  # RSS every tick: /proc/PID/statm between the quarter-second reads
    assert timeline.column(scope, "rss_bytes") == [(1000 + tick) * page for tick in range(40)]
    # the same file read in column chunks says the same
    reader = SampleColumns(str(samples_path))
    list(reader.chunks())
    assert reader.cadence_s == timeline.cadence_s


def test_at_intervals_of_an_eighth_of_a_second_or_more_every_reading_comes_every_tick():
    from gpuscope.probes.host import HostProbe, ticks_between_host_reads

    assert [ticks_between_host_reads(s) for s in (None, 0.005, 0.01, 0.05, 0.1, 0.124, 0.125, 0.2, 1.0)] == \
        [1, 50, 25, 5, 2, 2, 1, 1, 1]
    probe = HostProbe(uss_every_s=None, interval_s=0.125)
    assert probe.cadence_s() == {}
    keys = [set(as_keys(probe.read())) for _ in range(3)]
    assert keys[0] == keys[1] == keys[2] and ("host", "cpu_util_pct") in keys[0]


def as_keys(values):
    return [(scope, metric) for scope, metric, _value in values]


def test_a_step_end_request_reads_everything_at_once_and_the_cadence_counts_from_there():
    from gpuscope.probes.host import HostProbe

    probe = HostProbe(uss_every_s=None, interval_s=0.05)
    scope = f"pid:{os.getpid()}"
    whole = [(("host", "cpu_util_pct") in keys and (scope, "ctx_switches_voluntary") in keys)
             for keys in (set(as_keys(probe.read())) for _ in range(7))]
    assert whole == [True, False, False, False, False, True, False]
    probe.request_all()
    keys = set(as_keys(probe.read()))
    assert ("host", "mem_used_bytes") in keys and (scope, "uss_bytes") in keys and (scope, "ctx_switches_involuntary") in keys
    assert [("host", "cpu_util_pct") in set(as_keys(probe.read())) for _ in range(5)] == [False] * 4 + [True]


def test_a_writer_dropped_without_close_gives_its_descriptor_back(samples_path):
    """The writer holds a plain descriptor (one os.write a line): dropped unclosed, it must not leak it."""
    import gc

    writer = SampleWriter(str(samples_path), {"t0_ns": T0})
    fd, file_id = writer._fd, (os.stat(samples_path).st_dev, os.stat(samples_path).st_ino)

    def still_the_file() -> bool:  # by identity: another thread may be given the number again at once
        try:
            status = os.fstat(fd)
        except OSError:
            return False
        return (status.st_dev, status.st_ino) == file_id

    assert still_the_file()
    del writer
    gc.collect()
    assert not still_the_file()
