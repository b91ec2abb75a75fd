"""Fake NVML backends for tests on machines without a GPU.

`ScriptedNvml` implements `probes.nvml.NvmlBackend` from states written in the
test: devices are defined in code, a script says what each device looks like
at each tick, and tests move time forward with `advance()` (or `goto(tick)`).
Failures are injected per metric from a chosen tick on (`fail(...)`), and
`lose_gpu()` makes every call raise `MetricError(no_device)`, as NVML does once
a GPU has fallen off the bus.

`ReplayNvml` is the same backend driven by real readings from an H200
(tests/fixtures/gpu-facts/timeline-h200-2026-11-26.jsonl), one line per tick,
with the card's real driver reserve from memory info v2.

Both are injected through constructors (`GpuProbe(backend)`); nothing here
patches an import path.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from gpuscope.probes.nvml import MemoryInfo, MetricError, ProcessRow
from gpuscope.probes.readings import NO_DEVICE, NOT_INITIALIZED, PROCESS_GONE, REASONS

MiB = 1024**2
GiB = 1024**3

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "gpu-facts"
TIMELINE_H200 = FIXTURES / "timeline-h200-2026-11-26.jsonl"
RAW_H200 = FIXTURES / "raw-h200-2026-11-26.json"
FACTS_H200 = FIXTURES / "h200-2026-11-26.json"

# The real card the fixtures come from (raw-h200-2026-11-26.json, h200-2026-11-26.json).
H200_TOTAL_BYTES = 150_754_820_096          # mem_v1/mem_v2 total: 143,771 MiB
H200_DRIVER_RESERVED_BYTES = 644_939_776    # mem_v2 reserved: 615 MiB, the driver's own
H200_DRIVER = "580.159.04"
H200_CUDA_DRIVER = "13.0"
H200_NAME = "NVIDIA H200"
H200_UUID = "GPU-00000000-0000-0000-0000-0000000000c8"

# Every method of the NvmlBackend protocol that can be made to fail.
METRICS = ("device_count", "device_name", "device_uuid", "driver_version", "cuda_driver_version",
           "memory_info", "utilization_pct", "running_processes", "process_utilization_pct", "process_name")


def load_raw_h200() -> dict[str, Any]:
    """What the bindings really returned on the H200 (process rows, memory info v1/v2, memory_stats)."""
    return json.loads(RAW_H200.read_text())


def load_timeline_h200(path: str | Path = TIMELINE_H200) -> list[dict[str, Any]]:
    """The phased H200 time series, one dict per 50 ms tick."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@dataclass(frozen=True)
class FakeDevice:
    """A GPU as NVML describes it; defaults are the H200 of the fixtures."""

    name: str = H200_NAME
    uuid: str = H200_UUID
    total_bytes: int = H200_TOTAL_BYTES
    driver_reserved_bytes: int | None = H200_DRIVER_RESERVED_BYTES  # None: a v1-only driver


@dataclass(frozen=True)
class FakeProcess:
    """A process on a device: NVML's pid, per-process used bytes, name and SM utilisation."""

    pid: int
    used_bytes: int | None
    name: str = "python3"
    sm_util_pct: int | None = None  # None: no utilisation sample for it since the last query


@dataclass(frozen=True)
class DeviceState:
    """One device at one tick.

    By default device used = sum of the processes' memory + the driver reserve
    (what memory info v1 and nvidia-smi show), and free = total - used.
    `used_bytes`/`free_bytes` override that (a replay gives the card's own figures).
    `raw_rows` replaces the process list NVML returns (to plant malformed rows,
    such as swapped pid/usedGpuMemory fields) while `processes` still names them.
    """

    processes: tuple[FakeProcess, ...] = ()
    gpu_util_pct: int = 0
    mem_util_pct: int = 0
    used_bytes: int | None = None
    free_bytes: int | None = None
    raw_rows: tuple[ProcessRow, ...] | None = None

    def with_processes(self, *processes: FakeProcess) -> "DeviceState":
        return replace(self, processes=tuple(processes))


# A script entry: one DeviceState (device 0 of a one-GPU machine) or one per device.
State = Union[DeviceState, Sequence[DeviceState]]
Script = Union[Sequence[State], Callable[[int], State]]


@dataclass
class _Failure:
    metric: str              # a name from METRICS, or "*" for every call
    reason: str
    detail: str
    from_tick: int
    until_tick: int | None   # exclusive; None: for ever
    index: int | None        # a device index, or None for every device

    def applies(self, metric: str, tick: int, index: int | None) -> bool:
        if self.metric not in ("*", metric):
            return False
        if tick < self.from_tick or (self.until_tick is not None and tick >= self.until_tick):
            return False
        return self.index is None or index is None or self.index == index


@dataclass
class CallLog:
    """How often each backend method was called (for "read at most every ..." assertions)."""

    counts: dict[str, int] = field(default_factory=dict)
    since_us: list[int] = field(default_factory=list)  # process_utilization_pct arguments, in order

    def note(self, metric: str) -> None:
        self.counts[metric] = self.counts.get(metric, 0) + 1

    def __getitem__(self, metric: str) -> int:
        return self.counts.get(metric, 0)


class ScriptedNvml:
    """An NvmlBackend whose devices, per-tick states and failures are written by the test.

    `script` is a list of states (tick k uses entry k; past the end the last
    entry stays, as a real card keeps its last state) or a callable tick -> state.
    """

    def __init__(self, devices: Sequence[FakeDevice] | None = None, script: Script | None = None,
                 driver: str = H200_DRIVER, cuda_driver: str = H200_CUDA_DRIVER) -> None:
        self.devices = list(devices) if devices is not None else [FakeDevice()]
        self._script: Script = script if script is not None else [DeviceState()]
        if not callable(self._script) and len(self._script) == 0:
            raise ValueError("a script needs at least one state")
        self._driver = driver
        self._cuda_driver = cuda_driver
        self._failures: list[_Failure] = []
        self.tick = 0
        self.calls = CallLog()
        self.shut_down = False

    # -- driving the script ----------------------------------------------------------
    def advance(self, ticks: int = 1) -> "ScriptedNvml":
        self.tick += ticks
        return self

    def goto(self, tick: int) -> "ScriptedNvml":
        self.tick = tick
        return self

    @property
    def ticks(self) -> int | None:
        """Number of scripted states (None for a callable script)."""
        return None if callable(self._script) else len(self._script)

    def fail(self, metric: str, reason: str, *, from_tick: int | None = None, until_tick: int | None = None,
             index: int | None = None, detail: str = "") -> "ScriptedNvml":
        """From `from_tick` (default: now) on, calls of `metric` raise MetricError(reason)."""
        if metric != "*" and metric not in METRICS:
            raise ValueError(f"unknown NVML metric {metric!r} (one of {', '.join(METRICS)} or '*')")
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        self._failures.append(_Failure(metric, reason, detail or f"{metric}: injected {reason}",
                                       self.tick if from_tick is None else from_tick, until_tick, index))
        return self

    def lose_gpu(self, *, from_tick: int | None = None, index: int | None = None) -> "ScriptedNvml":
        """"GPU is lost": from `from_tick` on, every call raises MetricError(no_device)."""
        return self.fail("*", NO_DEVICE, from_tick=from_tick, index=index,
                         detail="NVML_ERROR_GPU_IS_LOST: the GPU has fallen off the bus")

    def state(self, index: int = 0) -> DeviceState:
        """The scripted state of device `index` at the current tick."""
        if callable(self._script):
            entry = self._script(self.tick)
        else:
            entry = self._script[min(self.tick, len(self._script) - 1)]
        states = [entry] if isinstance(entry, DeviceState) else list(entry)
        if not 0 <= index < len(self.devices):
            raise MetricError(NO_DEVICE, f"no device {index}")
        return states[index] if index < len(states) else DeviceState()

    def _enter(self, metric: str, index: int | None = None) -> None:
        self.calls.note(metric)
        if self.shut_down:
            raise MetricError(NOT_INITIALIZED, f"{metric}: NVML was shut down")
        for failure in self._failures:
            if failure.applies(metric, self.tick, index):
                raise MetricError(failure.reason, failure.detail)

    # -- NvmlBackend ---------------------------------------------------------------
    def device_count(self) -> int:
        self._enter("device_count")
        return len(self.devices)

    def device_name(self, index: int) -> str:
        self._enter("device_name", index)
        return self._device(index).name

    def device_uuid(self, index: int) -> str:
        self._enter("device_uuid", index)
        return self._device(index).uuid

    def driver_version(self) -> str:
        self._enter("driver_version")
        return self._driver

    def cuda_driver_version(self) -> str:
        self._enter("cuda_driver_version")
        return self._cuda_driver

    def memory_info(self, index: int) -> MemoryInfo:
        self._enter("memory_info", index)
        device, state = self._device(index), self.state(index)
        reserve = device.driver_reserved_bytes
        if state.used_bytes is not None:
            used = state.used_bytes
        else:
            used = sum(p.used_bytes or 0 for p in state.processes) + (reserve or 0)
        free = state.free_bytes if state.free_bytes is not None else device.total_bytes - used
        return MemoryInfo(device.total_bytes, used, free, reserve)

    def utilization_pct(self, index: int) -> tuple[int, int]:
        self._enter("utilization_pct", index)
        state = self.state(index)
        return state.gpu_util_pct, state.mem_util_pct

    def running_processes(self, index: int) -> list[ProcessRow]:
        self._enter("running_processes", index)
        state = self.state(index)
        if state.raw_rows is not None:
            return list(state.raw_rows)
        return [ProcessRow(p.pid, p.used_bytes) for p in state.processes]

    def process_utilization_pct(self, index: int, since_us: int) -> dict[int, int]:
        self._enter("process_utilization_pct", index)
        self.calls.since_us.append(since_us)
        return {p.pid: p.sm_util_pct for p in self.state(index).processes if p.sm_util_pct is not None}

    def process_name(self, pid: int) -> str:
        self._enter("process_name")
        for index in range(len(self.devices)):
            for proc in self.state(index).processes:
                if proc.pid == pid:
                    return proc.name
        raise MetricError(PROCESS_GONE, f"nvmlSystemGetProcessName: pid {pid} not found")

    def shutdown(self) -> None:
        self.shut_down = True

    def _device(self, index: int) -> FakeDevice:
        if not 0 <= index < len(self.devices):
            raise MetricError(NO_DEVICE, f"no device {index}")
        return self.devices[index]


def state_from_timeline_line(line: dict[str, Any]) -> DeviceState:
    """One line of capture_timeline.py's output as a device state (the card's own used/free)."""
    procs = tuple(FakeProcess(int(p["pid"]), int(p["used"]), str(p.get("name", ""))) for p in line["procs"])
    return DeviceState(processes=procs, gpu_util_pct=int(line["gpu_util"]), mem_util_pct=int(line["mem_util"]),
                       used_bytes=int(line["dev_used"]), free_bytes=int(line["dev_free"]))


class ReplayNvml(ScriptedNvml):
    """Replays real H200 readings, one timeline line per tick (the last line stays after the end).

    `lines` keeps the raw dicts (phase labels, torch figures) so a `FakeTorchCuda`
    can follow the same ticks: `FakeTorchCuda.from_timeline(replay.lines, follow=replay)`.
    """

    def __init__(self, lines: list[dict[str, Any]] | None = None, path: str | Path = TIMELINE_H200,
                 driver_reserved_bytes: int | None = None) -> None:
        self.lines = lines if lines is not None else load_timeline_h200(path)
        if not self.lines:
            raise ValueError("an empty timeline")
        if driver_reserved_bytes is None:
            driver_reserved_bytes = int(load_raw_h200()["mem_v2"]["reserved"])
        device = FakeDevice(total_bytes=int(self.lines[0]["dev_total"]), driver_reserved_bytes=driver_reserved_bytes)
        super().__init__([device], [state_from_timeline_line(line) for line in self.lines])

    @property
    def line(self) -> dict[str, Any]:
        return self.lines[min(self.tick, len(self.lines) - 1)]

    @property
    def phase(self) -> str:
        return str(self.line.get("phase", ""))

    def first_tick_of(self, phase: str) -> int:
        for tick, line in enumerate(self.lines):
            if line.get("phase") == phase:
                return tick
        raise KeyError(f"no phase {phase!r} in the timeline")
