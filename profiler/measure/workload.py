"""The predictor pool: N long-lived threads serving one shared model.

This mirrors how people serve from threads: the model is loaded once and
every predictor calls the same module. Each thread enters
`torch.inference_mode()` itself (grad mode is thread-local: setting it in the
main thread does nothing for workers), optionally runs on its own long-lived
CUDA stream, and records each request's latency. The hot loop does nothing but
call the model, time it, and append two integers, so the pool stays within a
few percent of a bare loop (benchmarks/ measures this).

A predictor with requests (a translator, or --requests) runs its own loop:
each request cycles through preprocess, the model and postprocess, and each
stage's wall time is kept beside the end-to-end latency. Around the measured
window the pool reads every predictor thread's scheduler times (on a CPU, on a
run queue), so the analysis can tell time blocked on the GIL from time waiting
for a core another process holds.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from gpuscope.measure.models import LoadedModel, make_input, weight_pointers
from gpuscope.measure.translator import STAGES
from gpuscope.probes.readings import Unavailable
from gpuscope.probes.schedstat import SchedReader, ThreadTimes, read_thread_times

MAX_ERROR_MESSAGES = 5
MAX_BACKLOG_PER_PREDICTOR = 64  # open-loop arrivals waiting beyond this are dropped (and counted), not queued


class ThreadStartError(RuntimeError):
    """The OS refused another predictor thread (too many threads for this machine or its limits)."""


def _note_failure(result: "PredictorResult", exc: BaseException, ended_ns: int, stop: threading.Event) -> None:
    """A request that raised: stamped (errors count in the measured window like requests), its message kept (a
    bounded few), and an out-of-memory error ends the step for every predictor."""
    result.error_end_ns.append(ended_ns)
    if len(result.error_messages) < MAX_ERROR_MESSAGES:
        result.error_messages.append(f"{type(exc).__name__}: {str(exc).strip()[:200]}")
    if _is_oom(exc):
        result.oom = True
        stop.set()


def _is_oom(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


@dataclass
class PredictorResult:
    """What one predictor thread saw during a step."""

    latencies_ns: list[int] = field(default_factory=list)
    end_times_ns: list[int] = field(default_factory=list)
    queue_ns: list[int] = field(default_factory=list)
    error_end_ns: list[int] = field(default_factory=list)  # when each error happened (windows count theirs)
    error_messages: list[str] = field(default_factory=list)
    weights: frozenset[int] = frozenset()
    grad_enabled: bool = False
    outputs_with_grad: int = 0
    oom: bool = False
    died: str | None = None
    completed: int = 0  # live counter the main thread reads for windows
    stage_ns: dict[str, list[int]] | None = None  # per stage, parallel to latencies_ns (requests with stages)
    native_id: int | None = None  # the kernel's thread id, for its scheduler times


@dataclass
class StepRun:
    """The raw outcome of one measured step."""

    predictors: int
    results: list[PredictorResult]
    measure_start_ns: int
    measure_end_ns: int
    windows_rps: list[float]
    stable: bool
    interrupted: bool
    dropped_arrivals: int = 0
    offered_rps: float | None = None
    cpu_s: float | None = None  # CPU time of the whole process (every thread) during the measured window
    # the predictor threads' scheduler times over the window, summed: wall, on_cpu, runqueue, blocked (seconds)
    thread_times_s: dict[str, float] | Unavailable | None = None

    @property
    def duration_s(self) -> float:
        return max(1e-9, (self.measure_end_ns - self.measure_start_ns) / 1e9)

    @property
    def cpu_util_pct(self) -> float | None:
        """Mean CPU of the process over the measured window, 100 = one core busy."""
        return None if self.cpu_s is None else 100.0 * self.cpu_s / self.duration_s

    def latencies_ms(self) -> list[float]:
        return [lat / 1e6 for r in self.results for lat, end in zip(r.latencies_ns, r.end_times_ns)
                if end <= self.measure_end_ns]

    def queue_ms(self) -> list[float]:
        return [q / 1e6 for r in self.results for q, end in zip(r.queue_ns, r.end_times_ns) if end <= self.measure_end_ns]

    def compute_ms(self) -> list[float]:
        """Latency minus queue wait, for open-loop requests completed inside the measured window."""
        return [(lat - q) / 1e6 for r in self.results
                for lat, q, end in zip(r.latencies_ns, r.queue_ns, r.end_times_ns) if end <= self.measure_end_ns]

    def stages_ms(self) -> dict[str, list[float]]:
        """Each stage's wall time (ms) of the requests completed inside the window; {} without stages."""
        out: dict[str, list[float]] = {}
        for r in self.results:
            if r.stage_ns is None:
                continue
            for stage, values in r.stage_ns.items():
                out.setdefault(stage, []).extend(
                    v / 1e6 for v, end in zip(values, r.end_times_ns) if end <= self.measure_end_ns)
        return out

    @property
    def requests(self) -> int:
        return sum(1 for r in self.results for end in r.end_times_ns if end <= self.measure_end_ns)

    @property
    def errors(self) -> int:
        """Errors inside the measured window, counted like `requests` (warm-up errors are not in the rate)."""
        return sum(1 for r in self.results for end in r.error_end_ns
                   if self.measure_start_ns <= end <= self.measure_end_ns)

    @property
    def oom(self) -> bool:
        return any(r.oom for r in self.results)


class PredictorPool:
    """Runs steps of N predictor threads over one model (or, naively, a copy each)."""

    def __init__(self, model: LoadedModel, streams: bool = False, copy_model: bool = False,
                 inference_mode: bool = True, sched_reader: SchedReader = read_thread_times) -> None:
        self.model = model
        self.sched_reader = sched_reader
        self.streams = streams and model.device.startswith("cuda")
        self.copy_model = copy_model
        self.inference_mode = inference_mode
        self._copies: list[Any] = []
        self._copies_lock = threading.Lock()
        # One long-lived stream per predictor index, kept across steps like a server's: torch caches a cuBLAS
        # workspace per (handle, stream) and never frees it, so new streams every step would inflate the
        # memory each extra predictor appears to cost.
        self._streams: dict[int, Any] = {}

    def _module_for(self, index: int) -> Any:
        if not self.copy_model:
            return self.model.module
        # Copies persist across steps, as a naive server's would. Each predictor makes only its own copy:
        # appending from every thread at once made more copies than predictors (and more memory per predictor).
        with self._copies_lock:
            while len(self._copies) <= index:
                self._copies.append(None)
            module = self._copies[index]
        if module is None:
            module = self.model.reload() if self.model.reload else self.model.module
            with self._copies_lock:
                self._copies[index] = module
        return module

    def _stream_for(self, index: int) -> Any:
        import torch

        with self._copies_lock:
            if index not in self._streams:
                self._streams[index] = torch.cuda.Stream(device=self.model.device)
            return self._streams[index]

    def _predictor(self, index: int, result: PredictorResult, ready: threading.Barrier, measuring: threading.Event,
                   stop: threading.Event, requests: "queue.Queue[int] | None") -> None:
        import torch

        started = False
        try:
            module = self._module_for(index)
            device = self.model.device
            stream = self._stream_for(index) if self.streams else None
            cuda = device.startswith("cuda")
            grad_ctx = torch.inference_mode() if self.inference_mode else torch.enable_grad()
            stream_ctx = torch.cuda.stream(stream) if stream is not None else _null_context()
            with grad_ctx, stream_ctx:
                result.weights = weight_pointers(module)
                result.grad_enabled = torch.is_grad_enabled()
                result.native_id = threading.get_native_id()
                sync = (stream.synchronize if stream is not None else
                        torch.cuda.current_stream(device).synchronize) if cuda else None
                with_stages = self.model.requests is not None or self.model.translator is not None
                x = None if with_stages else make_input(self.model)
                ready.wait()
                started = True
                if with_stages:
                    work = self.model.requests or [make_input(self.model)]
                    self._stages_loop(self.model.stages(module), work, index, sync, result, measuring, stop, requests)
                else:
                    self._loop(module, x, sync, result, measuring, stop, requests)
        except threading.BrokenBarrierError:
            return
        except BaseException as exc:  # the thread itself died: report it, never hang the step
            result.died = f"{type(exc).__name__}: {exc}"
            if not started:  # only a death before the start may release the others; after it, it would
                try:         # break the barrier under predictors still waking from it and end them silently
                    ready.abort()
                except Exception:
                    pass

    @staticmethod
    def _loop(module: Any, x: Any, sync: Callable[[], None] | None, result: PredictorResult,
              measuring: threading.Event, stop: threading.Event, requests: "queue.Queue[int] | None") -> None:
        perf = time.perf_counter_ns
        lat_append, end_append, q_append = result.latencies_ns.append, result.end_times_ns.append, result.queue_ns.append
        checked_grad = False
        while not stop.is_set():
            arrival = 0
            if requests is not None:
                try:
                    arrival = requests.get(timeout=0.05)
                except queue.Empty:
                    continue
            started = perf()
            try:
                out = module(x)
                if sync is not None:
                    sync()
            except Exception as exc:
                _note_failure(result, exc, perf(), stop)
                continue
            ended = perf()
            if not checked_grad:
                checked_grad = True
                if getattr(out, "grad_fn", None) is not None:
                    result.outputs_with_grad += 1
            if measuring.is_set():
                if requests is not None:
                    lat_append(ended - arrival)
                    q_append(started - arrival)
                else:
                    lat_append(ended - started)
                end_append(ended)
                result.completed += 1

    @staticmethod
    def _stages_loop(stages: Any, work: list[Any], index: int, sync: Callable[[], None] | None,
                     result: PredictorResult, measuring: threading.Event, stop: threading.Event,
                     requests: "queue.Queue[int] | None") -> None:
        """Like _loop, for a predictor with stages: cycle through the requests (each predictor from its own
        offset, so concurrent predictors serve different requests) and time preprocess, model, postprocess."""
        perf = time.perf_counter_ns
        pre, model, post = stages.preprocess, stages.model, stages.postprocess
        result.stage_ns = {stage: [] for stage, fn in zip(STAGES, (pre, model, post)) if fn is not None}
        pre_append = result.stage_ns["preprocess"].append if pre is not None else None
        model_append = result.stage_ns["model"].append
        post_append = result.stage_ns["postprocess"].append if post is not None else None
        lat_append, end_append, q_append = result.latencies_ns.append, result.end_times_ns.append, result.queue_ns.append
        checked_grad = False
        position = index % len(work)
        while not stop.is_set():
            arrival = 0
            if requests is not None:
                try:
                    arrival = requests.get(timeout=0.05)
                except queue.Empty:
                    continue
            request = work[position]
            position = position + 1 if position + 1 < len(work) else 0
            started = perf()
            try:
                value = pre(request) if pre is not None else request
                t_pre = perf()
                out = model(value)
                if sync is not None:
                    sync()
                t_model = perf()
                if post is not None:
                    post(out)
            except Exception as exc:
                _note_failure(result, exc, perf(), stop)
                continue
            ended = perf()
            if not checked_grad:
                checked_grad = True
                if getattr(out, "grad_fn", None) is not None:
                    result.outputs_with_grad += 1
            if measuring.is_set():
                if pre_append is not None:
                    pre_append(t_pre - started)
                model_append(t_model - t_pre)
                if post_append is not None:
                    post_append(ended - t_model)
                if requests is not None:
                    lat_append(ended - arrival)
                    q_append(started - arrival)
                else:
                    lat_append(ended - started)
                end_append(ended)
                result.completed += 1

    def _thread_times(self, results: list[PredictorResult]) -> list[ThreadTimes | Unavailable]:
        return [self.sched_reader(r.native_id) if r.native_id is not None
                else Unavailable("not_supported", "a predictor thread did not start") for r in results]

    def run_step(self, predictors: int, max_duration_s: float, warmup_s: float = 0.5, window_s: float = 1.0,
                 is_stable: Callable[[list[float]], bool] | None = None, stop: threading.Event | None = None,
                 rate_rps: float | None = None, on_window: Callable[[float, list[float]], None] | None = None) -> StepRun:
        """Start `predictors` threads, warm up, measure until stable or `max_duration_s`, stop and join them."""
        if predictors < 1:
            raise ValueError("predictors must be at least 1")
        outside_stop = stop or threading.Event()
        step_stop = threading.Event()
        measuring = threading.Event()
        ready = threading.Barrier(predictors + 1)
        results = [PredictorResult() for _ in range(predictors)]
        requests: queue.Queue[int] | None = (queue.Queue(maxsize=MAX_BACKLOG_PER_PREDICTOR * predictors)
                                             if rate_rps else None)
        dropped = [0]
        threads = [threading.Thread(target=self._predictor, args=(i, results[i], ready, measuring, step_stop, requests),
                                    name=f"gpuscope-predictor-{i}", daemon=True) for i in range(predictors)]
        started: list[threading.Thread] = []
        try:
            for thread in threads:
                thread.start()
                started.append(thread)
        except RuntimeError as exc:  # "can't start new thread": stop what started, then say so in one line
            step_stop.set()
            ready.abort()
            for thread in started:
                thread.join(timeout=30)
            raise ThreadStartError(f"could not start {predictors} predictor threads ({len(started)} started): {exc}") from None
        dispatcher = None
        measure_start: int | None = None
        cpu_start_s = 0.0
        if warmup_s <= 0:  # no warm-up: the window opens before the predictors are released, never after
            measure_start, cpu_start_s = time.perf_counter_ns(), _process_cpu_s()  # their first requests
            measuring.set()
        try:
            try:
                ready.wait(timeout=120)
            except threading.BrokenBarrierError:
                pass
            if rate_rps:
                dispatcher = threading.Thread(target=_dispatch, args=(requests, rate_rps, step_stop, dropped, measuring), daemon=True,
                                              name="gpuscope-dispatcher")
                dispatcher.start()
            _wait(warmup_s, outside_stop, step_stop)
            if measure_start is None:
                measure_start = time.perf_counter_ns()
                cpu_start_s = _process_cpu_s()
                measuring.set()
            # the threads' scheduler times bracket their own interval (every predictor has its id once the
            # barrier let it go), read after the window opens so the reads never delay it
            times_start = self._thread_times(results)
            times_start_ns = time.perf_counter_ns()
            windows: list[float] = []
            stable = False
            last_count, last_t = 0, measure_start
            deadline = measure_start + int(max_duration_s * 1e9)
            while not step_stop.is_set() and not outside_stop.is_set():
                remaining = (deadline - time.perf_counter_ns()) / 1e9
                if remaining <= 0 or all(not t.is_alive() for t in threads):
                    break
                _wait(min(window_s, remaining), outside_stop, step_stop)
                now = time.perf_counter_ns()
                count = sum(r.completed for r in results)
                if now - last_t >= window_s * 0.5e9:
                    windows.append((count - last_count) / ((now - last_t) / 1e9))
                    last_count, last_t = count, now
                    if on_window:
                        on_window((now - measure_start) / 1e9, windows)
                    if is_stable and is_stable(windows):
                        stable = True
                        break
            measure_end = time.perf_counter_ns()
            cpu_s = _process_cpu_s() - cpu_start_s
            times_end = self._thread_times(results)
            thread_times = _sum_thread_times(times_start, times_end, (time.perf_counter_ns() - times_start_ns) / 1e9)
        finally:
            step_stop.set()
            try:
                ready.abort()
            except Exception:
                pass
            for thread in threads:
                thread.join(timeout=30)
            if dispatcher is not None:
                dispatcher.join(timeout=5)
        return StepRun(predictors, results, measure_start, measure_end, windows, stable, outside_stop.is_set(),
                       dropped_arrivals=dropped[0], offered_rps=rate_rps, cpu_s=cpu_s, thread_times_s=thread_times)

    def release_copies(self) -> None:
        self._copies.clear()


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _sum_thread_times(before: list[ThreadTimes | Unavailable], after: list[ThreadTimes | Unavailable],
                      window_s: float) -> dict[str, float] | Unavailable:
    """The predictor threads' wall, on-CPU, run-queue and blocked seconds over the window, summed.

    Blocked is what is left: neither running nor waiting for a core (the GIL, a lock, I/O). The reads are
    not exactly at the window's edges (a few microseconds apart), so small negatives are clamped to 0."""
    on_cpu = runqueue = 0.0
    for start, end in zip(before, after):
        for value in (start, end):
            if isinstance(value, Unavailable):
                return value
        on_cpu += (end.on_cpu_ns - start.on_cpu_ns) / 1e9  # type: ignore[union-attr]
        runqueue += (end.runqueue_ns - start.runqueue_ns) / 1e9  # type: ignore[union-attr]
    wall = window_s * len(before)
    return {"wall": wall, "on_cpu": on_cpu, "runqueue": runqueue, "blocked": max(0.0, wall - on_cpu - runqueue)}


def _process_cpu_s() -> float:
    """User + system CPU seconds of this process, every thread together (one times(2) call)."""
    spent = os.times()
    return spent.user + spent.system


def _wait(seconds: float, *events: threading.Event) -> None:
    """Sleep up to `seconds`, waking early (within 50 ms) if any event is set."""
    end = time.monotonic() + seconds
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0 or any(e.is_set() for e in events):
            return
        events[0].wait(min(0.05, remaining))


def _dispatch(requests: "queue.Queue[int]", rate_rps: float, stop: threading.Event, dropped: list[int],
              measuring: threading.Event) -> None:
    """Open-loop arrivals at a fixed rate, each carrying its arrival time.

    The backlog is bounded: arrivals beyond it are counted as dropped rather than queued, so an offered rate
    far above capacity cannot fill this process's memory or CPU and distort what is being measured.
    """
    interval_ns = max(1, int(1e9 / rate_rps))
    next_ns = time.perf_counter_ns()
    while not stop.is_set():
        now = time.perf_counter_ns()
        if next_ns <= now:
            due = (now - next_ns) // interval_ns + 1
            room = max(0, requests.maxsize - requests.qsize()) if requests.maxsize else due
            lost = max(0, due - room)
            for k in range(min(due, room)):
                try:
                    requests.put_nowait(next_ns + k * interval_ns)
                except queue.Full:
                    lost += 1
            if measuring.is_set():
                dropped[0] += lost
            next_ns += due * interval_ns
        time.sleep(min(0.01, max(0.0, (next_ns - time.perf_counter_ns()) / 1e9)))
