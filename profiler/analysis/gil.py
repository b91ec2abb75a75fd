"""Where a request's time goes, and what the GIL allows: pure functions of a run record.

From the stage times at 1 predictor, the share p of a request spent in the
Python stages (preprocess, postprocess) is taken as holding the GIL; the model
stage releases it inside torch's kernels. Amdahl then bounds what N threads on
C usable cores can reach, relative to one predictor's throughput:

    bound(N) = 1 / (p + (1 - p) / min(N, C)),   at most 1 / p however many threads.

That is an upper bound (numpy and fast tokenizers release the GIL inside Python
stages), so the estimate is checked against what was measured: the measured
scaling, the process CPU, and the predictor threads' scheduler times. Time a
predictor spends blocked (neither on a CPU nor waiting for one) that grows with
the predictor count is the GIL's: waiting for a core another process holds is
run-queue time instead, so a busy machine does not pass itself off as the GIL.
The blocked share is taken of the time the threads were not in the run queue
(on a CPU or blocked), so that heavy load, which fills the run queue, does not
dilute it either.
"""
from __future__ import annotations

import math
from typing import Any

from gpuscope.probes.readings import is_available
from gpuscope.record.run import RunRecord, Step

PYTHON_STAGES = ("preprocess", "postprocess")


def stage_means_ms(step: Step) -> dict[str, float]:
    """Each stage's mean wall time (ms) in a step; {} for a plain model."""
    out: dict[str, float] = {}
    for stage, figures in (step.stages_ms or {}).items():
        mean = (figures or {}).get("mean")
        if is_available(mean) and math.isfinite(mean):
            out[stage] = float(mean)
    return out


def stage_shares(step: Step) -> dict[str, float]:
    """Each stage's share of a request's time (they add up to 1); {} without stages."""
    means = stage_means_ms(step)
    total = sum(means.values())
    return {stage: value / total for stage, value in means.items()} if total > 0 else {}


def python_share(step: Step) -> float | None:
    """The share of a request in the Python stages (None without stage times)."""
    shares = stage_shares(step)
    if not shares:
        return None
    return sum(shares.get(stage, 0.0) for stage in PYTHON_STAGES)


def amdahl_bound(p: float, predictors: int, cores: int) -> float:
    """The most N threads can reach relative to one, with a share p serialised (the GIL) on `cores` cores."""
    parallel = max(1, min(predictors, cores))
    return 1.0 / (p + (1.0 - p) / parallel) if p + (1.0 - p) / parallel > 0 else float(parallel)


def thread_shares(step: Step) -> dict[str, float] | None:
    """The predictor threads' time over the window as shares: on_cpu, runqueue, blocked (None when unread)."""
    times = step.thread_times_s
    if not isinstance(times, dict):
        return None
    wall = times.get("wall")
    if not is_available(wall) or wall <= 0:
        return None
    return {key: float(times[key]) / wall for key in ("on_cpu", "runqueue", "blocked") if is_available(times.get(key))}


def _blocked_off_queue(shares: dict[str, float] | None) -> float | None:
    """Blocked time as a share of the time the threads were not waiting for a core (on a CPU or blocked).

    Leaving the run queue out keeps the figure for a busy machine: when other processes hold the cores,
    every thread waits in the run queue whatever the GIL does, and a share of wall time would shrink."""
    if not shares or "blocked" not in shares or "on_cpu" not in shares:
        return None
    active = shares["on_cpu"] + shares["blocked"]
    return shares["blocked"] / active if active > 0 else None


# A step whose predictor threads waited at least this share of their time for a core ran on a contended
# machine: its raw scaling says as much about the other work as about the GIL.
CONTENDED_RUNQUEUE_SHARE = 0.10


def _per_unqueued_second(step: Step, shares: dict[str, float] | None) -> float | None:
    """Requests per second the threads were not waiting for a core (on a CPU or blocked): throughput with
    the time other processes held the cores taken out. An estimate, for the evidence: it takes a thread's
    queued share as what other work took from the whole step. Beside two busy loops, where raw scaling
    read 1.4-2.4x against an Amdahl bound of 1.02x, it came within the runs' own noise of the bound
    (tests/test_translator_e2e.py); the finding's title quotes measured figures only."""
    queued = shares.get("runqueue") if shares else None
    if queued is None or queued >= 0.99 or not step.throughput_rps:
        return None
    return step.throughput_rps / (1.0 - queued)


def _steps(record: RunRecord) -> list[Step]:
    return sorted((s for s in record.steps if s.requests > 0 and not s.oom and not s.partial and s.stages_ms),
                  key=lambda s: s.predictors)


def estimate(record: RunRecord) -> dict[str, Any] | None:
    """The GIL estimate of a run with stage times and a step at 1 predictor; None otherwise.

    {"python_share", "stage_shares", "amdahl_limit", "cores", "by_predictors": {N: {"bound", "measured",
    "unqueued", "cpu_cores", "blocked_share", "gil_wait_share", "runqueue_share", "busy_threads"}}}
    ("unqueued": the scaling per second the threads were not waiting for a core, None where unread)
    """
    steps = _steps(record)
    base = next((s for s in steps if s.predictors == 1), None)
    if base is None or not base.throughput_rps:
        return None
    p = python_share(base)
    if p is None:
        return None
    cores = int(record.host.get("usable_cores") or 1)
    base_threads = thread_shares(base)
    base_unqueued = _per_unqueued_second(base, base_threads)
    by_n: dict[str, dict[str, Any]] = {}
    for step in steps:
        shares = thread_shares(step)
        blocked = shares.get("blocked") if shares else None
        off = _blocked_off_queue(shares)
        base_off = _blocked_off_queue(base_threads)
        gil_wait = max(0.0, off - base_off) if off is not None and base_off is not None else None
        cpu = step.cpu_util_pct
        unqueued = _per_unqueued_second(step, shares)
        by_n[str(step.predictors)] = {
            "bound": amdahl_bound(p, step.predictors, cores),
            "measured": step.throughput_rps / base.throughput_rps,
            "unqueued": unqueued / base_unqueued if unqueued is not None and base_unqueued else None,
            "cpu_cores": cpu / 100.0 if is_available(cpu) else None,
            "blocked_share": blocked,
            "gil_wait_share": gil_wait,
            "runqueue_share": shares.get("runqueue") if shares else None,
            "busy_threads": step.predictors * (1 if record.gpu else (step.intra_op_threads or 1)),
        }
    return {"python_share": p, "stage_shares": stage_shares(base),
            "amdahl_limit": 1.0 / p if p > 0 else None, "cores": cores, "by_predictors": by_n}
