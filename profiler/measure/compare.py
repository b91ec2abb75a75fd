"""`gpuscope compare`: N predictor threads sharing one model versus N worker processes each loading it.

Both sides run the same worker (profiler/process_worker.py), the same model
spec and the same closed loop, so the only difference is the one measured:
  threads    one spawned worker process, N PredictorPool threads, one model;
  processes  N spawned worker processes, one predictor each, N models.
The parent only orchestrates and samples: it never loads the model, and it is
counted in neither mode (a real deployment's supervisor is not the model server).

Memory is sampled through the whole measured window and the peak kept:
  host_uss_bytes  sum of USS (private pages) over the participating processes
                  and their descendants, each process counted once; pages they
                  share (libraries, the page cache) count in no one's USS;
  host_pss_bytes  sum of PSS (shared pages split between their users): every
                  page counted exactly once, shared ones included;
  device_bytes    NVML per-process used memory, summed over the rows whose pid
                  is a participant (Unavailable on the CPU: never 0).
The comparison lives in record.extra["comparison"] (plain JSON, see COMPARISON_KEYS).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from gpuscope.analysis.verdict import (
    COMPARE_SCOPE,
    MODES,
    PROCESSES,
    THREADS,
    _plural,
    build_comparison,
    comparison_findings,
)
from gpuscope.measure.devices import nvml_index_for_uuid
from gpuscope.measure.options import WorkloadOptions
from gpuscope.probes import scopes
from gpuscope.probes.host import read_rss_bytes, read_smaps_rollup
from gpuscope.probes.readings import ERROR, NO_DEVICE, NOT_SUPPORTED, PROCESS_GONE, Unavailable, is_available
from gpuscope.probes.redact import redact_argv
from gpuscope.probes.units import format_bytes
from gpuscope.record.errors import EXIT_OK, EXIT_USAGE, UsageError
from gpuscope.record.run import RunRecord


@dataclass(frozen=True)
class CompareOptions(WorkloadOptions):
    """Everything `gpuscope compare` needs: the shared workload options with a compare run's defaults."""

    duration: str = "5s"
    warmup: str = "1s"
    interval: str = "200ms"
    out: str = "gpuscope-compare"


def default_counts(usable_cores: int) -> tuple[int, ...]:
    """1, 2, and powers of two up to the usable cores, at most 4: each process loads its own model."""
    top = min(4, max(2, usable_cores))
    counts, n = [], 1
    while n <= top:
        counts.append(n)
        n *= 2
    return tuple(counts)


def _read_process_memory(pid: int) -> dict[str, int] | Unavailable:
    rollup = read_smaps_rollup(pid)
    if rollup is not None:
        return rollup
    import psutil

    try:
        info = psutil.Process(pid).memory_full_info()
        return {"rss_bytes": int(info.rss), "pss_bytes": int(getattr(info, "pss", info.uss)), "uss_bytes": int(info.uss)}
    except psutil.NoSuchProcess:
        return Unavailable(PROCESS_GONE, f"pid {pid} exited")
    except psutil.Error as exc:
        return Unavailable(ERROR, f"{type(exc).__name__}: {exc}")


class ParticipantsProbe:
    """A sampler probe: memory of the processes taking part in the current step, summed once per process.

    `set_pids()` names the workers; their descendants (helper processes a model
    may start) are found again every `children_every_s` and counted too. NVML
    rows are attributed by pid: only the participants' rows are summed.

    USS and PSS come from /proc/PID/smaps_rollup, which costs milliseconds per
    process (the kernel walks its page tables) and would take that from the
    workers being measured at every tick; so they are read for every participant
    together at most every `full_every_s`, and whenever `request_full()` asks (at
    a window's start and end); RSS is read at every tick.
    """

    def __init__(self, nvml: Any = None, nvml_index: int | None = None, children_every_s: float = 1.0,
                 read_memory: Callable[[int], dict[str, int] | Unavailable] = _read_process_memory,
                 read_rss: Callable[[int], int | Unavailable] = read_rss_bytes, full_every_s: float = 1.0,
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        self.nvml = nvml
        self.nvml_index = nvml_index
        self.children_every_s = children_every_s
        self.full_every_s = full_every_s
        self._read_memory = read_memory
        self._read_rss = read_rss
        self._clock_s = clock_s
        self._full_at = float("-inf")
        self._lock = threading.Lock()
        self._pids: tuple[int, ...] = ()
        self._children: tuple[int, ...] = ()
        self._children_at = 0.0
        self.device_baseline: dict[int, int] = {}
        self.sources: set[str] = set()  # how device_bytes was measured: nvml_pids and/or device_delta

    def set_pids(self, pids: list[int]) -> None:
        with self._lock:
            self._pids = tuple(dict.fromkeys(pids))
            self._children = ()
            self._children_at = 0.0
            self._full_at = float("-inf")

    def request_full(self) -> None:
        """Read USS and PSS at the next tick, whatever the interval."""
        with self._lock:
            self._full_at = float("-inf")

    def _descendants(self, pids: tuple[int, ...]) -> tuple[int, ...]:
        now = time.monotonic()
        if now - self._children_at < self.children_every_s:
            return self._children
        import psutil

        found: list[int] = []
        for pid in pids:
            try:
                found += [c.pid for c in psutil.Process(pid).children(recursive=True)]
            except psutil.Error:
                continue
        self._children, self._children_at = tuple(p for p in dict.fromkeys(found) if p not in pids), now
        return self._children

    def read(self) -> list[tuple[str, str, Any]]:
        with self._lock:
            pids = self._pids
            children = self._descendants(pids) if pids else ()
            now = self._clock_s()
            full = now - self._full_at >= self.full_every_s
            if full and pids:
                self._full_at = now
        out: list[tuple[str, str, Any]] = []
        totals = {"rss_bytes": 0, "pss_bytes": 0, "uss_bytes": 0} if full else {"rss_bytes": 0}
        missing: Unavailable | None = None
        for pid in pids + children:  # a set: each process once
            if full:
                memory = self._read_memory(pid)
            else:
                rss = self._read_rss(pid)
                memory = rss if isinstance(rss, Unavailable) else {"rss_bytes": rss}
            if isinstance(memory, Unavailable):
                out += [(scopes.process(pid), key, memory) for key in totals]
                if pid in pids:  # a helper that exited is fine; a worker that vanished is not
                    missing = memory if missing is None else missing
                continue
            for key, value in memory.items():
                out.append((scopes.process(pid), key, value))
                totals[key] += value
        if pids:
            for key, value in totals.items():
                out.append((COMPARE_SCOPE, f"host_{key}", missing if missing is not None else value))
            out.append((COMPARE_SCOPE, "processes", len(pids) + len(children)))
            out.append((COMPARE_SCOPE, "device_bytes", self._device(set(pids + children), set(pids), out)))
        return out

    def _device(self, pids: set[int], workers: set[int], out: list[tuple[str, str, Any]]) -> Any:
        """The participants' device memory: their NVML rows (`pids`: workers and their helpers), else the
        device's growth since the mode started when NVML does not list every worker."""
        if self.nvml is None or self.nvml_index is None:
            return Unavailable(NO_DEVICE, "CPU run: no NVML")
        from gpuscope.probes.gpu import check_row
        from gpuscope.probes.nvml import MetricError

        try:
            total = self.nvml.memory_info(self.nvml_index).total_bytes
        except MetricError as exc:
            total = Unavailable(exc.reason, exc.detail)
        try:
            rows = self.nvml.running_processes(self.nvml_index)
        except MetricError as exc:
            return Unavailable(exc.reason, exc.detail)
        except Exception as exc:
            return Unavailable(ERROR, f"{type(exc).__name__}: {exc}")
        seen: dict[int, Any] = {}
        for row in rows:
            checked = check_row(row, total, lambda pid: True)
            if checked.pid in pids and checked.pid not in seen:  # each pid once, whatever the binding returned
                seen[checked.pid] = checked.used_bytes
                out.append((scopes.process_on_device(checked.pid, self.nvml_index), "used_bytes", checked.used_bytes))
        if seen and not workers <= set(seen):
            # some workers are on the device and not listed (their pid namespace, a listing race): a sum of the
            # listed ones would be too small by a whole process, so the device's growth stands in, as below
            seen = {}
        if not seen:
            # NVML reports host pids; inside a container's pid namespace none match. Fall back to the device's
            # growth since the mode started (exact on a GPU nobody else uses), and say so in the row.
            baseline = self.device_baseline.get(self.nvml_index)
            if baseline is not None:
                try:
                    used = self.nvml.memory_info(self.nvml_index).used_bytes
                except MetricError as exc:
                    return Unavailable(exc.reason, exc.detail)
                self.sources.add("device_delta")
                return max(0, used - baseline)
            return Unavailable(NOT_SUPPORTED, "NVML lists none of the workers' pids (another pid namespace?)")
        self.sources.add("nvml_pids")
        bad = next((v for v in seen.values() if not is_available(v)), None)
        return bad if bad is not None else sum(seen.values())

    def mark_device_baseline(self) -> None:
        """Device used memory now, on every device, before a mode's workers start (for the pid-namespace fallback)."""
        self.device_baseline = {}
        if self.nvml is None:
            return
        from gpuscope.probes.nvml import MetricError

        try:
            count = self.nvml.device_count()
        except Exception:
            return
        for index in range(count):
            try:
                self.device_baseline[index] = self.nvml.memory_info(index).used_bytes
            except (MetricError, Exception):
                continue


class WindowPeaks:
    """Sampler listener: the peak of each `compare` total between `begin()` and `end()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = False
        self._peaks: dict[str, Any] = {}
        self.ticks = 0

    def begin(self) -> None:
        with self._lock:
            self._active, self._peaks, self.ticks = True, {}, 0

    def end(self) -> dict[str, Any]:
        with self._lock:
            self._active = False
            return dict(self._peaks)

    def __call__(self, t_ns: int, values: list[tuple[str, str, Any]]) -> None:
        with self._lock:
            if not self._active:
                return
            self.ticks += 1
            for scope, metric, value in values:
                if scope != COMPARE_SCOPE:
                    continue
                current = self._peaks.get(metric)
                if is_available(value):
                    if not is_available(current) or value > current:
                        self._peaks[metric] = value
                elif current is None:
                    self._peaks[metric] = value  # keep the reason until a real value arrives


def build_row(mode: str, predictors: int, payloads: list[dict[str, Any]], window_s: float,
              peaks: dict[str, Any], ticks: int) -> dict[str, Any]:
    from gpuscope.measure.sweep import percentiles_ms

    latencies_ms = [lat / 1e6 for p in payloads for lat in p["latencies_ns"]]
    messages: list[str] = []
    for payload in payloads:
        messages += [m for m in payload.get("error_messages", []) if m not in messages]
    row: dict[str, Any] = {
        "predictors": predictors, "mode": mode,
        "processes": len(payloads), "threads_per_process": predictors if mode == THREADS else 1,
        "requests": len(latencies_ms), "errors": sum(p.get("errors", 0) for p in payloads),
        "duration_s": round(window_s, 3), "throughput_rps": len(latencies_ms) / window_s if window_s > 0 else 0.0,
        "latency_ms": percentiles_ms(latencies_ms),
        "host_uss_bytes": peaks.get("host_uss_bytes", Unavailable(ERROR, "no sample in the window")),
        "host_pss_bytes": peaks.get("host_pss_bytes", Unavailable(ERROR, "no sample in the window")),
        "host_rss_bytes": peaks.get("host_rss_bytes", Unavailable(ERROR, "no sample in the window")),
        "device_bytes": peaks.get("device_bytes", Unavailable(ERROR, "no sample in the window")),
        "model_copies": sum(p.get("weight_sets", 0) for p in payloads),
        "pids": [p["pid"] for p in payloads], "memory_samples": ticks,
        "oom": any(p.get("oom") for p in payloads), "dead_predictors": sum(p.get("dead_predictors", 0) for p in payloads),
        "error_messages": messages[:5],
    }
    if row["requests"] == 0 and row["errors"] > 0:  # a model failing every request is not a measurement
        row["error"] = (f"every request in the window failed ({row['errors']:,} errors)"
                        + (f": {messages[0]}" if messages else ""))
    return row


def run_compare(opts: CompareOptions, progress: Any = None,
                nvml_opener: Callable[[], tuple[Any, dict[str, str] | None]] | None = None) -> Any:
    """Run both modes for every predictor count; save run.json (and the report). Returns a SessionResult.

    Raises UsageError for bad input, or when the model cannot be loaded in a worker
    (before anything is written). Every worker is reaped before this returns or raises.
    """
    from gpuscope import __version__
    from gpuscope.measure.devices import resolve_device
    from gpuscope.measure.models import DTYPES, SIZES, parse_input_shape
    from gpuscope.measure.options import parse_predictors, parse_seconds
    from gpuscope.measure.recording import Interrupts, Progress, SessionResult, open_nvml
    from gpuscope.measure.workers import Interrupted, WorkerError, WorkerGroup, WorkerSpec
    from gpuscope.probes.host import host_info, usable_cores
    from gpuscope.probes.samplefile import SampleWriter
    from gpuscope.probes.sampler import Sampler
    from gpuscope.record.files import RUN_FILE, SAMPLES_FILE, check_out_path, prepare_out_dir
    from gpuscope.record.run import STATUS_COMPLETE, STATUS_FAILED, STATUS_INTERRUPTED, now_iso, save_run

    progress = progress or Progress(opts.quiet)
    counts = parse_predictors(opts.predictors) or default_counts(usable_cores())
    duration_s = parse_seconds("--duration", opts.duration, 0.1)
    warmup_s = parse_seconds("--warmup", opts.warmup, 0.0)
    interval_s = parse_seconds("--interval", opts.interval, 0.005)
    if opts.intra_op_threads is not None and opts.intra_op_threads < 1:
        raise UsageError(f"--intra-op-threads must be at least 1, got {opts.intra_op_threads}")
    try:
        shape = parse_input_shape(opts.input_shape) if opts.input_shape else None
    except ValueError as exc:
        raise UsageError(f"--input-shape: {exc}") from None
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise UsageError(f"--dtype: unknown dtype {opts.dtype!r} (choose from {', '.join(DTYPES)})")
    if opts.model_size is not None and opts.model_size not in SIZES:
        raise UsageError(f"--model-size: unknown size {opts.model_size!r} (choose from {', '.join(SIZES)})")
    check_out_path(opts.out)
    device = resolve_device(opts.device)
    gpu = device.startswith("cuda")
    size = opts.model_size or ("large" if gpu else "small")
    opener = nvml_opener or open_nvml
    nvml, device_unavailable = opener() if gpu else (None, {"reason": "no_device", "detail": "comparing on the CPU"})

    parent = os.getpid()
    record = RunRecord(tool_version=__version__, started_at=now_iso(), host=host_info(), pid=parent, mode="compare")
    record.device_unavailable = device_unavailable
    nvml_index: int | None = None
    if nvml is not None:
        from gpuscope.probes.gpu import GpuProbe

        record.devices = [d.to_json() for d in GpuProbe(nvml).devices]
    spec = WorkerSpec(model=opts.model, device=device, input_shape=shape, dtype=opts.dtype, size=size,
                      trust_model_file=opts.trust_model_file, intra_op_threads=opts.intra_op_threads,
                      streams=bool(opts.streams and gpu))
    stop = threading.Event()
    probe = ParticipantsProbe(nvml, None)
    peaks = WindowPeaks()
    rows: list[dict[str, Any]] = []
    writer: Any = None
    sampler: Any = None
    out_dir: str | None = None
    failure: str | None = None
    total = len(counts) * 2
    done = 0

    def measure(group: Any, workers: list[Any], threads: int, mode: str, n: int) -> dict[str, Any]:
        label = f"[{done + 1}/{total}] {mode}: {_plural(n, 'predictor')}" + (
            " in 1 process" if mode == THREADS else f" in {_plural(len(workers), 'process').replace('processs', 'processes')}")
        progress.update(f"{label}: warming up")
        sampler.mark("step_start", mode=mode, predictors=n, pids=[w.pid for w in workers])
        group.start_run(workers, threads)
        _wait(warmup_s, stop, lambda: group.check_alive(workers, "warming up"))
        if stop.is_set():
            raise Interrupted()
        probe.set_pids([w.pid for w in workers])
        probe.sources = set()
        peaks.begin()
        window_start = time.perf_counter_ns()
        sampler.tick()
        progress.update(f"{label}: measuring")
        _wait(duration_s, stop, lambda: group.check_alive(workers, "measuring"))
        probe.request_full()  # the window's end state, USS included, however short the window
        sampler.tick()
        window_end = time.perf_counter_ns()
        found, ticks = peaks.end(), peaks.ticks
        if stop.is_set():
            raise Interrupted()
        payloads = group.finish_run(workers, window_start, window_end)
        sampler.mark("step_end", mode=mode, predictors=n)
        row = build_row(mode, n, payloads, (window_end - window_start) / 1e9, found, ticks)
        if gpu:
            row["device_source"] = "+".join(sorted(probe.sources)) or None
        progress.line(_row_line(row))
        return row

    exit_code = EXIT_OK
    interrupted = False
    with Interrupts(stop) as interrupts:
        group = WorkerGroup(spec, stop)
        try:
            # ---- threads: one worker process, loaded first: a model that cannot load fails before any file is written
            progress.update(f"threads: starting a worker process and loading {opts.model}")
            try:
                probe.mark_device_baseline()
                [thread_worker] = group.spawn(1, "loading the model")
            except WorkerError as exc:
                raise UsageError(f"the model could not be loaded in a worker process: {exc}") from None
            info = thread_worker.info or {}
            record.model = info.get("model", {})
            if nvml is not None:
                nvml_index = nvml_index_for_uuid(info.get("device_uuid"), [d.get("uuid") for d in record.devices],
                                                 int(device.split(":")[1]))
                probe.nvml_index = nvml_index
            out_dir = prepare_out_dir(opts.out)
            record.config = {"device": device, "gpu_index": nvml_index, "model": opts.model, "model_size": size,
                             "predictors": list(counts), "max_step_s": duration_s, "warmup_s": warmup_s,
                             "interval_s": interval_s, "streams": spec.streams, "intra_op_threads": opts.intra_op_threads,
                             "worker_torch_threads": info.get("torch_num_threads"), "start_method": "spawn",
                             "modes": list(MODES), "out": out_dir, "argv": redact_argv(sys.argv[1:])}
            t0_ns = time.monotonic_ns()
            writer = SampleWriter(os.path.join(out_dir, SAMPLES_FILE),
                                  {"started_at": record.started_at, "t0_ns": t0_ns, "interval_s": interval_s,
                                   "pid": parent, "mode": "compare", "device": device, "gpu_index": nvml_index})
            sampler = Sampler({"participants": probe}, interval_s, writer, [peaks])
            sampler.start()
            record.status = STATUS_FAILED
            for mode in MODES:
                workers: list[Any] = [thread_worker] if mode == THREADS else []
                for n in counts:
                    try:
                        if mode == PROCESSES and len(workers) < n:
                            progress.update(f"[{done + 1}/{total}] processes: starting {n - len(workers)} more worker "
                                            f"process{'es' if n - len(workers) != 1 else ''}")
                            workers += group.spawn(n - len(workers), f"loading the model for the {n}-process step")
                        row = measure(group, workers, n if mode == THREADS else 1, mode, n)
                        rows.append(row)
                        if row.get("error"):
                            failure = failure or f"{mode} x{n}: {row['error']}"
                        done += 1
                    except WorkerError as exc:
                        message = str(exc)
                        rows.append({"predictors": n, "mode": mode, "error": message, "exitcode": exc.exitcode})
                        failure = failure or f"{mode} x{n}: {message}"
                        progress.line(f"  {mode} x{n}: a worker failed: {message}")
                        done += len(counts) - counts.index(n)
                        break
                group.retire(workers)  # threads' worker goes before processes start: they never compete
                probe.set_pids([])
                probe.mark_device_baseline()
        except Interrupted:
            interrupted = True
        except KeyboardInterrupt:  # a second Ctrl-C
            interrupted = True
            interrupts.signum = interrupts.signum or signal.SIGINT
        finally:
            group.close()
            if sampler is not None:
                sampler.stop()
            if writer is not None:
                writer.close()
    if out_dir is None:  # interrupted before the model loaded: nothing measured, nothing written
        return SessionResult(None, interrupts.exit_code or 130, None, None)
    record.ended_at = now_iso()
    record.environment = compare_environment(device, record.devices, nvml_index, info)
    model_bytes = int(record.model.get("model_bytes") or 0)
    comparison = build_comparison(rows, gpu, model_bytes)
    record.extra["comparison"] = comparison
    record.extra["worker_pids"] = group.pids
    record.recommendation = {"predictors": comparison.get("recommended_predictors"), "mode": comparison.get("winner"),
                             "reason": comparison.get("verdict")}
    record.findings = comparison_findings(comparison, gpu, model_bytes)
    record.sampler = {"interval_s": interval_s, "ticks": sampler.ticks if sampler else 0,
                      "missed_ticks": sampler.missed_ticks if sampler else 0,
                      "mean_tick_cost_us": round(sampler.mean_tick_cost_us, 1) if sampler else 0,
                      "probe_errors": dict(sampler.probe_errors) if sampler else {}}
    if interrupted or interrupts.exit_code is not None:
        record.status = STATUS_INTERRUPTED
        exit_code = interrupts.exit_code or 130
    elif failure:
        record.status = STATUS_FAILED
        record.failure = failure
        exit_code = EXIT_USAGE
    else:
        record.status = STATUS_COMPLETE
    save_run(record, os.path.join(out_dir, RUN_FILE))
    paths = render_comparison(record, out_dir, progress) if opts.report else None
    return SessionResult(record, exit_code, out_dir, paths)


def compare_environment(device: str, devices: list[dict[str, Any]], nvml_index: int | None,
                        worker_info: dict[str, Any] | None) -> dict[str, Any]:
    """record.environment of a compare: profiler.session.environment_facts, read without touching CUDA here.

    The parent never initialises CUDA (a context of its own would sit on the device the workers are measured
    on), so the facts are taken as for the CPU, then the device's name and driver come from NVML and the torch
    thread count from the worker that loaded the model.
    """
    from gpuscope.measure.recording import environment_facts  # lazy: it imports torch

    try:
        facts = environment_facts("cpu")
    except Exception as exc:  # torch missing or broken in the parent: the workers told us what they could
        from gpuscope import __version__

        facts = {"gpuscope": __version__, "python": sys.version.split()[0],
                 "torch": Unavailable("error", f"{type(exc).__name__}: {exc}")}
    threads = (worker_info or {}).get("torch_num_threads")
    if isinstance(threads, int) and not isinstance(threads, bool):
        facts["torch_num_threads"] = threads
    if device.startswith("cuda"):
        entry = next((d for d in devices if isinstance(d, dict) and d.get("index") == nvml_index), None)
        if entry is None and devices and isinstance(devices[0], dict):
            entry = devices[0]
        if entry:
            if entry.get("name") is not None:
                facts["device_name"] = entry.get("name")
            if entry.get("driver") is not None:
                facts["driver"] = entry.get("driver")
    return facts


def render_comparison(record: RunRecord, out_dir: str, progress: Any) -> dict[str, str] | None:
    """report.html and compare.png (reports.render writes both for a compare record, also on `gpuscope report`);
    a rendering failure is one line, run.json stays."""
    from gpuscope.measure.recording import render

    return render(record, out_dir, progress)


def _wait(seconds: float, stop: threading.Event, check: Callable[[], None]) -> None:
    """Sleep up to `seconds` in 50 ms slices, returning early on stop; `check` raises if a worker died."""
    end = time.monotonic() + seconds
    while not stop.is_set():
        check()
        remaining = end - time.monotonic()
        if remaining <= 0:
            return
        stop.wait(min(0.05, remaining))


def _row_line(row: dict[str, Any]) -> str:
    lat = row.get("latency_ms") or {}
    host = row.get("host_uss_bytes")
    device = row.get("device_bytes")
    return (f"  {row['mode']:>9} x{row['predictors']:<3} {row['throughput_rps']:9.1f} req/s  p50 {lat.get('p50', 0):7.2f} ms"
            f"  p99 {lat.get('p99', 0):7.2f} ms  host USS {format_bytes(host) if is_available(host) else 'n/a'}"
            f"  device {format_bytes(device) if is_available(device) else 'n/a'}"
            + (f"  errors {row['errors']}" if row.get("errors") else ""))
