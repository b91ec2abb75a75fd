"""What a comparison samples: the participating processes (workers and their children) and their peaks per window.

USS/PSS of every participant (each process once), NVML's per-process memory summed over the participants,
and the rows a measured window becomes. The orchestration is `gpuscope compare` (commands/compare.py).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from gpuscope.analysis.verdict import (
    COMPARE_SCOPE,
    THREADS,
)
from gpuscope.probes import scopes
from gpuscope.probes.host import read_rss_bytes, read_smaps_rollup
from gpuscope.probes.readings import ERROR, NO_DEVICE, NOT_SUPPORTED, PROCESS_GONE, Unavailable, is_available


def _read_process_memory(pid: int) -> dict[str, int] | Unavailable:
    rollup = read_smaps_rollup(pid)
    if rollup is not None:
        return rollup
    import psutil

    try:
        info = psutil.Process(pid).memory_full_info()
        return {"rss_bytes": int(info.rss), "pss_bytes": int(getattr(info, "pss", info.uss)), "uss_bytes": int(info.uss)}
    except psutil.NoSuchProcess:
        return Unavailable(PROCESS_GONE, f"pid {pid} exited")
    except psutil.Error as exc:
        return Unavailable(ERROR, f"{type(exc).__name__}: {exc}")


class ParticipantsProbe:
    """A sampler probe: memory of the processes taking part in the current step, summed once per process.

    `set_pids()` names the workers; their descendants (helper processes a model
    may start) are found again every `children_every_s` and counted too. NVML
    rows are attributed by pid: only the participants' rows are summed.

    USS and PSS come from /proc/PID/smaps_rollup, which costs milliseconds per
    process (the kernel walks its page tables) and would take that from the
    workers being measured at every tick; so they are read for every participant
    together at most every `full_every_s`, and whenever `request_full()` asks (at
    a window's start and end); RSS is read at every tick.
    """

    def __init__(self, nvml: Any = None, nvml_index: int | None = None, children_every_s: float = 1.0,
                 read_memory: Callable[[int], dict[str, int] | Unavailable] = _read_process_memory,
                 read_rss: Callable[[int], int | Unavailable] = read_rss_bytes, full_every_s: float = 1.0,
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        self.nvml = nvml
        self.nvml_index = nvml_index
        self.children_every_s = children_every_s
        self.full_every_s = full_every_s
        self._read_memory = read_memory
        self._read_rss = read_rss
        self._clock_s = clock_s
        self._full_at = float("-inf")
        self._lock = threading.Lock()
        self._pids: tuple[int, ...] = ()
        self._children: tuple[int, ...] = ()
        self._children_at = 0.0
        self.device_baseline: dict[int, int] = {}
        self.sources: set[str] = set()  # how device_bytes was measured: nvml_pids and/or device_delta

    def set_pids(self, pids: list[int]) -> None:
        with self._lock:
            self._pids = tuple(dict.fromkeys(pids))
            self._children = ()
            self._children_at = 0.0
            self._full_at = float("-inf")

    def request_full(self) -> None:
        """Read USS and PSS at the next tick, whatever the interval."""
        with self._lock:
            self._full_at = float("-inf")

    def _descendants(self, pids: tuple[int, ...]) -> tuple[int, ...]:
        now = time.monotonic()
        if now - self._children_at < self.children_every_s:
            return self._children
        import psutil

        found: list[int] = []
        for pid in pids:
            try:
                found += [c.pid for c in psutil.Process(pid).children(recursive=True)]
            except psutil.Error:
                continue
        self._children, self._children_at = tuple(p for p in dict.fromkeys(found) if p not in pids), now
        return self._children

    def read(self) -> list[tuple[str, str, Any]]:
        with self._lock:
            pids = self._pids
            children = self._descendants(pids) if pids else ()
            now = self._clock_s()
            full = now - self._full_at >= self.full_every_s
            if full and pids:
                self._full_at = now
        out: list[tuple[str, str, Any]] = []
        totals = {"rss_bytes": 0, "pss_bytes": 0, "uss_bytes": 0} if full else {"rss_bytes": 0}
        missing: Unavailable | None = None
        for pid in pids + children:  # a set: each process once
            if full:
                memory = self._read_memory(pid)
            else:
                rss = self._read_rss(pid)
                memory = rss if isinstance(rss, Unavailable) else {"rss_bytes": rss}
            if isinstance(memory, Unavailable):
                out += [(scopes.process(pid), key, memory) for key in totals]
                if pid in pids:  # a helper that exited is fine; a worker that vanished is not
                    missing = memory if missing is None else missing
                continue
            for key, value in memory.items():
                out.append((scopes.process(pid), key, value))
                totals[key] += value
        if pids:
            for key, value in totals.items():
                out.append((COMPARE_SCOPE, f"host_{key}", missing if missing is not None else value))
            out.append((COMPARE_SCOPE, "processes", len(pids) + len(children)))
            out.append((COMPARE_SCOPE, "device_bytes", self._device(set(pids + children), set(pids), out)))
        return out

    def _device(self, pids: set[int], workers: set[int], out: list[tuple[str, str, Any]]) -> Any:
        """The participants' device memory: their NVML rows (`pids`: workers and their helpers), else the
        device's growth since the mode started when NVML does not list every worker."""
        if self.nvml is None or self.nvml_index is None:
            return Unavailable(NO_DEVICE, "CPU run: no NVML")
        from gpuscope.probes.gpu import check_row
        from gpuscope.probes.nvml import MetricError

        try:
            total = self.nvml.memory_info(self.nvml_index).total_bytes
        except MetricError as exc:
            total = Unavailable(exc.reason, exc.detail)
        try:
            rows = self.nvml.running_processes(self.nvml_index)
        except MetricError as exc:
            return Unavailable(exc.reason, exc.detail)
        except Exception as exc:
            return Unavailable(ERROR, f"{type(exc).__name__}: {exc}")
        seen: dict[int, Any] = {}
        for row in rows:
            checked = check_row(row, total, lambda pid: True)
            if checked.pid in pids and checked.pid not in seen:  # each pid once, whatever the binding returned
                seen[checked.pid] = checked.used_bytes
                out.append((scopes.process_on_device(checked.pid, self.nvml_index), "used_bytes", checked.used_bytes))
        if seen and not workers <= set(seen):
            # some workers are on the device and not listed (their pid namespace, a listing race): a sum of the
            # listed ones would be too small by a whole process, so the device's growth stands in, as below
            seen = {}
        if not seen:
            # NVML reports host pids; inside a container's pid namespace none match. Fall back to the device's
            # growth since the mode started (exact on a GPU nobody else uses), and say so in the row.
            baseline = self.device_baseline.get(self.nvml_index)
            if baseline is not None:
                try:
                    used = self.nvml.memory_info(self.nvml_index).used_bytes
                except MetricError as exc:
                    return Unavailable(exc.reason, exc.detail)
                self.sources.add("device_delta")
                return max(0, used - baseline)
            return Unavailable(NOT_SUPPORTED, "NVML lists none of the workers' pids (another pid namespace?)")
        self.sources.add("nvml_pids")
        bad = next((v for v in seen.values() if not is_available(v)), None)
        return bad if bad is not None else sum(seen.values())

    def mark_device_baseline(self) -> None:
        """Device used memory now, on every device, before a mode's workers start (for the pid-namespace fallback)."""
        self.device_baseline = {}
        if self.nvml is None:
            return
        from gpuscope.probes.nvml import MetricError

        try:
            count = self.nvml.device_count()
        except Exception:
            return
        for index in range(count):
            try:
                self.device_baseline[index] = self.nvml.memory_info(index).used_bytes
            except (MetricError, Exception):
                continue


class WindowPeaks:
    """Sampler listener: the peak of each `compare` total between `begin()` and `end()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = False
        self._peaks: dict[str, Any] = {}
        self.ticks = 0

    def begin(self) -> None:
        with self._lock:
            self._active, self._peaks, self.ticks = True, {}, 0

    def end(self) -> dict[str, Any]:
        with self._lock:
            self._active = False
            return dict(self._peaks)

    def __call__(self, t_ns: int, values: list[tuple[str, str, Any]]) -> None:
        with self._lock:
            if not self._active:
                return
            self.ticks += 1
            for scope, metric, value in values:
                if scope != COMPARE_SCOPE:
                    continue
                current = self._peaks.get(metric)
                if is_available(value):
                    if not is_available(current) or value > current:
                        self._peaks[metric] = value
                elif current is None:
                    self._peaks[metric] = value  # keep the reason until a real value arrives


def build_row(mode: str, predictors: int, payloads: list[dict[str, Any]], window_s: float,
              peaks: dict[str, Any], ticks: int) -> dict[str, Any]:
    from gpuscope.measure.sweep import percentiles_ms

    latencies_ms = [lat / 1e6 for p in payloads for lat in p["latencies_ns"]]
    messages: list[str] = []
    for payload in payloads:
        messages += [m for m in payload.get("error_messages", []) if m not in messages]
    row: dict[str, Any] = {
        "predictors": predictors, "mode": mode,
        "processes": len(payloads), "threads_per_process": predictors if mode == THREADS else 1,
        "requests": len(latencies_ms), "errors": sum(p.get("errors", 0) for p in payloads),
        "duration_s": round(window_s, 3), "throughput_rps": len(latencies_ms) / window_s if window_s > 0 else 0.0,
        "latency_ms": percentiles_ms(latencies_ms),
        "host_uss_bytes": peaks.get("host_uss_bytes", Unavailable(ERROR, "no sample in the window")),
        "host_pss_bytes": peaks.get("host_pss_bytes", Unavailable(ERROR, "no sample in the window")),
        "host_rss_bytes": peaks.get("host_rss_bytes", Unavailable(ERROR, "no sample in the window")),
        "device_bytes": peaks.get("device_bytes", Unavailable(ERROR, "no sample in the window")),
        "model_copies": sum(p.get("weight_sets", 0) for p in payloads),
        "pids": [p["pid"] for p in payloads], "memory_samples": ticks,
        "oom": any(p.get("oom") for p in payloads), "dead_predictors": sum(p.get("dead_predictors", 0) for p in payloads),
        "error_messages": messages[:5],
    }
    if row["requests"] == 0 and row["errors"] > 0:  # a model failing every request is not a measurement
        row["error"] = (f"every request in the window failed ({row['errors']:,} errors)"
                        + (f": {messages[0]}" if messages else ""))
    return row
