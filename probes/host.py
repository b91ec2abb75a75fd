"""Host CPU and memory, and one process's memory, CPU, threads and context switches (psutil).

Also the number of cores this process may really use: affinity and the cgroup
CPU quota, because a container with `cpus: 2` on a 64-core host still shows 64
in os.cpu_count() and every predictor's intra-op pool sizes itself from that.
"""
from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

import psutil

from gpuscope.probes import scopes
from gpuscope.probes.readings import ERROR, NO_PERMISSION, NOT_INITIALIZED, PROCESS_GONE, Unavailable

ScopedValue = tuple[str, str, Any]


def cgroup_cpu_quota(cgroup_root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup quota (v2 cpu.max or v1 cfs files), or None when unlimited."""
    try:
        with open(f"{cgroup_root}/cpu.max", encoding="ascii") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open(f"{cgroup_root}/cpu/cpu.cfs_quota_us", encoding="ascii") as fh:
            quota_us = int(fh.read().strip())
        with open(f"{cgroup_root}/cpu/cpu.cfs_period_us", encoding="ascii") as fh:
            period_us = int(fh.read().strip())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Cores this process can run on: min(affinity, ceil-free cgroup quota), at least 1."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        return max(1, min(affinity, int(quota)))
    return max(1, affinity)


def read_smaps_rollup(pid: int, proc_root: str = "/proc") -> dict[str, int] | None:
    """RSS, PSS and USS (bytes) from /proc/PID/smaps_rollup, or None where the kernel lacks it.

    Cheaper than psutil.memory_full_info() (which parses every mapping in
    smaps), but the kernel still walks the page tables: measured on the 2-core
    development machine, 3.7-4.4 ms for a process holding torch's CPU build and
    10.4 ms with torch's CUDA build imported (more and larger mappings). So the
    host probe reads USS at most once per `uss_every_s` (default 2 s: 90-260 us
    per 50 ms tick on average), RSS (statm, ~20 us) every tick.
    """
    try:
        with open(f"{proc_root}/{pid}/smaps_rollup", "rb") as fh:
            text = fh.read()
    except OSError:
        return None
    fields: dict[bytes, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(b":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024
    if b"Rss" not in fields:
        return None
    uss = fields.get(b"Private_Clean", 0) + fields.get(b"Private_Dirty", 0) + fields.get(b"Private_Hugetlb", 0)
    return {"rss_bytes": fields[b"Rss"], "pss_bytes": fields.get(b"Pss", fields[b"Rss"]), "uss_bytes": uss}


def read_rss_bytes(pid: int, proc_root: str = "/proc") -> int | Unavailable:
    """RSS from /proc/PID/statm: microseconds, where smaps_rollup (USS, PSS) costs milliseconds."""
    try:
        with open(f"{proc_root}/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except FileNotFoundError:
        return Unavailable(PROCESS_GONE, f"pid {pid} exited")
    except (OSError, ValueError, IndexError) as exc:
        return Unavailable(ERROR, f"{type(exc).__name__}: {exc}")


def read_rss_uss_bytes(pid: int, proc_root: str = "/proc") -> tuple[int, int] | None:
    """RSS and USS of a process (see read_smaps_rollup for the cost)."""
    rollup = read_smaps_rollup(pid, proc_root)
    return (rollup["rss_bytes"], rollup["uss_bytes"]) if rollup else None


def host_info() -> dict[str, Any]:
    """Static facts about the host, for the run record."""
    import platform

    memory = psutil.virtual_memory()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cgroup_cpu_quota": cgroup_cpu_quota(),
        "memory_total_bytes": memory.total,
    }


class HostProbe:
    """Host-wide CPU/memory and the target process's resource use."""

    CPU_WINDOW_S = 0.25

    def __init__(self, pid: int | None = None, per_core: bool = True, uss_every_s: float | None = 2.0,
                 clock_s: Any = None) -> None:
        self.pid = os.getpid() if pid is None else pid
        self._per_core = per_core
        self._uss_every_s = uss_every_s
        self._clock_s = clock_s or time.monotonic
        self._uss_read_at: float | None = None
        self._uss_requested = False
        self._proc = psutil.Process(self.pid)
        self._cpu_history: deque[tuple[float, float]] = deque()  # (monotonic s, process CPU s)
        psutil.cpu_percent(None, percpu=True)  # prime: the first call has no interval to measure

    def read_rss(self) -> int | Unavailable:
        """This process's RSS now (a one-off reading outside the sampler)."""
        try:
            return int(self._proc.memory_info().rss)
        except psutil.Error as exc:
            return Unavailable(PROCESS_GONE, str(exc))

    def _cpu_pct(self) -> float | Unavailable:
        """The process's CPU over the last CPU_WINDOW_S or more (100 = one core busy).

        The kernel counts a process's CPU time in 10 ms clock ticks, so over one 50 ms tick the share
        is a multiple of 20% of a core, and right after a start a few ms can read as 800%. A mean over
        at least a quarter second is within 4%; until one is available, the reading says so.
        """
        now = time.monotonic()  # CPU seconds are real seconds, whatever clock the caller injected
        spent = self._proc.cpu_times()
        history = self._cpu_history
        history.append((now, spent.user + spent.system))
        while len(history) >= 2 and now - history[1][0] >= self.CPU_WINDOW_S:
            history.popleft()
        since, cpu_then = history[0]
        if now - since < self.CPU_WINDOW_S:
            return Unavailable(NOT_INITIALIZED, f"under {self.CPU_WINDOW_S:g} s of CPU time measured so far")
        return 100.0 * (history[-1][1] - cpu_then) / (now - since)

    def request_uss(self) -> None:
        """Read USS at the next read() whatever the interval: a short step still gets a reading of its
        own (diagnose asks at each step's final tick)."""
        self._uss_requested = True

    def _uss_due(self) -> bool:
        if self._uss_requested:
            self._uss_requested = False
            self._uss_read_at = self._clock_s()
            return True
        if self._uss_every_s is None:
            return False
        now = self._clock_s()
        if self._uss_read_at is None or now - self._uss_read_at >= self._uss_every_s:
            self._uss_read_at = now
            return True
        return False

    def read(self) -> list[ScopedValue]:
        out: list[ScopedValue] = []
        per_core = psutil.cpu_percent(None, percpu=True)
        out.append(("host", "cpu_util_pct", sum(per_core) / max(1, len(per_core))))
        if self._per_core:
            out += [("host", f"core{i}_util_pct", value) for i, value in enumerate(per_core)]
        memory = psutil.virtual_memory()
        out += [("host", "mem_used_bytes", memory.total - memory.available),
                ("host", "mem_available_bytes", memory.available)]
        scope = scopes.process(self.pid)
        metrics = ("rss_bytes", "uss_bytes", "cpu_util_pct", "num_threads",
                   "ctx_switches_voluntary", "ctx_switches_involuntary")
        try:
            with self._proc.oneshot():
                out.append((scope, "rss_bytes", self._proc.memory_info().rss))
                if self._uss_due():
                    rollup = read_rss_uss_bytes(self.pid)
                    out.append((scope, "uss_bytes", rollup[1] if rollup else self._proc.memory_full_info().uss))
                switches = self._proc.num_ctx_switches()
                out += [(scope, "cpu_util_pct", self._cpu_pct()),
                        (scope, "num_threads", self._proc.num_threads()),
                        (scope, "ctx_switches_voluntary", switches.voluntary),
                        (scope, "ctx_switches_involuntary", switches.involuntary)]
        except psutil.NoSuchProcess:
            out += [(scope, m, Unavailable(PROCESS_GONE, f"pid {self.pid} exited")) for m in metrics]
        except psutil.AccessDenied as exc:
            out += [(scope, m, Unavailable(NO_PERMISSION, str(exc))) for m in metrics]
        except Exception as exc:
            out += [(scope, m, Unavailable(ERROR, f"{type(exc).__name__}: {exc}")) for m in metrics]
        return out
