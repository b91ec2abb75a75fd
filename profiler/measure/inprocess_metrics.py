"""Prometheus gauges of the allocator, for `profile(..., prometheus_port=N)`.

From outside, NVML gives one number per process; only the process itself can
split it into what tensors use, what PyTorch's caching allocator keeps, and what
lies outside the allocator (CUDA context, cuBLAS/cuDNN workspaces, another
engine's pool). `gpuscope export` on the node cannot see that split; this
endpoint, served from inside the profiled server, can. It is fed by the
profile's own sampler (one more tick listener), so it costs no extra reading.

Metrics (per NVML device index `gpu` and process `pid`; bytes, counters `_total`):
  gpuscope_allocator_allocated_bytes        torch allocated (live tensors)
  gpuscope_allocator_reserved_bytes         torch reserved (what the allocator holds from the driver)
  gpuscope_allocator_cached_bytes           reserved - allocated (freed blocks kept for reuse)
  gpuscope_allocator_peak_allocated_bytes   highest allocated since the profile started (peaks between
  gpuscope_allocator_peak_reserved_bytes    ticks included: the sampler reads and resets torch's peaks)
  gpuscope_outside_allocator_bytes          NVML used by this process - torch reserved
  gpuscope_allocator_oom_total              torch's num_ooms (allocations that failed)
  gpuscope_allocator_alloc_retries_total    torch's num_alloc_retries (cache flushed to satisfy one)
A figure that could not be read (CUDA not initialised yet, NVML absent) is left out, never 0.

With requests marked by `gpuscope.request` (profiler/measure/requests.py), per process `pid`; seconds:
  gpuscope_requests_in_flight                     requests in flight now (read at the scrape)
  gpuscope_requests_total{outcome}                completed requests, outcome ok | error
  gpuscope_request_duration_seconds               histogram of whole requests (ok and error)
  gpuscope_request_stage_duration_seconds{stage}  histogram per `request.stage(name)` (preprocess, model, ...)
The histograms are fed when the tracker aggregates (each sampler tick, and at every scrape), not on the
request's own thread, so a request pays nothing more for them.
"""
from __future__ import annotations

import bisect
import threading
from typing import Any, Iterator

from gpuscope.probes.readings import is_available

_GAUGES = (
    ("torch_allocated_bytes", "gpuscope_allocator_allocated_bytes", "Bytes PyTorch's allocator has handed to live tensors"),
    ("torch_reserved_bytes", "gpuscope_allocator_reserved_bytes", "Bytes PyTorch's caching allocator holds from the driver"),
)
_PEAKS = (
    ("torch_peak_allocated_bytes", "gpuscope_allocator_peak_allocated_bytes", "Highest allocated bytes since the profile started"),
    ("torch_peak_reserved_bytes", "gpuscope_allocator_peak_reserved_bytes", "Highest reserved bytes since the profile started"),
)
_COUNTERS = (
    ("torch_ooms", "gpuscope_allocator_oom", "Allocations PyTorch's allocator could not satisfy (out of memory)"),
    ("torch_alloc_retries", "gpuscope_allocator_alloc_retries", "Allocations that needed the cache flushed and a retry"),
)
_WANTED = {m for m, _, _ in _GAUGES + _PEAKS + _COUNTERS} | {"used_bytes"}


class AllocatorGauges:
    """A tick listener (keeps the latest allocator and NVML figures of `pid`) and a prometheus-client collector."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._prefix = f"pid:{pid}/gpu:"
        self._lock = threading.Lock()
        self._latest: dict[str, dict[str, Any]] = {}   # gpu -> metric -> latest reading
        self._high: dict[str, dict[str, float]] = {}   # gpu -> peak metric -> highest seen

    def __call__(self, t_ns: int, values: list[tuple[str, str, Any]]) -> None:
        with self._lock:
            for scope, metric, value in values:
                if not scope.startswith(self._prefix) or metric not in _WANTED:
                    continue
                gpu = scope[len(self._prefix):]
                self._latest.setdefault(gpu, {})[metric] = value
                if metric.startswith("torch_peak_") and is_available(value):
                    high = self._high.setdefault(gpu, {})
                    high[metric] = max(high.get(metric, float(value)), float(value))

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["gpu", "pid"]
        with self._lock:
            latest = {gpu: dict(figures) for gpu, figures in self._latest.items()}
            high = {gpu: dict(figures) for gpu, figures in self._high.items()}
        gauges = {m: GaugeMetricFamily(name, doc, labels=labels) for m, name, doc in _GAUGES + _PEAKS}
        cached = GaugeMetricFamily("gpuscope_allocator_cached_bytes",
                                   "Reserved minus allocated: freed blocks the allocator keeps for reuse", labels=labels)
        outside = GaugeMetricFamily("gpuscope_outside_allocator_bytes",
                                    "NVML's memory for this process minus torch reserved: CUDA context, library "
                                    "workspaces, other engines", labels=labels)
        counters = {m: CounterMetricFamily(name, doc, labels=labels) for m, name, doc in _COUNTERS}
        for gpu in sorted(latest):
            figures, key = latest[gpu], [gpu, str(self.pid)]
            for metric, _, _ in _GAUGES:
                if is_available(figures.get(metric)):
                    gauges[metric].add_metric(key, float(figures[metric]))
            for metric, _, _ in _PEAKS:
                if metric in high.get(gpu, {}):
                    gauges[metric].add_metric(key, high[gpu][metric])
            allocated, reserved, used = (figures.get(m) for m in ("torch_allocated_bytes", "torch_reserved_bytes",
                                                                  "used_bytes"))
            if is_available(allocated) and is_available(reserved):
                cached.add_metric(key, float(reserved - allocated))
            if is_available(used) and is_available(reserved) and used >= reserved:
                outside.add_metric(key, float(used - reserved))  # below 0 the two were not read at one instant
            for metric, _, _ in _COUNTERS:
                if is_available(figures.get(metric)):
                    counters[metric].add_metric(key, float(figures[metric]))
        yield from gauges.values()
        yield cached
        yield outside
        yield from counters.values()


# Request latencies from 0.5 ms to 10 s (prometheus-client's defaults start at 5 ms: too coarse for a model call).
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Histogram:
    """Cumulative-on-export bucket counts and a sum; fed under the metrics' own lock."""

    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.total += seconds
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip(LATENCY_BUCKETS_S, self.counts):
            running += count
            out.append((repr(float(bound)), float(running)))
        out.append(("+Inf", float(self.count)))
        return out


class RequestMetrics:
    """A prometheus-client collector of a profile's marked requests (a RequestTracker observer)."""

    def __init__(self, pid: int, tracker: Any) -> None:
        self.pid = pid
        self.tracker = tracker
        self._lock = threading.Lock()
        self._requests = _Histogram()
        self._stages: dict[str, _Histogram] = {}
        self._outcomes = {"ok": 0, "error": 0}
        tracker.observers.append(self.observe)

    def observe(self, total_s: float, stages_s: dict[str, float], ok: bool) -> None:
        with self._lock:
            self._requests.observe(total_s)
            self._outcomes["ok" if ok else "error"] += 1
            for name, seconds in stages_s.items():
                histogram = self._stages.get(name)
                if histogram is None:
                    histogram = self._stages[name] = _Histogram()
                histogram.observe(seconds)

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        self.tracker.drain()  # the requests finished since the last tick
        pid = str(self.pid)
        in_flight = GaugeMetricFamily("gpuscope_requests_in_flight",
                                      "Requests marked with gpuscope.request in flight now", labels=["pid"])
        in_flight.add_metric([pid], float(self.tracker.in_flight))
        total = CounterMetricFamily("gpuscope_requests", "Completed requests marked with gpuscope.request",
                                    labels=["pid", "outcome"])
        whole = HistogramMetricFamily("gpuscope_request_duration_seconds",
                                      "Latency of whole requests marked with gpuscope.request", labels=["pid"])
        stages = HistogramMetricFamily("gpuscope_request_stage_duration_seconds",
                                       "Latency of each request.stage(name) inside marked requests",
                                       labels=["pid", "stage"])
        with self._lock:
            for outcome, count in self._outcomes.items():
                total.add_metric([pid, outcome], float(count))
            whole.add_metric([pid], self._requests.buckets(), self._requests.total)
            for name in sorted(self._stages):
                histogram = self._stages[name]
                stages.add_metric([pid, name], histogram.buckets(), histogram.total)
        yield in_flight
        yield total
        yield whole
        yield stages


class Collectors:
    """Several collectors served as one registry entry (the allocator gauges and the request metrics)."""

    def __init__(self, *collectors: Any) -> None:
        self.collectors = collectors

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        for collector in self.collectors:
            yield from collector.collect()
