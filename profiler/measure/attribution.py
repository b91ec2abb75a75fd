"""Per-tick attribution of device memory to this process, its allocator, and everyone else.

A tick listener: it turns the raw readings of one tick into the figures a step
reports (this process's NVML memory, torch's peaks, other processes' sum) and
keeps only running peaks plus the decomposition at the tick where this process
peaked, so layers always add up to one real instant.
"""
from __future__ import annotations

import threading
from typing import Any

from gpuscope.probes import scopes
from gpuscope.probes.readings import Unavailable, is_available
from gpuscope.record.layers import DeviceTick, cpu_layers, device_tick, tick_layers

ScopedValue = tuple[str, str, Any]


def end_figures(last: dict[tuple[str, str], Any], pid: int, gpu_index: int) -> dict[str, Any]:
    """The process's memory figures at the last tick of a run (CACHE_BLOAT reads them 'at the end')."""
    mine = scopes.process_on_device(pid, gpu_index)
    return {"process_gpu_bytes": last.get((mine, "used_bytes")),
            "torch_allocated_bytes": last.get((mine, "torch_allocated_bytes")),
            "torch_reserved_bytes": last.get((mine, "torch_reserved_bytes")),
            "device_used_bytes": last.get((scopes.device(gpu_index), "used_bytes"))}


# the names a step's peaks give the readings of the device, of this process on it, and of this process
_DEVICE_FIGURES = {"used_bytes": "device_used_bytes", "total_bytes": "device_total_bytes",
                   "driver_reserved_bytes": "driver_reserved_bytes", "free_bytes": "device_free_bytes"}
_PROCESS_ON_DEVICE_FIGURES = {"used_bytes": "process_gpu_bytes", "torch_allocated_bytes": "torch_allocated_now_bytes",
                              "torch_reserved_bytes": "torch_reserved_now_bytes",
                              "torch_peak_allocated_bytes": "torch_allocated_bytes",
                              "torch_peak_reserved_bytes": "torch_reserved_bytes",
                              "torch_inactive_split_bytes": "torch_inactive_split_bytes",
                              "torch_alloc_retries": "torch_alloc_retries", "torch_ooms": "torch_ooms"}
# (a step keeps only the figures its record uses: utilisation, threads and host CPU are drawn from the samples)
_PROCESS_FIGURES = frozenset(("rss_bytes", "uss_bytes", "cpu_util_pct", "ctx_switches_involuntary"))


class StepMonitor:
    """Tracks peaks for the profiled pid on one device (or the CPU) since the last reset()."""

    SERIES_MAX = 512

    def __init__(self, pid: int, gpu_index: int | None, model_bytes: int) -> None:
        self.pid = pid
        self.gpu_index = gpu_index
        self.model_bytes = model_bytes
        self._lock = threading.Lock()
        self._peaks: dict[str, Any] = {}
        self._layers_at_peak: dict[str, int] = {}
        self._anchor_peak: float = -1.0
        self.other_pids_seen: dict[int, int] = {}  # pid -> peak used bytes, for the whole run
        self.ticks = 0
        self._since_ns: int | None = None
        self._anchored_on_process = False
        # (t_ns, this process's memory) over the step, for its late growth: every tick, halved (every other
        # point dropped) whenever it reaches SERIES_MAX, so a long step at a short interval stays bounded
        self._series: list[tuple[int, float]] = []

    def reset(self, since_ns: int | None = None) -> None:
        """Start a new step's peaks. With `since_ns` (the step's start on the sampler's clock), a tick
        stamped earlier is ignored: the sampler may deliver a tick it began before the step started,
        and its readings (a lower RSS, another step's CPU) belong to the step before."""
        with self._lock:
            self._peaks = {}
            self._layers_at_peak = {}
            self._anchor_peak = -1.0
            self.ticks = 0
            self._since_ns = since_ns
            self._anchored_on_process = False
            self._series = []

    def _figures(self, values: list[ScopedValue]) -> tuple[dict[str, Any], DeviceTick | None]:
        """This tick's figures by the names a step's peaks use, and the device's tick for its layers.
        One pass over the tick, the name tables built once (a 5 ms sampler calls this 200 times a second)."""
        me = scopes.process(self.pid)
        figures: dict[str, Any] = {"model_bytes": self.model_bytes}
        tick: DeviceTick | None = None
        device = mine = None
        if self.gpu_index is not None:
            device = scopes.device(self.gpu_index)
            mine = scopes.process_on_device(self.pid, self.gpu_index)
            tick = device_tick(values, self.pid, self.gpu_index)
        for scope, metric, value in values:
            if scope == device:
                key = _DEVICE_FIGURES.get(metric)
            elif scope == mine:
                key = _PROCESS_ON_DEVICE_FIGURES.get(metric)
            elif scope == me:
                key = metric if metric in _PROCESS_FIGURES else None
            else:
                continue
            if key:
                figures[key] = value
        if tick is not None:
            for pid, used in tick.other_pids.items():
                self.other_pids_seen[pid] = max(self.other_pids_seen.get(pid, 0), used)
            figures["other_processes_bytes"] = tick.other_processes_bytes
            if "process_gpu_bytes" not in figures and "device_used_bytes" in figures:
                figures["process_gpu_bytes"] = Unavailable("process_gone", "NVML does not list this process")
        return figures, tick

    def __call__(self, t_ns: int, values: list[ScopedValue]) -> None:
        figures, tick = self._figures(values)
        with self._lock:
            if self._since_ns is not None and t_ns < self._since_ns:
                return
            self.ticks += 1
            for key, value in figures.items():
                current = self._peaks.get(key)
                if is_available(value):
                    if not is_available(current) or value > current:
                        self._peaks[key] = value
                elif key not in self._peaks:
                    self._peaks[key] = value
            own = figures.get("process_gpu_bytes" if self.gpu_index is not None else "rss_bytes")
            if is_available(own):
                self._series.append((t_ns, float(own)))
                if len(self._series) >= self.SERIES_MAX:
                    self._series = self._series[::2]
            if tick is not None:
                anchor = tick.process_bytes
                if is_available(anchor):
                    if not self._anchored_on_process:  # a process figure outranks the device-level fallback
                        self._anchored_on_process, self._anchor_peak = True, -1.0
                    if anchor > self._anchor_peak:
                        self._anchor_peak = anchor
                        self._layers_at_peak = tick_layers(tick, self.model_bytes)
                elif not self._anchored_on_process and tick.nobody_listed:
                    # NVML counts memory but lists no process (PID_NAMESPACE): split the device's used memory
                    if tick.device_used_bytes > self._anchor_peak:
                        self._anchor_peak = tick.device_used_bytes
                        self._layers_at_peak = tick_layers(tick, self.model_bytes)
            else:
                anchor = figures.get("rss_bytes")
                if is_available(anchor) and anchor > self._anchor_peak:
                    self._anchor_peak = anchor
                    self._layers_at_peak = cpu_layers(anchor, self.model_bytes)

    def snapshot(self) -> dict[str, Any]:
        """Peak figures since reset, plus `layers` at the tick where this process peaked, plus how much this
        process's memory grew over the second half of the step (`late_growth_bytes` over `late_growth_s`):
        warm-up is in the first half; a step that still grows in its second half is leaking, not warming."""
        with self._lock:
            out = dict(self._peaks)
            out["layers"] = dict(self._layers_at_peak)
            series = self._series
            if len(series) >= 4:
                middle_ns = (series[0][0] + series[-1][0]) / 2
                half = [point for point in series if point[0] >= middle_ns]
                if len(half) >= 2:
                    out["late_growth_bytes"] = int(half[-1][1] - half[0][1])
                    out["late_growth_s"] = round((half[-1][0] - half[0][0]) / 1e9, 3)
            return out


class GapTracker:
    """Notices readings that were available and then stopped (NVML failing mid-run, the GPU lost),
    and the signs of a foreign pid namespace (memory used while NVML lists nobody). It records every unlisted
    byte; whether that is enough to speak is PID_NAMESPACE's threshold (Thresholds.pid_namespace_min_bytes)."""

    WATCHED = ("used_bytes", "process_count", "util_pct")

    def __init__(self, pid: int, gpu_index: int | None) -> None:
        self.pid = pid
        self.gpu_index = gpu_index
        self._seen_ok: set[tuple[str, str]] = set()
        self.gaps: dict[str, dict[str, Any]] = {}
        self.unlisted_used_bytes = 0
        self.self_not_listed_ticks = 0

    def __call__(self, t_ns: int, values: list[ScopedValue]) -> None:
        if self.gpu_index is None:
            return
        device = scopes.device(self.gpu_index)
        mine = scopes.process_on_device(self.pid, self.gpu_index)
        figures: dict[str, Any] = {}
        self_listed = False
        reserved = None
        for scope, metric, value in values:
            if scope == device:
                figures[metric] = value
                if metric in self.WATCHED:
                    key = (scope, metric)
                    if is_available(value):
                        self._seen_ok.add(key)
                    elif key in self._seen_ok and isinstance(value, Unavailable):
                        gap = self.gaps.setdefault(f"{scope} {metric}", {"reason": value.reason, "detail": value.detail,
                                                                          "ticks": 0, "first_t_ns": t_ns})
                        gap["ticks"] += 1
            elif scope == mine:
                if metric == "used_bytes" and is_available(value):
                    self_listed = True
                elif metric == "torch_reserved_bytes" and is_available(value):
                    reserved = value
        count, used, driver = figures.get("process_count"), figures.get("used_bytes"), figures.get("driver_reserved_bytes")
        if count == 0 and is_available(used) and is_available(driver):  # without v2's reserve, idle looks used
            unlisted = used - driver
            self.unlisted_used_bytes = max(self.unlisted_used_bytes, unlisted)
        if not self_listed and is_available(reserved) and reserved > 0 and is_available(count):
            self.self_not_listed_ticks += 1

    def evidence(self) -> dict[str, Any]:
        return {"unlisted_used_bytes": self.unlisted_used_bytes,
                "self_not_listed": self.self_not_listed_ticks > 0,
                "self_not_listed_ticks": self.self_not_listed_ticks}
