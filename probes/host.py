"""Host CPU and memory, and one process's memory, CPU, threads and context switches (from /proc).

Also the number of cores this process may really use: affinity and the cgroup
CPU quota, because a container with `cpus: 2` on a 64-core host still shows 64
in os.cpu_count() and every predictor's intra-op pool sizes itself from that.
"""
from __future__ import annotations

import errno
import os
import time
from collections import deque
from itertools import repeat
from typing import Any, Callable

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
    host probe reads USS at most once per `uss_every_s` (default 30 s: 5-10 us
    per 50 ms tick on average), RSS (/proc/PID/statm or /proc/PID/stat, a few us) every tick.
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
        page_bytes = os.sysconf("SC_PAGE_SIZE")
        with open(f"{proc_root}/{pid}/statm", "rb") as fh:
            rss = parse_statm_rss_bytes(fh.read(), page_bytes)
        if rss is None:
            with open(f"{proc_root}/{pid}/stat", "rb") as fh:
                rss = rss_of_mapless(ProcessStat(fh.read(), os.sysconf("SC_CLK_TCK"), page_bytes))
        return rss
    except OSError as exc:
        return _unavailable_for(exc, pid)
    except (ValueError, IndexError) as exc:
        return Unavailable(ERROR, f"{type(exc).__name__}: {exc}")


def read_rss_uss_bytes(pid: int, proc_root: str = "/proc") -> tuple[int, int] | None:
    """RSS and USS of a process (see read_smaps_rollup for the cost)."""
    rollup = read_smaps_rollup(pid, proc_root)
    return (rollup["rss_bytes"], rollup["uss_bytes"]) if rollup else None


def host_info() -> dict[str, Any]:
    """Static facts about the host, for the run record."""
    import platform

    import psutil

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


class ProcFile:
    """A /proc file kept open and read again with one pread at offset 0 per reading.

    Why: open + read + close of a /proc file costs ~25 us from Python, a pread on an open
    descriptor 1-10 us (the kernel regenerates the text at offset 0 either way). A file that
    does not fit the buffer is read again with a larger one, and the size is kept.
    A descriptor of /proc/PID/... stays bound to that process: after it exits, reads fail with
    ESRCH even if the pid is reused, so a reading never comes from a stranger.
    """

    __slots__ = ("path", "_fd", "_size")

    def __init__(self, path: str, size: int = 4096) -> None:
        self.path = path
        self._fd: int | None = None
        self._size = size

    def read(self) -> bytes:
        """The file's current text (raises OSError as open/read would)."""
        fd = self._fd
        if fd is None:
            fd = self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(fd, self._size, 0)
        while len(data) >= self._size:  # may be cut short: grow, and keep the size for the next read
            self._size *= 4
            data = os.pread(fd, self._size, 0)
        return data

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


CoreTimes = tuple[int, int, int]  # (busy, idle, iowait) clock ticks of one core


def parse_core_times(stat_text: bytes) -> list[CoreTimes]:
    """Per-core CPU times from /proc/stat, in file order (psutil's core numbering: offline cores are
    not listed). Busy is user + nice + system + irq + softirq + steal; guest times are already in
    user and nice (psutil and htop leave them out of the total for that reason)."""
    cores = []
    for line in stat_text.split(b"\n")[1:]:  # line 0 is the all-cores total
        if not line.startswith(b"cpu"):
            break
        user, nice, system, idle, iowait, irq, softirq, steal = line.split()[1:9]
        cores.append((int(user) + int(nice) + int(system) + int(irq) + int(softirq) + int(steal),
                      int(idle), int(iowait)))
    return cores


def core_busy_pct(before: CoreTimes, after: CoreTimes) -> float:
    """One core's busy share between two readings, as psutil.cpu_percent computes it (0.1% steps,
    0.0 when no time passed). A counter that went backwards (iowait does, on tickless kernels)
    counts as 0, as in psutil and top."""
    busy, idle, iowait = after[0] - before[0], after[1] - before[1], after[2] - before[2]
    busy, idle, iowait = busy if busy > 0 else 0, idle if idle > 0 else 0, iowait if iowait > 0 else 0
    total = busy + idle + iowait
    return round(100.0 * busy / total, 1) if total else 0.0


def parse_meminfo_bytes(text: bytes) -> tuple[int, int] | None:
    """(MemTotal, MemAvailable) in bytes from the head of /proc/meminfo, or None where the kernel does
    not give a usable MemAvailable (before 3.14, or 0 or above the total: psutil then estimates it).
    By index and int(), not a regular expression: a third of the cost, at every host reading."""
    if not text.startswith(b"MemTotal:"):
        return None
    at = text.find(b"\nMemAvailable:")
    if at < 0:
        return None
    try:
        total = int(text[9:text.index(b" kB\n", 9)]) * 1024
        available = int(text[at + 14:text.index(b" kB\n", at)]) * 1024
    except ValueError:
        return None
    if available <= 0 or available > total:
        return None
    return total, available


class ProcessStat:
    """The figures of /proc/PID/stat a tick needs: state, CPU seconds, threads, RSS."""

    __slots__ = ("state", "cpu_s", "num_threads", "rss_bytes")

    def __init__(self, text: bytes, ticks_per_s: int, page_bytes: int) -> None:
        fields = text[text.rindex(b")") + 2:].split()  # the name in parentheses may hold spaces and ')'
        self.state = fields[0]
        self.cpu_s = (int(fields[11]) + int(fields[12])) / ticks_per_s  # utime + stime
        self.num_threads = int(fields[17])
        self.rss_bytes = int(fields[21]) * page_bytes  # the same counter statm's "resident" shows


def parse_statm_rss_bytes(statm_text: bytes, page_bytes: int) -> int | None:
    """RSS from /proc/PID/statm ("size resident shared ..." in pages), or None where the task has no memory
    map (a size of 0): a zombie (it has exited and waits for its parent) or a kernel thread, which only
    /proc/PID/stat's state tells apart (`rss_of_mapless`)."""
    size_end = statm_text.index(b" ")
    if statm_text[:size_end] == b"0":
        return None
    return int(statm_text[size_end + 1:statm_text.index(b" ", size_end + 1)]) * page_bytes


def rss_of_mapless(stat: "ProcessStat") -> int:
    """The RSS of a task statm showed without a memory map: a zombie's raises ESRCH (as a read of a reaped
    process does: both read as PROCESS_GONE), a kernel thread's is its RSS (0)."""
    if stat.state in (b"Z", b"X"):
        raise OSError(errno.ESRCH, "a zombie: the process has exited")
    return stat.rss_bytes


def parse_ctx_switches(status_text: bytes) -> tuple[int, int]:
    """(voluntary, involuntary) context switches from /proc/PID/status. As with psutil's
    num_ctx_switches, these are the counts of the process's main thread (the kernel's per-task figure)."""
    voluntary = status_text.index(b"\nvoluntary_ctxt_switches:")
    involuntary = status_text.index(b"\nnonvoluntary_ctxt_switches:")
    return (int(status_text[voluntary + 25:status_text.index(b"\n", voluntary + 1)]),
            int(status_text[involuntary + 28:status_text.index(b"\n", involuntary + 1)]))


def _unavailable_for(exc: OSError, pid: int) -> Unavailable:
    if exc.errno in (errno.ESRCH, errno.ENOENT):
        return Unavailable(PROCESS_GONE, f"pid {pid} exited")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Unavailable(NO_PERMISSION, str(exc))
    return Unavailable(ERROR, f"{type(exc).__name__}: {exc}")


# USS walks every mapping of the process (smaps_rollup: milliseconds for a torch process), so it is read on
# this slower cadence, which the samples file states; RSS is read every tick, and a diagnose step's last tick
# reads USS whatever the cadence (`request_all`). At 10 s the walk of a torch process (4-5.5 ms on the
# development machine) was a quarter of a 50 ms tick's mean cost; at 30 s, 8 us a tick.
USS_EVERY_S = 30.0
# ...and no more often than keeps its reads under this share of the time: the walk costs about 75 ns a
# resident page, so a server holding 10 GB (about 200 ms a walk) would spend 0.7% of a core on it at a fixed
# 30 s; at this share it is read every 1,000 s instead.
USS_MAX_TIME_SHARE = 0.0002
# Host-wide CPU and memory (/proc/stat, /proc/meminfo), the process's CPU and threads (/proc/PID/stat) and its
# context switches (/proc/PID/status) at short intervals: about every quarter second. At 50 ms a core's busy
# share is a multiple of 20% anyway (the kernel counts CPU time in 10 ms jiffies: a quarter second is within
# 4%; the process's CPU is a quarter-second mean at any interval), and reading four /proc files for them at
# every tick was most of the host probe's cost. RSS stays at every tick, from /proc/PID/statm (the kernel
# does not walk the threads for it, as it does for /proc/PID/stat).
HOST_EVERY_S = 0.25


def ticks_between_host_reads(interval_s: float | None) -> int:
    """How many sampler ticks apart the host-wide readings are taken: every tick at `HOST_EVERY_S / 2` or
    longer intervals (and when the interval is not known), else the ticks nearest to `HOST_EVERY_S`."""
    if interval_s is None or interval_s <= 0 or interval_s * 2 >= HOST_EVERY_S:
        return 1
    return max(1, round(HOST_EVERY_S / interval_s))


class HostProbe:
    """Host-wide CPU/memory and the target process's resource use, read straight from /proc.

    Every tick: the process's RSS, by one pread on a descriptor kept open. At a sampler `interval_s` under
    0.125 s, the host-wide readings (/proc/stat per-core CPU, the head of /proc/meminfo), the process's CPU
    and threads (/proc/PID/stat) and its context switches (/proc/PID/status) come every
    `ticks_between_host_reads()` ticks (about every 0.25 s: they were most of the probe's cost at every
    tick; RSS then comes from /proc/PID/statm in between), and at every tick otherwise.
    USS (smaps_rollup: a page-table walk, ~75 ns a resident page) comes every `uss_every_s`, or less often
    where the walk would otherwise take over USS_MAX_TIME_SHARE of the time. `cadence_s()` says
    which readings come less often than every tick, so the samples file can state it; the ticks in
    between carry no value for them (never a repeated, older one). `request_all()` makes the next
    reading a whole one (a step's last tick).
    """

    CPU_WINDOW_S = 0.25
    PROCESS_METRICS = ("rss_bytes", "uss_bytes", "cpu_util_pct", "num_threads",
                       "ctx_switches_voluntary", "ctx_switches_involuntary")
    HOST_MEMORY_METRICS = ("mem_used_bytes", "mem_available_bytes")
    CTX_METRICS = ("ctx_switches_voluntary", "ctx_switches_involuntary")
    CADENCED_PROCESS_METRICS = ("cpu_util_pct", "num_threads", *CTX_METRICS)

    def __init__(self, pid: int | None = None, per_core: bool = True, uss_every_s: float | None = USS_EVERY_S,
                 clock_s: Any = None, proc_root: str = "/proc", interval_s: float | None = None,
                 cost_clock_s: Callable[[], float] = time.perf_counter) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.scope = scopes.process(self.pid)
        self._per_core = per_core
        self._uss_every_s = uss_every_s
        self._clock_s = clock_s or time.monotonic
        self._uss_read_at: float | None = None
        self._uss_gap_s = uss_every_s  # uss_every_s, or longer where the last read took long (USS_MAX_TIME_SHARE)
        self._cost_clock_s = cost_clock_s  # times the USS read itself: real seconds, whatever clock_s is
        self._uss_requested = False
        self._host_every_ticks = ticks_between_host_reads(interval_s)
        self._host_every_s = self._host_every_ticks * interval_s if self._host_every_ticks > 1 and interval_s else None
        self._reads_to_host = 0  # reads left until the host-wide readings are due (0: at the next read)
        self._proc_root = proc_root
        self._ticks_per_s = os.sysconf("SC_CLK_TCK")
        self._page_bytes = os.sysconf("SC_PAGE_SIZE")
        self._stat = ProcFile(f"{proc_root}/stat")
        self._meminfo = ProcFile(f"{proc_root}/meminfo", 256)  # the first lines are all a tick needs
        self._pid_stat = ProcFile(f"{proc_root}/{self.pid}/stat", 1024)
        self._pid_statm = ProcFile(f"{proc_root}/{self.pid}/statm", 256)
        self._pid_status = ProcFile(f"{proc_root}/{self.pid}/status")
        self._cpu_history: deque[tuple[float, float]] = deque()  # (monotonic s, process CPU s)
        self._core_names: list[str] = []
        self._core_times = parse_core_times(self._stat.read())  # the first reading has an interval to measure

    def close(self) -> None:
        """Close the kept-open /proc descriptors (also done when the probe is collected)."""
        for name in ("_stat", "_meminfo", "_pid_stat", "_pid_statm", "_pid_status"):
            handle = getattr(self, name, None)  # absent when __init__ failed part way
            if handle is not None:
                handle.close()

    def __del__(self) -> None:
        self.close()

    def cadence_s(self) -> dict[tuple[str, str], float]:
        """Readings taken less often than every tick, and the seconds between them (at least: USS waits
        longer where its last read took long, see USS_MAX_TIME_SHARE): ticks in between carry no value
        for them (never a repeated, older one)."""
        cadence = {(self.scope, "uss_bytes"): self._uss_every_s} if self._uss_every_s else {}
        if self._host_every_s is not None:
            host_metrics = ["cpu_util_pct", *self.HOST_MEMORY_METRICS]
            if self._per_core:
                host_metrics += self._core_metrics(len(self._core_times))
            cadence.update({("host", metric): self._host_every_s for metric in host_metrics})
            cadence.update({(self.scope, metric): self._host_every_s for metric in self.CADENCED_PROCESS_METRICS})
        return cadence

    def _cpu_pct(self, cpu_s: float) -> float | Unavailable:
        """The process's CPU over the last CPU_WINDOW_S or more (100 = one core busy).

        The kernel counts a process's CPU time in 10 ms clock ticks, so over one 50 ms tick the share
        is a multiple of 20% of a core, and right after a start a few ms can read as 800%. A mean over
        at least a quarter second is within 4%; until one is available, the reading says so.
        """
        now = time.monotonic()  # CPU seconds are real seconds, whatever clock the caller injected
        history = self._cpu_history
        history.append((now, cpu_s))
        while len(history) >= 2 and now - history[1][0] >= self.CPU_WINDOW_S:
            history.popleft()
        since, cpu_then = history[0]
        if now - since < self.CPU_WINDOW_S:
            return Unavailable(NOT_INITIALIZED, f"under {self.CPU_WINDOW_S:g} s of CPU time measured so far")
        return 100.0 * (history[-1][1] - cpu_then) / (now - since)

    def request_all(self) -> None:
        """Take every reading at the next read() whatever the cadences (USS, host-wide CPU and memory, the
        process's CPU, threads and context switches): a short step still gets readings of its own (diagnose asks at each step's
        final tick)."""
        self._uss_requested = True
        self._reads_to_host = 0

    def _host_due(self) -> bool:
        due = self._reads_to_host <= 0
        self._reads_to_host = self._host_every_ticks - 1 if due else self._reads_to_host - 1
        return due

    def _uss_due(self) -> bool:
        if self._uss_requested:
            self._uss_requested = False
            self._uss_read_at = self._clock_s()
            return True
        if self._uss_every_s is None:
            return False
        now = self._clock_s()
        if self._uss_read_at is None or now - self._uss_read_at >= self._uss_gap_s:
            self._uss_read_at = now
            return True
        return False

    def _read_uss(self) -> int | Unavailable:
        started_s = self._cost_clock_s()
        try:
            return self._read_uss_now()
        finally:
            if self._uss_every_s is not None:
                self._uss_gap_s = max(self._uss_every_s, (self._cost_clock_s() - started_s) / USS_MAX_TIME_SHARE)

    def _read_uss_now(self) -> int | Unavailable:
        rollup = read_rss_uss_bytes(self.pid, self._proc_root)
        if rollup is not None:
            return rollup[1]
        import psutil  # kernels before 4.14 have no smaps_rollup: psutil parses every mapping in smaps

        try:
            return int(psutil.Process(self.pid).memory_full_info().uss)
        except psutil.NoSuchProcess:
            return Unavailable(PROCESS_GONE, f"pid {self.pid} exited")
        except psutil.AccessDenied as exc:
            return Unavailable(NO_PERMISSION, str(exc))

    def _core_metrics(self, cores: int) -> list[str]:
        """`core0_util_pct`, ...: built once, not every tick (a 192-core node names 192 of them)."""
        names = self._core_names
        while len(names) < cores:
            names.append(f"core{len(names)}_util_pct")
        return names

    def _read_host(self, out: list[ScopedValue]) -> None:
        cores = parse_core_times(self._stat.read())
        per_core = list(map(core_busy_pct, self._core_times, cores))  # pairs up to the shorter, as zip
        self._core_times = cores
        out.append(("host", "cpu_util_pct", sum(per_core) / max(1, len(per_core))))
        if self._per_core:
            out += zip(repeat("host"), self._core_metrics(len(per_core)), per_core)
        memory = parse_meminfo_bytes(self._meminfo.read())
        if memory is None:
            import psutil  # psutil's estimate where the kernel gives no usable MemAvailable

            vm = psutil.virtual_memory()
            memory = (vm.total, vm.available)
        total, available = memory
        out += [("host", "mem_used_bytes", total - available), ("host", "mem_available_bytes", available)]

    def read(self) -> list[ScopedValue]:
        out: list[ScopedValue] = []
        whole = self._host_due()
        if whole:
            self._read_host(out)
        scope = self.scope
        try:
            if whole:
                stat = ProcessStat(self._pid_stat.read(), self._ticks_per_s, self._page_bytes)
                if stat.state in (b"Z", b"X"):
                    raise OSError(errno.ESRCH, "a zombie: the process has exited")
                switches = parse_ctx_switches(self._pid_status.read())
                out.append((scope, "rss_bytes", stat.rss_bytes))
            else:
                rss = parse_statm_rss_bytes(self._pid_statm.read(), self._page_bytes)
                if rss is None:  # no memory map: a zombie, or a kernel thread (rare: stat says which)
                    rss = rss_of_mapless(ProcessStat(self._pid_stat.read(), self._ticks_per_s, self._page_bytes))
                out.append((scope, "rss_bytes", rss))
            if self._uss_due():
                out.append((scope, "uss_bytes", self._read_uss()))
            if whole:
                out += [(scope, "cpu_util_pct", self._cpu_pct(stat.cpu_s)), (scope, "num_threads", stat.num_threads),
                        (scope, "ctx_switches_voluntary", switches[0]),
                        (scope, "ctx_switches_involuntary", switches[1])]
        except OSError as exc:
            missing = _unavailable_for(exc, self.pid)
            out += [(scope, m, missing) for m in self.PROCESS_METRICS]
        except (ValueError, IndexError) as exc:
            failed = Unavailable(ERROR, f"{type(exc).__name__}: {exc}")
            out += [(scope, m, failed) for m in self.PROCESS_METRICS]
        return out
