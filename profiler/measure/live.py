"""Live tracking in bounded memory: what `watch` and `profile()` keep of every tick for a day-long run."""
from __future__ import annotations

import threading
from typing import Any

from gpuscope.measure.recording import sampler_stats
from gpuscope.probes import scopes
from gpuscope.probes.readings import is_available, reading_to_json
from gpuscope.record.run import RunRecord

ScopedValue = tuple[str, str, Any]


class BoundedSeries:
    """One figure over time in bounded memory: exact first/last/peak, and a decimated trace for trends.

    Every point is kept until `max_points`; then every other point is dropped
    and only every 2nd (4th, ...) new point is kept, so the trace always spans
    the whole watch evenly.
    """

    def __init__(self, max_points: int = 2048) -> None:
        self.max_points = max(8, max_points)
        self.points: list[tuple[float, float]] = []
        self._stride = 1
        self._seen = 0
        self.first: tuple[float, float] | None = None
        self.last: tuple[float, float] | None = None
        self.peak: tuple[float, float] | None = None

    def append(self, t_s: float, value: float) -> None:
        value = float(value)
        if self.first is None:
            self.first = (t_s, value)
        self.last = (t_s, value)
        if self.peak is None or value > self.peak[1]:
            self.peak = (t_s, value)
        if self._seen % self._stride == 0:
            self.points.append((t_s, value))
            if len(self.points) >= self.max_points:
                self.points = self.points[::2]
                self._stride *= 2
        self._seen += 1

    def __len__(self) -> int:
        return self._seen

    @staticmethod
    def _median(values: list[float]) -> float:
        ordered = sorted(values)
        n = len(ordered)
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2

    def summary(self) -> dict[str, Any]:
        """first/mid/last are medians of the first, middle and last tenth (robust to one odd tick)."""
        if self.first is None or self.last is None or self.peak is None:
            return {"points": 0}
        points = list(self.points)
        if points[-1] != self.last:
            points.append(self.last)
        n = len(points)
        k = max(1, n // 10)
        values = [v for _, v in points]
        mid_at = n // 2
        mid_window = values[max(0, mid_at - k // 2): max(0, mid_at - k // 2) + k] or [values[mid_at]]
        slope = None
        if n >= 2:
            mean_t = sum(t for t, _ in points) / n
            mean_v = sum(values) / n
            var = sum((t - mean_t) ** 2 for t, _ in points)
            if var > 0:
                slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / var
        return {"first": self._median(values[:k]), "mid": self._median(mid_window), "last": self._median(values[-k:]),
                "peak": self.peak[1], "peak_t_s": round(self.peak[0], 3), "first_t_s": round(self.first[0], 3),
                "last_t_s": round(self.last[0], 3), "first_value": self.first[1], "last_value": self.last[1],
                "slope_bytes_per_s": slope, "points": self._seen}


class LiveTracker:
    """A sampler listener that follows one pid (its NVML memory per device, RSS, memory outside the allocator),
    every device's used memory, and when every other pid was first and last seen. Thread-safe.

    On a node whose jobs come and go, a day brings thousands of pids: after each tick the tracker keeps at
    most `MAX_PIDS` (pid, device) spans, forgetting first the departed ones that held the least (the
    neighbours that matter are the big ones), counting what it forgot so the record can say so."""

    MAX_PIDS = 256

    def __init__(self, pid: int, t0_ns: int, max_points: int = 2048) -> None:
        self.pid = pid
        self.t0_ns = t0_ns
        self._max_points = max_points
        self._lock = threading.Lock()
        self.ticks = 0
        self.last_t_s = 0.0
        self.rss = BoundedSeries(max_points)
        self.gpu: dict[int, BoundedSeries] = {}
        self.outside: dict[int, BoundedSeries] = {}
        self.devices: dict[int, dict[str, Any]] = {}
        self.seen: dict[tuple[int, int], list[Any]] = {}  # (pid, gpu) -> [first_t_s, last_t_s, peak_used_bytes]
        self.forgotten_count = 0
        self.forgotten_peak_used_bytes: float | None = None  # the most any forgotten pid held
        self.listed_at_start: dict[int, bool] = {}          # gpu -> was the target listed at the first read
        self.context: dict[int, dict[str, Any]] = {}        # gpu -> observed context baseline
        self.last_values: list[ScopedValue] = []

    def __call__(self, t_ns: int, values: list[ScopedValue]) -> None:
        t_s = (t_ns - self.t0_ns) / 1e9
        me = scopes.process(self.pid)
        used_now: dict[int, float] = {}
        reserved_now: dict[int, float] = {}
        listed_devices: set[int] = set()
        with self._lock:
            self.ticks += 1
            self.last_t_s = t_s
            self.last_values = values
            for scope, metric, value in values:
                if scope == me:
                    if metric == "rss_bytes" and is_available(value):
                        self.rss.append(t_s, value)
                    continue
                parsed = scopes.parse(scope)
                if parsed.is_device:
                    index = parsed.gpu
                    device = self.devices.setdefault(index, {"index": index})
                    if metric == "used_bytes" and is_available(value):
                        device["last_used_bytes"] = value
                        if value > device.get("peak_used_bytes", -1):
                            device["peak_used_bytes"], device["peak_t_s"] = value, round(t_s, 3)
                    elif metric == "total_bytes" and is_available(value):
                        device["total_bytes"] = value
                    elif metric == "process_count":
                        if is_available(value):
                            listed_devices.add(index)
                elif parsed.is_process_on_device:
                    pid, index = parsed.pid, parsed.gpu
                    if metric == "used_bytes":
                        span = self.seen.get((pid, index))
                        if span is None:
                            span = self.seen[(pid, index)] = [t_s, t_s, None]
                        span[1] = t_s
                        if is_available(value) and (span[2] is None or value > span[2]):
                            span[2] = value
                        if pid == self.pid and is_available(value):
                            used_now[index] = value
                    elif metric == "torch_reserved_bytes" and pid == self.pid and is_available(value):
                        reserved_now[index] = value
            while len(self.seen) > self.MAX_PIDS and self._forget_one(t_s):
                pass  # after the whole tick: a pid later in it is not taken for departed
            for index in listed_devices:
                if index not in self.listed_at_start:
                    self.listed_at_start[index] = index in used_now
            for index, used in used_now.items():
                self.gpu.setdefault(index, BoundedSeries(self._max_points)).append(t_s, used)
                if index not in self.context and self.listed_at_start.get(index) is False:
                    self.context[index] = {"bytes": used, "source": "observed", "t_s": round(t_s, 3),
                                           "detail": "the process's first NVML reading on this device"}
                if index in reserved_now:
                    self.outside.setdefault(index, BoundedSeries(self._max_points)).append(
                        t_s, max(0.0, used - reserved_now[index]))

    def _forget_one(self, now_s: float) -> bool:
        """Drop, after a tick at `now_s`, the departed span (not in that tick) that held the least; when
        every one is still listed, the one that held the least of those, never the target's. A span first
        seen in this very tick and dropped at once was never kept: it is not counted as forgotten."""
        def held(key: tuple[int, int]) -> float:
            peak = self.seen[key][2]
            return peak if peak is not None else -1.0

        others = [k for k in self.seen if k[0] != self.pid]
        departed = [k for k in others if self.seen[k][1] < now_s]
        victim = min(departed or others, key=held, default=None)
        if victim is None:
            return False
        first_s, _last_s, peak = self.seen.pop(victim)
        if first_s < now_s:
            self.forgotten_count += 1
            if peak is not None and (self.forgotten_peak_used_bytes is None or peak > self.forgotten_peak_used_bytes):
                self.forgotten_peak_used_bytes = peak
        return True

    def forgotten(self) -> dict[str, Any]:
        """How many (pid, device) spans the bound made the tracker forget, and the most one of them held."""
        with self._lock:
            return {"count": self.forgotten_count, "largest_peak_used_bytes": self.forgotten_peak_used_bytes}

    def main_gpu(self) -> int | None:
        """The device where the target held the most memory (None: it never appeared on a GPU)."""
        with self._lock:
            peaks = {i: s.peak[1] for i, s in self.gpu.items() if s.peak is not None}
        return max(peaks, key=lambda i: (peaks[i], -i)) if peaks else None

    def current_gpu_bytes(self) -> dict[int, float]:
        with self._lock:
            return {i: s.last[1] for i, s in self.gpu.items() if s.last is not None and s.last[0] == self.last_t_s}

    def pid_spans(self) -> dict[tuple[int, int], list[float]]:
        """(pid, device) -> [first_t_s, last_t_s] of every span still kept."""
        with self._lock:
            return {k: v[:2] for k, v in self.seen.items()}

    def summary(self, mode: str = "watch") -> dict[str, Any]:
        """What the live rules read (`record.extra["live"]`, see profiler/analysis/live_rules.py)."""
        gpu_index = self.main_gpu()
        with self._lock:
            series: dict[str, Any] = {}
            if len(self.rss):
                series["rss_bytes"] = self.rss.summary()
            if gpu_index is not None:
                series["process_gpu_bytes"] = self.gpu[gpu_index].summary()
                if gpu_index in self.outside and len(self.outside[gpu_index]):
                    series["outside_allocator_bytes"] = self.outside[gpu_index].summary()
            context: dict[str, Any] = {}
            if gpu_index is not None:
                if gpu_index in self.outside and len(self.outside[gpu_index]):
                    outside = self.outside[gpu_index].summary()
                    context = {"bytes": outside["first_value"], "source": "allocator",
                               "detail": "NVML per-process used - torch reserved at the first reading"}
                elif gpu_index in self.context:
                    context = dict(self.context[gpu_index])
                else:
                    from gpuscope.analysis.live_rules import REFERENCE_CONTEXT_BYTES

                    context = {"bytes": REFERENCE_CONTEXT_BYTES, "source": "reference",
                               "detail": "the process already held GPU memory when sampling began; reference "
                                         "figure from an H200 with CUDA 13 and lazy module loading"}
            devices = [dict(d) for _, d in sorted(self.devices.items())]
            return {"target_pid": self.pid, "gpu_index": gpu_index, "mode": mode, "ticks": self.ticks,
                    "duration_s": round(self.last_t_s, 3), "series": series, "devices": devices, "context": context}


class ForgetDepartedPeaks:
    """A tick listener (after the LiveTracker) that, every `every_ticks` ticks, drops from the run's
    PeakTracker the per-process scopes of the pids the tracker no longer keeps, so the peaks stay within
    the tracker's bound however many processes come and go. Amortised: one pass over the peaks' keys
    every 256 ticks, not a lookup per reading on every tick."""

    def __init__(self, peaks: Any, tracker: LiveTracker, every_ticks: int = 256) -> None:
        self._peaks = peaks
        self._tracker = tracker
        self._every_ticks = max(1, every_ticks)
        self._ticks = 0

    def __call__(self, t_ns: int, values: list[ScopedValue]) -> None:
        self._ticks += 1
        if self._ticks % self._every_ticks == 0:
            self.prune()

    def prune(self) -> None:
        kept = set(self._tracker.pid_spans())

        def keep(key: tuple[str, str]) -> bool:
            parsed = scopes.parse(key[0])
            return not parsed.is_process_on_device or (parsed.pid, parsed.gpu) in kept

        self._peaks.retain(keep)


def process_alive(proc: Any) -> bool:
    """A psutil.Process that still runs (a zombie has exited; a reused pid is another process)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def children_of(pid: int) -> set[int]:
    import psutil

    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def live_processes(target_pid: int, target_info: Any, described: dict[int, Any], peaks: dict[tuple[str, str], Any],
                   spans: dict[tuple[int, int], list[float]], children: set[int], end_t_s: float,
                   interval_s: float) -> list[dict[str, Any]]:
    """record.processes for a live session: one entry per (pid, device) NVML listed, plus the target itself.

    `described`: pid -> ProcessInfo (GpuProbe.processes); `peaks`: PeakTracker.peaks(); `spans`: pid/gpu first
    and last seen (LiveTracker.pid_spans()).
    """
    entries: list[dict[str, Any]] = []
    listed_target = False
    for (pid, gpu), (first_s, last_s) in sorted(spans.items()):
        info = target_info if pid == target_pid and target_info is not None else described.get(pid)
        # not described (evicted from a long watch's bounded cache): unknown, not "outside this namespace"
        entry = info.to_json() if info is not None else {"pid": pid, "exists": None, "name": "?"}
        scope = scopes.process_on_device(pid, gpu)
        entry.update({
            "self": pid == target_pid or pid in children, "child": pid in children, "gpu": gpu,
            "peak_used_bytes": peaks.get((scope, "used_bytes")), "peak_sm_util_pct": peaks.get((scope, "sm_util_pct")),
            "first_seen_s": round(first_s, 3), "last_seen_s": round(last_s, 3),
            "gone": last_s < end_t_s - max(interval_s, 1e-9) / 2,
        })
        listed_target = listed_target or pid == target_pid
        entries.append(reading_to_json(entry))
    if not listed_target and target_info is not None:
        entry = target_info.to_json()
        entry.update({"self": True, "child": False, "gpu": None, "peak_used_bytes": None, "peak_sm_util_pct": None})
        entries.append(reading_to_json(entry))

    def order(p: dict[str, Any]) -> tuple:
        used = p.get("peak_used_bytes")
        return (not p.get("self"), p.get("gpu") if isinstance(p.get("gpu"), int) else -1,
                -(used if isinstance(used, (int, float)) else 0), p.get("pid", 0))

    return sorted(entries, key=order)


MAX_DEPARTED_LISTED = 32


def list_departed_within_bound(entries: list[dict[str, Any]], forgotten: dict[str, Any],
                               keep: int = MAX_DEPARTED_LISTED) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """record.processes with at most `keep` departed neighbours (the ones that held the most), and what was
    left out: a day-long watch on a busy node sees thousands of short jobs, and a run.json rewritten every
    minute must not list them all. Present processes and the target's own are always listed.

    Returns the entries kept (in their order) and {"listed", "not_listed", "largest_not_listed_peak_used_bytes"},
    counting the spans the tracker itself forgot (`LiveTracker.forgotten()`)."""
    def held(p: dict[str, Any]) -> float:
        used = p.get("peak_used_bytes")
        return used if isinstance(used, (int, float)) and not isinstance(used, bool) else -1.0

    departed = [p for p in entries if p.get("gone") and not p.get("self")]
    kept_departed = {id(p) for p in sorted(departed, key=lambda p: (-held(p), p.get("pid", 0)))[:keep]}
    dropped = [p for p in departed if id(p) not in kept_departed]
    largest = max([held(p) for p in dropped if held(p) >= 0]
                  + ([forgotten["largest_peak_used_bytes"]] if forgotten.get("largest_peak_used_bytes") is not None
                     else []), default=None)
    summary = {"listed": len(kept_departed), "not_listed": len(dropped) + int(forgotten.get("count") or 0),
               "largest_not_listed_peak_used_bytes": largest}
    kept = [p for p in entries if not (p.get("gone") and not p.get("self")) or id(p) in kept_departed]
    return kept, summary


def merge_gaps(trackers: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """measurement_gaps and pid_namespace evidence over one GapTracker per device."""
    gaps: dict[str, Any] = {}
    evidence = {"unlisted_used_bytes": 0, "self_not_listed": False, "self_not_listed_ticks": 0}
    for tracker in trackers:
        gaps.update(tracker.gaps)
        ev = tracker.evidence()
        evidence["unlisted_used_bytes"] = max(evidence["unlisted_used_bytes"], ev.get("unlisted_used_bytes") or 0)
        evidence["self_not_listed"] = evidence["self_not_listed"] or bool(ev.get("self_not_listed"))
        evidence["self_not_listed_ticks"] += int(ev.get("self_not_listed_ticks") or 0)
    return gaps, evidence


def complete_live_record(record: RunRecord, live: dict[str, Any], gap_trackers: list[Any], sampler: Any,
                         no_sweep_reason: str) -> None:
    """What a watch and an in-process profile add alike once their samples are in: gaps, sampler costs,
    no sweep, and the findings that apply from the samples alone. A profile that saw marked requests
    (observed steps) gets the pool size from its own traffic; one with registered models keeps the sharing
    its threads showed (record.sharing, set before this)."""
    from gpuscope.analysis.live_rules import live_findings
    from gpuscope.analysis.live_traffic import traffic_recommendation

    gaps, evidence = merge_gaps(gap_trackers)
    record.extra.update({"live": live, "measurement_gaps": gaps, "pid_namespace": evidence,
                         "context_baseline": live.get("context")})
    record.sampler = sampler_stats(sampler)
    record.sharing = record.sharing if isinstance(record.sharing, dict) else {}
    if record.steps:
        record.recommendation = traffic_recommendation(record)
    else:
        record.recommendation = {"predictors": None, "reason": f"{no_sweep_reason}; no predictor sweep was run "
                                                               "(gpuscope diagnose recommends a count; mark requests "
                                                               "with gpuscope.request for the pool size from "
                                                               "live traffic)"}
    record.findings = live_findings(record)
