"""`gpuscope compare`: N predictor threads sharing one model versus N worker processes each loading it.

Both sides run the same worker (profiler/measure/workers.py), the same model
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
    MODES,
    PROCESSES,
    THREADS,
    _plural,
    build_comparison,
    comparison_findings,
)
from gpuscope.measure.devices import index_match, nvml_index_for_uuid
from gpuscope.measure.options import WorkloadOptions
from gpuscope.measure.participants import ParticipantsProbe, WindowPeaks, build_row
from gpuscope.measure.recording import Recording, sampler_stats
from gpuscope.probes.readings import Unavailable, is_available
from gpuscope.probes.units import format_bytes
from gpuscope.record.catalogue import MODE_COMPARE
from gpuscope.record.errors import EXIT_OK, EXIT_USAGE, UsageError
from gpuscope.reports.render import render_run


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


def run_compare(opts: CompareOptions, progress: Any = None,
                nvml_opener: Callable[[], tuple[Any, dict[str, str] | None]] | None = None) -> Any:
    """Run both modes for every predictor count; save run.json (and the report). Returns a SessionResult.

    Raises UsageError for bad input, or when the model cannot be loaded in a worker
    (before anything is written). Every worker is reaped before this returns or raises.
    """
    from gpuscope.measure.devices import resolve_device
    from gpuscope.measure.models import DTYPES, SIZES, parse_input_shape
    from gpuscope.measure.options import parse_predictors, parse_seconds
    from gpuscope.measure.recording import Interrupts, Progress, SessionResult
    from gpuscope.measure.workers import Interrupted, WorkerError, WorkerGroup, WorkerSpec
    from gpuscope.probes.host import usable_cores
    from gpuscope.record.files import check_out_path
    from gpuscope.record.run import STATUS_COMPLETE, STATUS_FAILED, STATUS_INTERRUPTED, now_iso

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
    if opts.requests is not None:  # read here too, so a bad file is one line before any worker starts
        from gpuscope.measure.translator import RequestsError, load_requests_file

        try:
            load_requests_file(opts.requests)
        except RequestsError as exc:
            raise UsageError(str(exc)) from None
    check_out_path(opts.out)
    device = resolve_device(opts.device)
    gpu = device.startswith("cuda")
    size = opts.model_size or ("large" if gpu else "small")
    parent = os.getpid()
    recording = Recording(MODE_COMPARE, parent, progress, nvml_opener)
    record = recording.record
    # The parent reads NVML only on a GPU run, and never initialises CUDA itself (the workers do).
    recording.open_devices(cpu_detail=None if gpu else "comparing on the CPU", ask_nvml=gpu)
    nvml = recording.nvml
    nvml_index: int | None = None
    spec = WorkerSpec(model=opts.model, device=device, input_shape=shape, dtype=opts.dtype, size=size,
                      trust_model_file=opts.trust_model_file, intra_op_threads=opts.intra_op_threads,
                      streams=bool(opts.streams and gpu),
                      requests_path=os.path.abspath(opts.requests) if opts.requests is not None else None)
    stop = threading.Event()
    probe = ParticipantsProbe(nvml, None)
    peaks = WindowPeaks()
    rows: list[dict[str, Any]] = []
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
                torch_index, fallback = int(device.split(":")[1]), []
                nvml_index = nvml_index_for_uuid(info.get("device_uuid"), [d.get("uuid") for d in record.devices],
                                                 torch_index, on_fallback=fallback.append)
                record.extra["gpu_index"] = index_match(torch_index, nvml_index, fallback)
                for line in fallback:
                    progress.line(f"gpuscope: {line}")
                probe.nvml_index = nvml_index
            out_dir = recording.claim_folder(opts.out)
            recording.config({"device": device, "gpu_index": nvml_index, "model": opts.model, "model_size": size,
                             "predictors": list(counts), "max_step_s": duration_s, "warmup_s": warmup_s,
                             "interval_s": interval_s, "streams": spec.streams, "intra_op_threads": opts.intra_op_threads,
                             "worker_torch_threads": info.get("torch_num_threads"), "start_method": "spawn",
                             "modes": list(MODES), "out": out_dir})
            sampler = recording.start_samples({"participants": probe}, interval_s, [peaks],
                                              {"device": device, "gpu_index": nvml_index}, event_sources=[])
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
            recording.stop_samples()
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
    record.sampler = sampler_stats(sampler)
    if interrupted or interrupts.exit_code is not None:
        record.status = STATUS_INTERRUPTED
        exit_code = interrupts.exit_code or 130
    elif failure:
        record.status = STATUS_FAILED
        record.failure = failure
        exit_code = EXIT_USAGE
    else:
        record.status = STATUS_COMPLETE
    recording.close_devices()
    return recording.finish(exit_code, opts.report, render_run)


def compare_environment(device: str, devices: list[dict[str, Any]], nvml_index: int | None,
                        worker_info: dict[str, Any] | None) -> dict[str, Any]:
    """record.environment of a compare: gpuscope.measure.recording.environment_facts, read without touching CUDA here.

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
    latency = (f"p50 {lat['p50']:7.2f} ms  p99 {lat['p99']:7.2f} ms" if "p50" in lat and "p99" in lat
               else "no request completed")  # not "p50 0.00 ms"
    return (f"  {row['mode']:>9} x{row['predictors']:<3} {row['throughput_rps']:9.1f} req/s  {latency}"
            f"  host USS {format_bytes(host) if is_available(host) else 'n/a'}"
            f"  device {format_bytes(device) if is_available(device) else 'n/a'}"
            + (f"  errors {row['errors']}" if row.get("errors") else ""))
