"""`gpuscope watch --pid PID`: sample a running process from outside and write the usual report folder.

What a watch can see from outside: NVML's per-process memory and SM utilisation
on every device, the device totals, the process's RSS/CPU/threads (psutil), the
engines in its /proc/PID/maps and their memory variables, and every other
process on the same devices. It cannot see inside the process's allocator;
`profiler.profile()` (profiler/inprocess.py) can, and shares the machinery
here: `LiveTracker` (bounded per-tick summaries), `live_processes()` and
`format_live_summary()`.

The loop is synchronous and its clock and wait are injectable, so tests drive
a ScriptedNvml tick by tick. Memory stays bounded for a 24-hour watch: samples
stream to disk, and the tracker keeps decimated series of at most a few
thousand points.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from probes.readings import is_available, reading_to_json
from probes.units import format_bytes
from profiler.errors import EXIT_OK, EXIT_SIGTERM, EXIT_USAGE, OutputError, UsageError
from probes.redact import printable as _printable
from profiler.run import STATUS_COMPLETE, STATUS_FAILED, STATUS_INTERRUPTED, STATUS_RUNNING, RunRecord

ScopedValue = tuple[str, str, Any]

ENDED_BY_DURATION = "duration"
ENDED_BY_EXIT = "process_exit"
ENDED_BY_INTERRUPT = "interrupt"
ENDED_BY_SIGTERM = "sigterm"


# ---------------------------------------------------------------- bounded per-tick summaries

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
    every device's used memory, and when every other pid was first and last seen. Thread-safe."""

    MAX_PIDS = 2048

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
        self.seen: dict[tuple[int, int], list[float]] = {}  # (pid, gpu) -> [first_t_s, last_t_s]
        self.listed_at_start: dict[int, bool] = {}          # gpu -> was the target listed at the first read
        self.context: dict[int, dict[str, Any]] = {}        # gpu -> observed context baseline
        self.last_values: list[ScopedValue] = []

    def __call__(self, t_ns: int, values: list[ScopedValue]) -> None:
        t_s = (t_ns - self.t0_ns) / 1e9
        me, prefix = f"pid:{self.pid}", f"pid:{self.pid}/gpu:"
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
                elif scope.startswith("gpu:"):
                    index = _int(scope[4:])
                    if index is None:
                        continue
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
                elif scope.startswith("pid:") and "/gpu:" in scope:
                    pid_text, _, gpu_text = scope[4:].partition("/gpu:")
                    pid, index = _int(pid_text), _int(gpu_text)
                    if pid is None or index is None:
                        continue
                    if metric == "used_bytes":
                        span = self.seen.get((pid, index))
                        if span is None:
                            if len(self.seen) >= self.MAX_PIDS:  # churning pids over a day: forget the stalest
                                del self.seen[min(self.seen, key=lambda k: self.seen[k][1])]
                            span = self.seen[(pid, index)] = [t_s, t_s]
                        span[1] = t_s
                        if scope.startswith(prefix) and is_available(value):
                            used_now[index] = value
                    elif metric == "torch_reserved_bytes" and scope.startswith(prefix) and is_available(value):
                        reserved_now[index] = value
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

    def main_gpu(self) -> int | None:
        """The device where the target held the most memory (None: it never appeared on a GPU)."""
        with self._lock:
            peaks = {i: s.peak[1] for i, s in self.gpu.items() if s.peak is not None}
        return max(peaks, key=lambda i: (peaks[i], -i)) if peaks else None

    def current_gpu_bytes(self) -> dict[int, float]:
        with self._lock:
            return {i: s.last[1] for i, s in self.gpu.items() if s.last is not None and s.last[0] == self.last_t_s}

    def pid_spans(self) -> dict[tuple[int, int], list[float]]:
        with self._lock:
            return {k: list(v) for k, v in self.seen.items()}

    def summary(self, mode: str = "watch") -> dict[str, Any]:
        """What the live rules read (`record.extra["live"]`, see profiler/watch_findings.py)."""
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
                    from profiler.watch_findings import REFERENCE_CONTEXT_BYTES

                    context = {"bytes": REFERENCE_CONTEXT_BYTES, "source": "reference",
                               "detail": "the process already held GPU memory when sampling began; reference "
                                         "figure from an H200 with CUDA 13 and lazy module loading"}
            devices = [dict(d) for _, d in sorted(self.devices.items())]
            return {"target_pid": self.pid, "gpu_index": gpu_index, "mode": mode, "ticks": self.ticks,
                    "duration_s": round(self.last_t_s, 3), "series": series, "devices": devices, "context": context}


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


# ---------------------------------------------------------------- shared helpers for live records

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
        scope = f"pid:{pid}/gpu:{gpu}"
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
    no sweep (so no sharing or recommendation), and the findings that apply from the samples alone."""
    from profiler.watch_findings import live_findings

    gaps, evidence = merge_gaps(gap_trackers)
    record.extra.update({"live": live, "measurement_gaps": gaps, "pid_namespace": evidence,
                         "context_baseline": live.get("context")})
    record.sampler = sampler_stats(sampler)
    record.sharing = {}
    record.recommendation = {"predictors": None, "reason": f"{no_sweep_reason}; no predictor sweep was run "
                                                           "(gpuscope diagnose recommends a count)"}
    record.findings = live_findings(record)


def sampler_stats(sampler: Any) -> dict[str, Any]:
    return {"interval_s": sampler.interval_s, "ticks": sampler.ticks, "missed_ticks": sampler.missed_ticks,
            "mean_tick_cost_us": round(sampler.mean_tick_cost_us, 1),
            "mean_tick_cpu_us": round(getattr(sampler, "mean_tick_cpu_us", 0.0), 1),
            "probe_cost_us": {k: round(v / max(1, sampler.ticks) / 1000, 1) for k, v in sampler.probe_cost_ns.items()},
            "probe_errors": dict(sampler.probe_errors)}


def _mem(value: Any) -> str:
    return format_bytes(value) if is_available(value) else "n/a"


def format_live_summary(record: RunRecord) -> str:
    """The terminal summary of a watch or an in-process profile."""
    from probes.redact import redact_text
    from profiler.summary import format_findings

    live = record.extra.get("live") or {}
    series = live.get("series") or {}
    target = next((p for p in record.processes if p.get("pid") == record.pid), {})
    name = redact_text(str(target.get("name") or record.model.get("source") or "?"))
    what = "profiled this process" if record.mode == "profile" else f"watched pid {record.pid}"
    lines = [f"gpuscope {record.tool_version}: {what} ({_printable(name)}) for {live.get('duration_s', 0):.1f} s, "
             f"{live.get('ticks', 0)} samples  [{record.status}; ended by {record.config.get('ended_by', '?')}]"]
    if record.device_unavailable and live.get("gpu_index") is None:
        lines.append(f"GPU readings: unavailable ({record.device_unavailable.get('reason')}: "
                     f"{record.device_unavailable.get('detail')})")
    gpu = series.get("process_gpu_bytes")
    if gpu:
        lines.append(f"GPU memory on gpu:{live.get('gpu_index')}: {_mem(gpu.get('first_value'))} -> "
                     f"{_mem(gpu.get('last_value'))} (peak {_mem(gpu.get('peak'))})")
    elif live.get("gpu_index") is None and not record.device_unavailable:
        lines.append("GPU memory: the process did not appear on any GPU")
    rss = series.get("rss_bytes")
    if rss:
        lines.append(f"resident memory (RSS): {_mem(rss.get('first_value'))} -> {_mem(rss.get('last_value'))} "
                     f"(peak {_mem(rss.get('peak'))})")
    others = [p for p in record.processes if not p.get("self") and p.get("gpu") == live.get("gpu_index")
              and live.get("gpu_index") is not None]
    if others:
        lines.append(f"other processes on gpu:{live.get('gpu_index')}: " + ", ".join(
            f"pid {p.get('pid')} {_printable(str(p.get('name', '?')))} ({_mem(p.get('peak_used_bytes'))})"
            for p in others[:5]))
    lines.append("")
    lines += format_findings(record.findings)
    return "\n".join(lines)


# ---------------------------------------------------------------- the watch session

@dataclass(frozen=True)
class WatchOptions:
    pid: int
    interval: str = "1s"
    duration: str = "10m"
    out: str = "gpuscope-report"
    report: bool = True
    quiet: bool = False
    prometheus_port: int | None = None
    bind: str = "127.0.0.1"


def validate_port(port: int | None, option: str = "--prometheus-port") -> int | None:
    if port is None:
        return None
    if not 0 <= int(port) <= 65535:
        raise UsageError(f"{option} {port}: not a TCP port (0-65535)")
    return int(port)


def open_target(pid: int) -> Any:
    """The psutil.Process to watch, or UsageError saying why not."""
    import psutil

    if pid <= 0:
        raise UsageError(f"--pid {pid}: not a process id")
    try:
        proc = psutil.Process(pid)
        alive = process_alive(proc)
    except psutil.NoSuchProcess:
        raise UsageError(f"--pid {pid}: no such process in this pid namespace") from None
    except psutil.AccessDenied as exc:
        raise UsageError(f"--pid {pid}: not allowed to read this process ({exc})") from None
    if not alive:
        raise UsageError(f"--pid {pid}: the process has already exited")
    return proc


class WatchSession:
    """One watch: probes, a synchronous sampling loop, provisional findings for the exporter, the final record."""

    FINDINGS_EVERY_S = 5.0
    SAVE_EVERY_S = 30.0
    DESCRIBE_TARGET_EVERY_S = 10.0

    def __init__(self, opts: WatchOptions, nvml_opener: Callable[[], tuple[Any, dict[str, str] | None]] | None = None,
                 describe: Callable[[int, str], Any] | None = None, pid_exists: Callable[[int], bool] | None = None,
                 progress: Any = None, clock: Callable[[], float] = time.monotonic,
                 wait: Callable[[float], Any] | None = None, stop: threading.Event | None = None,
                 handle_signals: bool = True) -> None:
        from profiler.options import parse_seconds
        from profiler.session import Progress, open_nvml

        self.opts = opts
        self.interval_s = parse_seconds("--interval", opts.interval, 0.005)
        self.duration_s = parse_seconds("--duration", opts.duration, 0.0)
        if not self.duration_s or self.duration_s <= 0:
            raise UsageError(f"--duration {opts.duration!r}: must be longer than 0 s")
        self.port = validate_port(opts.prometheus_port)
        self.proc = open_target(int(opts.pid))
        self.pid = int(opts.pid)
        self._nvml_opener = nvml_opener or open_nvml
        self._describe = describe
        self._pid_exists = pid_exists
        self.progress = progress or Progress(opts.quiet)
        self._clock = clock
        self.stop = stop or threading.Event()
        self._wait = wait or self.stop.wait
        self._handle_signals = handle_signals
        self.view: Any = None          # the exporter's LiveView, replaced after every tick
        self.findings: list[Any] = []  # provisional findings (exporter), final ones after finish()
        self.exporter: Any = None
        self.ended_by = ENDED_BY_DURATION

    # -- set-up
    def _describe_pid(self, pid: int, name: str = "") -> Any:
        if self._describe is not None:
            return self._describe(pid, name)
        from probes.processes import describe_process

        return describe_process(pid, name)

    def _setup(self) -> None:
        from probes.gpu import GpuProbe
        from probes.host import HostProbe, host_info, read_rss_uss_bytes
        from probes.sampler import PeakTracker, Sampler
        from probes.samplefile import SampleWriter
        from profiler import __version__
        from profiler.attribution import GapTracker
        from profiler.session import SAMPLES_FILE, now_iso, prepare_out_dir

        if self.port is not None:
            from profiler.exporter import start_exporter

            self.exporter = start_exporter(lambda: self.view, self.port, self.opts.bind)
        try:
            self.out_dir = prepare_out_dir(self.opts.out)
        except BaseException:
            self._close_exporter()
            raise
        self.nvml, self.device_unavailable = self._nvml_opener()
        self.record = RunRecord(tool_version=__version__, started_at=now_iso(), host=host_info(), pid=self.pid,
                                mode="watch")
        self.record.device_unavailable = self.device_unavailable
        self.gpu_probe = None
        if self.nvml is not None:
            self.gpu_probe = GpuProbe(self.nvml, describe=self._describe, pid_exists=self._pid_exists)
            self.record.devices = [d.to_json() for d in self.gpu_probe.devices]
        self.target_info = self._describe_pid(self.pid)
        self._target_described_at = self._clock()
        self.children = children_of(self.pid)
        # USS needs /proc/PID/smaps_rollup (ptrace access); without it, RSS alone rather than no readings at all.
        uss_every = 2.0 if read_rss_uss_bytes(self.pid) is not None else None
        try:
            host = HostProbe(self.pid, uss_every_s=uss_every, clock_s=self._clock)
        except Exception as exc:
            raise UsageError(f"--pid {self.pid}: cannot read the process ({exc})") from None
        probes: dict[str, Any] = {"host": host}
        if self.gpu_probe is not None:
            probes["gpu"] = self.gpu_probe
        self.t0_ns = int(self._clock() * 1e9)
        self.peaks = PeakTracker()
        self.tracker = LiveTracker(self.pid, self.t0_ns)
        count = self.gpu_probe.device_count if self.gpu_probe is not None else 0
        self.gaps = [GapTracker(self.pid, index) for index in range(count)]
        self.writer = SampleWriter(os.path.join(self.out_dir, SAMPLES_FILE),
                                   {"started_at": self.record.started_at, "t0_ns": self.t0_ns,
                                    "interval_s": self.interval_s, "pid": self.pid, "mode": "watch",
                                    "target": self.target_info.to_json()})
        self.sampler = Sampler(probes, self.interval_s, self.writer, [self.peaks, self.tracker, *self.gaps],
                               clock_ns=lambda: int(self._clock() * 1e9),
                               event_sources=[self.gpu_probe] if self.gpu_probe is not None else [])
        self.record.config = {"target_pid": self.pid, "device": "cpu", "gpu_index": None,
                              "interval_s": self.interval_s, "duration_s": self.duration_s, "out": self.out_dir,
                              "device_index_space": "nvml", "prometheus_port": self.port,
                              "bind": self.opts.bind if self.port is not None else None, "argv": sys.argv[1:]}
        self._save_progress()

    # -- the loop
    def _status_line(self, values: list[ScopedValue], elapsed_s: float) -> str:
        me = f"pid:{self.pid}"
        figures = {(s, m): v for s, m, v in values}
        parts = [f"watch pid {self.pid} ({_printable(self.target_info.name)[:24]})",
                 f"{elapsed_s:6.1f}/{self.duration_s:g} s"]
        gpu_now = self.tracker.current_gpu_bytes()
        for index, used in sorted(gpu_now.items()):
            util = figures.get((f"pid:{self.pid}/gpu:{index}", "sm_util_pct"))
            parts.append(f"gpu:{index} {format_bytes(used)}" + (f" sm {util}%" if is_available(util) else ""))
        if not gpu_now and self.gpu_probe is not None:
            parts.append("not on a GPU")
        parts.append(f"RSS {_mem(figures.get((me, 'rss_bytes')))}")
        cpu = figures.get((me, "cpu_util_pct"))
        if is_available(cpu):
            parts.append(f"CPU {cpu:.0f}%")
        threads = figures.get((me, "num_threads"))
        if is_available(threads):
            parts.append(f"{threads} threads")
        others = 0
        for index in gpu_now:
            suffix = f"/gpu:{index}"
            others += sum(1 for (s, m), v in figures.items() if m == "used_bytes" and s.endswith(suffix)
                          and s.startswith("pid:") and not s.startswith(f"{me}/") and int(s[4:-len(suffix)]) not in self.children)
        if others:
            parts.append(f"{others} other process{'es' if others != 1 else ''} on its GPU")
        engines = self.target_info.engines
        if isinstance(engines, tuple) and engines:
            parts.append("engines " + ",".join(engines))
        if self.findings:
            worst = [f for f in self.findings if f.severity in ("warn", "fail")]
            if worst:
                parts.append("findings " + ",".join(sorted({f.code for f in worst})))
        return "  ".join(parts)

    def _refresh_target(self, now: float) -> None:
        if now - self._target_described_at < self.DESCRIBE_TARGET_EVERY_S:
            return
        self._target_described_at = now
        if process_alive(self.proc):
            self.target_info = self._describe_pid(self.pid, self.target_info.name)
            self.children |= children_of(self.pid)

    def _after_tick(self, values: list[ScopedValue], now: float) -> None:
        self._refresh_target(now)
        if now - self._findings_at >= self.FINDINGS_EVERY_S:
            self._findings_at = now
            self.findings = self.build_record(final=False).findings
        if self.port is not None:
            from profiler.exporter import LiveView, nvml_answered

            described = dict(self.gpu_probe.processes) if self.gpu_probe is not None else {}
            described[self.pid] = self.target_info
            self.view = LiveView(devices=list(self.record.devices), values=values, processes=described,
                                 findings=list(self.findings), target_pid=self.pid,
                                 nvml_available=self.gpu_probe is not None and nvml_answered(values),
                                 device_unavailable=self.device_unavailable,
                                 children=set(self.children))
        # run.json is what a kill -9 leaves: written soon after the start (1 s, then at half the time
        # watched so far, so 1, 2, 3, 4.5, ... s) and every SAVE_EVERY_S once the watch is long.
        if now - self._saved_at >= min(self.SAVE_EVERY_S, max(1.0, (now - self._started_at) / 2)):
            self._saved_at = now
            self.findings = self.build_record(final=False).findings  # the record as it stands now
            self._save_progress()

    def _loop(self) -> None:
        start = self._clock()
        deadline = start + self.duration_s - 1e-6  # a float clock must not add a tick past the end
        tick_index = 0
        self._findings_at = start
        self._saved_at = start
        self._started_at = start
        while True:
            values = self.sampler.tick()
            now = self._clock()
            if not process_alive(self.proc):
                self.ended_by = ENDED_BY_EXIT
                return
            self.progress.update(self._status_line(values, now - start))
            self._after_tick(values, now)
            if self.stop.is_set() or now >= deadline:
                return
            tick_index += 1
            next_tick = start + tick_index * self.interval_s  # drift-free: no accumulated error
            if next_tick <= now:  # fell behind: skip the missed ticks rather than bunching them up
                missed = int((now - next_tick) // self.interval_s) + 1
                self.sampler.missed_ticks += missed
                tick_index += missed
                next_tick = start + tick_index * self.interval_s
            self._wait(max(0.0, min(next_tick, start + self.duration_s) - now))
            if self.stop.is_set():  # Ctrl-C during the wait: one last reading of the moment it ended
                if process_alive(self.proc):
                    self.sampler.tick()
                return

    # -- the record
    def build_record(self, final: bool) -> RunRecord:
        from profiler.session import now_iso

        record = self.record
        live = self.tracker.summary("watch")
        gpu_index = live.get("gpu_index")
        record.config.update({"device": f"cuda:{gpu_index}" if gpu_index is not None else "cpu",
                              "gpu_index": gpu_index, "ended_by": self.ended_by})
        name = _printable(self.target_info.name)
        record.model = {"source": f"pid {self.pid} ({name})", "target": self.target_info.to_json()}
        env = self.target_info.memory_env
        record.environment = {"gpuscope": record.tool_version,
                              "python": sys.version.split()[0],
                              "memory_env": env if isinstance(env, dict) else reading_to_json(env),
                              "target_engines": reading_to_json(list(self.target_info.engines)
                                                                if isinstance(self.target_info.engines, tuple)
                                                                else self.target_info.engines)}
        if self.gpu_probe is not None and self.gpu_probe.devices:
            record.environment["driver"] = self.gpu_probe.devices[0].driver
        described = dict(self.gpu_probe.processes) if self.gpu_probe is not None else {}
        record.processes = live_processes(self.pid, self.target_info, described, self.peaks.peaks(),
                                          self.tracker.pid_spans(), self.children, live.get("duration_s", 0.0),
                                          self.interval_s)
        first_rss = (live.get("series", {}).get("rss_bytes") or {}).get("first_value")
        record.baseline = {"rss_at_start_bytes": first_rss,
                           "process_gpu_bytes_at_start": (live.get("series", {}).get("process_gpu_bytes") or {}).get("first_value")}
        if final:
            record.ended_at = now_iso()
        complete_live_record(record, live, self.gaps, self.sampler,
                             f"a live process was watched for {live.get('duration_s', 0):.0f} s")
        return record

    def _save_progress(self) -> None:
        from profiler.run import save_run
        from profiler.session import RUN_FILE

        try:
            save_run(self.record, os.path.join(self.out_dir, RUN_FILE))
        except OSError:
            pass

    def _close_exporter(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None

    def run(self) -> Any:
        from profiler.run import save_run
        from profiler.session import RUN_FILE, Interrupts, SessionResult, render

        self._setup()
        if self.exporter is not None:
            self.progress.line(f"serving Prometheus metrics on {self.exporter.url}")
        self.record.status = STATUS_RUNNING
        crash: BaseException | None = None
        interrupts = Interrupts(self.stop) if self._handle_signals else None
        try:
            if interrupts is not None:
                interrupts.__enter__()
            try:
                self._loop()
            except KeyboardInterrupt:
                self.stop.set()
            except BaseException as exc:  # keep what was measured, then report the crash
                crash = exc
        finally:
            if interrupts is not None:
                interrupts.__exit__(None, None, None)
            self.writer.close()
        signum = interrupts.signum if interrupts is not None else None
        if self.stop.is_set() and self.ended_by == ENDED_BY_DURATION:
            self.ended_by = ENDED_BY_SIGTERM if signum == signal.SIGTERM else ENDED_BY_INTERRUPT
        record = self.build_record(final=True)
        self.findings = record.findings
        if crash is not None:
            record.status, record.failure = STATUS_FAILED, f"{type(crash).__name__}: {crash}"
        elif self.ended_by == ENDED_BY_SIGTERM:
            record.status = STATUS_INTERRUPTED
        else:
            record.status = STATUS_COMPLETE  # Ctrl-C is the ordinary way to end a watch
        if getattr(self.progress, "tty", False) and not getattr(self.progress, "quiet", False):
            self.progress.stream.write("\r\033[K")  # clear the live status line
            self.progress.stream.flush()
        exit_code = EXIT_SIGTERM if self.ended_by == ENDED_BY_SIGTERM else EXIT_OK
        if self.writer.error is not None:
            self.progress.line(f"gpuscope: writing samples failed: {self.writer.error.strerror or self.writer.error} "
                               f"({self.writer.lines_written} lines kept in {self.writer.path})")
            record.failure = record.failure or f"samples file: {self.writer.error}"
            exit_code = EXIT_USAGE
        run_path = os.path.join(self.out_dir, RUN_FILE)
        try:
            save_run(record, run_path)
        except OSError as exc:
            self._close_exporter()
            raise OutputError(f"cannot write {run_path}: {exc.strerror or exc} (samples kept in {self.writer.path})") from None
        if self.port is not None:  # the last view carries the final findings until the exporter closes
            self._after_tick(self.tracker.last_values, self._clock())
        self._close_exporter()
        if self.nvml is not None:
            try:
                self.nvml.shutdown()
            except Exception:
                pass
        paths = None
        if self.opts.report:
            paths = render(record, self.out_dir, self.progress)
            if paths is None:
                exit_code = exit_code or EXIT_USAGE
        if crash is not None:
            raise crash
        return SessionResult(record, exit_code, self.out_dir, paths)


def run_watch(opts: WatchOptions, **kwargs: Any) -> Any:
    """Watch a process until the duration ends, it exits, or Ctrl-C. Returns profiler.session.SessionResult.

    kwargs (for tests and embedding): nvml_opener() -> (backend | None, unavailable | None), describe(pid, name),
    pid_exists(pid), progress, clock() -> seconds, wait(seconds), stop (threading.Event), handle_signals.
    Bad input raises UsageError / OutputError before anything is sampled.
    """
    return WatchSession(opts, **kwargs).run()


def watch_command(pid: int, interval: str, duration: str, out: str, prometheus_port: int | None, bind: str,
                  quiet: bool, json_output: bool = False) -> int:
    """What `gpuscope watch` runs: the session, then the summary on stdout. Returns the exit code."""
    import json

    result = run_watch(WatchOptions(pid=pid, interval=interval, duration=duration, out=out, quiet=quiet,
                                    prometheus_port=prometheus_port, bind=bind))
    if json_output:
        data = result.record.to_json()
        print(json.dumps({k: data[k] for k in ("schema", "status", "mode", "pid", "config", "devices",
                                               "processes", "findings", "extra") if k in data}, indent=2, default=str))
    else:
        print(format_live_summary(result.record))
        html = (result.report_paths or {}).get("html")
        print(f"\nwrote {os.path.join(result.out_dir, 'run.json')}" + (f" and {html}" if html else ""))
    return result.exit_code

