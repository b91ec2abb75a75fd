"""Device and per-process GPU memory and utilisation, from an injected NvmlBackend.

Each read is independent per metric: one failing call makes that reading
`Unavailable(reason)` and leaves the rest intact (nvitop's rule). Rows from
NVML are sanity-checked before they are trusted, because some binding/driver
pairs have returned swapped `pid`/`usedGpuMemory` fields.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from gpuscope.probes import scopes
from gpuscope.probes.nvml import MetricError, NvmlBackend, ProcessRow
from gpuscope.probes.processes import ProcessInfo, describe_process
from gpuscope.probes.readings import ERROR, NOT_SUPPORTED, Unavailable

MAX_PID = 4_194_304  # Linux pid_max upper bound (2**22)
ScopedValue = tuple[str, str, Any]


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str | Unavailable
    uuid: str | Unavailable
    total_bytes: int | Unavailable
    driver: str | Unavailable

    def to_json(self) -> dict:
        from gpuscope.probes.readings import reading_to_json

        return reading_to_json({"index": self.index, "name": self.name, "uuid": self.uuid,
                                "total_bytes": self.total_bytes, "driver": self.driver})


@dataclass(frozen=True)
class CheckedRow:
    """A process row after sanity checks."""

    pid: int
    used_bytes: int | Unavailable
    in_namespace: bool
    note: str = ""


def _attempt(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or the Unavailable its failure means (the arguments are passed rather than closed
    over: a tick makes four of these calls per device)."""
    try:
        return fn(*args)
    except MetricError as exc:
        return Unavailable(exc.reason, exc.detail)
    except Exception as exc:  # a binding bug must not kill the sampler
        return Unavailable(ERROR, f"{type(exc).__name__}: {exc}")


def check_row(row: ProcessRow, total_bytes: int | Unavailable, pid_exists: Callable[[int], bool]) -> CheckedRow:
    """Validate one NVML process row: swapped fields, impossible sizes, foreign pid namespaces."""
    pid, used, note = fix_row(row, total_bytes)
    return CheckedRow(pid, used, pid_exists(pid), note)


def fix_row(row: ProcessRow, total_bytes: int | Unavailable) -> tuple[int, int | Unavailable, str]:
    """(pid, used bytes or why not, note) of one NVML process row: swapped fields put back, impossible
    sizes refused. What a tick needs of `check_row`, without asking whether the pid is in this namespace
    (a syscall per process per tick; the process's description says it, every `describe_every_s`)."""
    pid, used = row.pid, row.used_bytes
    note = ""
    total = total_bytes if isinstance(total_bytes, int) else None
    if used is not None and pid > MAX_PID and 0 < used <= MAX_PID and (total is None or pid <= total):
        pid, used, note = used, pid, "pid and usedGpuMemory were swapped by the binding"
    if used is None:
        checked_used: int | Unavailable = Unavailable(NOT_SUPPORTED, "NVML reports no per-process memory")
    elif used < 0 or (total is not None and used > total):
        checked_used = Unavailable(ERROR, f"implausible per-process memory {used} (device total {total})")
    else:
        checked_used = used
    return pid, checked_used, note


class GpuProbe:
    """Samples every device NVML can see, and every process on each.

    `pid_exists` is accepted for the callers that pass it and is not asked at each tick: whether a
    listed pid is in this pid namespace is the `exists` of its description (`describe`, every
    `describe_every_s`), which is what the snapshot and the findings read. Asking it per row per
    tick cost a syscall per GPU process every 50 ms and its answer went unused.
    """

    def __init__(self, backend: NvmlBackend, describe: Callable[[int, str], ProcessInfo] | None = None,
                 pid_exists: Callable[[int], bool] | None = None, describe_every_s: float = 5.0,
                 clock_s: Callable[[], float] | None = None) -> None:
        self._backend = backend
        self._describe = describe or (lambda pid, name: describe_process(pid, name))
        self._describe_every_s = describe_every_s
        self._clock_s = clock_s or time.monotonic  # SM holds and re-describes age on it (tests drive it)
        self._described_at: dict[int, float] = {}
        # Every process seen during the run (a foreign process that came and went still matters),
        # capped so a day-long watch on a box with churning processes stays bounded.
        self.processes: dict[int, ProcessInfo] = {}
        self.max_processes = 512
        self._events: list[dict] = []
        self._last_util_us: dict[int, int] = {}
        # (device, pid) -> (SM %, when NVML last gave a sample): NVML samples a process's utilisation only
        # every 1/6 to 1 s, so most 50 ms ticks find no new sample; the last one stands for SM_HOLD_S.
        self._last_sm: dict[tuple[int, int], tuple[int, float]] = {}
        self._process_scopes: dict[tuple[int, int], str] = {}
        self.device_count = backend.device_count()
        self._device_scopes = [scopes.device(i) for i in range(self.device_count)]
        self.devices = [self._device_info(i) for i in range(self.device_count)]

    def _device_info(self, index: int) -> DeviceInfo:
        memory = _attempt(self._backend.memory_info, index)
        total = memory.total_bytes if not isinstance(memory, Unavailable) else memory
        return DeviceInfo(index, _attempt(self._backend.device_name, index),
                          _attempt(self._backend.device_uuid, index), total,
                          _attempt(self._backend.driver_version))

    def drain_events(self) -> list[dict]:
        events, self._events = self._events, []
        return events

    def _note_process(self, pid: int, index: int, now_s: float) -> None:
        last = self._described_at.get(pid)
        if last is not None and now_s - last < self._describe_every_s:
            return
        self._described_at[pid] = now_s
        name = _attempt(self._backend.process_name, pid)
        info = self._describe(pid, name if isinstance(name, str) else "")
        if self.processes.get(pid) != info:
            if pid not in self.processes and len(self.processes) >= self.max_processes:
                oldest = min(self._described_at, key=lambda p: self._described_at[p] if p != pid else now_s)
                self.processes.pop(oldest, None)
                self._described_at.pop(oldest, None)
            self.processes[pid] = info
            self._events.append({"event": "process", "gpu": index, **info.to_json()})

    SM_HOLD_S = 2.0

    def _sm_pct(self, index: int, pid: int, samples: dict[int, int], now_s: float) -> int:
        """The process's SM % from NVML's newest sample: a new one when this tick got it, else the last
        one for up to SM_HOLD_S (NVML's own sampling period), else 0 (NVML samples only processes that
        used the SMs, so none for that long means idle)."""
        key = (index, pid)
        if pid in samples:
            self._last_sm[key] = (samples[pid], now_s)
            return samples[pid]
        last = self._last_sm.get(key)
        return last[0] if last is not None and now_s - last[1] <= self.SM_HOLD_S else 0

    def _process_scope(self, pid: int, index: int) -> str:
        """`pid:P/gpu:N`, built once per process and device (bounded: a week of churning pids)."""
        key = (pid, index)
        scope = self._process_scopes.get(key)
        if scope is None:
            if len(self._process_scopes) >= 4 * self.max_processes:
                self._process_scopes.clear()
            scope = self._process_scopes[key] = scopes.process_on_device(pid, index)
        return scope

    def read(self) -> list[ScopedValue]:
        out: list[ScopedValue] = []
        backend = self._backend
        now_s = self._clock_s()
        # bounded: samples older than SM_HOLD_S go, including those of processes that have exited
        if self._last_sm:
            self._last_sm = {k: v for k, v in self._last_sm.items() if now_s - v[1] <= self.SM_HOLD_S}
        for index in range(self.device_count):
            scope = self._device_scopes[index]
            memory = _attempt(backend.memory_info, index)
            if isinstance(memory, Unavailable):
                for metric in ("total_bytes", "used_bytes", "free_bytes", "driver_reserved_bytes"):
                    out.append((scope, metric, memory))
                total: int | Unavailable = memory
            else:
                total = memory.total_bytes
                out += [(scope, "total_bytes", memory.total_bytes), (scope, "used_bytes", memory.used_bytes),
                        (scope, "free_bytes", memory.free_bytes),
                        (scope, "driver_reserved_bytes", memory.reserved_bytes if memory.reserved_bytes is not None
                         else Unavailable(NOT_SUPPORTED, "memory info v2 not available"))]
            util = _attempt(backend.utilization_pct, index)
            if isinstance(util, Unavailable):
                out += [(scope, "util_pct", util), (scope, "mem_util_pct", util)]
            else:
                out += [(scope, "util_pct", util[0]), (scope, "mem_util_pct", util[1])]
            rows = _attempt(backend.running_processes, index)
            if isinstance(rows, Unavailable):
                out.append((scope, "process_count", rows))
                continue
            out.append((scope, "process_count", len(rows)))
            now_us = int(time.time() * 1e6)
            since_us = self._last_util_us.get(index, now_us - 1_000_000)
            self._last_util_us[index] = now_us
            proc_util = _attempt(backend.process_utilization_pct, index, since_us)
            util_failed = isinstance(proc_util, Unavailable)
            for row in rows:
                pid, used, note = fix_row(row, total)
                pscope = self._process_scope(pid, index)
                out.append((pscope, "used_bytes", used))
                out.append((pscope, "sm_util_pct", proc_util if util_failed else self._sm_pct(index, pid, proc_util, now_s)))
                if note:
                    self._events.append({"event": "nvml_row_fixed", "pid": pid, "gpu": index, "note": note})
                self._note_process(pid, index, now_s)
        return out
