"""The one recording lifecycle: the pieces every mode (diagnose, watch, profile(), compare) runs through."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from gpuscope import __version__
from gpuscope.measure.devices import CudaDevices, TorchDevices, index_match, nvml_index_for
from gpuscope.probes import scopes
from gpuscope.probes.readings import Unavailable
from gpuscope.probes.samplefile import SampleWriter
from gpuscope.record.errors import EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, OutputError
from gpuscope.record.files import RUN_FILE, SAMPLES_FILE, prepare_out_dir
from gpuscope.record.run import RunRecord, now_iso, save_run


def environment_facts(device: str, cuda: CudaDevices | None = None) -> dict[str, Any]:
    """The software a run measured with; on a GPU, the device's name as torch (`cuda`) gives it."""
    import platform

    import torch

    from gpuscope.probes.engines import memory_variables

    facts: dict[str, Any] = {"gpuscope": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                             "python": platform.python_version(), "memory_env": memory_variables(dict(os.environ)),
                             "torch_num_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        facts["cudnn"] = torch.backends.cudnn.version()
        facts["device_name"] = (cuda or TorchDevices()).device_name(device)
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


def process_gpu_bytes(gpu_probe: Any, pid: int, index: int | None) -> Any:
    """What NVML shows process `pid` holding on NVML device `index` right now; Unavailable when it lists no such
    row (no context yet, a container's own pid namespace, or no index)."""
    values = gpu_probe.read()  # the processes it sees first are described by events the sampler writes
    mine = scopes.process_on_device(pid, index) if index is not None else None
    for scope, metric, value in values:
        if scope == mine and metric == "used_bytes":
            return value
    return Unavailable("process_gone", "NVML does not list this process")


def open_nvml() -> tuple[Any, dict[str, str] | None]:
    from gpuscope.probes.nvml import DeviceUnavailable, open_backend

    try:
        return open_backend(), None
    except DeviceUnavailable as exc:
        return None, {"reason": exc.reason, "detail": exc.detail}




def sampler_stats(sampler: Any) -> dict[str, Any]:
    """What sampling cost, for record.sampler (the same keys in every mode)."""
    if sampler is None:
        return {"ticks": 0}
    return {"interval_s": sampler.interval_s, "ticks": sampler.ticks, "missed_ticks": sampler.missed_ticks,
            "mean_tick_cost_us": round(sampler.mean_tick_cost_us, 1),
            "mean_tick_cpu_us": round(getattr(sampler, "mean_tick_cpu_us", 0.0), 1),
            "probe_cost_us": {k: round(v / max(1, sampler.ticks) / 1000, 1) for k, v in sampler.probe_cost_ns.items()},
            "probe_errors": dict(sampler.probe_errors)}


@dataclass
class WorkloadSampling:
    """What Recording.sample_workload set up: the host probe (for USS on demand), the step monitor, the run's
    peaks, the gap tracker and the sampler."""

    host_probe: Any
    monitor: Any
    run_peaks: Any
    gaps: Any
    sampler: Any


def device_probes(pid: int, device: str, nvml_index: int | None, gpu_probe: Any,
                  allocator: Callable[[], Any] | None) -> dict[str, Any]:
    """A workload's device probes, in the order a tick reads them: torch's allocator (`allocator()` gives its
    backend; None on the CPU), then NVML. The allocator is read for torch's device index and its figures are
    scoped by NVML's index (torch's only when NVML is absent), so they land beside NVML's row for this process.
    The allocator goes first: memory allocated between the two reads then shows as NVML growth for a tick
    (outside the allocator), not as torch holding more than NVML says the process has."""
    probes: dict[str, Any] = {}
    if allocator is not None and device.startswith("cuda"):
        from gpuscope.probes.allocator import AllocatorProbe

        torch_index = int(device.split(":")[1])
        scope_index = nvml_index if nvml_index is not None else torch_index
        probes["allocator"] = AllocatorProbe(allocator(), {torch_index: scopes.process_on_device(pid, scope_index)})
    if gpu_probe is not None:
        probes["gpu"] = gpu_probe
    return probes


def workload_listeners(pid: int, nvml_index: int | None, model_bytes: int, nvml_open: bool) -> tuple[Any, Any, Any]:
    """The tick listeners of a workload run: each step's peaks and layers (StepMonitor), the run's peaks and last
    tick (PeakTracker), the readings that went missing (GapTracker). Without NVML the step's picture falls back
    to the CPU one (RSS), plus the allocator's own figures."""
    from gpuscope.measure.attribution import GapTracker, StepMonitor
    from gpuscope.probes.sampler import PeakTracker

    return (StepMonitor(pid, nvml_index if nvml_open else None, model_bytes), PeakTracker(),
            GapTracker(pid, nvml_index))


Renderer = Callable[[RunRecord, str], "dict[str, str] | None"]


class Recording:
    """One run's life on disk, the same for every mode: diagnose, watch, profile() and compare.

    In order: the record is opened (host facts, start time), the devices are
    opened (NVML, or why not), the output folder is claimed (emptied of the
    last run's files), samples stream to samples.jsonl from the first tick,
    run.json is saved as the run goes (status running: what a kill -9 leaves),
    and `finish()` stops sampling, saves the final run.json and renders the
    report. Each mode adds only what differs: its probes, its loop, its record.

    The report is rendered by the `renderer` the caller hands in (commands and
    the library API pass reports.render): the measure layer never imports the
    reports it feeds.
    """

    def __init__(self, mode: str, pid: int, progress: Any = None,
                 nvml_opener: Callable[[], tuple[Any, dict[str, str] | None]] | None = None,
                 cuda: CudaDevices | None = None) -> None:
        from gpuscope.probes.host import host_info

        self.mode = mode
        self.pid = pid
        self.progress = progress or Progress(quiet=True)
        self._nvml_opener = nvml_opener or open_nvml
        self.cuda: CudaDevices = cuda or TorchDevices()  # torch.cuda (a fake in tests): the context, the allocator
        self.record = RunRecord(tool_version=__version__, started_at=now_iso(), host=host_info(), pid=pid, mode=mode)
        self.nvml: Any = None
        self.gpu_probe: Any = None
        self.out_dir: str | None = None
        self.writer: Any = None
        self.sampler: Any = None
        self.t0_ns: int | None = None

    # -- devices
    def open_devices(self, cpu_detail: str | None = None, ask_nvml: bool = True,
                     describe: Callable[[int, str], Any] | None = None,
                     pid_exists: Callable[[int], bool] | None = None) -> Any:
        """Open NVML and list the devices in the record; returns the GpuProbe, or None (the record says why).

        `cpu_detail`: this run measures no GPU (the user chose the CPU); NVML is closed again and the record
        says so, keeping NVML's own reason when it had one. `ask_nvml=False` does not even open it (a parent
        that must not touch the device its workers are measured on).
        """
        nvml, unavailable = self._nvml_opener() if ask_nvml else (None, None)
        if cpu_detail is not None:
            if nvml is not None:
                nvml.shutdown()
                nvml, unavailable = None, {"reason": "no_device", "detail": cpu_detail}
            elif unavailable is not None:
                unavailable = {**unavailable, "detail": f"{unavailable['detail']}; {cpu_detail}"}
            else:
                unavailable = {"reason": "no_device", "detail": cpu_detail}
        self.nvml = nvml
        self.record.device_unavailable = unavailable
        if nvml is not None:
            from gpuscope.probes.gpu import GpuProbe

            self.gpu_probe = GpuProbe(nvml, describe=describe, pid_exists=pid_exists)
            self.record.devices = [d.to_json() for d in self.gpu_probe.devices]
        return self.gpu_probe

    def prepare_device(self, device: str, cpu_detail: str | None = None) -> int | None:
        """Everything a workload run in this process does before its model loads: open NVML (or say why not),
        find NVML's index of torch's `device`, create the CUDA context and read what this process holds then
        (`baseline.context_bytes`: the context alone, which the model's weights must not inflate), and the RSS
        before the model (`baseline.rss_before_model_bytes`). Returns NVML's index, None without NVML.

        The index is matched by UUID (under CUDA_VISIBLE_DEVICES torch's cuda:0 may be NVML's 2); when that
        fails torch's index is assumed, which may read another GPU's figures, so stderr and the record
        (`extra.gpu_index`) say so.
        """
        from gpuscope.probes.host import read_rss_bytes

        gpu = device.startswith("cuda")
        gpu_probe = self.open_devices(cpu_detail=cpu_detail)
        nvml_index: int | None = None
        if gpu_probe is not None and gpu:
            torch_index = int(device.split(":")[1])
            fallback: list[str] = []
            nvml_index = nvml_index_for(torch_index, [d.uuid for d in gpu_probe.devices],
                                        properties=self.cuda.device_properties, on_fallback=fallback.append)
            self.record.extra["gpu_index"] = index_match(torch_index, nvml_index, fallback)
            for line in fallback:
                self.progress.line(f"gpuscope: {line}")
        if gpu:
            self.cuda.initialise(device)  # what NVML shows for this process now is the context alone
            if gpu_probe is not None:
                self.record.baseline["context_bytes"] = process_gpu_bytes(gpu_probe, self.pid, nvml_index)
        self.record.baseline["rss_before_model_bytes"] = read_rss_bytes(self.pid)
        return nvml_index

    def close_devices(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.shutdown()
            except Exception:  # a driver already gone: nothing left to release
                pass
            self.nvml = None

    # -- the folder and the samples
    def claim_folder(self, path: str) -> str:
        """Create (or empty of the last run's files) the output folder, proving it writable."""
        self.out_dir = prepare_out_dir(path)
        return self.out_dir

    @property
    def run_path(self) -> str:
        return os.path.join(self.out_dir or ".", RUN_FILE)

    def config(self, values: dict[str, Any], argv: list[str] | None = None) -> dict[str, Any]:
        """record.config: the mode's settings plus the command line that started it, redacted."""
        from gpuscope.probes.redact import redact_argv

        self.record.config = {**values, "argv": redact_argv(list(sys.argv[1:] if argv is None else argv))}
        return self.record.config

    def start_samples(self, probes: dict[str, Any], interval_s: float, listeners: list[Any],
                      header: dict[str, Any] | None = None, clock_ns: Callable[[], int] | None = None,
                      event_sources: list[Any] | None = None) -> Any:
        """The sampler and samples.jsonl (streamed from the first tick). Not started: a mode ticks it itself
        (watch) or starts its thread (`sampler.start()`) when its measurement begins."""
        from gpuscope.probes.sampler import Sampler

        clock = clock_ns or time.monotonic_ns
        self.t0_ns = clock()
        self.writer = SampleWriter(os.path.join(self.out_dir or ".", SAMPLES_FILE),
                                   {"started_at": self.record.started_at, "t0_ns": self.t0_ns,
                                    "interval_s": interval_s, "pid": self.pid, "mode": self.mode, **(header or {})})
        if event_sources is None:
            event_sources = [self.gpu_probe] if self.gpu_probe is not None else []
        kwargs: dict[str, Any] = {"event_sources": event_sources}
        if clock_ns is not None:
            kwargs["clock_ns"] = clock_ns
        self.sampler = Sampler(probes, interval_s, self.writer, listeners, **kwargs)
        return self.sampler

    def sample_workload(self, device: str, nvml_index: int | None, model_bytes: int,
                        interval_s: float) -> "WorkloadSampling":
        """The probes and listeners of a workload run in this process (diagnose and tune alike): the host, torch's
        allocator on a GPU, NVML when open; a StepMonitor for each step's peaks and layers, the run's peaks and
        the readings that went missing. The sampler is created here, not started."""
        from gpuscope.probes.host import HostProbe

        host_probe = HostProbe(self.pid, interval_s=interval_s)
        probes: dict[str, Any] = {"host": host_probe,
                                  **device_probes(self.pid, device, nvml_index, self.gpu_probe,
                                                  self.cuda.allocator if device.startswith("cuda") else None)}
        monitor, run_peaks, gaps = workload_listeners(self.pid, nvml_index, model_bytes, self.gpu_probe is not None)
        sampler = self.start_samples(probes, interval_s, [monitor, run_peaks, gaps],
                                     {"device": device, "gpu_index": nvml_index})
        return WorkloadSampling(host_probe, monitor, run_peaks, gaps, sampler)

    def stop_samples(self, threaded: bool = True) -> None:
        """Stop the sampler's thread (it takes one last reading) and close samples.jsonl."""
        if self.sampler is not None and threaded:
            self.sampler.stop()
        if self.writer is not None:
            self.writer.close()


    # -- run.json and the report
    def save_progress(self) -> None:
        """Write the record as it stands; a failure here must not stop the measurement."""
        try:
            save_run(self.record, self.run_path)
        except OSError:
            pass

    def finish(self, exit_code: int, report: bool, renderer: Renderer | None,
               before_report: Callable[[RunRecord], None] | None = None) -> SessionResult:
        """The final run.json, then the report. A samples file that failed is exit 2 with the lines kept;
        a run.json that cannot be written is an OutputError (one line) naming where the samples are."""
        record = self.record
        writer = self.writer
        if writer is not None and writer.error is not None:
            self.progress.error(f"gpuscope: writing samples failed: {writer.error.strerror or writer.error} "
                                f"({writer.lines_written} lines kept in {writer.path})")
            record.failure = record.failure or f"samples file: {writer.error}"
            exit_code = EXIT_USAGE
        try:
            save_run(record, self.run_path)
        except OSError as exc:
            kept = f" (samples kept in {writer.path})" if writer is not None else ""
            raise OutputError(f"cannot write {self.run_path}: {exc.strerror or exc}{kept}") from None
        if before_report is not None and exit_code == EXIT_OK:
            before_report(record)
        paths = None
        if report and renderer is not None:
            paths = self.render(renderer)
            if paths is None:
                exit_code = exit_code or EXIT_USAGE
        return SessionResult(record, exit_code, self.out_dir, paths)

    def render(self, renderer: Renderer) -> dict[str, str] | None:
        """Render the report; a rendering failure is one line, and run.json stays."""
        try:
            return renderer(self.record, self.out_dir or ".")
        except Exception as exc:
            self.progress.error(f"gpuscope: could not render the report: {type(exc).__name__}: {exc} "
                                "(run.json is kept)")
            return None
