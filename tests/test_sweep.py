"""The sweep: stability, percentiles, the default predictor counts, and run_sweep's early stops, with real
CPU steps of tiny models (each well under a second)."""
from __future__ import annotations

import copy
import os
import threading
import time

import pytest
from torch import nn

from gpuscope.measure.attribution import StepMonitor
from gpuscope.measure.models import LoadedModel
from gpuscope.measure.sweep import (
    SweepConfig,
    SweepHooks,
    default_predictor_counts,
    is_stable,
    percentiles_ms,
    run_sweep,
)
from gpuscope.measure.workload import PredictorPool
from gpuscope.probes.host import HostProbe
from gpuscope.probes.sampler import Sampler

FAST = dict(max_step_s=0.3, warmup_s=0.05, window_s=0.1)


def loaded(module: nn.Module) -> LoadedModel:
    module.eval()
    return LoadedModel(module=module, source="test", kind="builtin", input_shape=(4, 8), dtype="float32",
                       device="cpu", param_bytes=288, reload=lambda: copy.deepcopy(module))


class Slow(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.linear(x)


class OomFromSecondPredictor(nn.Module):
    """Fits with one predictor; the second predictor's requests run out of memory."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        if not threading.current_thread().name.endswith("-0"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return self.linear(x)


class Marks:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []
        self.ticks = 0

    def mark(self, event: str, **fields) -> int:
        self.events.append((event, fields))
        return time.monotonic_ns()

    def tick(self) -> None:
        self.ticks += 1


def hooks_for(marks: Marks, **kwargs) -> SweepHooks:
    return SweepHooks(mark=marks.mark, tick=marks.tick, t0_ns=time.monotonic_ns(), **kwargs)


# ---------------------------------------------------------------- pure helpers

@pytest.mark.parametrize("windows, expected", [
    ([100.0, 100.0, 100.0], True), ([95.0, 100.0, 105.0], True), ([100.0, 120.0, 100.0], False),
    ([100.0, 100.0], False), ([], False), ([0.0, 0.0, 0.0], False), ([1.0, 100.0, 101.0, 99.0], True),
    ([100.0, 100.0, 100.0, 10.0], False)])
def test_is_stable(windows, expected):
    assert is_stable(windows) is expected


def test_is_stable_count_and_tolerance():
    assert is_stable([100.0, 115.0], count=2, tolerance=0.2)
    assert not is_stable([100.0, 115.0], count=2, tolerance=0.1)


def test_percentiles():
    p = percentiles_ms([float(v) for v in range(101, 0, -1)])  # 1..101, unsorted
    assert p == {"p50": 51.0, "p90": 91.0, "p99": 100.0, "max": 101.0, "mean": 51.0}
    assert percentiles_ms([]) == {}
    assert percentiles_ms([2.5]) == {"p50": 2.5, "p90": 2.5, "p99": 2.5, "max": 2.5, "mean": 2.5}


@pytest.mark.parametrize("cores, gpu, expected", [
    (2, False, (1, 2, 4)), (1, False, (1, 2, 4)), (8, False, (1, 2, 4, 8, 16)), (1, True, (1, 2, 4, 8)),
    (16, True, (1, 2, 4, 8, 16, 32)), (64, True, (1, 2, 4, 8, 16, 32)), (3, False, (1, 2, 4))])
def test_default_predictor_counts(cores, gpu, expected):
    assert default_predictor_counts(cores, gpu) == expected


# ---------------------------------------------------------------- run_sweep

def test_run_sweep_measures_every_count_with_the_monitor_memory():
    pid = os.getpid()
    monitor = StepMonitor(pid, None, 288)
    sampler = Sampler({"host": HostProbe(pid, per_core=False, uss_every_s=None)}, 0.05, None, [monitor])
    marks = Marks()
    seen = []
    hooks = SweepHooks(mark=marks.mark, tick=sampler.tick, t0_ns=time.monotonic_ns(), on_step=seen.append,
                       intra_op_threads=lambda: 3)
    sampler.start()
    try:
        steps = run_sweep(PredictorPool(loaded(nn.Linear(8, 8)), copy_model=True), SweepConfig((1, 2), **FAST),
                          monitor, hooks, threading.Event())
    finally:
        sampler.stop()
    assert [s.predictors for s in steps] == [1, 2]
    assert seen == steps and hooks.steps == steps
    assert [s.distinct_weight_sets for s in steps] == [1, 2]
    for step in steps:
        assert step.requests > 0 and step.throughput_rps > 0 and step.latency_ms["p99"] > 0
        assert step.memory["rss_bytes"] > 0
        # --copy-model: the original plus one copy per predictor are resident
        assert step.memory["layers"]["model_weights_bytes"] == 288 * (1 + step.predictors)
        assert sum(step.memory["layers"].values()) == step.memory["rss_bytes"]
        assert step.intra_op_threads == 3
        assert 0 <= step.started_s < step.ended_s
    assert [e for e, _ in marks.events] == ["step_start", "step_end"] * 2
    assert marks.events[0][1] == {"predictors": 1}


def test_run_sweep_stops_once_p99_passes_max_p99_ms():
    marks = Marks()
    lines = []
    hooks = hooks_for(marks, on_line=lines.append)
    steps = run_sweep(PredictorPool(loaded(Slow(0.005))), SweepConfig((1, 2, 4), max_p99_ms=1.0, **FAST),
                      StepMonitor(os.getpid(), None, 288), hooks, threading.Event())
    assert [s.predictors for s in steps] == [1]
    assert steps[0].latency_ms["p99"] > 1.0
    assert any("exceeded --max-p99-ms 1: stopping the sweep" in line for line in lines)  # a line that stays
    assert hooks.stopped_by and "at 1 predictors" not in hooks.stopped_by


def test_run_sweep_continues_under_max_p99_ms():
    steps = run_sweep(PredictorPool(loaded(nn.Linear(8, 8))), SweepConfig((1, 2), max_p99_ms=1000.0, **FAST),
                      StepMonitor(os.getpid(), None, 288), hooks_for(Marks()), threading.Event())
    assert [s.predictors for s in steps] == [1, 2]


def test_run_sweep_stops_on_oom():
    steps = run_sweep(PredictorPool(loaded(OomFromSecondPredictor())), SweepConfig((1, 2, 4), **FAST),
                      StepMonitor(os.getpid(), None, 288), hooks_for(Marks()), threading.Event())
    assert [s.predictors for s in steps] == [1, 2]
    assert not steps[0].oom and steps[0].requests > 0
    assert steps[1].oom
    assert any("out of memory" in m for m in steps[1].error_messages)


def test_run_sweep_with_stop_already_set_measures_nothing():
    stop = threading.Event()
    stop.set()
    assert run_sweep(PredictorPool(loaded(nn.Linear(8, 8))), SweepConfig((1, 2), **FAST),
                     StepMonitor(os.getpid(), None, 288), hooks_for(Marks()), stop) == []


def test_run_sweep_stops_after_an_interrupted_step():
    stop = threading.Event()
    threading.Timer(0.25, stop.set).start()
    steps = run_sweep(PredictorPool(loaded(nn.Linear(8, 8))), SweepConfig((1, 2), max_step_s=5.0, warmup_s=0.05,
                                                                          window_s=0.1, stable_windows=100),
                      StepMonitor(os.getpid(), None, 288), hooks_for(Marks()), stop)
    assert [s.predictors for s in steps] == [1]  # what was measured is kept; no second step
    assert steps[0].requests > 0


def test_a_tick_taken_before_the_step_started_is_not_credited_to_it():
    """The sampler may deliver a tick it began before the step's start mark (its readings were taken
    then): the step's peaks must not include it, or a step shows the last step's CPU and memory."""
    pid = os.getpid()
    monitor = StepMonitor(pid, None, 288)
    me = f"pid:{pid}"
    monitor.reset(since_ns=1_000)
    monitor(999, [(me, "rss_bytes", 900 * 2**20), (me, "cpu_util_pct", 302.8)])   # began before the step
    monitor(1_000, [(me, "rss_bytes", 300 * 2**20), (me, "cpu_util_pct", 150.0)])
    monitor(1_050, [(me, "rss_bytes", 310 * 2**20), (me, "cpu_util_pct", 140.0)])
    snapshot = monitor.snapshot()
    assert snapshot["rss_bytes"] == 310 * 2**20 and snapshot["cpu_util_pct"] == 150.0
    assert monitor.ticks == 2
    monitor.reset()  # no start given (watch, profile): every tick counts
    monitor(5, [(me, "rss_bytes", 1)])
    assert monitor.snapshot()["rss_bytes"] == 1


def test_a_steps_cpu_is_the_mean_over_its_window_within_the_cores():
    """Step.cpu_util_pct is the process's CPU time over the measured window / its wall time: a model
    that sleeps uses almost none; a busy one at most every usable core (the old peak of 50 ms readings
    reported 302% on 2 cores)."""
    from gpuscope.probes.host import usable_cores

    idle = run_sweep(PredictorPool(loaded(Slow(0.02))), SweepConfig((1,), **FAST), StepMonitor(os.getpid(), None, 288),
                     hooks_for(Marks()), threading.Event())[0]
    assert 0 <= idle.cpu_util_pct < 25, idle.cpu_util_pct
    busy = run_sweep(PredictorPool(loaded(Busy())), SweepConfig((2,), **FAST), StepMonitor(os.getpid(), None, 288),
                     hooks_for(Marks()), threading.Event())[0]
    # the busy model is seen as busier than the sleeping one, however much of the cores other processes take
    assert idle.cpu_util_pct < busy.cpu_util_pct <= 100 * usable_cores() * 1.05, (idle.cpu_util_pct, busy.cpu_util_pct)


class Busy(nn.Module):
    """Spins in Python for 5 ms per request: CPU-bound under the GIL."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        deadline = time.perf_counter() + 0.005
        while time.perf_counter() < deadline:
            pass
        return self.linear(x)


def test_late_growth_is_the_second_half_of_the_step_by_time_even_when_thinned():
    """1 MiB per tick for 2,000 ticks: the series is thinned to stay bounded, and the growth over the
    second half of the step's time is still half of it."""
    pid = os.getpid()
    monitor = StepMonitor(pid, None, 288)
    monitor.reset(since_ns=0)
    for tick in range(2000):
        monitor(tick * 50_000_000, [(f"pid:{pid}", "rss_bytes", 100 * 2**20 + tick * 2**20)])
    snapshot = monitor.snapshot()
    assert len(monitor._series) < StepMonitor.SERIES_MAX
    # thinning keeps every 8th early point here: the second half starts at most that late (1% of its growth)
    assert abs(snapshot["late_growth_bytes"] - 1000 * 2**20) <= 10 * 2**20, snapshot["late_growth_bytes"]
    assert abs(snapshot["late_growth_s"] - 50.0) <= 0.5
