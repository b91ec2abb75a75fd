"""The samples file (`samples.jsonl`): streamed during a run, read back for reports.

One JSON object per line, each written to the kernel as its tick is taken, so a crash or `kill -9`
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

Two readers give the same readings: `load_timeline` (every reading as a Python object, Unavailable
with its reason: for tests, the analysis and short runs) and `SampleColumns` (a stream of numpy
column chunks, NaN where a tick has no usable number, never every row in memory at once: what the
report reads, as a day at 5 ms is 17 million rows). Both go through `Timeline.chunks`/`SampleColumns
.chunks`, so the report's code sees one shape.
"""
from __future__ import annotations

import errno
import itertools
import json
import math
import operator
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from gpuscope.probes.readings import Unavailable, reading_from_json, reading_to_json
from gpuscope.probes.samplerows import Loads, PlainRows, Shape, plain_rows
from gpuscope.probes.ticklayout import TickLayout

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


@dataclass(frozen=True, slots=True)
class Tick:
    """One tick's readings as the sampler took them, for `SampleWriter.write` to encode as a row
    (slots: one is made every tick, and a slotted one is made in half the time)."""

    t_ns: int
    values: list[ScopedValue]


_isfinite = math.isfinite


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

    Cost: a tick is written every 50 ms (or 5 ms) for days beside a server, so the usual tick takes
    a short path. When a tick names the same readings in the same order as the one before (the
    probes' layout: nothing new, nothing gone, no key twice), the readings that changed are found by
    position (`TickLayout`), and a row of plain numbers is formatted directly rather than by
    `json.dumps`. Both paths write the same bytes: the short one is only taken where it gives the same row.
    """

    def __init__(self, path: str, header: dict[str, Any], keyframe_every_ticks: int = KEYFRAME_EVERY_TICKS) -> None:
        self.path = path
        self.error: OSError | None = None
        self.lines_written = 0
        self.cadence_s: dict[Key, float] = {}
        self._lock = threading.Lock()
        self._index: dict[Key, int] = {}
        self._last: dict[int, Any] = {}  # index -> the reading the file last gave (present keys only)
        self._keyframe_every = keyframe_every_ticks  # a keyframe every this many rows (tests shorten it)
        self._rows_since_keyframe = keyframe_every_ticks  # the first row is a keyframe
        # The kept layouts of recent ticks, and the file's index of each of their slots (see TickLayout)
        self._layout = TickLayout()
        self._slot_index: list[int] = []
        # A plain descriptor, each line one os.write: a text file's write and flush cost a third more a
        # tick, and the line must reach the kernel at once either way (a kill -9 then loses nothing taken)
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
        self.write({"schema": SAMPLES_SCHEMA, **header})

    def write(self, obj: Tick | dict[str, Any]) -> None:
        """Write a tick (a `Tick`, or a tick dict {"t_ns", "v": {scope: {metric: value}}}) as a row, or any
        other dict (header, event) as it is."""
        if not isinstance(obj, Tick) and isinstance(obj.get("v"), dict) and "event" not in obj:
            obj = Tick(obj["t_ns"], [(scope, metric, value) for scope, metrics in obj["v"].items()
                                     for metric, value in metrics.items()])
        with self._lock:
            fd = self._fd
            if self.error is not None or fd is None:
                return
            if isinstance(obj, Tick):
                line = self._row_line(obj)
            else:
                line = json.dumps(reading_to_json(obj), separators=(",", ":"), default=str) + "\n"
            data = line.encode()  # ASCII: json.dumps escapes the rest
            try:
                written = os.write(fd, data)  # one line a tick in the kernel at once: a kill -9 loses none
                while written < len(data):  # short only as a disk fills: the next write says why
                    if written == 0:  # a file system that takes nothing and says nothing: never spin on it
                        raise OSError(errno.EIO, f"wrote nothing of a {len(data)}-byte line")
                    data = data[written:]
                    written = os.write(fd, data)
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

    def _row_line(self, tick: Tick) -> str:
        """The tick's line (called under the lock): by a kept layout where one still holds."""
        values, t_ns = tick.values, tick.t_ns
        layout = self._layout
        if self._rows_since_keyframe < self._keyframe_every and type(t_ns) is int:
            changed = layout.changed(values)
            if changed is not None:
                self._rows_since_keyframe += 1
                return self._layout_row(t_ns, values, changed)
        if self._rows_since_keyframe >= self._keyframe_every:
            layout.forget()  # the keyframe numbers the keys afresh
            self._slot_index = []
        row = self._row(tick)
        layout.remember(values)
        if layout.current is None:  # a key given twice: nothing kept, the slots start again
            self._slot_index = []
        else:
            slot_index, keys, index = self._slot_index, layout.keys, self._index
            while len(slot_index) < len(keys):  # every key a kept layout names has its index in the file
                slot_index.append(index[keys[len(slot_index)]])
        if len(row) == 2 and type(t_ns) is int and all(type(v) is int or type(v) is float for v in row["v"]):
            return _plain_line(t_ns, row["v"])
        return json.dumps(row, separators=(",", ":"), default=str) + "\n"

    def _layout_row(self, t_ns: int, values: list[ScopedValue], changed: list[int]) -> str:
        """A row for a tick with a kept layout: the readings that changed or came back, and those the tick
        before had and this one lacks ("x"); nothing declared."""
        last, index = self._last, self._slot_index
        slots = self._layout.current.slots  # type: ignore[union-attr]  (a layout matched)
        pairs: list[Any] = []
        plain = True
        for position in changed:
            value = values[position][2]
            i = index[slots[position]]
            last[i] = value
            kind = type(value)
            if kind is int or (kind is float and _isfinite(value)):
                pairs += (i, value)
            else:
                plain = False
                pairs += (i, _encode(value))
        gone = self._layout.gone
        stopped = sorted(index[slot] for slot in gone) if gone else gone
        for i in stopped:
            del last[i]
        if plain:
            return _plain_line(t_ns, pairs, stopped)
        row: dict[str, Any] = {"t_ns": t_ns}
        if stopped:
            row["x"] = stopped
        row["v"] = pairs
        return json.dumps(row, separators=(",", ":"), default=str) + "\n"

    def _row(self, tick: Tick) -> dict[str, Any]:
        """Encode a tick against what the file already holds (called under the lock)."""
        keyframe = self._rows_since_keyframe >= self._keyframe_every
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
        gone = sorted(i for i in last if i not in present)  # in index order, as a kept layout's row gives them
        for i in gone:
            del last[i]
        if gone:
            row["x"] = gone
        row["v"] = pairs
        return row

    def __del__(self) -> None:
        """A writer dropped without close() gives its descriptor back (a file object did so by itself)."""
        fd = getattr(self, "_fd", None)  # absent when __init__ failed to open the file
        if fd is not None:
            self._fd = None
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                try:
                    os.close(self._fd)
                except OSError as exc:
                    self.error = self.error or exc
                self._fd = None


def _plain_line(t_ns: int, pairs: list[Any], stopped: list[int] | None = None) -> str:
    """`{"t_ns":T,"v":[...]}` (with `"x":[...]` where readings stopped) for a row of ints and finite
    floats: the bytes json.dumps gives it (both write an int and a float as their repr), at a third of
    its cost."""
    if stopped:
        return f'{{"t_ns":{t_ns},"x":[{",".join(map(str, stopped))}],"v":[{",".join(map(repr, pairs))}]}}\n'
    return f'{{"t_ns":{t_ns},"v":[{",".join(map(repr, pairs))}]}}\n'


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

    @property
    def ticks(self) -> int:
        return len(self.t_s)

    @property
    def last_t_s(self) -> float | None:
        return self.t_s[-1] if self.t_s else None

    def chunks(self, keep: KeyFilter | None = None) -> Iterator["ColumnChunk"]:
        """The timeline as one column chunk, in `SampleColumns.chunks`' form (NaN where a tick holds no
        finite number), so a report reads an in-memory timeline and a streamed file alike."""
        import numpy as np

        if not self.t_s:
            return
        columns = {key: np.fromiter((_finite_or_nan(v) for v in values), dtype=float, count=len(values))
                   for key, values in self.series.items() if keep is None or keep(*key)}
        yield ColumnChunk(np.asarray(self.t_s, dtype=float), columns)

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


# ---------------------------------------------------------------- the same file, streamed into numpy columns

KeyFilter = Callable[[str, str], bool]  # (scope, metric) -> whether a reader keeps that column
CHUNK_TICKS = 8192  # rows decoded, then turned into columns, at a time: bounds the Python objects held


def _finite_or_nan(value: Any) -> float:
    """A reading as a column holds it: the number, or NaN for absent, Unavailable, bool or non-finite
    (what plotdata.clean() makes unavailable, and `is_available` refuses)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return math.nan
    return number if math.isfinite(number) else math.nan


@dataclass
class ColumnChunk:
    """Consecutive ticks of a samples file: `t_s` (seconds since t0) and one float64 column per kept
    (scope, metric), NaN where that tick holds no usable number. A column missing from a chunk is NaN
    all along it (a reading that appears later in the run)."""

    t_s: Any
    columns: dict[Key, Any]


class _Chunk:
    """One chunk's rows while they are read: each row's changes as (global key id, value), in order, to
    become columns at `SampleColumns._flush`."""

    def __init__(self) -> None:
        self.t_ns: list[Any] = []  # per row (lists of ints, or int64 arrays for runs of plain rows)
        self.counts: list[Any] = []  # per row: how many changes it made
        self.gid_parts: list[Any] = []  # int64 arrays: the changes' global key ids (-1: unknown, skipped)
        self.val_parts: list[Any] = []  # float64 arrays: their values (NaN: the reading stopped)
        self.resets: list[int] = []  # rows before whose changes nothing is current (keyframe, lost line)
        # readings that stopped ("x") in runs of plain rows: (rows, global key ids), applied before any change
        # of the same row (at flush they go first, and the last change of a (row, key) wins)
        self.stop_rows: list[Any] = []
        self.stop_gids: list[Any] = []
        self.rows = 0
        self._gids: list[int] = []  # changes of rows read one at a time, not yet in the parts
        self._vals: list[float] = []

    def row(self, t_ns: int, gids: list[int], vals: list[float]) -> None:
        self.t_ns.append([t_ns])
        self.counts.append([len(gids)])
        self._gids += gids
        self._vals += vals
        self.rows += 1

    def seal(self, np: Any) -> None:
        """Rows read one at a time become one part, so parts stay in row order."""
        if self._gids:
            self.gid_parts.append(np.asarray(self._gids, dtype=np.int64))
            self.val_parts.append(np.asarray(self._vals, dtype=float))
            self._gids, self._vals = [], []


def _decoded(lines: list[str]) -> list[Any]:
    """The lines decoded by one json.loads where they all are JSON, else one at a time (blank lines left
    out; a line that is not JSON is None), as `load_timeline` decodes them."""
    try:
        return json.loads("[" + ",".join(lines) + "]")
    except (json.JSONDecodeError, RecursionError):
        return [_decoded_line(raw) for raw in lines if raw.strip()]


def _decoded_line(raw: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return None


def _text_lines(raw: bytes) -> list[str]:
    """A line read in binary, as the text-mode reading of `load_timeline` gives it (UTF-8 with errors
    replaced, universal newlines): one line, or more where it holds a carriage return."""
    text = raw.decode("utf-8", "replace")
    if "\r" not in text:
        return [text]
    pieces = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [piece + "\n" for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])


def _texts(lines: list[bytes]) -> list[str]:
    return [text for raw in lines for text in _text_lines(raw)]


def _run_ends(flags: Any, np: Any) -> list[int]:
    """Where each run of equal flags ends (exclusive), in order."""
    if not len(flags):
        return []
    return [*(np.flatnonzero(np.diff(flags.astype(np.int8))) + 1).tolist(), len(flags)]


class SampleColumns:
    """A samples file (either schema) read as a stream of `ColumnChunk`s: the same readings
    `load_timeline` gives, without holding every row as Python objects.

    Why: a report of a day at 5 ms would otherwise build 17 million rows of dicts before drawing 1,200
    points. Lines are read CHUNK_TICKS at a time. The plain rows ({"t_ns", "v"}, maybe "x": 255 of every
    256 the writer makes) are read as text by probes/samplerows.py (their numbers in one decode, no
    dict or list a row) and applied as arrays, a run of them at a time; keyframes, declarations, events,
    Unavailable readings, old-format and damaged rows are decoded and read one at a time, as
    `load_timeline` reads them. A chunk whose numbers do not decode as JSON numbers is decoded as JSON
    objects whole (one json.loads, or one a line where a line is damaged), its plain rows still taken
    apart with C-level maps and numpy. Each chunk's changes become columns by a forward fill in numpy,
    carrying the last values into the next chunk. `loads` decodes the plain rows' numbers
    (samplerows.default_loads(): orjson's where installed, else json's; tests pass either).

    Opening reads the header and raises SamplesFileError as `load_timeline` does. `chunks()` reads the
    rest, once; after it, `events`, `torn_lines`, `cadence_s`, `ticks` and `last_t_s` hold what the
    whole file said.
    """

    def __init__(self, path: str, chunk_ticks: int = CHUNK_TICKS, loads: Loads | None = None) -> None:
        if not os.path.exists(path):
            raise SamplesFileError(f"{path}: no such samples file")
        self.path = path
        self.chunk_ticks = chunk_ticks
        self._loads = loads  # the decoder of plain rows' numbers (samplerows.default_loads() when None)
        self.events: list[dict[str, Any]] = []
        self.torn_lines = 0
        self.cadence_s: dict[Key, float] = {}
        self.ticks = 0
        self.last_t_s: float | None = None
        self._fh = open(path, "rb")  # read as bytes: plain rows are ASCII (samplerows.py); other lines as text
        self._leftover: list[bytes] = []  # lines that shared the header's binary line (a carriage return)
        header: Any = None
        for texts in map(_text_lines, self._fh):
            found = next((n for n, text in enumerate(texts) if text.strip()), None)
            if found is not None:
                try:
                    header = json.loads(texts[found])
                except json.JSONDecodeError:
                    header = None
                self._leftover = [text.encode("utf-8") for text in texts[found + 1:]]
                break
        if not isinstance(header, dict) or "schema" not in header:
            self._fh.close()
            raise SamplesFileError(f"{path}: not a gpuscope samples file (no header line)")
        if header["schema"] not in SUPPORTED_SAMPLE_SCHEMAS:
            self._fh.close()
            raise SamplesFileError(f"{path}: schema {header['schema']!r} is not supported by this gpuscope "
                                   f"(reads {', '.join(SUPPORTED_SAMPLE_SCHEMAS)}); upgrade gpuscope")
        self.header: dict[str, Any] = header
        self._t0_ns = int(header.get("t0_ns", 0))
        self._keys: list[Key] = []  # global key id -> (scope, metric)
        self._key_id: dict[Key, int] = {}
        self._table: dict[Any, int] = {}  # the file's key table now: row index -> global key id
        self._lut: Any = None  # the table as an int64 array, while it holds only small non-negative ints
        self._reset_pending = False

    def close(self) -> None:
        """Let the file go without reading it (a report that draws no timeline); chunks() closes it itself."""
        self._fh.close()

    def _global(self, key: Key) -> int:
        gid = self._key_id.get(key)
        if gid is None:
            gid = self._key_id[key] = len(self._keys)
            self._keys.append(key)
        return gid

    def _line_chunks(self) -> Iterator[list[bytes]]:
        """The file's remaining lines (as bytes), CHUNK_TICKS at a time."""
        lines = itertools.chain(self._leftover, self._fh)
        while True:
            chunk = list(itertools.islice(lines, self.chunk_ticks))
            if not chunk:
                return
            yield chunk

    def _lookup(self, loc: Any) -> int:
        try:
            return self._table.get(loc, -1)
        except TypeError:  # an unhashable index in a damaged row
            return -1

    def _row(self, t_ns: int, obj: dict[str, Any], values: list[Any], chunk: _Chunk) -> bool:
        """A gpuscope.samples/2 row read on its own; False when malformed (nothing applied), as
        `_RowReader.keyed` decides it."""
        declared, gone = obj.get("k", []), obj.get("x", [])
        if (len(values) % 2 or not isinstance(declared, list) or not isinstance(gone, list)
                or not all(isinstance(entry, list) and len(entry) >= 3 for entry in declared)):
            return False
        if obj.get("f"):
            self._table, self._lut = {}, None
            self._reset_pending = True
        if declared:
            self._lut = None
            for entry in declared:
                key = (str(entry[1]), str(entry[2]))
                try:
                    self._table[entry[0]] = self._global(key)
                except TypeError:  # an unhashable index: _RowReader would fail on it; nothing can refer to it
                    continue
                if len(entry) > 3:
                    self.cadence_s[key] = entry[3]
        if self._reset_pending:
            chunk.resets.append(chunk.rows)
            self._reset_pending = False
        gids = [self._lookup(i) for i in gone] + [self._lookup(i) for i in values[0::2]]
        vals = [math.nan] * len(gone) + [_finite_or_nan(v) for v in values[1::2]]
        chunk.row(t_ns, gids, vals)
        return True

    def _grouped(self, t_ns: int, values: dict[str, Any], chunk: _Chunk) -> None:
        """A gpuscope.samples/1 row: every reading of the tick, nothing carried from the row before."""
        chunk.resets.append(chunk.rows)
        self._reset_pending = False
        gids, vals = [], []
        for scope, metrics in values.items():
            if isinstance(metrics, dict):
                for metric, value in metrics.items():
                    gids.append(self._global((scope, metric)))
                    vals.append(_finite_or_nan(value))
        chunk.row(t_ns, gids, vals)

    def _plain_run(self, t_ns: list[Any], rows: list[Any], stops: list[Any], chunk: _Chunk, np: Any) -> bool:
        """Consecutive plain rows decoded as objects ({"t_ns": int, "v": [index, value, ...]}, maybe "x":
        [index, ...]) at C speed; False (nothing applied) when they need reading one at a time (an odd
        row, an index or value of another kind)."""
        counts = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        if (counts % 2).any():
            return False
        flat = list(itertools.chain.from_iterable(rows))
        if not set(map(type, flat)) <= {int, float}:  # an Unavailable, a bool, ...: one at a time
            return False
        stop_counts = np.fromiter((len(stop) if stop is not None else 0 for stop in stops), dtype=np.int64,
                                  count=len(stops))
        stopped = list(itertools.chain.from_iterable(stop for stop in stops if stop is not None))
        if not set(map(type, stopped)) <= {int}:
            return False
        try:
            numbers = np.asarray(flat, dtype=float)  # one conversion: indices are small ints, exact in a float
            stopped_at = np.asarray(stopped, dtype=float)
        except OverflowError:
            return False
        return self._plain_arrays(t_ns, counts // 2, numbers, stop_counts, stopped_at, chunk, np)

    def _index_gids(self, index: Any, np: Any) -> Any:
        """Global key ids of row indices given as floats: -1 where the table holds no such index (a number
        that is no whole number in the table's range finds no key, as dict.get finds none)."""
        nowhere = len(self._lut) - 1
        known = (index >= 0) & (index < nowhere) & (index == np.trunc(index))
        return self._lut[np.where(known, index, nowhere).astype(np.int64)]

    def _plain_arrays(self, t_ns: list[Any], pair_counts: Any, pairs: Any, stop_counts: Any, stops: Any,
                      chunk: _Chunk, np: Any) -> bool:
        """Consecutive plain rows as arrays (per row: its time, how many index/value pairs and stopped
        indices it holds; all rows' pairs and stopped indices as floats) applied at C speed; False
        (nothing applied) when the key table is not one of small non-negative ints."""
        if self._lut is None:
            table = self._table
            if not all(type(i) is int and 0 <= i < 1 << 16 for i in table):
                return False
            self._lut = np.full(max(table, default=-1) + 2, -1, dtype=np.int64)  # the last slot: no such index
            if table:
                self._lut[list(table)] = list(table.values())
        chunk.seal(np)
        values = pairs[1::2]
        chunk.gid_parts.append(self._index_gids(pairs[0::2], np))
        chunk.val_parts.append(np.where(np.isfinite(values), values, np.nan))
        if len(stops):
            rows = np.arange(chunk.rows, chunk.rows + len(t_ns), dtype=np.int64)
            chunk.stop_rows.append(np.repeat(rows, stop_counts))
            chunk.stop_gids.append(self._index_gids(stops, np))
        if self._reset_pending:
            chunk.resets.append(chunk.rows)
            self._reset_pending = False
        chunk.t_ns.append(t_ns)
        chunk.counts.append(pair_counts)
        chunk.rows += len(t_ns)
        return True

    def _one(self, obj: Any, chunk: _Chunk) -> None:
        """Any line, read on its own (as load_timeline reads it)."""
        t_ns = obj.get("t_ns") if isinstance(obj, dict) else None
        if not isinstance(t_ns, int):
            self.torn_lines += 1
            self._reset_pending = True
            return
        if "event" in obj:
            self.events.append({**obj, "t_s": (t_ns - self._t0_ns) / 1e9})
            return
        values = obj.get("v")
        if isinstance(values, dict):
            self._grouped(t_ns, values, chunk)
        elif not (isinstance(values, list) and self._row(t_ns, obj, values, chunk)):
            self.torn_lines += 1
            self._reset_pending = True

    def chunks(self, keep: KeyFilter | None = None) -> Iterator[ColumnChunk]:
        """The ticks in chunks, with the columns `keep(scope, metric)` accepts (all when None)."""
        import numpy as np

        carry: dict[int, float] = {}  # global key id -> its value at the last tick of the previous chunk
        kept: dict[int, bool] = {}
        shapes: dict[bytes, Shape] = {}  # plain_rows' verdicts on the lines' skeletons, for the whole file
        for lines in self._line_chunks():
            chunk = _Chunk()
            plain = plain_rows(lines, shapes, np, self._loads)
            if plain is None:  # numbers JSON does not read as numbers: every line as JSON reads it
                self._read_objects(_decoded(_texts(lines)), chunk, np)
            else:
                self._read_text(lines, plain, chunk, np)
            chunk.seal(np)
            if not chunk.rows:
                continue
            for gid, key in enumerate(self._keys):
                if gid not in kept:
                    kept[gid] = keep is None or bool(keep(*key))
            yield self._flush(chunk, carry, kept, np)
        self._fh.close()

    def _read_text(self, lines: list[bytes], plain: PlainRows, chunk: _Chunk, np: Any) -> None:
        """A chunk whose plain rows were read as text: runs of them applied as arrays, the other lines
        decoded and read one at a time, in the file's order."""
        pair_at = np.concatenate([[0], np.cumsum(plain.pair_counts * 2)])
        stop_at = np.concatenate([[0], np.cumsum(plain.stop_counts)])
        start = row = 0
        for end in _run_ends(plain.plain, np):
            if plain.plain[start]:
                last = row + end - start
                if not self._plain_arrays(plain.t_ns[row:last], plain.pair_counts[row:last],
                                          plain.pairs[pair_at[row]:pair_at[last]], plain.stop_counts[row:last],
                                          plain.stops[stop_at[row]:stop_at[last]], chunk, np):
                    for text in _texts(lines[start:end]):
                        self._one(_decoded_line(text), chunk)
                row = last
            else:
                for text in _texts(lines[start:end]):
                    if text.strip():
                        self._one(_decoded_line(text), chunk)
            start = end

    def _read_objects(self, objs: list[Any], chunk: _Chunk, np: Any) -> None:
        """A chunk decoded as JSON objects: runs of plain rows applied at C speed, the rest one at a time."""
        get = dict.get
        if set(map(type, objs)) == {dict}:
            n = len(objs)
            t_ns = list(map(get, objs, itertools.repeat("t_ns")))
            rows = list(map(get, objs, itertools.repeat("v")))
            stops = list(map(get, objs, itertools.repeat("x")))
            # plain: exactly {"t_ns": int, "v": list} or {"t_ns": int, "v": list, "x": list}
            sizes = np.fromiter(map(len, objs), dtype=np.int64, count=n)
            stop_list = np.fromiter(map(operator.is_, map(type, stops), itertools.repeat(list)), dtype=bool,
                                    count=n)
            plain = (sizes == 2) | ((sizes == 3) & stop_list)
            plain &= np.fromiter(map(operator.is_, map(type, rows), itertools.repeat(list)), dtype=bool, count=n)
            plain &= np.fromiter(map(operator.is_, map(type, t_ns), itertools.repeat(int)), dtype=bool, count=n)
        else:
            plain = np.zeros(len(objs), dtype=bool)
            t_ns = rows = stops = []
        start = 0
        for end in _run_ends(plain, np):
            if not (plain[start] and self._plain_run(t_ns[start:end], rows[start:end], stops[start:end], chunk, np)):
                for obj in objs[start:end]:
                    self._one(obj, chunk)
            start = end

    def _flush(self, chunk: _Chunk, carry: dict[int, float], kept: dict[int, bool], np: Any) -> ColumnChunk:
        """The chunk's changes as columns: the last change at or before each tick, unless a reset came
        after it (then NaN), else the value carried from the chunk before."""
        rows = chunk.rows
        t_list = list(itertools.chain.from_iterable(chunk.t_ns))
        try:
            t_ns = np.asarray(t_list, dtype=np.int64)
        except OverflowError:
            t_ns = np.asarray(t_list, dtype=float)
        t_s = (t_ns - self._t0_ns) / 1e9
        self.ticks += rows
        self.last_t_s = float(t_s[-1])
        columns_of = {gid: n for n, gid in enumerate(g for g, k in kept.items() if k)}
        width = len(columns_of)
        counts = np.concatenate([np.asarray(c, dtype=np.int64) for c in chunk.counts])
        row_of = np.repeat(np.arange(rows), counts)
        gid_of = np.concatenate(chunk.gid_parts) if chunk.gid_parts else np.zeros(0, dtype=np.int64)
        vals = np.concatenate(chunk.val_parts) if chunk.val_parts else np.zeros(0)
        if chunk.stop_rows:  # stopped readings first: a change in the same row comes after, and wins
            stop_rows = np.concatenate(chunk.stop_rows)
            row_of = np.concatenate([stop_rows, row_of])
            gid_of = np.concatenate([np.concatenate(chunk.stop_gids), gid_of])
            vals = np.concatenate([np.full(len(stop_rows), np.nan), vals])
        lut = np.full(len(self._keys) + 1, -1, dtype=np.int64)  # gid -1 (unknown) -> the last slot: dropped
        for gid, n in columns_of.items():
            lut[gid] = n
        col_of = lut[gid_of]
        mine = col_of >= 0
        row_of, col_of, vals = row_of[mine], col_of[mine], vals[mine]
        # the last change of each (row, column) wins, as applying them in order would leave it
        flat = row_of * max(width, 1) + col_of
        if len(flat) >= 2 and np.bincount(flat, minlength=rows * max(width, 1)).max() > 1:  # not the usual case
            _unique, last_from_end = np.unique(flat[::-1], return_index=True)
            last = len(flat) - 1 - last_from_end
            row_of, col_of, vals = row_of[last], col_of[last], vals[last]
        block = np.full((rows, width), np.nan)
        changed_at = np.full((rows, width), -1, dtype=np.int64)
        block[row_of, col_of] = vals
        changed_at[row_of, col_of] = row_of
        np.maximum.accumulate(changed_at, axis=0, out=changed_at)
        reset_at = np.full(rows, -1, dtype=np.int64)
        resets = np.asarray(chunk.resets, dtype=np.int64)
        reset_at[resets] = resets
        np.maximum.accumulate(reset_at, out=reset_at)
        gids = list(columns_of)
        # each tick: its column's last change, unless a reset came after it; before any change (or after a
        # reset, before the next change), the value carried from the chunk before, or NaN after a reset
        carried = np.array([carry.get(gid, np.nan) for gid in gids], dtype=float)
        before = np.where((reset_at >= 0)[:, None], np.nan, carried[None, :])
        changed = np.take_along_axis(block, np.maximum(changed_at, 0), axis=0)
        filled = np.where((changed_at >= 0) & (changed_at >= reset_at[:, None]), changed, before).T.copy()
        columns: dict[Key, Any] = {}
        for n, gid in enumerate(gids):
            carry[gid] = float(filled[n, -1])
            columns[self._keys[gid]] = filled[n]
        return ColumnChunk(t_s, columns)
