"""The sampler: one thread, a drift-free interval, one timestamp per tick shared by every probe.

Every tick's readings go to the samples file at once (bounded memory, crash
safe) and to listeners such as `PeakTracker`, which keep only running maxima,
so a 24-hour watch holds a few kilobytes in memory, not a day of samples.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any, Callable, Protocol

from gpuscope.probes.readings import ERROR, Unavailable, is_available
from gpuscope.probes.samplefile import SampleWriter, Tick
from gpuscope.probes.ticklayout import TickLayout

ScopedValue = tuple[str, str, Any]
_ABSENT = object()  # a key PeakTracker has not seen since its reset


class Probe(Protocol):
    """Reads its values at each tick. A probe that takes some readings less often than every tick
    also has `cadence_s() -> {(scope, metric): seconds}`, which the samples file declares."""

    def read(self) -> list[ScopedValue]: ...


TickListener = Callable[[int, list[ScopedValue]], None]


class PeakTracker:
    """Running max and last value per (scope, metric) since the last `reset()`; thread-safe.

    Called with every tick's readings (28 a tick on a one-GPU node, hundreds with many GPU processes).
    A reading equal to the same key's reading at the tick before (same value, same type) cannot move
    the max, the first or the last, so only the readings that changed are looked at, found by
    position where the tick keeps the previous one's layout (`TickLayout`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._max: dict[tuple[str, str], Any] = {}
        self._last: dict[tuple[str, str], Any] = {}
        self._first: dict[tuple[str, str], Any] = {}
        self._layout = TickLayout()
        self.ticks = 0

    def __call__(self, t_ns: int, values: list[ScopedValue]) -> None:
        with self._lock:
            self.ticks += 1
            changed = self._layout.changed(values)
            if changed is not None:
                self._take([values[position] for position in changed])
            else:
                self._take(values)
                self._layout.remember(values)

    def _take(self, values: list[ScopedValue]) -> None:
        maxima, last, first = self._max, self._last, self._first
        for scope, metric, value in values:
            key = (scope, metric)
            last[key] = value
            current = maxima.get(key, _ABSENT)
            if current is _ABSENT:  # the first reading since the reset (the first map and the max map
                first[key] = value  # always hold the same keys): a number, or the reason until one comes
                maxima[key] = value
                continue
            kind = type(value)
            if kind is int or kind is float or is_available(value):
                held = type(current)
                if held is int or held is float:
                    if value > current:
                        maxima[key] = value
                elif not is_available(current) or value > current:
                    maxima[key] = value

    def reset(self) -> None:
        with self._lock:
            self._max.clear()
            self._first.clear()
            self._layout.forget()  # the next tick's readings are all new to the maxima
            self.ticks = 0

    def peaks(self) -> dict[tuple[str, str], Any]:
        with self._lock:
            return dict(self._max)

    def retain(self, keep: Callable[[tuple[str, str]], bool]) -> None:
        """Forget every (scope, metric) that `keep` rejects: a day-long watch prunes the departed pids'
        scopes here (off the tick path), or its peaks would grow with every process that came and went."""
        with self._lock:
            for table in (self._max, self._last, self._first):
                for key in [k for k in table if not keep(k)]:
                    del table[key]
            self._layout.forget()  # a kept pid still listed must come back whole at the next tick, changed or not

    def last(self) -> dict[tuple[str, str], Any]:
        with self._lock:
            return dict(self._last)

    def first(self) -> dict[tuple[str, str], Any]:
        with self._lock:
            return dict(self._first)


class Sampler:
    """Runs probes every `interval_s` on a background thread (also callable synchronously)."""

    def __init__(self, probes: dict[str, Probe], interval_s: float = 0.05, writer: SampleWriter | None = None,
                 listeners: list[TickListener] | None = None, clock_ns: Callable[[], int] = time.monotonic_ns,
                 event_sources: list[Any] | None = None) -> None:
        if interval_s < 0.005:
            raise ValueError("the sampling interval must be at least 5 ms")
        self.probes = probes
        self.interval_s = interval_s
        self.writer = writer
        self.listeners = list(listeners or [])
        self._clock_ns = clock_ns
        self._event_sources = list(event_sources or [])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()
        self.ticks = 0
        self.missed_ticks = 0
        self.tick_cost_ns = 0  # wall time, including waits for the GIL held by busy predictor threads
        self.tick_cpu_ns = 0  # CPU time of the ticking thread: what sampling takes from the workload
        self.probe_cost_ns: dict[str, int] = defaultdict(int)
        self.probe_errors: dict[str, str] = {}
        if writer is not None and hasattr(writer, "cadence_s"):
            for probe in probes.values():
                cadence = getattr(probe, "cadence_s", None)
                if callable(cadence):
                    writer.cadence_s.update(cadence())

    def tick(self) -> list[ScopedValue]:
        """Take one tick now: every probe, one shared timestamp, written and dispatched."""
        with self._tick_lock:
            started = time.perf_counter_ns()
            cpu_started = time.thread_time_ns()
            t_ns = self._clock_ns()
            values: list[ScopedValue] = []
            for name, probe in self.probes.items():
                probe_started = time.perf_counter_ns()
                try:
                    values.extend(probe.read())
                except Exception as exc:  # a probe bug must not stop sampling or the workload
                    self.probe_errors[name] = f"{type(exc).__name__}: {exc}"
                    values.append((name, "probe_error", Unavailable(ERROR, self.probe_errors[name])))
                self.probe_cost_ns[name] += time.perf_counter_ns() - probe_started
            if self.writer is not None:
                self.writer.write(Tick(t_ns, values))
                for source in self._event_sources:
                    for event in source.drain_events():
                        self.writer.write({"t_ns": t_ns, **event})
            for listener in self.listeners:
                listener(t_ns, values)
            self.ticks += 1
            self.tick_cost_ns += time.perf_counter_ns() - started
            self.tick_cpu_ns += time.thread_time_ns() - cpu_started
            return values

    def mark(self, event: str, **fields: Any) -> int:
        """Write an event line (step start/end, phase) stamped with the sampler's clock."""
        t_ns = self._clock_ns()
        if self.writer is not None:
            self.writer.write({"t_ns": t_ns, "event": event, **fields})
        return t_ns

    def _run(self) -> None:
        interval_ns = int(self.interval_s * 1e9)
        clock = self._clock_ns  # the injected clock schedules as well as stamps (tests drive it)
        next_ns = clock()
        while not self._stop.is_set():
            self.tick()
            next_ns += interval_ns
            now = clock()
            if now > next_ns:  # fell behind: skip the missed ticks instead of bunching them up
                missed = (now - next_ns) // interval_ns + 1
                self.missed_ticks += int(missed)
                next_ns += int(missed) * interval_ns
            self._stop.wait((next_ns - clock()) / 1e9)

    def start(self) -> "Sampler":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="gpuscope-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.tick()  # one final reading so the end state is always on disk

    @property
    def mean_tick_cost_us(self) -> float:
        return self.tick_cost_ns / max(1, self.ticks) / 1000

    @property
    def mean_tick_cpu_us(self) -> float:
        return self.tick_cpu_ns / max(1, self.ticks) / 1000

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
