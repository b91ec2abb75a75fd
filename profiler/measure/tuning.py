"""Measuring one tuning configuration: in this process, or in a fresh spawned worker when it sets the environment.

`gpuscope tune` (commands/tune.py) asks `analysis/search.py` what to measure and
hands each `Settings` to one of two measurers, which both return the search's
`Measurement` and the run record's `Step`:

* `InProcessMeasurer`: predictor count, intra-op threads and CUDA streams can all
  change while the process runs (torch.set_num_threads between steps, a pool per
  stream setting), so they share the one loaded model and diagnose's own sweep
  (measure/sweep.py), samples and step memory.
* `ChildMeasurer`: environment variables (CUBLAS_WORKSPACE_CONFIG,
  PYTORCH_CUDA_ALLOC_CONF, OMP/MKL variables) act only before torch and CUDA
  initialise, so each such group runs in its own worker from measure/workers.py,
  spawned with the setting in its environment, kept for that group's predictor
  counts and reaped when the group is done or on any exit path (`close()`), as
  compare's workers are.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from gpuscope.analysis.search import Group, Measurement, Settings
from gpuscope.probes.readings import is_available
from gpuscope.record.run import Step

FAILED_SHARE = 0.01  # a step with this share of failed requests or more is a failure, never a winner


@dataclass(frozen=True)
class StepPlan:
    """How long each configuration is measured."""

    max_step_s: float
    warmup_s: float
    window_s: float
    rate_rps: float | None = None  # open-loop arrivals (in-process configurations); None: closed loop

    @property
    def estimate_s(self) -> float:
        """What one step can cost before anything was measured: warm-up and the longest measured window."""
        return self.warmup_s + self.max_step_s


def _int_or_none(value: Any) -> int | None:
    return int(value) if is_available(value) and isinstance(value, (int, float)) and not isinstance(value, bool) else None


def measurement_of(settings: Settings, step: Step | None, wall_s: float, interrupted: bool) -> Measurement:
    """The search's view of a measured step: throughput, latency, peak memory, and whether it failed."""
    if step is None:
        return Measurement(settings, 0.0, wall_s=wall_s, interrupted=True)
    failure = None
    if step.oom:
        failure = f"out of memory at {settings.predictors} predictors"
    elif step.dead_predictors:
        failure = f"{step.dead_predictors} predictor(s) died: " + "; ".join(step.error_messages[:1])
    elif step.requests == 0:
        failure = "no request completed" + (f": {step.error_messages[0]}" if step.error_messages else "")
    elif step.error_rate >= FAILED_SHARE:
        failure = f"{step.error_rate:.0%} of requests failed" + (f": {step.error_messages[0]}" if step.error_messages else "")
    memory = step.memory or {}
    return Measurement(settings, step.throughput_rps, step.latency_ms.get("p50"), step.latency_ms.get("p99"),
                       device_bytes=_int_or_none(memory.get("process_gpu_bytes")),
                       host_bytes=_int_or_none(memory.get("rss_bytes")), wall_s=wall_s, failure=failure,
                       interrupted=interrupted or step.partial)


class InProcessMeasurer:
    """Settings without environment variables, measured on the model this process loaded."""

    def __init__(self, pools: dict[bool, Any], monitor: Any, plan: StepPlan, make_hooks: Callable[[], Any],
                 stop: threading.Event, set_threads: Callable[[int], None],
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        self.pools = pools  # streams on/off -> PredictorPool over the one model
        self.monitor = monitor
        self.plan = plan
        self.make_hooks = make_hooks
        self.stop = stop
        self.set_threads = set_threads
        self.clock_s = clock_s

    def measure(self, settings: Settings) -> tuple[Measurement, Step | None]:
        from gpuscope.measure.sweep import SweepConfig, run_sweep

        started = self.clock_s()
        self.set_threads(settings.intra_op_threads)
        hooks = self.make_hooks()
        hooks.intra_op_threads = lambda: settings.intra_op_threads
        config = SweepConfig(predictors=(settings.predictors,), max_step_s=self.plan.max_step_s,
                             warmup_s=self.plan.warmup_s, window_s=self.plan.window_s, rate_rps=self.plan.rate_rps)
        steps = run_sweep(self.pools[settings.streams], config, self.monitor, hooks, self.stop)
        step = steps[0] if steps else None
        if step is None and hooks.stopped_by:  # threads could not start: a failure, not an interruption
            failed = Step(predictors=settings.predictors, intra_op_threads=settings.intra_op_threads,
                          error_messages=[hooks.stopped_by])
            return measurement_of(settings, failed, self.clock_s() - started, False), failed
        return measurement_of(settings, step, self.clock_s() - started, self.stop.is_set()), step


class ChildMeasurer:
    """Settings with environment variables: one spawned worker per group, reaped when the group changes
    and in `close()` (call it on every exit path; it is safe to call twice)."""

    def __init__(self, spec: Any, plan: StepPlan, stop: threading.Event, nvml: Any = None,
                 nvml_index: int | None = None, poll_s: float = 0.1,
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        from gpuscope.measure.participants import ParticipantsProbe

        self.spec = spec  # measure/workers.py WorkerSpec: the model, device and shape, without the group's settings
        self.plan = plan
        self.stop = stop
        self.poll_s = poll_s
        self.clock_s = clock_s
        self.probe = ParticipantsProbe(nvml, nvml_index)
        self._group: Group | None = None
        self._workers: Any = None  # WorkerGroup
        self._worker: Any = None
        self.pids: list[int] = []

    def _worker_for(self, group: Group) -> Any:
        from gpuscope.measure.workers import WorkerGroup

        if self._group != group:
            self.close()
            spec = replace(self.spec, env=group.env, intra_op_threads=group.intra_op_threads, streams=group.streams)
            self._workers = WorkerGroup(spec, self.stop)
            self._group = group
            self.probe.mark_device_baseline()
            [self._worker] = self._workers.spawn(1, f"loading the model with {group.label()}")
            if self._worker.pid is not None:
                self.pids.append(self._worker.pid)
        return self._worker

    def measure(self, settings: Settings) -> tuple[Measurement, Step | None]:
        from gpuscope.measure.participants import WindowPeaks, build_row
        from gpuscope.measure.workers import Interrupted, WorkerError

        started = self.clock_s()
        try:
            worker = self._worker_for(settings.group)
            group = self._workers
            group.start_run([worker], settings.predictors)
            self._wait(self.plan.warmup_s, lambda: group.check_alive([worker], "warming up"))
            peaks = WindowPeaks()
            self.probe.set_pids([worker.pid])
            peaks.begin()
            window_start = time.perf_counter_ns()
            self._wait(self.plan.max_step_s, lambda: (group.check_alive([worker], "measuring"),
                                                      peaks(time.monotonic_ns(), self.probe.read())))
            self.probe.request_full()
            peaks(time.monotonic_ns(), self.probe.read())
            window_end = time.perf_counter_ns()
            found = peaks.end()
            if self.stop.is_set():
                return Measurement(settings, 0.0, wall_s=self.clock_s() - started, interrupted=True), None
            payloads = group.finish_run([worker], window_start, window_end)
        except Interrupted:
            return Measurement(settings, 0.0, wall_s=self.clock_s() - started, interrupted=True), None
        except WorkerError as exc:
            self.close()  # a dead or failing worker is not reused
            step = Step(predictors=settings.predictors, intra_op_threads=settings.intra_op_threads,
                        error_messages=[str(exc)])
            return measurement_of(settings, step, self.clock_s() - started, False), step
        row = build_row("threads", settings.predictors, payloads, (window_end - window_start) / 1e9, found, peaks.ticks)
        step = Step(predictors=settings.predictors, requests=row["requests"], errors=row["errors"],
                    duration_s=row["duration_s"], throughput_rps=row["throughput_rps"], latency_ms=row["latency_ms"],
                    memory={"rss_bytes": row["host_rss_bytes"], "uss_bytes": row["host_uss_bytes"],
                            "process_gpu_bytes": row["device_bytes"]},
                    oom=any(p.get("oom") for p in payloads), error_messages=row.get("error_messages", [])[:5],
                    dead_predictors=sum(p.get("dead_predictors", 0) for p in payloads),
                    intra_op_threads=settings.intra_op_threads)
        return measurement_of(settings, step, self.clock_s() - started, False), step

    def _wait(self, seconds: float, check: Callable[[], Any]) -> None:
        from gpuscope.measure.workers import Interrupted

        end = self.clock_s() + seconds
        while True:
            if self.stop.is_set():
                raise Interrupted()
            check()
            remaining = end - self.clock_s()
            if remaining <= 0:
                return
            self.stop.wait(min(self.poll_s, remaining))

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
        self._workers, self._worker, self._group = None, None, None
        self.probe.set_pids([])
