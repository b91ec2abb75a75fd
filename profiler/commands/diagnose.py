"""The diagnose session: probes, sampler, model, sweep, conclusions, and the files they leave.

Order matters for honesty and safety: bad input is rejected before anything is
written; the CUDA context baseline is read before the model loads; samples
stream to disk from the first tick; Ctrl-C/SIGTERM stop the predictors and
still leave run.json (status `interrupted`) and a report of what was measured.
"""
from __future__ import annotations

import math
import os
import signal
import threading
from typing import Any, Callable

from gpuscope.measure.attribution import GapTracker, end_figures
from gpuscope.measure.devices import CudaDevices
from gpuscope.measure.options import MAX_PREDICTORS, DiagnoseOptions, parse_predictors, parse_seconds
from gpuscope.measure.recording import (
    Interrupts,
    Progress,
    Recording,
    SessionResult,
    environment_facts,
    open_nvml,
    sampler_stats,
)
from gpuscope.probes import scopes
from gpuscope.probes.host import usable_cores
from gpuscope.probes.readings import is_available, reading_to_json
from gpuscope.probes.sampler import PeakTracker
from gpuscope.record.catalogue import MODE_DIAGNOSE
from gpuscope.record.errors import EXIT_OK, EXIT_USAGE, UsageError
from gpuscope.record.files import check_out_path
from gpuscope.record.run import STATUS_COMPLETE, STATUS_FAILED, STATUS_INTERRUPTED, RunRecord, now_iso
from gpuscope.reports.render import render_run

MAX_RATE_RPS = 1e6


def run_diagnose(opts: DiagnoseOptions, progress: Progress | None = None,
                 nvml_opener: Callable[[], tuple[Any, dict[str, str] | None]] = open_nvml,
                 before_report: Callable[[RunRecord], None] | None = None,
                 cuda: CudaDevices | None = None) -> SessionResult:
    """Run the whole diagnose session. Raises UsageError/OutputError for bad input (before writing anything).

    `before_report(record)` runs once a complete run is saved and before the report renders, so what it
    adds to the record (`gpuscope check` stores its outcome) is in the report; it is skipped for a run
    that was interrupted or crashed. `nvml_opener` and `cuda` (torch.cuda unless given) are the device's
    backends: tests hand in fakes to run a GPU session's wiring on a machine without one.
    """
    import torch

    from gpuscope.analysis.findings import conclude
    from gpuscope.measure.models import ModelLoadError, load_model, parse_input_shape, validate_model
    from gpuscope.measure.sweep import SweepConfig, SweepHooks, default_predictor_counts, run_sweep
    from gpuscope.measure.thread_safety import SafetyConfig, check_thread_safety
    from gpuscope.measure.translator import RequestsError, check_tolerance
    from gpuscope.measure.workload import PredictorPool

    progress = progress or Progress(opts.quiet)
    # ---- validate everything the user typed, before touching the device or the disk
    counts = parse_predictors(opts.predictors)
    max_step_s = parse_seconds("--duration", opts.duration, 0.1)
    warmup_s = parse_seconds("--warmup", opts.warmup, 0.0)
    window_s = parse_seconds("--window", opts.window, 0.05)
    interval_s = parse_seconds("--interval", opts.interval, 0.005)
    if opts.intra_op_threads is not None and opts.intra_op_threads < 1:
        raise UsageError(f"--intra-op-threads must be at least 1, got {opts.intra_op_threads}")
    if opts.rate is not None and not (math.isfinite(opts.rate) and 0 < opts.rate <= MAX_RATE_RPS):
        raise UsageError(f"--rate must be a number of requests/s between 0 and {MAX_RATE_RPS:g}, got {opts.rate}")
    if opts.max_p99_ms is not None and not (math.isfinite(opts.max_p99_ms) and opts.max_p99_ms > 0):
        raise UsageError(f"--max-p99-ms must be a positive number of milliseconds, got {opts.max_p99_ms}")
    try:
        shape = parse_input_shape(opts.input_shape) if opts.input_shape else None
    except ValueError as exc:
        raise UsageError(f"--input-shape: {exc}") from None
    try:
        tolerance = check_tolerance(opts.output_tolerance)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_out_path(opts.out)
    from gpuscope.measure.devices import TorchDevices, resolve_device

    cuda = cuda or TorchDevices()
    device = resolve_device(opts.device, cuda)
    gpu = device.startswith("cuda")
    cores = usable_cores()
    counts = counts or default_predictor_counts(cores, gpu)
    if opts.include_predictors is not None and opts.include_predictors not in counts:
        if not 1 <= opts.include_predictors <= MAX_PREDICTORS:
            raise UsageError(f"--at-predictors {opts.include_predictors}: a sweep runs 1 to {MAX_PREDICTORS} predictors")
        counts = tuple(sorted({*counts, opts.include_predictors}))
    size = opts.model_size or ("large" if gpu else "small")
    if opts.intra_op_threads is not None:
        torch.set_num_threads(opts.intra_op_threads)

    # ---- the device, and the CUDA context baseline before the model loads
    pid = os.getpid()
    recording = Recording(MODE_DIAGNOSE, pid, progress, nvml_opener, cuda)
    record = recording.record
    # A CPU run measures no GPU; the record says why: none here (NVML's own reason), or the user chose the CPU.
    nvml_index = recording.prepare_device(device, None if gpu else f"profiling on the CPU (--device {opts.device})")
    gpu_probe = recording.gpu_probe

    try:
        model = load_model(opts.model, cuda.tensor_device(device), shape, opts.dtype, size, opts.trust_model_file,
                           opts.requests)
        validate_model(model)
    except (ModelLoadError, RequestsError) as exc:
        raise UsageError(str(exc)) from None
    out_dir = recording.claim_folder(opts.out)
    # ---- thread safety, before the sweep (about a second): writes seen, responses compared
    progress.update("checking thread safety")
    safety_config = SafetyConfig(predictors=max(2, min(4, max(counts))), tolerance=tolerance)
    try:
        record.thread_safety = check_thread_safety(model, safety_config)
    except Exception as exc:  # the check must never cost the sweep: say why it has no verdict
        record.thread_safety = {"checked": False, "error": f"{type(exc).__name__}: {str(exc).strip()[:200]}"}

    recording.config({"device": device, "gpu_index": nvml_index, "model": opts.model, "model_size": size,
                      "predictors": list(counts), "max_step_s": max_step_s, "warmup_s": warmup_s,
                      "window_s": window_s, "interval_s": interval_s, "streams": bool(opts.streams and gpu),
                      "copy_model": opts.copy_model, "inference_mode": opts.inference_mode,
                      "intra_op_threads": opts.intra_op_threads, "rate_rps": opts.rate, "max_p99_ms": opts.max_p99_ms,
                      "requests": opts.requests, "output_tolerance": tolerance, "out": out_dir})
    record.model = model.to_json()
    record.environment = environment_facts(device, cuda)
    if gpu_probe is not None:
        record.environment["driver"] = gpu_probe.devices[0].driver if gpu_probe and gpu_probe.devices else None

    # ---- probes and sampler
    sampling = recording.sample_workload(device, nvml_index, model.model_bytes, interval_s)
    host_probe, monitor, run_peaks, gaps, sampler = (sampling.host_probe, sampling.monitor, sampling.run_peaks,
                                                     sampling.gaps, sampling.sampler)
    t0_ns = recording.t0_ns

    stop = threading.Event()
    pool = PredictorPool(model, streams=opts.streams, copy_model=opts.copy_model, inference_mode=opts.inference_mode)
    config = SweepConfig(predictors=counts, max_step_s=max_step_s, warmup_s=warmup_s, window_s=window_s,
                         max_p99_ms=opts.max_p99_ms, rate_rps=opts.rate)

    def on_step(step: Any) -> None:
        progress.line(_step_line(step))
        record.steps = list(hooks.steps)
        recording.save_progress()  # a kill -9 still leaves every finished step on disk

    def step_end_tick() -> Any:  # every step gets readings of its own (USS, process CPU), however short it is
        host_probe.request_all()
        return sampler.tick()

    hooks = SweepHooks(mark=sampler.mark, tick=step_end_tick, t0_ns=t0_ns, on_progress=progress.update,
                       on_line=progress.line, on_step=on_step, intra_op_threads=torch.get_num_threads)
    if opts.streams and not gpu:
        progress.line("--streams needs a CUDA device: ignored on the CPU")
    recording.save_progress()  # status "running": what a killed run leaves behind
    crash: BaseException | None = None
    with Interrupts(stop) as interrupts:
        sampler.start()
        sampler.mark("phase", name="sweep")
        try:
            run_sweep(pool, config, monitor, hooks, stop)
        except KeyboardInterrupt:
            interrupts.signum = interrupts.signum or signal.SIGINT
        except BaseException as exc:  # keep what was measured, then report the crash
            crash = exc
        finally:
            stop.set()
            recording.stop_samples()
            pool.release_copies()
    progress.finish()
    record.steps = hooks.steps
    record.ended_at = now_iso()
    if hooks.stopped_by:
        record.extra["stopped_by"] = hooks.stopped_by
    _finish_record(record, run_peaks, gaps, gpu_probe, pid, nvml_index, gpu, sampler)
    if crash is not None:
        record.status = STATUS_FAILED
        record.failure = f"{type(crash).__name__}: {crash}"
    elif interrupts.exit_code is not None:
        record.status = STATUS_INTERRUPTED
    else:
        record.status = STATUS_COMPLETE
    conclude(record)
    exit_code = interrupts.exit_code or EXIT_OK
    if record.status == STATUS_COMPLETE and record.steps and not any(s.requests for s in record.steps):
        # nothing was measured: say why on one line and exit 2, as for any input that cannot be profiled
        cause = next((m for s in record.steps for m in s.error_messages), None)
        progress.error("gpuscope: no request completed at any predictor count: "
                       + (cause if cause else f"a request takes longer than the measured window (--duration "
                                               f"{opts.duration}); raise --duration")
                       + " (run.json and the report keep what was seen)")
        exit_code = EXIT_USAGE
    recording.close_devices()
    result = recording.finish(exit_code, opts.report, render_run,
                              before_report if crash is None else None)
    if crash is not None:
        raise crash
    return result


def _finish_record(record: RunRecord, run_peaks: PeakTracker, gaps: GapTracker, gpu_probe: Any, pid: int,
                   nvml_index: int | None, gpu: bool, sampler: Any) -> None:
    """Processes seen, end-of-run figures, gaps and sampler costs: everything rules need from the run."""
    import psutil

    from gpuscope.probes.engines import EnginesProbe
    from gpuscope.probes.processes import describe_process

    peaks, last = run_peaks.peaks(), run_peaks.last()
    children = set()
    try:
        children = {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        pass
    known = dict(gpu_probe.processes) if gpu_probe is not None else {}
    if pid not in known:
        known[pid] = describe_process(pid, "", EnginesProbe())
    else:
        known[pid] = describe_process(pid, known[pid].name, EnginesProbe())  # engines loaded since first sight
    record.processes = process_entries(known, pid, children, nvml_index, peaks)
    if gpu and nvml_index is not None:
        record.baseline["end"] = end_figures(last, pid, nvml_index)
    record.extra["measurement_gaps"] = gaps.gaps
    record.extra["pid_namespace"] = gaps.evidence()
    record.sampler = sampler_stats(sampler)


def process_entries(known: dict[int, Any], pid: int, children: set[int], nvml_index: int | None,
                    peaks: dict[tuple[str, str], Any]) -> list[dict[str, Any]]:
    """record.processes: this process (and its children) and every process seen on its device (NVML's index),
    each with its peak memory and SM use there; ours first, then the largest. `known` maps pid -> ProcessInfo."""
    processes: dict[int, dict[str, Any]] = {}
    for other_pid, info in known.items():
        on_device = nvml_index is not None and (scopes.process_on_device(other_pid, nvml_index), "used_bytes") in peaks
        if other_pid != pid and not on_device:
            continue  # seen only on another GPU: not this run's neighbour
        entry = info.to_json()
        entry["self"] = other_pid == pid or other_pid in children
        entry["child"] = other_pid in children
        if nvml_index is not None:
            scope = scopes.process_on_device(other_pid, nvml_index)
            entry["gpu"] = nvml_index
            entry["peak_used_bytes"] = peaks.get((scope, "used_bytes"))
            entry["peak_sm_util_pct"] = peaks.get((scope, "sm_util_pct"))
        processes[other_pid] = reading_to_json(entry)
    return sorted(processes.values(), key=lambda p: (not p.get("self"), -(p.get("peak_used_bytes") or 0)
                                                     if isinstance(p.get("peak_used_bytes"), int) else 0))


def _step_line(step: Any) -> str:
    from gpuscope.probes.units import format_bytes

    memory_key = "process_gpu_bytes" if is_available(step.memory.get("process_gpu_bytes")) else "rss_bytes"
    memory = step.memory.get(memory_key)
    memory_text = format_bytes(memory) if is_available(memory) else "n/a"
    lat = step.latency_ms
    # no completed request has no latency: say so rather than print "p50 0.00 ms"
    latency = (f"p50 {lat['p50']:7.2f} ms  p99 {lat['p99']:7.2f} ms" if "p50" in lat and "p99" in lat
               else "no request completed")
    return (f"  {step.predictors:>3} predictor{'s' if step.predictors != 1 else ' '}  {step.throughput_rps:9.1f} req/s  "
            f"{latency}  {memory_key.split('_')[0]} {memory_text}"
            + ("  (stable)" if step.stable else "") + (f"  errors {step.errors}" if step.errors else ""))
