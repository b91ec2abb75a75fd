"""Per-thread scheduler times from /proc/PID/task/TID/schedstat: on a CPU, and runnable but waiting for one.

Why: a predictor thread's wall time is on-CPU + waiting for a CPU (run queue) +
blocked (sleeping on a lock, the GIL, I/O). Stage wall times alone cannot tell
a thread that waits for the GIL from one that waits for a core another process
holds: both just take longer. The kernel's run-queue wait separates them, so the
GIL estimate stays honest on a busy machine. The file holds three numbers:
nanoseconds on a CPU, nanoseconds waiting on a run queue, timeslices.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from gpuscope.probes.readings import ERROR, NOT_SUPPORTED, PROCESS_GONE, Unavailable


@dataclass(frozen=True)
class ThreadTimes:
    """Cumulative scheduler times of one thread, in nanoseconds."""

    on_cpu_ns: int
    runqueue_ns: int


def parse_schedstat(text: str) -> ThreadTimes:
    """`"218705640 178251799 70"` -> ThreadTimes(218705640, 178251799); ValueError when malformed."""
    parts = text.split()
    if len(parts) < 2:
        raise ValueError(f"schedstat has {len(parts)} fields, expected 3")
    return ThreadTimes(int(parts[0]), int(parts[1]))


SchedReader = Callable[[int], "ThreadTimes | Unavailable"]


def read_thread_times(tid: int, pid: int | None = None, proc_root: str = "/proc") -> ThreadTimes | Unavailable:
    """One thread's scheduler times, or Unavailable(reason) (a kernel without schedstat, a thread gone)."""
    path = f"{proc_root}/{pid or os.getpid()}/task/{tid}/schedstat"
    try:
        with open(path, encoding="ascii") as fh:
            return parse_schedstat(fh.read())
    except FileNotFoundError:
        return Unavailable(PROCESS_GONE if os.path.exists(f"{proc_root}/{pid or os.getpid()}/task") else NOT_SUPPORTED,
                           f"{path} is missing")
    except (OSError, ValueError) as exc:
        return Unavailable(ERROR, f"{path}: {exc}")


def unsupported_reader(tid: int) -> ThreadTimes | Unavailable:
    """A reader for platforms without /proc: every thread's times are unavailable, with the reason."""
    return Unavailable(NOT_SUPPORTED, "no per-thread scheduler statistics on this platform")
