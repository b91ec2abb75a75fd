"""`gpuscope watch --pid PID`: sample a running process from outside and write the usual report folder.

What a watch can see from outside: NVML's per-process memory and SM utilisation
on every device, the device totals, the process's RSS/CPU/threads (psutil), the
engines in its /proc/PID/maps and their memory variables, and every other
process on the same devices. It cannot see inside the process's allocator;
`gpuscope.profile()` (profiler/inprocess.py) can, and shares the machinery
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

from gpuscope.measure.attribution import GapTracker
from gpuscope.measure.exporter import validate_port
from gpuscope.measure.live import (
    ForgetDepartedPeaks,
    LiveTracker,
    ScopedValue,
    children_of,
    complete_live_record,
    list_departed_within_bound,
    live_processes,
    process_alive,
)
from gpuscope.measure.recording import Interrupts, Recording
from gpuscope.probes import scopes
from gpuscope.probes.readings import is_available, reading_to_json
from gpuscope.probes.redact import printable as _printable
from gpuscope.probes.sampler import PeakTracker
from gpuscope.probes.units import format_bytes
from gpuscope.record.catalogue import MODE_WATCH
from gpuscope.record.errors import EXIT_OK, EXIT_SIGTERM, UsageError
from gpuscope.record.run import STATUS_COMPLETE, STATUS_FAILED, STATUS_INTERRUPTED, STATUS_RUNNING, RunRecord, now_iso
from gpuscope.reports.render import render_run
from gpuscope.reports.text import format_live_summary

ENDED_BY_DURATION = "duration"


ENDED_BY_EXIT = "process_exit"


ENDED_BY_INTERRUPT = "interrupt"


ENDED_BY_SIGTERM = "sigterm"


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
        from gpuscope.measure.options import parse_seconds
        from gpuscope.measure.recording import Progress, open_nvml

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
        self._cadenced_keys: frozenset[tuple[str, str]] = frozenset()  # set with the host probe (_setup)
        self._held: dict[tuple[str, str], Any] = {}
        self.exporter: Any = None
        self.ended_by = ENDED_BY_DURATION

    # -- set-up
    def _describe_pid(self, pid: int, name: str = "") -> Any:
        if self._describe is not None:
            return self._describe(pid, name)
        from gpuscope.probes.processes import describe_process

        return describe_process(pid, name)

    def _setup(self) -> None:
        from gpuscope.probes.host import USS_EVERY_S, HostProbe, read_rss_uss_bytes

        if self.port is not None:
            from gpuscope.measure.exporter import start_exporter

            self.exporter = start_exporter(lambda: self.view, self.port, self.opts.bind)
        self.recording = Recording(MODE_WATCH, self.pid, self.progress, self._nvml_opener)
        try:
            self.out_dir = self.recording.claim_folder(self.opts.out)
        except BaseException:
            self._close_exporter()
            raise
        self.record = self.recording.record
        self.gpu_probe = self.recording.open_devices(describe=self._describe, pid_exists=self._pid_exists)
        self.device_unavailable = self.record.device_unavailable
        self.target_info = self._describe_pid(self.pid)
        self._target_described_at = self._clock()
        self.children = children_of(self.pid)
        # USS needs /proc/PID/smaps_rollup (ptrace access); without it, RSS alone rather than no readings at all.
        uss_every = USS_EVERY_S if read_rss_uss_bytes(self.pid) is not None else None
        try:
            host = HostProbe(self.pid, uss_every_s=uss_every, clock_s=self._clock, interval_s=self.interval_s)
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
        listeners = [self.peaks, self.tracker, ForgetDepartedPeaks(self.peaks, self.tracker), *self.gaps]
        self.sampler = self.recording.start_samples(probes, self.interval_s, listeners,
                                                    {"target": self.target_info.to_json()},
                                                    clock_ns=lambda: int(self._clock() * 1e9))
        self.writer = self.recording.writer
        # readings the probes take less often than every tick (the sampler declared them to the samples file:
        # CPU and threads every quarter second at short intervals): the status line and the exporter show
        # their last value, not a gap between reads
        self._cadenced_keys = frozenset(self.writer.cadence_s) if self.writer is not None else frozenset()
        self.recording.config({"target_pid": self.pid, "device": "cpu", "gpu_index": None,
                               "interval_s": self.interval_s, "duration_s": self.duration_s, "out": self.out_dir,
                               "device_index_space": "nvml", "prometheus_port": self.port,
                               "bind": self.opts.bind if self.port is not None else None})
        self._save_progress()

    # -- the loop
    def _latest(self, values: list[ScopedValue]) -> list[ScopedValue]:
        """The tick's readings, and the last reading of each key on a slower cadence that this tick lacks: what
        the status line and the exporter show (samples.jsonl keeps each reading at the tick it was taken)."""
        cadenced, held = self._cadenced_keys, self._held
        if not cadenced:
            return values
        present = set()
        for scope, metric, value in values:
            key = (scope, metric)
            if key in cadenced:
                held[key] = value
                present.add(key)
        return values + [(scope, metric, value) for (scope, metric), value in held.items() if (scope, metric) not in present]

    def _status_line(self, values: list[ScopedValue], elapsed_s: float) -> str:
        me = scopes.process(self.pid)
        figures = {(s, m): v for s, m, v in values}
        parts = [f"watch pid {self.pid} ({_printable(self.target_info.name)[:24]})",
                 f"{elapsed_s:6.1f}/{self.duration_s:g} s"]
        gpu_now = self.tracker.current_gpu_bytes()
        for index, used in sorted(gpu_now.items()):
            util = figures.get((scopes.process_on_device(self.pid, index), "sm_util_pct"))
            parts.append(f"{scopes.device(index)} {format_bytes(used)}" + (f" sm {util}%" if is_available(util) else ""))
        if not gpu_now and self.gpu_probe is not None:
            parts.append("not on a GPU")
        rss = figures.get((me, 'rss_bytes'))
        parts.append(f"RSS {format_bytes(rss) if is_available(rss) else 'n/a'}")
        cpu = figures.get((me, "cpu_util_pct"))
        if is_available(cpu):
            parts.append(f"CPU {cpu:.0f}%")
        threads = figures.get((me, "num_threads"))
        if is_available(threads):
            parts.append(f"{threads} threads")
        others = 0
        for index in gpu_now:
            others += sum(1 for (s, m), v in figures.items() if m == "used_bytes"
                          and scopes.pid_on_device(s, index) not in (None, self.pid, *self.children))
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
            from gpuscope.measure.exporter import LiveView, nvml_answered

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
            latest = self._latest(values)
            self.progress.update(self._status_line(latest, now - start))
            self._after_tick(latest, now)
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
        listed = live_processes(self.pid, self.target_info, described, self.peaks.peaks(),
                                self.tracker.pid_spans(), self.children, live.get("duration_s", 0.0), self.interval_s)
        record.processes, record.extra["departed_processes"] = list_departed_within_bound(
            listed, self.tracker.forgotten())
        first_rss = (live.get("series", {}).get("rss_bytes") or {}).get("first_value")
        record.baseline = {"rss_at_start_bytes": first_rss,
                           "process_gpu_bytes_at_start": (live.get("series", {}).get("process_gpu_bytes") or {}).get("first_value")}
        if final:
            record.ended_at = now_iso()
        complete_live_record(record, live, self.gaps, self.sampler,
                             f"a live process was watched for {live.get('duration_s', 0):.0f} s")
        return record

    def _save_progress(self) -> None:
        self.recording.save_progress()

    def _close_exporter(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None

    def run(self) -> Any:
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
            self.recording.stop_samples(threaded=False)
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
        if self.port is not None:  # the last view carries the final findings until the exporter closes
            self._after_tick(self._latest(self.tracker.last_values), self._clock())
        self._close_exporter()
        self.recording.close_devices()
        result = self.recording.finish(exit_code, self.opts.report, render_run)
        if crash is not None:
            raise crash
        return result


def run_watch(opts: WatchOptions, **kwargs: Any) -> Any:
    """Watch a process until the duration ends, it exits, or Ctrl-C. Returns gpuscope.measure.recording.SessionResult.

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
