"""`gpuscope.profile()`: allocator-level truth from inside your own server.

    import gpuscope

    with gpuscope.profile(out="gpuscope-report", interval=0.05):
        serve()                      # your threads, your loop

    @gpuscope.profile(out="gpuscope-report")
    def main(): ...

    prof = gpuscope.profile(out="gpuscope-report").start()
    ...
    prof.stop()                      # returns the RunRecord; prof.report_paths has report.html

It samples this process on one background daemon thread: host RSS/USS, CPU and
threads; PyTorch's caching allocator per CUDA device once torch is imported
and CUDA is initialised (nothing here imports torch or initialises CUDA for
you); NVML's per-process and device figures when a driver is present. On exit
it writes run.json, samples.jsonl and the report, like `gpuscope watch`, with
the memory outside the allocator measured directly (NVML used - torch reserved).

Good-guest rules for running inside someone else's process: no signal
handlers, no global matplotlib state (the report renders on a bare Agg
figure), no output unless something fails, and an exception inside the block
is recorded (status failed) and then re-raised unchanged. One side effect to
know: peaks between ticks are caught by `torch.cuda.reset_peak_memory_stats()`
after each reading; pass `reset_peaks=False` if your code reads
`torch.cuda.max_memory_allocated()` itself.

`prometheus_port=N` also serves the allocator's figures per device on
http://127.0.0.1:N/metrics while the profile runs (profiler/inprocess_metrics.py):
the split of this process's memory that no outside exporter can see.
"""
from __future__ import annotations

import atexit
import functools
import inspect
import os
import sys
import threading
import time
from typing import Any, Callable

from gpuscope.record.catalogue import MODE_PROFILE
from gpuscope.record.run import STATUS_COMPLETE, STATUS_FAILED, STATUS_INTERRUPTED, STATUS_RUNNING, RunRecord

ScopedValue = tuple[str, str, Any]


class ProfileBusy(RuntimeError):
    """Another profile of this process is already writing to that folder."""


# Output folder (real path) -> the running profile writing there. A profile samples the whole process, so a
# second one into the same folder would only clobber the first one's files.
_ACTIVE: dict[str, "Profile"] = {}
_ACTIVE_LOCK = threading.Lock()


class LazyAllocatorProbe:
    """Reads torch's allocator once the application has imported torch and CUDA is usable; silent before.

    `backend` and `scopes` (torch device -> NVML index) are injectable for tests;
    by default they come from torch itself the first time torch is importable.
    """

    def __init__(self, pid: int, backend: Any = None, scopes: dict[int, int] | None = None,
                 nvml_uuids: list[Any] | None = None, reset_peaks: bool = True) -> None:
        self.pid = pid
        self._backend = backend
        self._scopes = scopes
        self._nvml_uuids = nvml_uuids or []
        self._reset_peaks = reset_peaks
        self._probe: Any = None
        self._given_up = False
        self.index_matches: dict[int, dict[str, Any]] = {}  # torch index -> how NVML's was found (extra.gpu_index)

    def _build(self) -> Any:
        from gpuscope.probes import scopes as scopes_
        from gpuscope.probes.allocator import AllocatorProbe, RealTorchCuda

        backend = self._backend
        if backend is None:
            module = sys.modules.get("torch")
            if module is None:  # never import torch into an application that does not use it
                return None
            if getattr(getattr(module, "__spec__", None), "_initializing", False):
                return None  # the application is importing torch right now: next tick
            backend = RealTorchCuda()
            if not backend.available():
                self._given_up = True
                return None
            if not backend.is_initialized():
                return None  # never initialise CUDA (a context costs ~600 MiB) for an app that has not
        scopes = self._scopes
        if scopes is None:
            import torch

            from gpuscope.measure.devices import index_match, nvml_index_for

            scopes = {}
            for i in range(torch.cuda.device_count()):
                fallback: list[str] = []
                scopes[i] = nvml_index_for(i, self._nvml_uuids, on_fallback=fallback.append)
                self.index_matches[i] = index_match(i, scopes[i], fallback)
        return AllocatorProbe(backend, {t: scopes_.process_on_device(self.pid, n) for t, n in scopes.items()},
                              reset_peaks=self._reset_peaks)

    def read(self) -> list[ScopedValue]:
        if self._probe is None and not self._given_up:
            try:
                self._probe = self._build()
            except Exception:  # torch half-imported or CUDA in a bad state: try again next tick
                self._probe = None
        return self._probe.read() if self._probe is not None else []


class Profile:
    """An in-process profile: a context manager, a decorator, or explicit start()/stop()."""

    def __init__(self, out: str = "gpuscope-report", interval: float = 0.05, *, report: bool = True,
                 reset_peaks: bool = True, label: str | None = None,
                 nvml_opener: Callable[[], tuple[Any, dict[str, str] | None]] | None = None,
                 torch_cuda: Any = None, torch_scopes: dict[int, int] | None = None,
                 describe: Callable[[int, str], Any] | None = None, pid_exists: Callable[[int], bool] | None = None,
                 listeners: list[Callable[[int, list[ScopedValue]], None]] | None = None,
                 prometheus_port: int | None = None, prometheus_bind: str = "127.0.0.1",
                 model: Any = None, max_p99_ms: float | None = None, min_requests: int | None = None) -> None:
        if isinstance(interval, str):
            from gpuscope.probes.units import parse_duration_s

            interval = parse_duration_s(interval)
        if float(interval) < 0.005:
            raise ValueError(f"profile(interval={interval}): the sampling interval must be at least 0.005 s")
        self.out = out
        self.interval_s = float(interval)
        self.report = report
        self.reset_peaks = reset_peaks
        self.label = label
        self._settings = dict(out=out, interval=interval, report=report, reset_peaks=reset_peaks, label=label,
                              nvml_opener=nvml_opener, torch_cuda=torch_cuda, torch_scopes=torch_scopes,
                              describe=describe, pid_exists=pid_exists, listeners=listeners,
                              prometheus_port=prometheus_port, prometheus_bind=prometheus_bind,
                              model=model, max_p99_ms=max_p99_ms, min_requests=min_requests)
        if max_p99_ms is not None and not (isinstance(max_p99_ms, (int, float)) and max_p99_ms > 0):
            raise ValueError(f"profile(max_p99_ms={max_p99_ms!r}): a p99 limit is a positive number of milliseconds")
        if min_requests is not None and not (isinstance(min_requests, int) and min_requests >= 1):
            raise ValueError(f"profile(min_requests={min_requests!r}): the requests a level needs, at least 1")
        self.max_p99_ms = float(max_p99_ms) if max_p99_ms is not None else None
        self.min_requests = min_requests
        self._served: Any = None
        if model is not None:  # checked now: a wrong object fails the call, not the profile's end
            from gpuscope.measure.served_models import ServedModels

            self._served = ServedModels(model)
        self._requests: Any = None  # the RequestTracker while this profile tracks gpuscope.request
        self._requests_note: str | None = None
        if prometheus_port is not None:
            from gpuscope.measure.exporter import validate_port

            prometheus_port = validate_port(prometheus_port, "profile(prometheus_port=...)")
        self.prometheus_port = prometheus_port
        self.prometheus_bind = prometheus_bind
        self.metrics: Any = None  # the running endpoint (measure.exporter.Exporter) while sampling
        self._nvml_opener = nvml_opener
        self._torch_cuda = torch_cuda
        self._torch_scopes = torch_scopes
        self._allocator: LazyAllocatorProbe | None = None
        self._describe = describe
        self._pid_exists = pid_exists
        self._extra_listeners = list(listeners or [])
        self._lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending_marks: list[tuple[str, dict[str, Any]]] = []  # overlaps noted while starting
        self._folder_key: str | None = None  # the registry key this profile holds (set when claimed)
        self._state = "new"
        self.pid = os.getpid()
        self.record: RunRecord | None = None
        self.report_paths: dict[str, str] | None = None
        self.out_dir: str | None = None
        self.error: str | None = None

    # -- decorator
    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """A fresh profile per call. Calls may overlap (threads, an event loop): while one call's profile
        runs, it already samples the whole process, so an overlapping call into the same folder runs
        unprofiled, marked in the running profile's samples, and never fails because of it."""
        settings = dict(self._settings)
        name = getattr(fn, "__qualname__", getattr(fn, "__name__", "call"))

        def begin() -> "Profile | None":
            prof = Profile(**settings)
            try:
                return prof.start()
            except ProfileBusy:
                holder = _ACTIVE.get(_folder_key(prof.out))
                if holder is not None:
                    holder._note_overlap(name)
                return None

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                prof = begin()
                if prof is None:
                    return await fn(*args, **kwargs)
                with _ending(prof):
                    return await fn(*args, **kwargs)

            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            prof = begin()
            if prof is None:
                return fn(*args, **kwargs)
            with _ending(prof):
                return fn(*args, **kwargs)

        return wrapper

    # -- context manager
    def __enter__(self) -> "Profile":
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.stop()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.stop(_status=STATUS_INTERRUPTED, _ended_by="interrupt")
        else:
            self.stop(_status=STATUS_FAILED, _ended_by="exception", _failure=f"{exc_type.__name__}: {exc}")
        return None  # never swallow the application's exception

    def mark(self, event: str, **fields: Any) -> None:
        """Write an event (a phase, a request burst) into samples.jsonl, stamped with the sampler's clock."""
        if self._state == "running":
            self._sampler.mark(event, **fields)

    def _note_overlap(self, function: str) -> None:
        """An overlapping decorated call: marked now, or as soon as this profile has started (never waits)."""
        with self._pending_lock:
            if self._state != "running":
                self._pending_marks.append(("overlapping_call", {"function": function}))
                return
        self.mark("overlapping_call", function=function)

    # -- start/stop
    def start(self) -> "Profile":
        """Start sampling; ProfileBusy when another running profile of this process writes to `out`."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError("this profile was already started; create a new gpuscope.profile() per run")
            self._claim_folder()
            try:
                self._start_locked()
            except BaseException:
                self._close_metrics()
                self._end_tracking()
                self._release_folder()
                raise
        return self

    def _claim_folder(self) -> None:
        key = _folder_key(self.out)
        with _ACTIVE_LOCK:
            holder = _ACTIVE.get(key)
            if holder is not None and holder is not self:  # starting or running: registered until stop()
                raise ProfileBusy(f"gpuscope.profile(out={self.out!r}) is already running in this process (it samples "
                                  "the whole process): stop it first, or give this profile another folder")
            _ACTIVE[key] = self
            self._folder_key = key  # released by this key, whatever the working directory is by then

    def _release_folder(self) -> None:
        with _ACTIVE_LOCK:
            if self._folder_key is not None and _ACTIVE.get(self._folder_key) is self:
                del _ACTIVE[self._folder_key]
            self._folder_key = None

    def _start_locked(self) -> None:
        """The body of start(), under self._lock and with the folder claimed."""
        from gpuscope.measure.attribution import GapTracker
        from gpuscope.measure.live import ForgetDepartedPeaks, LiveTracker, children_of
        from gpuscope.measure.recording import Recording
        from gpuscope.probes.host import HostProbe
        from gpuscope.probes.sampler import PeakTracker

        self._recording = recording = Recording(MODE_PROFILE, self.pid, nvml_opener=self._nvml_opener)
        self.out_dir = recording.claim_folder(self._folder_key or os.path.abspath(self.out))  # a later chdir: no change
        listeners = list(self._extra_listeners)
        from gpuscope.measure import requests as requests_

        tracker = requests_.RequestTracker()
        if self.prometheus_port is not None:  # first: a taken port fails start() before anything runs
            from gpuscope.measure.exporter import serve_collector
            from gpuscope.measure.inprocess_metrics import AllocatorGauges, Collectors, RequestMetrics

            gauges = AllocatorGauges(self.pid)
            self.metrics = serve_collector(Collectors(gauges, RequestMetrics(self.pid, tracker)),
                                           self.prometheus_port, self.prometheus_bind)
            listeners.insert(0, gauges)
        if requests_.install(tracker):  # one profile at a time receives gpuscope.request's requests
            self._requests = tracker
            listeners.append(tracker)  # each tick aggregates the requests finished since the last
        else:
            self._requests_note = "another running profile of this process receives gpuscope.request's requests"
        if self._served is not None:
            self._served.attach()
        record = recording.record
        self._gpu_probe = recording.open_devices(describe=self._describe, pid_exists=self._pid_exists)
        uuids: list[Any] = [d.uuid for d in self._gpu_probe.devices] if self._gpu_probe is not None else []
        probes: dict[str, Any] = {"host": HostProbe(self.pid, interval_s=self.interval_s)}
        # the allocator before NVML, as in diagnose (commands/diagnose.py says why)
        probes["allocator"] = LazyAllocatorProbe(self.pid, self._torch_cuda, self._torch_scopes, uuids,
                                                 self.reset_peaks)
        self._allocator = probes["allocator"]
        if self._gpu_probe is not None:
            probes["gpu"] = self._gpu_probe
        self._peaks = PeakTracker()
        self._t0_ns = time.monotonic_ns()
        self._tracker = LiveTracker(self.pid, self._t0_ns)
        count = self._gpu_probe.device_count if self._gpu_probe is not None else 0
        self._gaps = [GapTracker(self.pid, index) for index in range(count)]
        self._sampler = recording.start_samples(probes, self.interval_s,
                                                [self._peaks, self._tracker,
                                                 ForgetDepartedPeaks(self._peaks, self._tracker), *self._gaps,
                                                 *listeners])
        # the app's own command line, redacted: its secrets stay out of the report
        recording.config({"device": "cpu", "gpu_index": None, "interval_s": self.interval_s, "out": self.out_dir,
                          "label": self.label, "reset_peaks": self.reset_peaks, "device_index_space": "nvml"},
                         argv=list(sys.argv))
        record.status = STATUS_RUNNING
        self.record = record
        self._children_at_start = children_of(self.pid)
        atexit.register(self._at_exit)
        self._sampler.start()
        with self._pending_lock:
            self._state = "running"
            pending, self._pending_marks = self._pending_marks, []
        for event, fields in pending:
            self._sampler.mark(event, **fields)

    def _at_exit(self) -> None:
        """The interpreter is exiting with the profile still running: keep run.json (no report)."""
        try:
            self.stop(_status=STATUS_INTERRUPTED, _ended_by="interpreter_exit", _render=False,
                      _failure="the process exited before profile.stop() was called")
        except Exception:
            pass

    def stop(self, *, _status: str = STATUS_COMPLETE, _ended_by: str = "stop", _failure: str | None = None,
             _render: bool = True) -> RunRecord | None:
        """Stop sampling, write run.json and the report; returns the record (None if never started)."""
        with self._lock:
            if self._state != "running":
                return self.record
            self._state = "stopped"
            try:
                return self._finish(_status, _ended_by, _failure, _render)
            finally:
                self._release_folder()  # only now: a profile starting here must not delete these files

    def _finish(self, _status: str, _ended_by: str, _failure: str | None, _render: bool) -> RunRecord:
        """stop()'s work once sampling is to end: the record, run.json and the report."""
        from gpuscope.measure.recording import Progress
        from gpuscope.record.errors import OutputError
        from gpuscope.reports.render import render_run

        try:
            atexit.unregister(self._at_exit)
        except Exception:
            pass
        recording = self._recording
        self._end_tracking()  # requests finishing from now on are not this profile's
        recording.stop_samples()  # joins the thread and takes one last reading
        self._close_metrics()
        record = self._build_record(_ended_by)
        record.status = _status
        record.failure = _failure
        recording.close_devices()
        # a good guest: silent unless something fails (then one line on stderr)
        recording.progress = Progress(quiet=False)
        try:
            result = recording.finish(0, self.report and _render, render_run)
        except OutputError as exc:
            self.error = str(exc)
            sys.stderr.write(f"gpuscope profile: {self.error}\n")
            return record
        self.report_paths = result.report_paths
        return record

    def _end_tracking(self) -> None:
        from gpuscope.measure import requests as requests_

        if self._requests is not None:
            requests_.uninstall(self._requests)
        if self._served is not None:
            self._served.detach()

    def _close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    # -- the record
    def _build_record(self, ended_by: str) -> RunRecord:
        from gpuscope.measure.attribution import end_figures
        from gpuscope.measure.live import (children_of, complete_live_record, list_departed_within_bound,
                                           live_processes)
        from gpuscope.probes.engines import memory_variables
        from gpuscope.probes.processes import describe_process
        from gpuscope.record.run import now_iso

        record = self.record
        assert record is not None
        live = self._tracker.summary("profile")
        gpu_index = live.get("gpu_index")
        record.ended_at = now_iso()
        record.config.update({"device": f"cuda:{gpu_index}" if gpu_index is not None else "cpu",
                              "gpu_index": gpu_index, "ended_by": ended_by})
        me = (self._describe or (lambda pid, name: describe_process(pid, name)))(self.pid, "")
        record.model = {"source": self.label or f"this process (pid {self.pid}, {me.name})"}
        environment: dict[str, Any] = {"gpuscope": record.tool_version, "python": sys.version.split()[0],
                                       "memory_env": memory_variables(dict(os.environ))}
        torch = sys.modules.get("torch")
        if torch is not None:
            environment["torch"] = getattr(torch, "__version__", None)
            environment["cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
            try:
                environment["torch_num_threads"] = torch.get_num_threads()
            except Exception:
                pass
        if self._gpu_probe is not None and self._gpu_probe.devices:
            environment["driver"] = self._gpu_probe.devices[0].driver
        record.environment = environment
        described = dict(self._gpu_probe.processes) if self._gpu_probe is not None else {}
        children = self._children_at_start | children_of(self.pid)
        listed = live_processes(self.pid, me, described, self._peaks.peaks(), self._tracker.pid_spans(),
                                children, live.get("duration_s", 0.0), self.interval_s)
        record.processes, record.extra["departed_processes"] = list_departed_within_bound(
            listed, self._tracker.forgotten())
        if gpu_index is not None:
            record.baseline["end"] = end_figures(self._peaks.last(), self.pid, gpu_index)
            matches = self._allocator.index_matches.values() if self._allocator is not None else ()
            matched = [m for m in matches if m["nvml_index"] == gpu_index]
            if matched:  # which torch device is this NVML index, and was it matched by UUID or assumed
                record.extra["gpu_index"] = matched[0]
        rss = (live.get("series") or {}).get("rss_bytes") or {}
        record.baseline["rss_at_start_bytes"] = rss.get("first_value")
        self._traffic_into(record, gpu_index)
        complete_live_record(record, live, self._gaps, self._sampler,
                             f"this process was profiled for {live.get('duration_s', 0):.1f} s in place")
        return record

    def _traffic_into(self, record: RunRecord, gpu_index: int | None) -> None:
        """The marked requests as observed steps, the registered models' weights and sharing (record in place)."""
        from gpuscope.analysis.live_traffic import (
            DEFAULT_TRAFFIC_THRESHOLDS,
            TrafficThresholds,
            observed_steps,
            unmeasured_codes,
        )
        from gpuscope.probes.readings import Unavailable

        thresholds = (TrafficThresholds(min_requests=self.min_requests) if self.min_requests is not None
                      else DEFAULT_TRAFFIC_THRESHOLDS)
        record.config["max_p99_ms"] = self.max_p99_ms
        record.config["min_requests_per_level"] = thresholds.min_requests
        request_threads: set[int] = set()
        if self._requests is not None:
            snapshot = self._requests.snapshot()
            request_threads = self._requests.thread_ids()
            record.steps = observed_steps(snapshot["levels"], thresholds)
            record.extra["requests"] = {
                "requests": sum(s.requests for s in record.steps), "errors": sum(s.errors for s in record.steps),
                "peak_in_flight": snapshot["peak_in_flight"], "in_flight_at_end": snapshot["in_flight_at_end"],
                "threads": snapshot["threads"], "levels": [lv["level"] for lv in snapshot["levels"]],
                "level_basis": "the most requests in flight at once while each request ran",
                "throughput_basis": "Little's law: requests in flight / mean latency of that level"}
        else:
            record.extra["requests"] = Unavailable("not_supported", self._requests_note or "not tracked")
        if self._served is not None:
            record.sharing = self._served.summary("cuda" if gpu_index is not None else "cpu", request_threads)
            self._served.release()
            record.model.update({"model_bytes": record.sharing["model_bytes"],
                                 "model_device": record.sharing["model_device"],
                                 "registered": record.sharing["registered_models"]})
        record.extra["unmeasured_codes"] = unmeasured_codes(record, self._served is not None)

    @property
    def running(self) -> bool:
        return self._state == "running"

    def summary(self) -> str:
        """The terminal summary of the finished profile (as `gpuscope watch` prints)."""
        from gpuscope.reports.text import format_live_summary

        return format_live_summary(self.record) if self.record is not None else "profile not started"


def _folder_key(out: str) -> str:
    return os.path.realpath(out)


class _ending:
    """`with _ending(prof):` around a call whose profile is already started: stop it as __exit__ would."""

    def __init__(self, prof: Profile) -> None:
        self.prof = prof

    def __enter__(self) -> Profile:
        return self.prof

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.prof.__exit__(exc_type, exc, tb)


def profile(*args: Any, **kwargs: Any) -> Any:
    """`with profile(out=..., interval=0.05):`, `@profile(...)`, `@profile`, or `profile(...).start()`/`.stop()`."""
    if len(args) == 1 and callable(args[0]) and not kwargs and not isinstance(args[0], str):
        return Profile()(args[0])
    return Profile(*args, **kwargs)


__all__ = ["LazyAllocatorProbe", "Profile", "ProfileBusy", "profile"]
