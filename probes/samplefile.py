"""The samples file (`samples.jsonl`): streamed during a run, read back for reports.

One JSON object per line, appended and flushed as each tick is taken, so a crash or `kill -9`
loses at most the tick being written. Line kinds (gpuscope.samples/2):
  {"schema": "gpuscope.samples/2", "started_at": ..., "t0_ns": ..., ...}         header (first line)
  {"t_ns": 123, "f": 1, "k": [[0, "gpu:0", "used_bytes"], ...], "v": [0, 1, ...]}  a keyframe row
  {"t_ns": 173, "v": [0, 2], "k": [[7, "pid:9/gpu:0", "used_bytes"]], "x": [3]}   a delta row
  {"t_ns": 123, "event": "step_start", ...}                                      events (steps, processes)

Why rows, not one object per tick: today's readings mostly repeat the last tick's, and the
scope/metric names were most of each line. A row names each reading by an index into a key
table, carries only the readings that changed, and lists in "x" those that stopped (a reading
left out of a row is unchanged; one in "x" is absent from then on, so a reading read on a
slower cadence is never shown between its reads). "k" declares the keys a row uses for the
first time, with explicit indices: [index, scope, metric] or [index, scope, metric, every_s]
for a reading taken only every `every_s` seconds. A keyframe ("f": 1) restarts the table
with every key that row holds and carries every reading, so a reader can pick up after a
damaged line and the writer's table stays bounded; one comes every KEYFRAME_EVERY_TICKS rows.

gpuscope.samples/1 files ({"t_ns": 123, "v": {"gpu:0": {"used_bytes": 1}, ...}}: every reading
of the tick, grouped by scope) load through the same `load_timeline`, into the same Timeline;
such rows are read in either schema. A torn last line (killed mid-write) is skipped when reading.
"""
from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from gpuscope.probes.readings import Unavailable, reading_from_json, reading_to_json

SAMPLES_SCHEMA_V1 = "gpuscope.samples/1"
SAMPLES_SCHEMA = "gpuscope.samples/2"
SUPPORTED_SAMPLE_SCHEMAS = (SAMPLES_SCHEMA_V1, SAMPLES_SCHEMA)
KEYFRAME_EVERY_TICKS = 256

Key = tuple[str, str]  # (scope, metric)
ScopedValue = tuple[str, str, Any]


@dataclass(frozen=True)
class Sample:
    """One reading: when (monotonic ns), of what (`host`, `gpu:0`, `pid:1234/gpu:0`), which metric, the value."""

    t_ns: int
    scope: str
    metric: str
    value: int | float | Unavailable


@dataclass(frozen=True)
class Tick:
    """One tick's readings as the sampler took them, for `SampleWriter.write` to encode as a row."""

    t_ns: int
    values: list[ScopedValue]


def _encode(value: Any) -> Any:
    """A reading as JSON will hold it (Unavailable and non-finite floats as {"unavailable": ...})."""
    if type(value) is int or (type(value) is float and math.isfinite(value)):
        return value
    return reading_to_json(value)


def _same(a: Any, b: Any) -> bool:
    """Unchanged for the file: equal and of the same type (1 and 1.0 and True are not the same reading)."""
    return a is b or (type(a) is type(b) and a == b)


class SampleWriter:
    """Appends lines to samples.jsonl. A write failure (disk full) is kept, not raised, in the sampler thread.

    `cadence_s` maps a (scope, metric) read less often than every tick to the seconds between its
    reads; the key table states it (the sampler fills it from its probes' `cadence_s()`).
    """

    def __init__(self, path: str, header: dict[str, Any]) -> None:
        self.path = path
        self.error: OSError | None = None
        self.lines_written = 0
        self.cadence_s: dict[Key, float] = {}
        self._lock = threading.Lock()
        self._index: dict[Key, int] = {}
        self._last: dict[int, Any] = {}  # index -> the reading the file last gave (present keys only)
        self._rows_since_keyframe = KEYFRAME_EVERY_TICKS  # the first row is a keyframe
        self._fh = open(path, "a", encoding="utf-8")
        self.write({"schema": SAMPLES_SCHEMA, **header})

    def write(self, obj: Tick | dict[str, Any]) -> None:
        """Write a tick (a `Tick`, or a tick dict {"t_ns", "v": {scope: {metric: value}}}) as a row, or any
        other dict (header, event) as it is."""
        if not isinstance(obj, Tick) and isinstance(obj.get("v"), dict) and "event" not in obj:
            obj = Tick(obj["t_ns"], [(scope, metric, value) for scope, metrics in obj["v"].items()
                                     for metric, value in metrics.items()])
        with self._lock:
            if self.error is not None or self._fh is None:
                return
            if isinstance(obj, Tick):
                line = json.dumps(self._row(obj), separators=(",", ":"), default=str) + "\n"
            else:
                line = json.dumps(reading_to_json(obj), separators=(",", ":"), default=str) + "\n"
            try:
                self._fh.write(line)
                self._fh.flush()
                self.lines_written += 1
            except OSError as exc:
                self.error = exc

    def _declare(self, keys: list[Key], rank: dict[str, int]) -> list[list[Any]]:
        """Index new keys (grouped by scope in the order the tick gave them, as v1 files grouped them)."""
        keys.sort(key=lambda key: rank[key[0]])
        declared = []
        for key in keys:
            index = self._index[key] = len(self._index)
            every_s = self.cadence_s.get(key)
            declared.append([index, key[0], key[1]] if every_s is None else [index, key[0], key[1], every_s])
        return declared

    def _row(self, tick: Tick) -> dict[str, Any]:
        """Encode a tick against what the file already holds (called under the lock)."""
        keyframe = self._rows_since_keyframe >= KEYFRAME_EVERY_TICKS
        if keyframe:
            self._index, self._last, self._rows_since_keyframe = {}, {}, 0
        self._rows_since_keyframe += 1
        index, last = self._index, self._last
        pairs: list[Any] = []
        present: dict[int, None] = {}
        fresh: list[tuple[Key, Any]] = []
        for scope, metric, value in tick.values:
            i = index.get((scope, metric))
            if i is None:
                fresh.append(((scope, metric), value))
                continue
            present[i] = None
            if i in last and _same(last[i], value):
                continue
            last[i] = value
            pairs += (i, _encode(value))
        row: dict[str, Any] = {"t_ns": tick.t_ns}
        if keyframe:
            row["f"] = 1
        if fresh:
            rank: dict[str, int] = {}
            for scope, _metric, _value in tick.values:
                rank.setdefault(scope, len(rank))
            new_keys = list(dict.fromkeys(key for key, _value in fresh))
            row["k"] = self._declare(new_keys, rank)
            for key, value in fresh:  # in tick order: a key given twice keeps its last value, as in v1
                i = index[key]
                present[i] = None
                last[i] = value
                pairs += (i, _encode(value))
        gone = [i for i in last if i not in present]
        for i in gone:
            del last[i]
        if gone:
            row["x"] = gone
        row["v"] = pairs
        return row

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                try:
                    self._fh.close()
                except OSError as exc:
                    self.error = self.error or exc
                self._fh = None


class SamplesFileError(ValueError):
    """The file is not a gpuscope samples file, or from an unsupported schema."""


@dataclass
class Timeline:
    """Samples in columns for plotting: `t_s[i]` and `series[(scope, metric)][i]` (None when absent that tick)."""

    header: dict[str, Any]
    t_s: list[float] = field(default_factory=list)
    series: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    torn_lines: int = 0
    # (scope, metric) -> seconds between its reads, for readings taken less often than every tick
    # (declared by gpuscope.samples/2 files; the ticks between reads hold None, not an older value)
    cadence_s: dict[tuple[str, str], float] = field(default_factory=dict)

    def column(self, scope: str, metric: str) -> list[Any]:
        return self.series.get((scope, metric), [None] * len(self.t_s))

    def scopes(self) -> set[str]:
        return {scope for scope, _ in self.series}

    def samples(self) -> Iterator[Sample]:
        t0_ns = int(self.header.get("t0_ns", 0))
        for (scope, metric), values in self.series.items():
            for t, value in zip(self.t_s, values):
                if value is not None:
                    yield Sample(t0_ns + round(t * 1e9), scope, metric, value)  # round: t_s is a float


def _read_lines(path: str) -> Iterator[tuple[dict[str, Any] | None, str]]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for raw in fh:
            raw = raw.strip()
            if not raw:
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                yield None, raw
                continue
            yield (obj if isinstance(obj, dict) else None), raw


class _RowReader:
    """The key table and the current readings while reading rows (both schemas' rows)."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.keys: dict[int, Key] = {}
        self.current: dict[Key, Any] = {}

    def grouped(self, values: dict[str, Any]) -> None:
        """A gpuscope.samples/1 row: every reading of the tick, grouped by scope."""
        self.current = {}
        for scope, metrics in values.items():
            if not isinstance(metrics, dict):
                continue
            for metric, value in metrics.items():
                self.current[(scope, metric)] = reading_from_json(value)

    def keyed(self, obj: dict[str, Any]) -> bool:
        """A gpuscope.samples/2 row; False when it is malformed (nothing of it is applied then)."""
        pairs, declared, gone = obj["v"], obj.get("k", []), obj.get("x", [])
        if (len(pairs) % 2 or not isinstance(declared, list) or not isinstance(gone, list)
                or not all(isinstance(entry, list) and len(entry) >= 3 for entry in declared)):
            return False
        if obj.get("f"):
            self.keys, self.current = {}, {}
        series, cadence = self.timeline.series, self.timeline.cadence_s
        length = len(self.timeline.t_s)
        for entry in declared:
            key = (str(entry[1]), str(entry[2]))
            self.keys[entry[0]] = key
            if key not in series:
                series[key] = [None] * length
            if len(entry) > 3:
                cadence[key] = entry[3]
        keys, current = self.keys, self.current
        for i in gone:
            key = keys.get(i)
            if key is not None:
                current.pop(key, None)
        for n in range(0, len(pairs), 2):
            key = keys.get(pairs[n])
            if key is not None:  # an index whose declaration was lost with a damaged line: skipped
                current[key] = reading_from_json(pairs[n + 1])
        return True

    def lost_a_line(self) -> None:
        """After a damaged line, the rows that follow may rely on what it changed: until the next
        keyframe, show only readings rows give again, never an older value as if current."""
        self.current = {}

    def append_tick(self, t_s: float) -> None:
        timeline = self.timeline
        index = len(timeline.t_s)
        timeline.t_s.append(t_s)
        series = timeline.series
        for key, value in self.current.items():
            column = series.get(key)
            if column is None:
                column = series[key] = [None] * index
            column.append(value)
        for column in series.values():
            if len(column) < index + 1:
                column.append(None)


def load_timeline(path: str) -> Timeline:
    """Read a samples file (either schema) into columns. Raises SamplesFileError for a foreign or newer file."""
    if not os.path.exists(path):
        raise SamplesFileError(f"{path}: no such samples file")
    lines = _read_lines(path)
    first = next(lines, None)
    if first is None or first[0] is None or "schema" not in first[0]:
        raise SamplesFileError(f"{path}: not a gpuscope samples file (no header line)")
    header = first[0]
    if header["schema"] not in SUPPORTED_SAMPLE_SCHEMAS:
        raise SamplesFileError(f"{path}: schema {header['schema']!r} is not supported by this gpuscope "
                               f"(reads {', '.join(SUPPORTED_SAMPLE_SCHEMAS)}); upgrade gpuscope")
    t0_ns = int(header.get("t0_ns", 0))
    timeline = Timeline(header=header)
    rows = _RowReader(timeline)
    for obj, _raw in lines:
        t_ns = obj.get("t_ns") if obj is not None else None
        if not isinstance(t_ns, int):
            timeline.torn_lines += 1
            rows.lost_a_line()
            continue
        if "event" in obj:
            timeline.events.append({**obj, "t_s": (t_ns - t0_ns) / 1e9})
            continue
        values = obj.get("v")
        if isinstance(values, dict):
            rows.grouped(values)
        elif not (isinstance(values, list) and rows.keyed(obj)):
            timeline.torn_lines += 1
            rows.lost_a_line()
            continue
        rows.append_tick((t_ns - t0_ns) / 1e9)
    return timeline
