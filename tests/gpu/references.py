"""Independent references for the GPU scenarios: figures gpuscope did not compute.

The GPU suite proves gpuscope right only where it compares gpuscope's figures with something else. This
module holds the pieces that take or predict those other figures, each small and testable on the CPU with
scripted inputs (tests/test_gpu_suite_checks.py):

- `nvidia-smi`, run by the test process (a separate reader: its own NVML session, its own process):
  `parse_compute_apps` and `parse_gpu_memory` read its CSV, `SmiWatcher` polls it while a diagnose run
  runs, stamping each reading with CLOCK_MONOTONIC (the clock the run's samples.jsonl events use, shared by
  every process on the machine), and `match_steps` keeps, for each step, the readings taken inside its
  step_start/step_end events;
- `cublas_workspace_bytes`: the cuBLAS workspace torch gives each (handle, stream), predicted from
  CUBLAS_WORKSPACE_CONFIG the way torch parses it;
- `fill_bytes`: how much to allocate to bring the card to a target share, sized from NVML's free memory;
- `predictor_index`: which predictor thread of a step is calling (the trigger of the planted models);
- `DriverMemory`: device memory taken with the CUDA driver API, outside every framework's allocator.

It imports nothing outside the standard library at module level, and nothing from the suite: it is loaded
both as `tests.gpu.references` (pytest) and as the top-level `references` (a planted model's process).
"""
from __future__ import annotations

import ctypes
import json
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

MiB = 1 << 20

SMI_APPS_ARGV = ("nvidia-smi", "--query-compute-apps=gpu_uuid,pid,used_memory", "--format=csv,noheader,nounits")
SMI_GPU_ARGV = ("nvidia-smi", "--query-gpu=uuid,memory.total,memory.free", "--format=csv,noheader,nounits")
PREDICTOR_THREAD_PREFIX = "gpuscope-predictor-"  # profiler/measure/workload.py names step threads so


# ---------------------------------------------------------------- nvidia-smi's CSV

@dataclass(frozen=True)
class AppRow:
    """One row of `--query-compute-apps`: a process on a GPU; used_mib None where nvidia-smi prints N/A."""

    gpu_uuid: str
    pid: int
    used_mib: int | None


def _mib(text: str) -> int | None:
    """A MiB field: an integer, or None for what nvidia-smi prints when it has no figure ([N/A], [Not Supported])."""
    text = text.strip()
    return int(text) if text.isdigit() else None


def parse_compute_apps(text: str) -> list[AppRow]:
    """Rows of `nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader,nounits`.

    Lines that are not three fields with a numeric pid ("No running processes found", blank lines) are
    not processes and are skipped."""
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        rows.append(AppRow(parts[0], int(parts[1]), _mib(parts[2])))
    return rows


def parse_gpu_memory(text: str) -> dict[str, tuple[int | None, int | None]]:
    """`nvidia-smi --query-gpu=uuid,memory.total,memory.free ...`: uuid -> (total MiB, free MiB).

    Device used is total - free: NVML's v1 `used`, which counts the driver's reserve, as gpuscope's
    device_used_bytes does (probes/nvml.py)."""
    out: dict[str, tuple[int | None, int | None]] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[0]:
            continue
        out[parts[0]] = (_mib(parts[1]), _mib(parts[2]))
    return out


def run_nvidia_smi(argv: Sequence[str]) -> str:
    """nvidia-smi's stdout; RuntimeError (with its message) when it fails or is missing."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{argv[0]}: {type(exc).__name__}: {exc}") from None
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {result.returncode}: {(result.stderr or result.stdout).strip()[:300]}")
    return result.stdout


# ---------------------------------------------------------------- readings taken while a run runs

@dataclass(frozen=True)
class SmiReading:
    """One poll: both queries, bracketed by the monotonic clock before the first and after the second.

    `error` says why a poll has no figures (never zeros in their place)."""

    started_ns: int
    ended_ns: int
    apps: tuple[AppRow, ...] = ()
    devices: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    error: str | None = None

    def process_mib(self, pid: int, gpu_uuid: str | None = None) -> int | None:
        """The pid's MiB on the GPU `gpu_uuid` (on every GPU, summed, without one); None when not listed."""
        rows = [r for r in self.apps if r.pid == pid and (gpu_uuid is None or r.gpu_uuid == gpu_uuid)]
        if not rows or any(r.used_mib is None for r in rows):
            return None
        return sum(r.used_mib for r in rows if r.used_mib is not None)

    def device_mib(self, gpu_uuid: str | None) -> tuple[int, int] | None:
        """(used, total) MiB of the GPU `gpu_uuid` (the only GPU without one); None when not read."""
        if gpu_uuid is None:
            if len(self.devices) != 1:
                return None
            total, free = next(iter(self.devices.values()))
        elif gpu_uuid in self.devices:
            total, free = self.devices[gpu_uuid]
        else:
            return None
        return (total - free, total) if total is not None and free is not None else None

    def to_json(self) -> dict[str, Any]:
        return {"started_ns": self.started_ns, "ended_ns": self.ended_ns, "error": self.error,
                "apps": [[r.gpu_uuid, r.pid, r.used_mib] for r in self.apps],
                "devices": {k: list(v) for k, v in self.devices.items()}}


class SmiWatcher:
    """Polls nvidia-smi from the test process while a diagnose run runs, in a thread of its own.

    `run` (nvidia-smi's stdout for an argv) and `clock_ns` are injected, so `poll_once` is tested with
    scripted outputs and clocks; `start`/`stop` only repeat it on a thread every `interval_s`.
    """

    def __init__(self, run: Callable[[Sequence[str]], str] = run_nvidia_smi,
                 clock_ns: Callable[[], int] = time.monotonic_ns, interval_s: float = 0.1) -> None:
        self._run = run
        self._clock_ns = clock_ns
        self.interval_s = interval_s
        self.readings: list[SmiReading] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> SmiReading:
        started = self._clock_ns()
        try:
            apps = tuple(parse_compute_apps(self._run(SMI_APPS_ARGV)))
            devices = parse_gpu_memory(self._run(SMI_GPU_ARGV))
        except Exception as exc:
            reading = SmiReading(started, self._clock_ns(), error=f"{type(exc).__name__}: {exc}")
        else:
            reading = SmiReading(started, self._clock_ns(), apps, devices)
        self.readings.append(reading)
        return reading

    def _loop(self) -> None:
        while True:
            self.poll_once()
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> "SmiWatcher":
        self._thread = threading.Thread(target=self._loop, name="nvidia-smi-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[SmiReading]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return list(self.readings)


# ---------------------------------------------------------------- readings matched to the run's steps

@dataclass(frozen=True)
class StepWindow:
    """A step's span in samples.jsonl: its step_start and step_end events (sampler clock, CLOCK_MONOTONIC)."""

    predictors: int
    start_ns: int
    end_ns: int

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def step_windows(lines: Iterable[str]) -> list[StepWindow]:
    """Each step's window from samples.jsonl's lines (a torn or foreign line is skipped); a step_start
    without its step_end (a killed run) has no window."""
    starts: dict[int, int] = {}
    windows: list[StepWindow] = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict) or obj.get("event") not in ("step_start", "step_end"):
            continue
        n, t_ns = obj.get("predictors"), obj.get("t_ns")
        if not isinstance(n, int) or not isinstance(t_ns, int):
            continue
        if obj["event"] == "step_start":
            starts[n] = t_ns
        elif n in starts:
            windows.append(StepWindow(n, starts.pop(n), t_ns))
    return windows


def read_step_windows(samples: Path) -> list[StepWindow]:
    if not samples.exists():
        return []
    with samples.open(encoding="utf-8", errors="replace") as fh:
        return step_windows(line for line in fh if '"event"' in line)


@dataclass(frozen=True)
class StepSmi:
    """nvidia-smi's figures during one step: the largest of the readings taken wholly inside it.

    The process's memory inside a step only grows (the caching allocator keeps what it reserved), so the
    largest reading is the one nearest the step's own peak. `why` says why a figure is missing."""

    predictors: int
    readings: int
    process_mib: int | None
    device_used_mib: int | None
    device_total_mib: int | None
    step_s: float
    why: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"predictors": self.predictors, "readings": self.readings, "process_mib": self.process_mib,
                "device_used_mib": self.device_used_mib, "device_total_mib": self.device_total_mib,
                "step_s": round(self.step_s, 3), "why": self.why}


def match_steps(windows: list[StepWindow], readings: list[SmiReading], pid: int,
                gpu_uuid: str | None) -> dict[int, StepSmi]:
    """For each step, the nvidia-smi readings taken inside its window (both ends of a poll inside it)."""
    out: dict[int, StepSmi] = {}
    for w in windows:
        inside = [r for r in readings if r.error is None and w.start_ns <= r.started_ns and r.ended_ns <= w.end_ns]
        processes = [m for r in inside if (m := r.process_mib(pid, gpu_uuid)) is not None]
        devices = [d for r in inside if (d := r.device_mib(gpu_uuid)) is not None]
        why = None
        if not inside:
            failed = [r.error for r in readings if r.error is not None]
            why = (f"no nvidia-smi reading inside the step ({w.seconds:.2f} s long; {len(readings)} readings in all"
                   + (f"; failed polls: {failed[0]}" if failed else "") + ")")
        elif not processes:
            why = f"nvidia-smi did not list pid {pid} (with a figure) in the {len(inside)} readings inside the step"
        out[w.predictors] = StepSmi(w.predictors, len(inside), max(processes) if processes else None,
                                    max(d[0] for d in devices) if devices else None,
                                    devices[0][1] if devices else None, w.seconds, why)
    return out


def within(value: float, reference: float, share: float, floor: float = 0.0) -> bool:
    """|value - reference| <= max(share x |reference|, floor)."""
    return abs(value - reference) <= max(share * abs(reference), floor)


# ---------------------------------------------------------------- predicted figures

def cublas_workspace_bytes(config: str | None) -> int | None:
    """The cuBLAS workspace torch allocates per (cuBLAS handle, stream), from CUBLAS_WORKSPACE_CONFIG.

    torch (aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize) sums every `:SIZE:COUNT`
    pair, SIZE in KiB: ":4096:8" is 8 x 4 MiB = 32 MiB (its default on Hopper), ":4096:2:16:8" is
    8 MiB + 128 KiB (the pre-Hopper default), ":0:0" is none. The workspace comes from torch's caching
    allocator (a (handle, stream) -> block map that is never freed), so it shows in torch's allocated
    bytes. None when the setting holds no pair (torch then uses its own default).
    """
    if not config:
        return None
    pairs = re.findall(r":([0-9]+):([0-9]+)", config)
    if not pairs:
        return None
    return sum(int(size) * 1024 * int(count) for size, count in pairs)


def fill_bytes(total_bytes: int, free_bytes: int, target_share: float, own_bytes: int,
               granularity_bytes: int = 2 * MiB) -> int:
    """Bytes to allocate so that the device ends up `target_share` full, sized from NVML's free memory
    before the run: the target, less what is used now (total - free: processes and the driver's reserve),
    less what the profiled process will hold besides the fill (`own_bytes`, an estimate). Rounded down to
    the allocator's 2 MiB pages. ValueError when the card is already that full."""
    want = int(target_share * total_bytes) - (total_bytes - free_bytes) - own_bytes
    if want < granularity_bytes:
        raise ValueError(f"the device is already {(total_bytes - free_bytes) / total_bytes:.1%} used "
                         f"(+ {own_bytes // MiB} MiB for the run): nothing to fill up to {target_share:.0%}")
    return want // granularity_bytes * granularity_bytes


def predictor_index(thread_name: str | None = None) -> int | None:
    """The index of the calling predictor thread within its step (0 .. N-1), None on any other thread.

    gpuscope's PredictorPool names a step's threads gpuscope-predictor-0 .. -(N-1), so index k is seen
    only in steps of more than k predictors: a planted model keys its plant to a predictor count by
    acting only on thread k. (The thread-safety check's threads are gpuscope-safety-*, never a trigger.)"""
    name = threading.current_thread().name if thread_name is None else thread_name
    if not name.startswith(PREDICTOR_THREAD_PREFIX):
        return None
    tail = name[len(PREDICTOR_THREAD_PREFIX):]
    return int(tail) if tail.isdigit() else None


# ---------------------------------------------------------------- memory outside every allocator

class DriverError(RuntimeError):
    """A CUDA driver call failed: its name and CUresult."""


class DriverMemory:
    """Device memory taken with the CUDA driver API (cuMemAlloc), outside torch's allocator and any other.

    NVML counts it in the process's figure; torch.cuda.memory_stats() never sees it: exactly what
    gpuscope's outside-the-allocator layer must show. The allocation is made in the device's primary
    context (the one the CUDA runtime, and so torch, uses) and never freed: it ends with the process.
    `lib` is libcuda (injected: a fake on the CPU).
    """

    def __init__(self, lib: Any = None) -> None:
        self._lib = lib if lib is not None else ctypes.CDLL("libcuda.so.1")
        self.pointers: list[int] = []
        self.total_bytes = 0

    def _call(self, name: str, *args: Any) -> None:
        code = getattr(self._lib, name)(*args)
        if code != 0:
            raise DriverError(f"{name} returned CUresult {code}")

    def alloc(self, nbytes: int, ordinal: int) -> int:
        """Allocate `nbytes` on CUDA device `ordinal` (the runtime's numbering); the device pointer."""
        device = ctypes.c_int(0)
        context = ctypes.c_void_p(0)
        pointer = ctypes.c_uint64(0)
        popped = ctypes.c_void_p(0)
        self._call("cuInit", 0)
        self._call("cuDeviceGet", ctypes.byref(device), ordinal)
        self._call("cuDevicePrimaryCtxRetain", ctypes.byref(context), device)
        self._call("cuCtxPushCurrent_v2", context)
        try:
            self._call("cuMemAlloc_v2", ctypes.byref(pointer), ctypes.c_size_t(nbytes))
        finally:
            self._call("cuCtxPopCurrent_v2", ctypes.byref(popped))
        self.pointers.append(pointer.value)
        self.total_bytes += nbytes
        return pointer.value
