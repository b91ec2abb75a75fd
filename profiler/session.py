"""The diagnose session: probes, sampler, model, sweep, conclusions, and the files they leave.

Order matters for honesty and safety: bad input is rejected before anything is
written; the CUDA context baseline is read before the model loads; samples
stream to disk from the first tick; Ctrl-C/SIGTERM stop the predictors and
still leave run.json (status `interrupted`) and a report of what was measured.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from probes.host import HostProbe, host_info, usable_cores
from probes.readings import is_available, reading_to_json
from probes.redact import redact_argv
from probes.sampler import PeakTracker, Sampler
from probes.samplefile import SampleWriter
from profiler import __version__
from profiler.attribution import GapTracker, StepMonitor, end_figures
from profiler.errors import EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, OutputError, UsageError
from profiler.files import REPORT_FILES
from profiler.options import MAX_PREDICTORS, DiagnoseOptions, parse_predictors, parse_seconds
from profiler.run import STATUS_COMPLETE, STATUS_FAILED, STATUS_INTERRUPTED, RunRecord, save_run

MAX_RATE_RPS = 1e6
RUN_FILE = "run.json"
SAMPLES_FILE = "samples.jsonl"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def check_out_path(path: str) -> None:
    """Fail at once, before the slow part (CUDA, the model), when --out can never be a folder because
    it or a folder above it is a file. Permissions are proven later by prepare_out_dir."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
    if not os.path.isdir(probe):
        what = "it is a file" if probe == os.path.abspath(path) else f"{probe} is a file"
        raise OutputError(f"cannot write to output folder {path}: {what}, not a folder")


def prepare_out_dir(path: str) -> str:
    """Create the output folder and prove it is writable, before any measurement."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".gpuscope-write-test-{os.getpid()}-{threading.get_ident()}")
        with open(probe, "w", encoding="utf-8") as fh:
            fh.write("ok")
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {path}: {exc.strerror or exc}") from None
    # A new run must not append to, or be mistaken for, the last one: nor may the last report sit beside
    # a run that is killed before it renders its own.
    for stale in (SAMPLES_FILE, RUN_FILE, *REPORT_FILES.values()):
        target = os.path.join(path, stale)
        if os.path.isfile(target) or os.path.islink(target):
            try:
                os.unlink(target)
            except FileNotFoundError:
                pass  # removed meanwhile by another run starting here
    return path


def environment_facts(device: str) -> dict[str, Any]:
    import platform

    import torch

    from probes.engines import memory_variables

    facts: dict[str, Any] = {"gpuscope": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                             "python": platform.python_version(), "memory_env": memory_variables(dict(os.environ)),
                             "torch_num_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        facts["cudnn"] = torch.backends.cudnn.version()
        facts["device_name"] = torch.cuda.get_device_name(device)
    return facts


class Interrupts:
    """SIGINT/SIGTERM set a stop event instead of raising in the middle of a step."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out
        self.signum = signum
        self.stop.set()

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int | None:
        if self.signum == signal.SIGINT:
            return EXIT_SIGINT
        if self.signum == signal.SIGTERM:
            return EXIT_SIGTERM
        return None


@dataclass
class SessionResult:
    record: RunRecord | None
    exit_code: int
    out_dir: str | None = None
    report_paths: dict[str, str] | None = None


class Progress:
    """Progress on stderr: a refreshing line on a terminal, plain lines otherwise."""

    def __init__(self, quiet: bool = False, stream: Any = None, columns: Callable[[], int] | None = None) -> None:
        import shutil

        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._columns = columns or (lambda: shutil.get_terminal_size((120, 24)).columns)
        self._last_plain = 0.0
        self._pending = False  # a refreshing line is on screen without its newline

    def update(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            # One row, never wrapped: \r returns to the start of the last row only, so a wrapped status line
            # would leave its first rows behind at every refresh.
            width = max(20, self._columns() - 1)
            if len(text) > width:
                text = text[:width - 1] + "\u2026"
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            self._pending = True
        elif time.monotonic() - self._last_plain > 2.0 or "warming" in text:
            self._last_plain = time.monotonic()
            self.stream.write(text + "\n")
            self.stream.flush()

    def line(self, text: str) -> None:
        if self.quiet:
            return
        self.error(text)

    def error(self, text: str) -> None:
        """A line the user must see (a failure), written even with --quiet."""
        if self.tty:
            self.stream.write("\r\033[K")
            self._pending = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """Clear a refreshing line so what follows (the summary) starts on a clean line."""
        if self._pending:
            self.stream.write("\r\033[K")
            self.stream.flush()
        self._pending = False


def open_nvml() -> tuple[Any, dict[str, str] | None]:
    from probes.nvml import DeviceUnavailable, open_backend

    try:
        return open_backend(), None
    except DeviceUnavailable as exc:
        return None, {"reason": exc.reason, "detail": exc.detail}


def run_diagnose(opts: DiagnoseOptions, progress: Progress | None = None,
                 nvml_opener: Callable[[], tuple[Any, dict[str, str] | None]] = open_nvml,
                 before_report: Callable[[RunRecord], None] | None = None) -> SessionResult:
    """Run the whole diagnose session. Raises UsageError/OutputError for bad input (before writing anything).

    `before_report(record)` runs once a complete run is saved and before the report renders, so what it
    adds to the record (`gpuscope check` stores its outcome) is in the report; it is skipped for a run
    that was interrupted or crashed.
    """
    import torch

    from profiler.findings import conclude
    from profiler.models import ModelLoadError, load_model, parse_input_shape, validate_model
    from profiler.sweep import SweepConfig, SweepHooks, default_predictor_counts, run_sweep
    from profiler.workload import PredictorPool

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
    check_out_path(opts.out)
    from profiler.devices import nvml_index_for, resolve_device

    device = resolve_device(opts.device)
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
    nvml, device_unavailable = nvml_opener()
    if not gpu:
        # A CPU run measures no GPU; say why: none here (NVML's own reason), or the user chose the CPU.
        if nvml is not None:
            nvml.shutdown()
            nvml, device_unavailable = None, {"reason": "no_device", "detail": f"profiling on the CPU (--device {opts.device})"}
        elif device_unavailable is not None:
            device_unavailable = {**device_unavailable, "detail": f"{device_unavailable['detail']}; profiling on the CPU"}
    pid = os.getpid()
    record = RunRecord(tool_version=__version__, started_at=now_iso(), host=host_info(), pid=pid, mode="diagnose")
    record.device_unavailable = device_unavailable
    gpu_probe = None
    nvml_index: int | None = None
    if nvml is not None:
        from probes.gpu import GpuProbe

        gpu_probe = GpuProbe(nvml)
        record.devices = [d.to_json() for d in gpu_probe.devices]
        nvml_index = nvml_index_for(int(device.split(":")[1]), [d.uuid for d in gpu_probe.devices],
                                    on_fallback=progress.line)
    if gpu:
        torch.zeros(1, device=device)  # initialise CUDA: what NVML shows now is the context alone
        torch.cuda.synchronize(device)
        if gpu_probe is not None:
            record.baseline["context_bytes"] = _process_gpu_bytes(gpu_probe, pid, nvml_index)
    record.baseline["rss_before_model_bytes"] = HostProbe(pid, per_core=False, uss_every_s=None).read_rss()

    try:
        model = load_model(opts.model, device, shape, opts.dtype, size, opts.trust_model_file)
        validate_model(model)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from None
    out_dir = prepare_out_dir(opts.out)

    record.config = {"device": device, "gpu_index": nvml_index, "model": opts.model, "model_size": size,
                     "predictors": list(counts), "max_step_s": max_step_s, "warmup_s": warmup_s, "window_s": window_s,
                     "interval_s": interval_s, "streams": bool(opts.streams and gpu), "copy_model": opts.copy_model,
                     "inference_mode": opts.inference_mode, "intra_op_threads": opts.intra_op_threads,
                     "rate_rps": opts.rate, "max_p99_ms": opts.max_p99_ms, "out": out_dir,
                     "argv": redact_argv(sys.argv[1:])}
    record.model = model.to_json()
    record.environment = environment_facts(device)
    if nvml is not None:
        record.environment["driver"] = gpu_probe.devices[0].driver if gpu_probe and gpu_probe.devices else None

    # ---- probes and sampler
    host_probe = HostProbe(pid)
    probes: dict[str, Any] = {"host": host_probe}
    # The allocator before NVML in each tick: memory allocated between the two reads then shows as NVML
    # growth for a tick (outside the allocator), not as torch holding more than NVML says the process has.
    if gpu:
        from probes.allocator import AllocatorProbe, RealTorchCuda

        scope_index = nvml_index if nvml_index is not None else int(device.split(":")[1])
        probes["allocator"] = AllocatorProbe(RealTorchCuda(), {int(device.split(":")[1]): f"pid:{pid}/gpu:{scope_index}"})
    if gpu_probe is not None:
        probes["gpu"] = gpu_probe
    # Without NVML the picture falls back to the CPU one (RSS), plus the allocator's own figures.
    monitor = StepMonitor(pid, nvml_index if gpu_probe is not None else None, model.model_bytes)
    run_peaks = PeakTracker()
    gaps = GapTracker(pid, nvml_index)
    t0_ns = time.monotonic_ns()
    writer = SampleWriter(os.path.join(out_dir, SAMPLES_FILE),
                          {"started_at": record.started_at, "t0_ns": t0_ns, "interval_s": interval_s, "pid": pid,
                           "mode": "diagnose", "device": device, "gpu_index": nvml_index})
    sampler = Sampler(probes, interval_s, writer, [monitor, run_peaks, gaps],
                      event_sources=[gpu_probe] if gpu_probe is not None else [])

    stop = threading.Event()
    pool = PredictorPool(model, streams=opts.streams, copy_model=opts.copy_model, inference_mode=opts.inference_mode)
    config = SweepConfig(predictors=counts, max_step_s=max_step_s, warmup_s=warmup_s, window_s=window_s,
                         max_p99_ms=opts.max_p99_ms, rate_rps=opts.rate)
    run_path = os.path.join(out_dir, RUN_FILE)

    def on_step(step: Any) -> None:
        progress.line(_step_line(step))
        record.steps = list(hooks.steps)
        _save_progress(record, run_path)  # a kill -9 still leaves every finished step on disk

    def step_end_tick() -> Any:  # every step gets a USS reading of its own, however short it is
        host_probe.request_uss()
        return sampler.tick()

    hooks = SweepHooks(mark=sampler.mark, tick=step_end_tick, t0_ns=t0_ns, on_progress=progress.update,
                       on_line=progress.line, on_step=on_step, intra_op_threads=torch.get_num_threads)
    if opts.streams and not gpu:
        progress.line("--streams needs a CUDA device: ignored on the CPU")
    _save_progress(record, run_path)  # status "running": what a killed run leaves behind
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
            sampler.stop()
            writer.close()
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
    if writer.error is not None:
        progress.error(f"gpuscope: writing samples failed: {writer.error.strerror or writer.error} "
                       f"({writer.lines_written} lines kept in {writer.path})")
        record.failure = record.failure or f"samples file: {writer.error}"
        exit_code = EXIT_USAGE
    try:
        save_run(record, run_path)
    except OSError as exc:
        raise OutputError(f"cannot write {run_path}: {exc.strerror or exc} "
                          f"(samples kept in {writer.path})") from None
    if before_report is not None and crash is None and exit_code == EXIT_OK:
        before_report(record)
    paths = None
    if opts.report:
        paths = render(record, out_dir, progress)
        if paths is None:
            exit_code = exit_code or EXIT_USAGE
    if crash is not None:
        raise crash
    return SessionResult(record, exit_code, out_dir, paths)


def _save_progress(record: RunRecord, path: str) -> None:
    """Write the record as it stands (status running); a failure here must not stop the measurement."""
    try:
        save_run(record, path)
    except OSError:
        pass


def render(record: RunRecord, out_dir: str, progress: Progress) -> dict[str, str] | None:
    """Render the report; a rendering failure is one line, and run.json stays."""
    try:
        from reports.render import render_report
    except ImportError:
        return {}
    try:
        return render_report(record, out_dir, os.path.join(out_dir, record.samples))
    except Exception as exc:
        progress.error(f"gpuscope: could not render the report: {type(exc).__name__}: {exc} (run.json is kept)")
        return None


def _process_gpu_bytes(gpu_probe: Any, pid: int, index: int | None) -> Any:
    from probes.readings import Unavailable

    for scope, metric, value in gpu_probe.read():
        if scope == f"pid:{pid}/gpu:{index}" and metric == "used_bytes":
            return value
    gpu_probe.drain_events()
    return Unavailable("process_gone", "NVML does not list this process")


def _finish_record(record: RunRecord, run_peaks: PeakTracker, gaps: GapTracker, gpu_probe: Any, pid: int,
                   nvml_index: int | None, gpu: bool, sampler: Sampler) -> None:
    """Processes seen, end-of-run figures, gaps and sampler costs: everything rules need from the run."""
    import psutil

    from probes.engines import EnginesProbe
    from probes.processes import describe_process

    peaks, last = run_peaks.peaks(), run_peaks.last()
    children = set()
    try:
        children = {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        pass
    processes: dict[int, dict[str, Any]] = {}
    known = dict(gpu_probe.processes) if gpu_probe is not None else {}
    if pid not in known:
        known[pid] = describe_process(pid, "", EnginesProbe())
    else:
        known[pid] = describe_process(pid, known[pid].name, EnginesProbe())  # engines loaded since first sight
    for other_pid, info in known.items():
        on_device = nvml_index is not None and (f"pid:{other_pid}/gpu:{nvml_index}", "used_bytes") in peaks
        if other_pid != pid and not on_device:
            continue  # seen only on another GPU: not this run's neighbour
        entry = info.to_json()
        entry["self"] = other_pid == pid or other_pid in children
        entry["child"] = other_pid in children
        if nvml_index is not None:
            scope = f"pid:{other_pid}/gpu:{nvml_index}"
            entry["gpu"] = nvml_index
            entry["peak_used_bytes"] = peaks.get((scope, "used_bytes"))
            entry["peak_sm_util_pct"] = peaks.get((scope, "sm_util_pct"))
        processes[other_pid] = reading_to_json(entry)
    record.processes = sorted(processes.values(), key=lambda p: (not p.get("self"), -(p.get("peak_used_bytes") or 0)
                                                                 if isinstance(p.get("peak_used_bytes"), int) else 0))
    if gpu and nvml_index is not None:
        record.baseline["end"] = end_figures(last, pid, nvml_index)
    record.extra["measurement_gaps"] = gaps.gaps
    record.extra["pid_namespace"] = gaps.evidence()
    record.sampler = {"interval_s": sampler.interval_s, "ticks": sampler.ticks, "missed_ticks": sampler.missed_ticks,
                      "mean_tick_cost_us": round(sampler.mean_tick_cost_us, 1),
                      "mean_tick_cpu_us": round(sampler.mean_tick_cpu_us, 1),
                      "probe_cost_us": {k: round(v / max(1, sampler.ticks) / 1000, 1) for k, v in sampler.probe_cost_ns.items()},
                      "probe_errors": dict(sampler.probe_errors)}


def _step_line(step: Any) -> str:
    from probes.units import format_bytes

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
