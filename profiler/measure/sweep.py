"""Sweep orchestration: one measured step per predictor count, stopping early on OOM or a latency limit.

A step is stable when its last three windows agree within 10% (perf_analyzer's
rule) or its time is up. Memory for the step comes from the StepMonitor's peaks
between the step's start and end marks, never from one lucky reading.
"""
from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from gpuscope.measure.attribution import StepMonitor
from gpuscope.measure.workload import PredictorPool, StepRun, ThreadStartError
from gpuscope.probes.units import format_ms
from gpuscope.record.run import Step


@dataclass(frozen=True)
class SweepConfig:
    predictors: tuple[int, ...]
    max_step_s: float = 6.0
    warmup_s: float = 0.5
    window_s: float = 1.0
    stable_windows: int = 3
    stable_tolerance: float = 0.10
    max_p99_ms: float | None = None
    rate_rps: float | None = None


def default_predictor_counts(usable_cores: int, gpu: bool) -> tuple[int, ...]:
    """Powers of two up to 2x the usable cores (at least up to 4), capped at 32 on a GPU."""
    top = max(4, 2 * usable_cores)
    if gpu:
        top = min(max(top, 8), 32)
    counts, n = [], 1
    while n <= top:
        counts.append(n)
        n *= 2
    return tuple(counts)


def is_stable(windows: list[float], count: int = 3, tolerance: float = 0.10) -> bool:
    """The last `count` windows' throughputs agree within `tolerance` of their mean."""
    if len(windows) < count:
        return False
    last = windows[-count:]
    mean = sum(last) / count
    return mean > 0 and (max(last) - min(last)) / mean <= tolerance


def percentiles_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        index = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
        return ordered[index]

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": ordered[-1],
            "mean": statistics.fmean(ordered)}


def step_from_run(run: StepRun, memory: dict[str, Any], intra_op_threads: int, t0_ns: int,
                  started_ns: int, ended_ns: int) -> Step:
    latencies = run.latencies_ms()
    queue = run.queue_ms()
    messages: list[str] = []
    for result in run.results:
        for message in result.error_messages + ([f"predictor died: {result.died}"] if result.died else []):
            if message not in messages:
                messages.append(message)
    # The step's CPU is the process's mean over the measured window (CPU time / wall time), not the peak of
    # the sampler's 50 ms readings, which are noisy and may come from just before the step.
    sampled_cpu = memory.pop("cpu_util_pct", None)
    cpu = run.cpu_util_pct if run.cpu_util_pct is not None else sampled_cpu
    switches = memory.pop("ctx_switches_involuntary", None)
    step = Step(
        predictors=run.predictors, requests=run.requests, errors=run.errors, duration_s=run.duration_s,
        throughput_rps=run.requests / run.duration_s, latency_ms=percentiles_ms(latencies),
        memory=memory, cpu_util_pct=cpu, windows_rps=[round(w, 2) for w in run.windows_rps], stable=run.stable,
        oom=run.oom, error_messages=messages[:5],
        distinct_weight_sets=len({r.weights for r in run.results if r.weights}) or 0,
        grad_enabled_in_workers=any(r.grad_enabled for r in run.results),
        outputs_with_grad=sum(r.outputs_with_grad for r in run.results), intra_op_threads=intra_op_threads,
        ctx_switches_involuntary=switches, dead_predictors=sum(1 for r in run.results if r.died),
        started_s=(started_ns - t0_ns) / 1e9, ended_s=(ended_ns - t0_ns) / 1e9,
        partial=run.interrupted, offered_rps=run.offered_rps, dropped_arrivals=run.dropped_arrivals)
    if queue:
        step.queue_ms = percentiles_ms(queue)
        step.compute_ms = percentiles_ms(run.compute_ms())
    stages = run.stages_ms()
    if stages:
        step.stages_ms = {stage: {k: v for k, v in percentiles_ms(values).items() if k in ("p50", "p99", "mean")}
                          for stage, values in stages.items() if values}
    step.thread_times_s = run.thread_times_s
    return step


@dataclass
class SweepHooks:
    """How the sweep talks to the outside: marks in the samples file, a tick, progress."""

    mark: Callable[..., int]
    tick: Callable[[], Any]
    t0_ns: int
    on_progress: Callable[[str], None] = lambda text: None
    on_line: Callable[[str], None] = lambda text: None  # a message that must stay on screen
    on_step: Callable[[Step], None] = lambda step: None
    intra_op_threads: Callable[[], int] = lambda: 1
    steps: list[Step] = field(default_factory=list)
    stopped_by: str | None = None  # why the sweep ended before its last predictor count, if it did


def run_sweep(pool: PredictorPool, config: SweepConfig, monitor: StepMonitor, hooks: SweepHooks,
              stop: threading.Event) -> list[Step]:
    """Run each predictor count in turn; return the steps measured (also on early stop)."""
    steps = hooks.steps
    total = len(config.predictors)
    for index, predictors in enumerate(config.predictors, start=1):
        if stop.is_set():
            break
        label = f"[{index}/{total}] {predictors} predictor{'s' if predictors != 1 else ''}"
        hooks.on_progress(f"{label}: warming up")
        started_ns = hooks.mark("step_start", predictors=predictors)
        monitor.reset(since_ns=started_ns)
        # With --copy-model every predictor holds its own copy beside the original: the weights layer is that many.
        monitor.model_bytes = pool.model.model_bytes * (1 + predictors if pool.copy_model else 1)

        def on_window(elapsed_s: float, windows: list[float], label: str = label) -> None:
            hooks.on_progress(f"{label}: {elapsed_s:4.1f}/{config.max_step_s:g} s  {windows[-1]:8.1f} req/s")

        try:
            run = pool.run_step(predictors, config.max_step_s, warmup_s=config.warmup_s, window_s=config.window_s,
                                is_stable=lambda w: is_stable(w, config.stable_windows, config.stable_tolerance),
                                stop=stop, rate_rps=config.rate_rps, on_window=on_window)
        except ThreadStartError as exc:
            hooks.mark("step_end", predictors=predictors)
            hooks.stopped_by = str(exc)
            hooks.on_line(f"{exc}: stopping the sweep")
            break
        hooks.tick()  # the step's final state is always on disk and in the peaks
        ended_ns = hooks.mark("step_end", predictors=predictors)
        step = step_from_run(run, monitor.snapshot(), hooks.intra_op_threads(), hooks.t0_ns, started_ns, ended_ns)
        if run.interrupted and step.requests == 0:
            break  # nothing measured: do not report an empty step as a result
        # An interrupted step is kept (it is what was measured) but marked partial: shown, never recommended.
        steps.append(step)
        hooks.on_step(step)
        if step.oom:
            break
        if config.max_p99_ms is not None and step.latency_ms.get("p99", 0) > config.max_p99_ms:
            hooks.stopped_by = (f"p99 {format_ms(step.latency_ms['p99'])} at {predictors} "
                                f"predictor{'s' if predictors != 1 else ''} exceeded "
                                f"--max-p99-ms {config.max_p99_ms:g}")
            hooks.on_line(f"{hooks.stopped_by}: stopping the sweep")
            break
        if run.interrupted:
            break
    return steps
