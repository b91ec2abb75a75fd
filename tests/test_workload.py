"""The predictor pool on the CPU with tiny models: one shared weight set (or a copy each), grad mode as
the worker threads see it, failing requests, OOM, open-loop arrivals, and predictor threads that die."""
from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from torch import nn

from gpuscope.measure.models import LoadedModel, weight_pointers
from gpuscope.measure.sweep import step_from_run
from gpuscope.measure.workload import PredictorPool

STEP = dict(warmup_s=0.05, window_s=0.1)


def loaded(module: nn.Module, reload=None) -> LoadedModel:
    module.eval()
    return LoadedModel(module=module, source="test", kind="builtin", input_shape=(4, 8), dtype="float32",
                       device="cpu", param_bytes=8 * 8 * 4 + 8 * 4,
                       reload=reload or (lambda: copy.deepcopy(module)))


def step_of(run):
    return step_from_run(run, {}, torch.get_num_threads(), 0, run.measure_start_ns, run.measure_end_ns)


class Flaky(nn.Module):
    """Raises on every third request (across all predictors)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.calls = 0
        self.lock = threading.Lock()

    def forward(self, x):
        with self.lock:
            self.calls += 1
            n = self.calls
        if n % 3 == 0:
            raise ValueError(f"request {n} has a NaN")
        return self.linear(x)


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError."""


class RunsOutOfMemory(nn.Module):
    """Raises `exc` on every request after the first `after` once `armed` is set (armed from the start
    without one)."""

    def __init__(self, after: int, exc: BaseException, armed: threading.Event | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.after = after
        self.exc = exc
        self.calls = 0
        self.armed = armed

    def forward(self, x):
        if self.armed is not None and not self.armed.is_set():
            return self.linear(x)
        self.calls += 1
        if self.calls > self.after:
            raise self.exc
        return self.linear(x)


class Fatal(BaseException):
    """Not an Exception: escapes the request loop and ends the thread."""


class KillsPredictorOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        if threading.current_thread().name.endswith("-1"):
            raise Fatal("predictor 1 lost its interpreter state")
        return self.linear(x)


class RecordsGradMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.seen: dict[str, bool] = {}

    def forward(self, x):
        self.seen[threading.current_thread().name] = torch.is_grad_enabled()
        return self.linear(x)


def test_all_predictors_share_one_weight_set():
    model = nn.Linear(8, 8)
    pool = PredictorPool(loaded(model))
    run = pool.run_step(3, 0.3, **STEP)
    assert {r.weights for r in run.results} == {weight_pointers(model)}
    step = step_of(run)
    assert step.distinct_weight_sets == 1
    assert step.requests > 0 and step.errors == 0 and step.dead_predictors == 0
    assert step.latency_ms["p50"] > 0
    assert pool._copies == []


def test_copy_model_gives_each_predictor_its_own_weights():
    model = nn.Linear(8, 8)
    pool = PredictorPool(loaded(model), copy_model=True)
    run = pool.run_step(3, 0.3, **STEP)
    sets = [r.weights for r in run.results]
    assert len(set(sets)) == 3
    assert weight_pointers(model) not in sets
    assert step_of(run).distinct_weight_sets == 3
    # copies persist across steps, as a naive server's would: the next step reuses them
    again = pool.run_step(3, 0.3, **STEP)
    assert {r.weights for r in again.results} == set(sets)
    pool.release_copies()
    assert pool._copies == []


def test_copy_model_makes_exactly_one_copy_per_predictor_when_copying_is_slow():
    """A slow reload (a big model) used to race: several predictors appended copies at once and the pool
    kept more copies than predictors, inflating memory per predictor."""
    model = nn.Linear(8, 8)
    made = []

    def slow_reload():  # predictor 0's copy is the slow one, so the others race past it
        time.sleep(0.3 if threading.current_thread().name.endswith("-0") else 0.01)
        made.append(1)
        return copy.deepcopy(model)

    pool = PredictorPool(loaded(model, reload=slow_reload), copy_model=True)
    run = pool.run_step(4, 0.2, **STEP)
    assert len(pool._copies) == 4
    assert len(made) == 4
    assert step_of(run).distinct_weight_sets == 4


def test_grad_enabled_detected_inside_the_worker_threads():
    model = RecordsGradMode()
    with torch.inference_mode():  # the main thread's mode does not reach the workers
        run = PredictorPool(loaded(model), inference_mode=False).run_step(2, 0.2, **STEP)
    step = step_of(run)
    assert step.grad_enabled_in_workers is True
    assert step.outputs_with_grad == 2  # one output checked per predictor
    assert set(model.seen.values()) == {True}
    assert all(name.startswith("gpuscope-predictor-") for name in model.seen)


def test_grad_not_enabled_with_inference_mode_even_when_the_main_thread_has_grad():
    model = RecordsGradMode()
    assert torch.is_grad_enabled()
    run = PredictorPool(loaded(model), inference_mode=True).run_step(2, 0.2, **STEP)
    step = step_of(run)
    assert step.grad_enabled_in_workers is False
    assert step.outputs_with_grad == 0
    assert set(model.seen.values()) == {False}


def test_a_model_that_raises_on_some_requests_counts_errors():
    run = PredictorPool(loaded(Flaky())).run_step(2, 0.3, **STEP)
    step = step_of(run)
    assert step.errors > 0 and step.requests > 0
    assert not step.oom and step.dead_predictors == 0
    assert 0.1 < step.error_rate < 0.6
    assert step.error_messages and step.error_messages[0].startswith("ValueError: request ")
    assert len(step.error_messages) <= 5


@pytest.mark.parametrize("exc", [RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                 OutOfMemoryError("Tried to allocate 20.00 MiB")], ids=["message", "type"])
def test_an_out_of_memory_error_sets_oom_and_stops_the_step(exc):
    # The model runs out of memory only once the first measured window has closed (the pool's on_window
    # call arms it), so the error lands inside the measured window however the threads are scheduled.
    armed = threading.Event()
    max_s = 120.0
    run = PredictorPool(loaded(RunsOutOfMemory(2, exc, armed))).run_step(
        2, max_s, warmup_s=0.0, window_s=0.1, on_window=lambda elapsed, windows: armed.set())
    assert armed.is_set()
    assert run.oom
    assert run.duration_s < max_s and not run.interrupted  # stopped at the OOM, not at the step's end
    step = step_of(run)
    assert step.oom
    assert step.errors >= 1
    assert any("Tried to allocate" in m for m in step.error_messages)


def test_rate_mode_reports_queue_and_compute_latencies():
    # 1 s measured in 0.5 s windows: ~200 arrivals, so a late dispatcher wake-up or a request at either edge
    # of the window moves the rate by a few percent, not by the tolerance
    run = PredictorPool(loaded(nn.Linear(8, 8))).run_step(2, 1.0, warmup_s=0.05, window_s=0.5, rate_rps=200.0)
    step = step_of(run)
    assert step.queue_ms is not None and step.compute_ms is not None
    assert {"p50", "p99"} <= set(step.queue_ms) and {"p50", "p99"} <= set(step.compute_ms)
    assert step.queue_ms["p50"] >= 0 and step.compute_ms["p50"] > 0
    assert step.latency_ms["p50"] >= step.compute_ms["p50"] * 0.5
    assert step.throughput_rps == pytest.approx(200.0, rel=0.35)  # arrivals, not the model's speed


def test_closed_loop_has_no_queue():
    step = step_of(PredictorPool(loaded(nn.Linear(8, 8))).run_step(1, 0.2, **STEP))
    assert step.queue_ms is None and step.compute_ms is None


def test_a_predictor_thread_dying_is_reported_and_the_others_keep_serving():
    run = PredictorPool(loaded(KillsPredictorOne())).run_step(2, 0.3, **STEP)
    step = step_of(run)
    assert step.dead_predictors == 1
    assert "predictor died: Fatal: predictor 1 lost its interpreter state" in step.error_messages
    assert run.results[1].died and run.results[0].died is None
    assert step.requests > 0  # predictor 0 was not taken down with it
    assert len(run.results[0].latencies_ns) > 0


def test_a_predictor_dying_before_the_start_does_not_hang_the_step():
    def broken_reload():
        raise MemoryError("cannot copy the model")

    # A hang would wait out the start barrier's 120 s and then the step's max_s; a step whose predictors are all
    # dead ends at once instead. The bounds are those lengths, which the test sets, not how fast the machine is.
    max_s = 60.0
    started = time.monotonic()
    run = PredictorPool(loaded(nn.Linear(8, 8), reload=broken_reload), copy_model=True).run_step(
        2, max_s, warmup_s=0.05, window_s=0.1)
    assert time.monotonic() - started < max_s and run.duration_s < max_s
    step = step_of(run)
    assert step.dead_predictors == 2
    assert step.requests == 0
    assert "predictor died: MemoryError: cannot copy the model" in step.error_messages


def test_an_outside_stop_interrupts_the_step():
    stop = threading.Event()
    max_s = 120.0
    # stopped from outside once the first measured window has closed (an event, not a timer)
    run = PredictorPool(loaded(nn.Linear(8, 8))).run_step(1, max_s, warmup_s=0.05, window_s=0.1, stop=stop,
                                                          on_window=lambda elapsed, windows: stop.set())
    assert run.interrupted
    assert run.duration_s < max_s and len(run.windows_rps) == 1  # it ended at the stop, not at max_s
    assert step_of(run).requests > 0


def test_zero_predictors_is_refused():
    with pytest.raises(ValueError):
        PredictorPool(loaded(nn.Linear(8, 8))).run_step(0, 0.1)


class SlowLinear(nn.Linear):
    """A model that serves at most ~200 req/s per predictor."""

    def forward(self, x):
        time.sleep(0.005)
        return super().forward(x)


def test_an_offered_rate_far_above_capacity_drops_arrivals_instead_of_queueing_them():
    from gpuscope.measure.workload import MAX_BACKLOG_PER_PREDICTOR

    # 1.5 s: long enough that an unbounded (or far too large) backlog would make the last served requests wait
    # well over a second, beyond the bound below
    run = PredictorPool(loaded(SlowLinear(8, 8))).run_step(1, 1.5, warmup_s=0.05, window_s=0.2, rate_rps=100_000.0)
    step = step_of(run)
    assert step.offered_rps == 100_000.0
    assert step.dropped_arrivals > 10_000  # ~150,000 offered in 1.5 s, ~290 served
    assert step.throughput_rps < 400
    # the wait of any served request is bounded by the backlog, not by the offered flood: at most a full backlog
    # (plus a few in flight) of requests ahead of it, each taking what a request really took here (sleep(0.005)
    # is nominally 5 ms but longer on a loaded machine); the flood of ~60,000 would be seconds
    per_request_ms = max(10.0, step.compute_ms["max"])
    assert step.queue_ms["max"] < (MAX_BACKLOG_PER_PREDICTOR + 5) * per_request_ms * 1.5, (step.queue_ms,
                                                                                          step.compute_ms)


class FailsDuringWarmup(nn.Linear):
    """Raises on its first `failures` requests (right after the start, in the warm-up), then serves."""

    def __init__(self, failures: int = 5) -> None:
        super().__init__(8, 8)
        self.failures = failures
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("still warming up")
        return super().forward(x)


def test_errors_during_warm_up_do_not_count_in_the_error_rate():
    model = FailsDuringWarmup()
    run = PredictorPool(loaded(model)).run_step(1, 0.3, warmup_s=0.4, window_s=0.1)
    step = step_of(run)
    stamps = run.results[0].error_end_ns
    assert len(stamps) == model.failures  # they happened, and their messages are kept for the report
    assert step.requests > 0
    # the errors counted are exactly those stamped inside the measured window: none of those before it
    inside = [t for t in stamps if run.measure_start_ns <= t <= run.measure_end_ns]
    assert step.errors == len(inside)
    assert len(inside) < len(stamps), "every warm-up error landed in the window: 5 requests took the 0.4 s warm-up"
    assert step.error_rate == step.errors / (step.requests + step.errors)
