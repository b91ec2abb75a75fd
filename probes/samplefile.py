"""The samples file (`samples.jsonl`): streamed during a run, read back for reports.

One JSON object per line, appended and flushed as each tick is taken, so a
crash or `kill -9` loses at most the tick being written. Line kinds:
  {"schema": "gpuscope.samples/1", "started_at": ..., "t0_ns": ..., ...}   header (first line)
  {"t_ns": 123, "v": {"gpu:0": {"used_bytes": 1}, "pid:7": {...}}}           one tick, one timestamp
  {"t_ns": 123, "event": "step_start", ...}                                 events (steps, processes)
A torn last line (killed mid-write) is skipped when reading.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from gpuscope.probes.readings import Unavailable, reading_from_json, reading_to_json

SAMPLES_SCHEMA = "gpuscope.samples/1"
SUPPORTED_SAMPLE_SCHEMAS = (SAMPLES_SCHEMA,)


@dataclass(frozen=True)
class Sample:
    """One reading: when (monotonic ns), of what (`host`, `gpu:0`, `pid:1234/gpu:0`), which metric, the value."""

    t_ns: int
    scope: str
    metric: str
    value: int | float | Unavailable


class SampleWriter:
    """Appends lines to samples.jsonl. A write failure (disk full) is kept, not raised, in the sampler thread."""

    def __init__(self, path: str, header: dict[str, Any]) -> None:
        self.path = path
        self.error: OSError | None = None
        self.lines_written = 0
        self._lock = threading.Lock()
        self._fh = open(path, "a", encoding="utf-8")
        self.write({"schema": SAMPLES_SCHEMA, **header})

    def write(self, obj: dict[str, Any]) -> None:
        line = json.dumps(reading_to_json(obj), separators=(",", ":"), default=str) + "\n"
        with self._lock:
            if self.error is not None or self._fh is None:
                return
            try:
                self._fh.write(line)
                self._fh.flush()
                self.lines_written += 1
            except OSError as exc:
                self.error = exc

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


def load_timeline(path: str) -> Timeline:
    """Read a samples file into columns. Raises SamplesFileError for a foreign or newer file."""
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
    for obj, _raw in lines:
        if obj is None:
            timeline.torn_lines += 1
            continue
        t_ns = obj.get("t_ns")
        if not isinstance(t_ns, int):
            timeline.torn_lines += 1
            continue
        if "event" in obj:
            timeline.events.append({**obj, "t_s": (t_ns - t0_ns) / 1e9})
            continue
        values = obj.get("v")
        if not isinstance(values, dict):
            timeline.torn_lines += 1
            continue
        index = len(timeline.t_s)
        timeline.t_s.append((t_ns - t0_ns) / 1e9)
        for scope, metrics in values.items():
            if not isinstance(metrics, dict):
                continue
            for metric, value in metrics.items():
                column = timeline.series.get((scope, metric))
                if column is None:
                    column = timeline.series[(scope, metric)] = [None] * index
                column.append(reading_from_json(value))
        for column in timeline.series.values():
            if len(column) < index + 1:
                column.append(None)
    return timeline
