"""`gpuscope.request`: mark the requests a live server serves, so a profile sees its traffic.

    from gpuscope import request

    @request                               # a decorator: one request per call
    def handle(payload): ...

    with request():                        # or a block
        with request.stage("preprocess"):
            x = decode(payload)
        with request.stage("model"):
            y = model(x)

Why it lives here, small and free of imports: it is meant to stay in production
code. With no profile running, `request()` returns one shared do-nothing object
and a decorated call costs one global read (about a microsecond in CPython;
`python -m benchmarks --only request_cost`). While a `gpuscope.profile()` runs,
each request takes two clock reads and two short lock holds (a few microseconds).

What one request records, in bounded memory (profiler/analysis/live_traffic.py
turns it into the curve):
  - its latency, its thread, and whether it raised (an error: counted, never
    swallowed; the exception reaches the caller unchanged);
  - the in-flight count when it started, and its *level*: the most requests in
    flight at once while it ran. The level is what a pool of that size would
    have served it with; it is exact and does not depend on timing (a request
    that waits at a barrier for three others is at level 4, however long it
    waited), where a time average would depend on the machine's load;
  - the time spent in each `request.stage(name)` (names line up with diagnose's
    per-step `stages_ms`: "preprocess", "model", "postprocess").

The peak in flight over a request's life costs O(log L) with a stack of suffix
maxima of the in-flight count at each start (L: the most in flight), not a scan
of every request in flight.

Requests are per thread (a threading.local holds the current request for
`request.stage`): thread pools, threaded http.server, Flask, FastAPI's sync
endpoints. An `async def` handler is refused when decorated: its requests share
one thread, so neither stages nor a pool size could be told apart.
"""
from __future__ import annotations

import bisect
import collections
import functools
import inspect
import random
import threading
import time
from typing import Any, Callable

_clock = time.perf_counter_ns
_ident = threading.get_ident


class _Local(threading.local):
    """The request in flight on this thread; a class default, because a missing attribute on a
    threading.local costs an exception (0.7 us) on every `request.stage()` outside a request."""

    current: "_Request | None" = None


_local = _Local()

MAX_SAMPLES = 65536      # latencies kept per level and stage; beyond, a uniform reservoir sample
MAX_THREADS = 4096       # distinct thread ids remembered per level
MAX_ERROR_MESSAGES = 5
MAX_PENDING = 65536      # finished requests queued between two sampler ticks before a request drains them


class _Reservoir:
    """Up to `cap` values kept exactly; past that a uniform sample of all values seen (Vitter's algorithm R),
    so the percentiles of a day-long profile stay unbiased in bounded memory."""

    __slots__ = ("values", "seen", "total", "_cap", "_rng")

    def __init__(self, cap: int, rng: random.Random) -> None:
        self.values: list[float] = []
        self.seen = 0
        self.total = 0.0
        self._cap = cap
        self._rng = rng

    def add(self, value: float) -> None:
        self.seen += 1
        self.total += value
        if len(self.values) < self._cap:
            self.values.append(value)
        else:
            slot = self._rng.randrange(self.seen)
            if slot < self._cap:
                self.values[slot] = value


class LevelStats:
    """Every completed request at one level (the most requests in flight at once while it ran)."""

    __slots__ = ("level", "requests", "errors", "latency_ms", "stages_ms", "threads", "threads_overflow",
                 "start_levels", "error_messages", "_cap", "_rng")

    def __init__(self, level: int, cap: int, rng: random.Random) -> None:
        self.level = level
        self.requests = 0          # completed without raising
        self.errors = 0            # raised
        self.latency_ms = _Reservoir(cap, rng)   # successful requests only, as diagnose's steps
        self.stages_ms: dict[str, _Reservoir] = {}
        self.threads: set[int] = set()
        self.threads_overflow = False
        self.start_levels: dict[int, int] = {}   # in flight at start -> requests
        self.error_messages: list[str] = []
        self._cap = cap
        self._rng = rng

    def to_input(self) -> dict[str, Any]:
        """What the pure analysis reads (profiler/analysis/live_traffic.py `LevelInput`)."""
        return {"level": self.level, "requests": self.requests, "errors": self.errors,
                "latency_ms": list(self.latency_ms.values), "latency_sum_ms": self.latency_ms.total,
                "stages_ms": {name: list(r.values) for name, r in self.stages_ms.items()},
                "stage_sums_ms": {name: r.total for name, r in self.stages_ms.items()},
                "stage_counts": {name: r.seen for name, r in self.stages_ms.items()},
                "threads": len(self.threads), "thread_ids": sorted(self.threads), "threads_overflow": self.threads_overflow,
                "start_levels": dict(self.start_levels), "error_messages": list(self.error_messages)}


class RequestTracker:
    """The requests of one profile: in flight now, and every completed one aggregated by level. Thread-safe.

    `observers` get (total_s, stages_s, ok) of each completed request when it is aggregated (the Prometheus
    histograms, profiler/measure/inprocess_metrics.py `RequestMetrics`). It is also a sampler listener:
    each tick aggregates the requests finished since the last.
    """

    def __init__(self, clock: Callable[[], int] = _clock, max_samples: int = MAX_SAMPLES, seed: int = 0) -> None:
        self.clock = clock
        self._lock = threading.Lock()         # in flight and the stack: held for a few operations
        self._drain_lock = threading.Lock()   # the aggregates
        self._pending: collections.deque = collections.deque()
        self._rng = random.Random(seed)
        self._cap = max_samples
        self.in_flight = 0
        self.peak_in_flight = 0
        self._seq = 0
        self._stack_seq: list[int] = []     # start sequence numbers, increasing
        self._stack_level: list[int] = []   # in flight after that start, strictly decreasing (suffix maxima)
        self.levels: dict[int, LevelStats] = {}
        self.threads: set[int] = set()
        self.observers: list[Callable[[float, dict[str, float], bool], None]] = []
        self.started_ns = clock()

    def begin(self) -> tuple[int, int]:
        """One request starts: (its sequence number, requests in flight including it)."""
        with self._lock:
            self.in_flight = level = self.in_flight + 1
            if level > self.peak_in_flight:
                self.peak_in_flight = level
            self._seq = seq = self._seq + 1
            stack = self._stack_level
            while stack and stack[-1] <= level:
                stack.pop()
                self._stack_seq.pop()
            stack.append(level)
            self._stack_seq.append(seq)
        return seq, level

    def end(self, seq: int, start_level: int, latency_ns: int, stages_ns: dict[str, int] | None,
            error: BaseException | None) -> None:
        """One request ends: find its level (the most in flight while it ran) and queue it for `drain()`.

        Only the level needs the lock; the aggregation runs later on the profile's sampler thread (and at
        every snapshot or scrape), so a request pays for a deque append, not for percentiles' bookkeeping."""
        with self._lock:
            index = bisect.bisect_left(self._stack_seq, seq)
            level = self._stack_level[index] if index < len(self._stack_level) else start_level
            self.in_flight -= 1
        pending = self._pending
        pending.append((level, start_level, latency_ns, stages_ns, error, _ident()))
        if len(pending) > MAX_PENDING:  # nobody drains (no sampler running): bound the memory here
            self.drain()

    def __call__(self, t_ns: int, values: Any) -> None:
        """A sampler listener: aggregate the requests finished since the last tick."""
        self.drain()

    def drain(self) -> None:
        """Aggregate every queued request (thread-safe; deque pops are atomic, the aggregation is locked)."""
        pending = self._pending
        done: list[tuple[float, dict[str, float], bool]] = []
        with self._drain_lock:
            while True:
                try:
                    level, start_level, latency_ns, stages_ns, error, thread = pending.popleft()
                except IndexError:
                    break
                stats = self.levels.get(level)
                if stats is None:
                    stats = self.levels[level] = LevelStats(level, self._cap, self._rng)
                stats.start_levels[start_level] = stats.start_levels.get(start_level, 0) + 1
                if len(stats.threads) < MAX_THREADS:
                    stats.threads.add(thread)
                elif thread not in stats.threads:
                    stats.threads_overflow = True
                if len(self.threads) < MAX_THREADS:
                    self.threads.add(thread)
                if error is None:
                    stats.requests += 1
                    stats.latency_ms.add(latency_ns / 1e6)
                    if stages_ns:
                        for name, spent in stages_ns.items():
                            reservoir = stats.stages_ms.get(name)
                            if reservoir is None:
                                reservoir = stats.stages_ms[name] = _Reservoir(self._cap, self._rng)
                            reservoir.add(spent / 1e6)
                else:
                    stats.errors += 1
                    if len(stats.error_messages) < MAX_ERROR_MESSAGES:
                        stats.error_messages.append(f"{type(error).__name__}: {error}"[:300])
                if self.observers:
                    done.append((latency_ns / 1e9, {k: v / 1e9 for k, v in (stages_ns or {}).items()},
                                 error is None))
        for latency_s, stages_s, ok in done:
            for observer in self.observers:
                try:
                    observer(latency_s, stages_s, ok)
                except Exception:  # an exporter must never fail the profile
                    pass

    def snapshot(self) -> dict[str, Any]:
        """Everything the analysis needs, copied: {"levels": [LevelInput...], ...}."""
        self.drain()
        with self._drain_lock:
            levels = [self.levels[n].to_input() for n in sorted(self.levels)]
        with self._lock:
            return {"levels": levels, "in_flight_at_end": self.in_flight, "peak_in_flight": self.peak_in_flight,
                    "threads": len(self.threads), "duration_s": (self.clock() - self.started_ns) / 1e9}

    def thread_ids(self) -> set[int]:
        self.drain()
        with self._drain_lock:
            return set(self.threads)


# The tracker of the running profile, or None: the whole fast path is one read of this global.
_tracker: RequestTracker | None = None
_install_lock = threading.Lock()


def install(tracker: RequestTracker) -> bool:
    """Make `tracker` receive every marked request; False when another profile's tracker already does."""
    global _tracker
    with _install_lock:
        if _tracker is not None and _tracker is not tracker:
            return False
        _tracker = tracker
        return True


def uninstall(tracker: RequestTracker) -> None:
    """Stop feeding `tracker` (requests in flight now finish into it, unread)."""
    global _tracker
    with _install_lock:
        if _tracker is tracker:
            _tracker = None


def active_tracker() -> RequestTracker | None:
    return _tracker


class _Null:
    """What `request()` and `request.stage()` return with no profile running: nothing to do."""

    __slots__ = ()

    def __enter__(self) -> "_Null":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        return None


_NULL = _Null()


class _Request:
    """One request in flight (a context manager; never swallows an exception)."""

    __slots__ = ("_tracker", "_clock", "_seq", "_level", "_t0", "_stages", "_outer", "_scope")

    def __init__(self, tracker: RequestTracker) -> None:
        self._tracker = tracker
        self._clock = tracker.clock
        self._stages: dict[str, int] | None = None
        self._scope: _Stages | None = None

    def __enter__(self) -> "_Request":
        self._outer = _local.current
        _local.current = self
        self._seq, self._level = self._tracker.begin()
        self._t0 = self._clock()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        latency = self._clock() - self._t0
        _local.current = self._outer
        self._tracker.end(self._seq, self._level, latency, self._stages, exc if exc_type is not None else None)
        return None


class _Stages:
    """The stages of one request: one object per request, reused by every `request.stage()` in it (no
    allocation per stage); nested stages keep a stack. Repeated names add up."""

    __slots__ = ("_request", "_next", "_names", "_starts")

    def __init__(self, owner: _Request) -> None:
        self._request = owner
        self._next = ""
        self._names: list[str] = []
        self._starts: list[int] = []

    def __enter__(self) -> "_Stages":
        self._names.append(self._next)
        self._starts.append(self._request._clock())
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        owner = self._request
        spent = owner._clock() - self._starts.pop()
        name = self._names.pop()
        stages = owner._stages
        if stages is None:
            owner._stages = {name: spent}
        else:
            stages[name] = stages.get(name, 0) + spent
        return None


class RequestMarker:
    """`gpuscope.request`: a decorator (`@request`, `@request()`) and a context manager (`with request():`)."""

    STAGES = ("preprocess", "model", "postprocess")  # diagnose's stages_ms keys: use these where they fit

    def __call__(self, fn: Callable[..., Any] | None = None) -> Any:
        if fn is None:
            tracker = _tracker
            return _NULL if tracker is None else _Request(tracker)
        if not callable(fn):
            raise TypeError("gpuscope.request: use @request, @request() or `with request():`")
        if inspect.iscoroutinefunction(fn):
            raise TypeError(f"gpuscope.request cannot mark async def {getattr(fn, '__qualname__', fn)!r}: its "
                            "requests share one thread (mark the sync function it runs in a thread pool instead)")

        @functools.wraps(fn)
        def marked(*args: Any, **kwargs: Any) -> Any:
            tracker = _tracker
            if tracker is None:
                return fn(*args, **kwargs)
            with _Request(tracker):
                return fn(*args, **kwargs)

        return marked

    def stage(self, name: str) -> Any:
        """`with request.stage("model"):` times part of the current request (nothing outside a marked one)."""
        if _tracker is None:  # no profile: one global read, not a thread-local lookup
            return _NULL
        current = _local.current
        if current is None:
            return _NULL
        scope = current._scope
        if scope is None:
            scope = current._scope = _Stages(current)
        scope._next = name  # taken by __enter__: a stage() never entered names nothing
        return scope

    def __repr__(self) -> str:
        return "gpuscope.request"


request = RequestMarker()


__all__ = ["RequestMarker", "RequestTracker", "LevelStats", "request", "install", "uninstall", "active_tracker"]
