"""`gpuscope compare`: N predictor threads sharing one model versus N worker processes each loading it.

Both sides run the same worker (profiler/process_worker.py), the same model
spec and the same closed loop, so the only difference is the one measured:
  threads    one spawned worker process, N PredictorPool threads, one model;
  processes  N spawned worker processes, one predictor each, N models.
The parent only orchestrates and samples: it never loads the model, and it is
counted in neither mode (a real deployment's supervisor is not the model server).

Memory is sampled through the whole measured window and the peak kept:
  host_uss_bytes  sum of USS (private pages) over the participating processes
                  and their descendants, each process counted once; pages they
                  share (libraries, the page cache) count in no one's USS;
  host_pss_bytes  sum of PSS (shared pages split between their users): every
                  page counted exactly once, shared ones included;
  device_bytes    NVML per-process used memory, summed over the rows whose pid
                  is a participant (Unavailable on the CPU: never 0).
The comparison lives in record.extra["comparison"] (plain JSON, see COMPARISON_KEYS).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from probes.readings import ERROR, NO_DEVICE, NOT_SUPPORTED, PROCESS_GONE, Unavailable, is_available, reading_to_json
from probes.redact import redact_argv
from probes.host import read_rss_bytes, read_smaps_rollup
from probes.units import format_bytes
from profiler.errors import EXIT_OK, EXIT_USAGE, UsageError
from profiler.options import WorkloadOptions
from profiler.findings import least_squares_slope
from profiler.run import Finding, RunRecord

THREADS = "threads"
PROCESSES = "processes"
MODES = (THREADS, PROCESSES)
COMPARE_SCOPE = "compare"
COMPARE_PNG = "compare.png"
FINDING_CODE = "PROCESSES_VS_THREADS"
SAME_THROUGHPUT = 0.10  # throughputs within 10% count as a tie; memory then decides
PLATEAU_SHARE = 0.05  # the recommended N: the smallest within 5% of the best throughput (as diagnose)
COMPARISON_KEYS = ("rows", "per_extra_predictor", "verdict", "winner", "recommended_predictors", "verdict_at_predictors",
                   "verdict_numbers", "host_memory", "device_memory")


@dataclass(frozen=True)
class CompareOptions(WorkloadOptions):
    """Everything `gpuscope compare` needs: the shared workload options with a compare run's defaults."""

    duration: str = "5s"
    warmup: str = "1s"
    interval: str = "200ms"
    out: str = "gpuscope-compare"


def default_counts(usable_cores: int) -> tuple[int, ...]:
    """1, 2, and powers of two up to the usable cores, at most 4: each process loads its own model."""
    top = min(4, max(2, usable_cores))
    counts, n = [], 1
    while n <= top:
        counts.append(n)
        n *= 2
    return tuple(counts)


# ---------------------------------------------------------------- memory of a set of processes

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
                out += [(f"pid:{pid}", key, memory) for key in totals]
                if pid in pids:  # a helper that exited is fine; a worker that vanished is not
                    missing = memory if missing is None else missing
                continue
            for key, value in memory.items():
                out.append((f"pid:{pid}", key, value))
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
        from probes.gpu import check_row
        from probes.nvml import MetricError

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
                out.append((f"pid:{checked.pid}/gpu:{self.nvml_index}", "used_bytes", checked.used_bytes))
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
        from probes.nvml import MetricError

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


# ---------------------------------------------------------------- turning measurements into the comparison

def build_row(mode: str, predictors: int, payloads: list[dict[str, Any]], window_s: float,
              peaks: dict[str, Any], ticks: int) -> dict[str, Any]:
    from profiler.sweep import percentiles_ms

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


def ok_rows(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r.get("mode") == mode and not r.get("error") and r.get("requests", 0) > 0),
                  key=lambda r: r["predictors"])


def per_extra_predictor(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Least-squares growth per added predictor, per mode and memory figure (bytes), from the measured rows."""
    out: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        mine = ok_rows(rows, mode)
        entry: dict[str, Any] = {}
        for key in ("host_uss_bytes", "host_pss_bytes", "device_bytes"):
            points = [(r["predictors"], r[key]) for r in mine if is_available(r.get(key))]
            slope = least_squares_slope(points)
            if slope is not None:
                entry[key] = int(round(slope))
            else:
                reasons = [r.get(key) for r in mine if isinstance(r.get(key), Unavailable)]
                entry[key] = reasons[0] if reasons else Unavailable(
                    NOT_SUPPORTED, "needs two predictor counts measured in this mode")
        out[mode] = entry
    return out


def recommended_predictors(rows: list[dict[str, Any]]) -> int | None:
    """The smallest N, measured in both modes, whose better mode is within 5% of the best throughput seen."""
    threads = {r["predictors"]: r for r in ok_rows(rows, THREADS)}
    processes = {r["predictors"]: r for r in ok_rows(rows, PROCESSES)}
    both = sorted(set(threads) & set(processes))
    if not both:
        return None
    best_at = {n: max(threads[n]["throughput_rps"], processes[n]["throughput_rps"]) for n in both}
    best = max(best_at.values())
    return min(n for n in both if best_at[n] >= best * (1 - PLATEAU_SHARE))


def throughput_noise(rows: list[dict[str, Any]]) -> float | None:
    """How far apart the two modes' throughputs are at 1 predictor, where they are the same deployment."""
    t = next((r for r in ok_rows(rows, THREADS) if r["predictors"] == 1), None)
    p = next((r for r in ok_rows(rows, PROCESSES) if r["predictors"] == 1), None)
    if t is None or p is None or max(t["throughput_rps"], p["throughput_rps"]) <= 0:
        return None
    return abs(t["throughput_rps"] - p["throughput_rps"]) / max(t["throughput_rps"], p["throughput_rps"])


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _memory_phrase(n: int, diff: Any, what: str, gpu: bool, model_bytes: int) -> str | None:
    """'2 processes use 151 MiB more host memory than 2 threads: ...', or None when it cannot be said."""
    if not is_available(diff):
        return None
    if diff >= 0:
        cause = (f"{_plural(n, 'CUDA context')} and {_plural(n, 'model copy').replace('copys', 'copies')} instead of one"
                 if gpu and what == "device" else
                 f"{_plural(n, 'interpreter')} with torch and {_plural(n, 'copy').replace('copys', 'copies')} of the "
                 f"{format_bytes(model_bytes)} model instead of one")
        if n == 1:
            return f"1 process uses {format_bytes(diff)} more {what} memory than 1 thread in its own process"
        return f"{n} processes use {format_bytes(diff)} more {what} memory than {n} threads: {cause}"
    return f"{n} processes use {format_bytes(-diff)} less {what} memory than {n} threads"


def _memory_text(diffs: list[tuple[int, str]], side: str) -> str:
    """'151 MiB less host memory' from `side`'s point of view; diffs are processes minus threads."""
    words = []
    for diff, what in diffs:
        fewer = diff >= 0 if side == THREADS else diff < 0
        words.append(f"{format_bytes(abs(diff))} {'less' if fewer else 'more'} {what} memory")
    return " and ".join(words) or "memory not measured"


def verdict(rows: list[dict[str, Any]], gpu: bool, model_bytes: int) -> tuple[str, str | None, dict[str, Any]]:
    """(the verdict sentence, the winning mode or None, the numbers behind it), phrased from the rows."""
    recommended = recommended_predictors(rows)
    if recommended is None:
        return ("no predictor count completed in both modes: nothing to compare", None, {})
    measured = sorted(set(r["predictors"] for r in ok_rows(rows, THREADS)) & set(r["predictors"] for r in ok_rows(rows, PROCESSES)))
    # at 1 predictor both modes are the same deployment (one process, one model): judge at 2 or more when possible
    n = recommended if recommended >= 2 else next((m for m in measured if m >= 2), recommended)
    if n == 1:
        return ("at 1 predictor both modes are the same deployment (one process, one model): measure 2 or more "
                "predictors to compare threads with processes", None, {"predictors": 1, "recommended_predictors": 1})
    t = next(r for r in ok_rows(rows, THREADS) if r["predictors"] == n)
    p = next(r for r in ok_rows(rows, PROCESSES) if r["predictors"] == n)
    ratio = p["throughput_rps"] / t["throughput_rps"] if t["throughput_rps"] > 0 else float("inf")
    noise = throughput_noise(rows)
    tie = max(SAME_THROUGHPUT, noise or 0.0)
    host_diff = (p["host_uss_bytes"] - t["host_uss_bytes"]
                 if is_available(p["host_uss_bytes"]) and is_available(t["host_uss_bytes"]) else None)
    device_diff = (p["device_bytes"] - t["device_bytes"]
                   if is_available(p["device_bytes"]) and is_available(t["device_bytes"]) else None)
    diffs = [(d, w) for d, w in ((device_diff, "device"), (host_diff, "host")) if d is not None]
    at = f"at {_plural(n, 'predictor')}"
    p99 = "p99 {a:.1f} vs {b:.1f} ms"
    if ratio > 1 + tie:
        winner = PROCESSES
        text = (f"processes win {at}: {ratio:.2f}x the throughput of threads ({p['throughput_rps']:.1f} vs "
                f"{t['throughput_rps']:.1f} req/s, " + p99.format(a=p["latency_ms"].get("p99", 0), b=t["latency_ms"].get("p99", 0))
                + f") for {_memory_text(diffs, PROCESSES)}")
    elif ratio < 1 / (1 + tie):
        winner = THREADS
        text = (f"threads win {at}: {1 / ratio:.2f}x the throughput of processes ({t['throughput_rps']:.1f} vs "
                f"{p['throughput_rps']:.1f} req/s, " + p99.format(a=t["latency_ms"].get("p99", 0), b=p["latency_ms"].get("p99", 0))
                + f") with {_memory_text(diffs, THREADS)}")
    else:
        winner = THREADS if not diffs or diffs[0][0] >= 0 else PROCESSES
        first, second = (t, p) if winner == THREADS else (p, t)
        same = f"the same throughput within {tie:.0%}" if tie <= SAME_THROUGHPUT else "throughput within this machine's noise"
        text = (f"{winner} win {at}: {same} ({first['throughput_rps']:.1f} vs "
                f"{second['throughput_rps']:.1f} req/s) with {_memory_text(diffs, winner)}")
    if n != recommended:
        text = "1 predictor already gives the best throughput, and at 1 predictor both modes are the same deployment; " + text
    if noise is not None and noise > SAME_THROUGHPUT:
        text += (f" (throughput is noisy here: at 1 predictor, where both modes are the same deployment, it differed "
                 f"by {noise:.0%}, so smaller differences are not counted)")
    numbers = {"predictors": n, "recommended_predictors": recommended,
               "throughput_noise": round(noise, 3) if noise is not None else None, "tie_tolerance": round(tie, 3),
               "throughput_ratio_processes_to_threads": round(ratio, 3),
               "host_uss_diff_bytes": host_diff, "device_diff_bytes": device_diff,
               "threads": {k: t[k] for k in ("throughput_rps", "latency_ms", "host_uss_bytes", "device_bytes")},
               "processes": {k: p[k] for k in ("throughput_rps", "latency_ms", "host_uss_bytes", "device_bytes")}}
    return text, winner, numbers


def comparison_findings(comparison: dict[str, Any], gpu: bool, model_bytes: int) -> list[Finding]:
    """PROCESSES_VS_THREADS: what N processes cost over N threads, and which mode serves better."""
    rows = comparison.get("rows", [])
    findings: list[Finding] = []
    n = comparison.get("recommended_predictors")
    numbers = comparison.get("verdict_numbers") or {}
    if n is not None and numbers.get("threads"):
        # the count the verdict speaks of, so the finding and the verdict never describe different deployments
        at_n = int(numbers.get("predictors") or n)
        t = next(r for r in ok_rows(rows, THREADS) if r["predictors"] == at_n)
        p = next(r for r in ok_rows(rows, PROCESSES) if r["predictors"] == at_n)
        device_diff = p["device_bytes"] - t["device_bytes"] if is_available(p["device_bytes"]) and is_available(t["device_bytes"]) else None
        host_diff = p["host_uss_bytes"] - t["host_uss_bytes"] if is_available(p["host_uss_bytes"]) and is_available(t["host_uss_bytes"]) else None
        phrases = [x for x in (_memory_phrase(at_n, device_diff, "device", gpu, model_bytes),
                               _memory_phrase(at_n, host_diff, "host", gpu, model_bytes)) if x]
        title = phrases[0] if phrases else f"{at_n} processes versus {at_n} threads: memory not measured"
        per_extra = comparison.get("per_extra_predictor", {})
        winner = comparison.get("winner")
        faster = numbers.get("throughput_ratio_processes_to_threads", 1) > 1 + numbers.get("tie_tolerance", SAME_THROUGHPUT)
        one_is_best = numbers.get("recommended_predictors") == 1  # at 1 predictor both modes are one deployment
        severity = "warn" if winner == PROCESSES and faster and not one_is_best else "info"
        if winner == PROCESSES and faster:
            remedy = ("threads leave throughput on the table here (the GIL or a lock in the model serialises them): "
                      "serve from worker processes if their memory fits, or make forward release the GIL "
                      "(TorchScript / torch.compile, fewer Python-level ops) and compare again"
                      + ("; but 1 predictor already gives the best throughput, where the two modes are the same"
                         if one_is_best else ""))
        elif winner == PROCESSES:
            remedy = ("the two modes serve the same here, and the processes measured less memory, which is unusual "
                      "(threads share one model; each process loads its own): measure again, longer, before "
                      "choosing; threads stay the simpler deployment")
        else:
            remedy = ("serve from threads sharing one model; worker processes only add memory here "
                      f"(each extra process costs {_fmt(per_extra.get(PROCESSES, {}).get('device_bytes' if gpu else 'host_uss_bytes'))}"
                      f" against {_fmt(per_extra.get(THREADS, {}).get('device_bytes' if gpu else 'host_uss_bytes'))} per extra thread)")
        findings.append(Finding(FINDING_CODE, severity, title,
                                reading_to_json({"at_predictors": at_n, "phrases": phrases,
                                                 "verdict": comparison.get("verdict"),
                                                 "per_extra_predictor": per_extra, "verdict_numbers": numbers,
                                                 "host_uss_diff_bytes": host_diff, "device_diff_bytes": device_diff}),
                                remedy, at_n))
    for row in rows:
        if row.get("error"):
            findings.append(Finding(FINDING_CODE, "warn",
                                    f"{_plural(row['predictors'], 'predictor')} in {row['mode']} mode could not run: "
                                    f"{row['error']}", {"row": reading_to_json(row)},
                                    "see the worker's error; on a GPU, N processes need N CUDA contexts and N model "
                                    "copies, which may not fit where N threads do", row["predictors"]))
    return findings


def _fmt(value: Any) -> str:
    return ("+" if value >= 0 else "") + format_bytes(value) if is_available(value) else "n/a"


def build_comparison(rows: list[dict[str, Any]], gpu: bool, model_bytes: int) -> dict[str, Any]:
    text, winner, numbers = verdict(rows, gpu, model_bytes)
    return reading_to_json({
        "rows": rows, "per_extra_predictor": per_extra_predictor(rows), "verdict": text, "winner": winner,
        "recommended_predictors": numbers.get("recommended_predictors"), "verdict_at_predictors": numbers.get("predictors"),
        "verdict_numbers": numbers,
        "host_memory": "peak during the measured window of the sum of USS (and PSS) over the workers of the mode "
                       "and their descendants, each process once; the orchestrating parent is not counted",
        "device_memory": ("peak of NVML per-process used memory summed over the workers' pids (a row whose "
                          "device_source is device_delta could not see their pids, e.g. from a container: there it is "
                          "the device's growth since the mode started)" if gpu
                          else "not measured: no GPU (NVML unavailable)"),
    })


# ---------------------------------------------------------------- the terminal table

def format_comparison(record: RunRecord) -> str:
    comparison = record.extra.get("comparison") or {}
    rows = comparison.get("rows", [])
    model = record.model or {}
    lines = [f"gpuscope compare: {model.get('source', record.config.get('model', '?'))} "
             f"({format_bytes(model.get('model_bytes') or 0)} of weights) on {record.config.get('device', '?')}, "
             f"{record.config.get('max_step_s', 0):g} s per step  [{record.status}]", ""]

    def mem(value: Any) -> str:
        return format_bytes(value) if is_available(value) else "n/a"

    def cell(row: dict[str, Any] | None) -> str:
        if row is None:
            return f"{'-':>8} {'':>8} {'':>8} {'':>10} {'':>10}"
        if row.get("error"):
            return f"{'failed':>8} {'':>8} {'':>8} {'':>10} {'':>10}"
        lat = row.get("latency_ms") or {}
        latency = (f"{lat['p50']:>8.2f} {lat['p99']:>8.2f}" if "p50" in lat and "p99" in lat
                   else f"{'none done':>17}")  # no completed request: no latency, not 0.00 ms
        return (f"{row['throughput_rps']:>8.1f} {latency} "
                f"{mem(row.get('host_uss_bytes')):>10} {mem(row.get('device_bytes')):>10}")

    width = len(cell(None))
    lines.append(f"{'':>4}  {'threads (1 process)':<{width}}  | {'processes (1 predictor each)':<{width}}")
    head = f"{'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'host USS':>10} {'device':>10}"
    lines.append(f"{'N':>4}  {head}  | {head}")
    by = {(r.get("mode"), r.get("predictors")): r for r in rows}
    for n in sorted({r.get("predictors") for r in rows}):
        lines.append(f"{n:>4}  {cell(by.get((THREADS, n)))}  | {cell(by.get((PROCESSES, n)))}")
    per_extra = comparison.get("per_extra_predictor", {})

    def extra(mode: str) -> str:
        e = per_extra.get(mode, {})
        return f"host {_fmt(e.get('host_uss_bytes'))}, device {_fmt(e.get('device_bytes'))}"

    lines.append(f"{'per extra predictor:':<{width + 6}}")
    lines.append(f"{'':>4}  {extra(THREADS):<{width}}  | {extra(PROCESSES)}")
    for row in rows:
        if row.get("error"):
            lines.append(f"{row['mode']} x{row['predictors']} failed: {row['error']}")
    lines += ["", f"verdict: {comparison.get('verdict', 'none')}"]
    for finding in record.findings:
        lines.append(f"  [{finding.severity}] {finding.code}: {finding.title}")
    if record.failure:
        lines.append(f"failure: {record.failure}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the session

def run_compare(opts: CompareOptions, progress: Any = None,
                nvml_opener: Callable[[], tuple[Any, dict[str, str] | None]] | None = None) -> Any:
    """Run both modes for every predictor count; save run.json (and the report). Returns a SessionResult.

    Raises UsageError for bad input, or when the model cannot be loaded in a worker
    (before anything is written). Every worker is reaped before this returns or raises.
    """
    from probes.host import host_info, usable_cores
    from probes.samplefile import SampleWriter
    from probes.sampler import Sampler
    from profiler import __version__
    from profiler.devices import resolve_device
    from profiler.models import DTYPES, SIZES, parse_input_shape
    from profiler.options import parse_predictors, parse_seconds
    from profiler.process_worker import Interrupted, WorkerError, WorkerGroup, WorkerSpec
    from profiler.run import STATUS_COMPLETE, STATUS_FAILED, STATUS_INTERRUPTED, save_run
    from profiler.session import (RUN_FILE, SAMPLES_FILE, Interrupts, Progress, SessionResult, check_out_path,
                                  now_iso, open_nvml, prepare_out_dir)

    progress = progress or Progress(opts.quiet)
    counts = parse_predictors(opts.predictors) or default_counts(usable_cores())
    duration_s = parse_seconds("--duration", opts.duration, 0.1)
    warmup_s = parse_seconds("--warmup", opts.warmup, 0.0)
    interval_s = parse_seconds("--interval", opts.interval, 0.005)
    if opts.intra_op_threads is not None and opts.intra_op_threads < 1:
        raise UsageError(f"--intra-op-threads must be at least 1, got {opts.intra_op_threads}")
    try:
        shape = parse_input_shape(opts.input_shape) if opts.input_shape else None
    except ValueError as exc:
        raise UsageError(f"--input-shape: {exc}") from None
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise UsageError(f"--dtype: unknown dtype {opts.dtype!r} (choose from {', '.join(DTYPES)})")
    if opts.model_size is not None and opts.model_size not in SIZES:
        raise UsageError(f"--model-size: unknown size {opts.model_size!r} (choose from {', '.join(SIZES)})")
    check_out_path(opts.out)
    device = resolve_device(opts.device)
    gpu = device.startswith("cuda")
    size = opts.model_size or ("large" if gpu else "small")
    opener = nvml_opener or open_nvml
    nvml, device_unavailable = opener() if gpu else (None, {"reason": "no_device", "detail": "comparing on the CPU"})

    parent = os.getpid()
    record = RunRecord(tool_version=__version__, started_at=now_iso(), host=host_info(), pid=parent, mode="compare")
    record.device_unavailable = device_unavailable
    nvml_index: int | None = None
    if nvml is not None:
        from probes.gpu import GpuProbe

        record.devices = [d.to_json() for d in GpuProbe(nvml).devices]
    spec = WorkerSpec(model=opts.model, device=device, input_shape=shape, dtype=opts.dtype, size=size,
                      trust_model_file=opts.trust_model_file, intra_op_threads=opts.intra_op_threads,
                      streams=bool(opts.streams and gpu))
    stop = threading.Event()
    probe = ParticipantsProbe(nvml, None)
    peaks = WindowPeaks()
    rows: list[dict[str, Any]] = []
    writer: Any = None
    sampler: Any = None
    out_dir: str | None = None
    failure: str | None = None
    total = len(counts) * 2
    done = 0

    def measure(group: Any, workers: list[Any], threads: int, mode: str, n: int) -> dict[str, Any]:
        label = f"[{done + 1}/{total}] {mode}: {_plural(n, 'predictor')}" + (
            " in 1 process" if mode == THREADS else f" in {_plural(len(workers), 'process').replace('processs', 'processes')}")
        progress.update(f"{label}: warming up")
        sampler.mark("step_start", mode=mode, predictors=n, pids=[w.pid for w in workers])
        group.start_run(workers, threads)
        _wait(warmup_s, stop, lambda: group.check_alive(workers, "warming up"))
        if stop.is_set():
            raise Interrupted()
        probe.set_pids([w.pid for w in workers])
        probe.sources = set()
        peaks.begin()
        window_start = time.perf_counter_ns()
        sampler.tick()
        progress.update(f"{label}: measuring")
        _wait(duration_s, stop, lambda: group.check_alive(workers, "measuring"))
        probe.request_full()  # the window's end state, USS included, however short the window
        sampler.tick()
        window_end = time.perf_counter_ns()
        found, ticks = peaks.end(), peaks.ticks
        if stop.is_set():
            raise Interrupted()
        payloads = group.finish_run(workers, window_start, window_end)
        sampler.mark("step_end", mode=mode, predictors=n)
        row = build_row(mode, n, payloads, (window_end - window_start) / 1e9, found, ticks)
        if gpu:
            row["device_source"] = "+".join(sorted(probe.sources)) or None
        progress.line(_row_line(row))
        return row

    exit_code = EXIT_OK
    interrupted = False
    with Interrupts(stop) as interrupts:
        group = WorkerGroup(spec, stop)
        try:
            # ---- threads: one worker process, loaded first: a model that cannot load fails before any file is written
            progress.update(f"threads: starting a worker process and loading {opts.model}")
            try:
                probe.mark_device_baseline()
                [thread_worker] = group.spawn(1, "loading the model")
            except WorkerError as exc:
                raise UsageError(f"the model could not be loaded in a worker process: {exc}") from None
            info = thread_worker.info or {}
            record.model = info.get("model", {})
            if nvml is not None:
                nvml_index = nvml_index_for_uuid(info.get("device_uuid"), [d.get("uuid") for d in record.devices],
                                                 int(device.split(":")[1]))
                probe.nvml_index = nvml_index
            out_dir = prepare_out_dir(opts.out)
            record.config = {"device": device, "gpu_index": nvml_index, "model": opts.model, "model_size": size,
                             "predictors": list(counts), "max_step_s": duration_s, "warmup_s": warmup_s,
                             "interval_s": interval_s, "streams": spec.streams, "intra_op_threads": opts.intra_op_threads,
                             "worker_torch_threads": info.get("torch_num_threads"), "start_method": "spawn",
                             "modes": list(MODES), "out": out_dir, "argv": redact_argv(sys.argv[1:])}
            t0_ns = time.monotonic_ns()
            writer = SampleWriter(os.path.join(out_dir, SAMPLES_FILE),
                                  {"started_at": record.started_at, "t0_ns": t0_ns, "interval_s": interval_s,
                                   "pid": parent, "mode": "compare", "device": device, "gpu_index": nvml_index})
            sampler = Sampler({"participants": probe}, interval_s, writer, [peaks])
            sampler.start()
            record.status = STATUS_FAILED
            for mode in MODES:
                workers: list[Any] = [thread_worker] if mode == THREADS else []
                for n in counts:
                    try:
                        if mode == PROCESSES and len(workers) < n:
                            progress.update(f"[{done + 1}/{total}] processes: starting {n - len(workers)} more worker "
                                            f"process{'es' if n - len(workers) != 1 else ''}")
                            workers += group.spawn(n - len(workers), f"loading the model for the {n}-process step")
                        row = measure(group, workers, n if mode == THREADS else 1, mode, n)
                        rows.append(row)
                        if row.get("error"):
                            failure = failure or f"{mode} x{n}: {row['error']}"
                        done += 1
                    except WorkerError as exc:
                        message = str(exc)
                        rows.append({"predictors": n, "mode": mode, "error": message, "exitcode": exc.exitcode})
                        failure = failure or f"{mode} x{n}: {message}"
                        progress.line(f"  {mode} x{n}: a worker failed: {message}")
                        done += len(counts) - counts.index(n)
                        break
                group.retire(workers)  # threads' worker goes before processes start: they never compete
                probe.set_pids([])
                probe.mark_device_baseline()
        except Interrupted:
            interrupted = True
        except KeyboardInterrupt:  # a second Ctrl-C
            interrupted = True
            interrupts.signum = interrupts.signum or signal.SIGINT
        finally:
            group.close()
            if sampler is not None:
                sampler.stop()
            if writer is not None:
                writer.close()
    if out_dir is None:  # interrupted before the model loaded: nothing measured, nothing written
        return SessionResult(None, interrupts.exit_code or 130, None, None)
    record.ended_at = now_iso()
    record.environment = compare_environment(device, record.devices, nvml_index, info)
    model_bytes = int(record.model.get("model_bytes") or 0)
    comparison = build_comparison(rows, gpu, model_bytes)
    record.extra["comparison"] = comparison
    record.extra["worker_pids"] = group.pids
    record.recommendation = {"predictors": comparison.get("recommended_predictors"), "mode": comparison.get("winner"),
                             "reason": comparison.get("verdict")}
    record.findings = comparison_findings(comparison, gpu, model_bytes)
    record.sampler = {"interval_s": interval_s, "ticks": sampler.ticks if sampler else 0,
                      "missed_ticks": sampler.missed_ticks if sampler else 0,
                      "mean_tick_cost_us": round(sampler.mean_tick_cost_us, 1) if sampler else 0,
                      "probe_errors": dict(sampler.probe_errors) if sampler else {}}
    if interrupted or interrupts.exit_code is not None:
        record.status = STATUS_INTERRUPTED
        exit_code = interrupts.exit_code or 130
    elif failure:
        record.status = STATUS_FAILED
        record.failure = failure
        exit_code = EXIT_USAGE
    else:
        record.status = STATUS_COMPLETE
    save_run(record, os.path.join(out_dir, RUN_FILE))
    paths = render_comparison(record, out_dir, progress) if opts.report else None
    return SessionResult(record, exit_code, out_dir, paths)


def compare_environment(device: str, devices: list[dict[str, Any]], nvml_index: int | None,
                        worker_info: dict[str, Any] | None) -> dict[str, Any]:
    """record.environment of a compare: profiler.session.environment_facts, read without touching CUDA here.

    The parent never initialises CUDA (a context of its own would sit on the device the workers are measured
    on), so the facts are taken as for the CPU, then the device's name and driver come from NVML and the torch
    thread count from the worker that loaded the model.
    """
    from profiler.session import environment_facts  # lazy: it imports torch

    try:
        facts = environment_facts("cpu")
    except Exception as exc:  # torch missing or broken in the parent: the workers told us what they could
        from profiler import __version__

        facts = {"gpuscope": __version__, "python": sys.version.split()[0],
                 "torch": Unavailable("error", f"{type(exc).__name__}: {exc}")}
    threads = (worker_info or {}).get("torch_num_threads")
    if isinstance(threads, int) and not isinstance(threads, bool):
        facts["torch_num_threads"] = threads
    if device.startswith("cuda"):
        entry = next((d for d in devices if isinstance(d, dict) and d.get("index") == nvml_index), None)
        if entry is None and devices and isinstance(devices[0], dict):
            entry = devices[0]
        if entry:
            if entry.get("name") is not None:
                facts["device_name"] = entry.get("name")
            if entry.get("driver") is not None:
                facts["driver"] = entry.get("driver")
    return facts


def render_comparison(record: RunRecord, out_dir: str, progress: Any) -> dict[str, str] | None:
    """report.html and compare.png (reports.render writes both for a compare record, also on `gpuscope report`);
    a rendering failure is one line, run.json stays."""
    from profiler.session import render

    return render(record, out_dir, progress)


def nvml_index_for_uuid(uuid: Any, nvml_uuids: list[Any], torch_index: int) -> int:
    """NVML's index of the worker's device, matched by the UUID the worker read from torch (the parent never
    touches CUDA); torch's index when the UUID is unknown."""
    if isinstance(uuid, str) and uuid:
        wanted = uuid.replace("GPU-", "").lower()
        for index, nvml_uuid in enumerate(nvml_uuids):
            if isinstance(nvml_uuid, str) and nvml_uuid.replace("GPU-", "").lower() == wanted:
                return index
    return torch_index


def _wait(seconds: float, stop: threading.Event, check: Callable[[], None]) -> None:
    """Sleep up to `seconds` in 50 ms slices, returning early on stop; `check` raises if a worker died."""
    end = time.monotonic() + seconds
    while not stop.is_set():
        check()
        remaining = end - time.monotonic()
        if remaining <= 0:
            return
        stop.wait(min(0.05, remaining))


def _row_line(row: dict[str, Any]) -> str:
    lat = row.get("latency_ms") or {}
    host = row.get("host_uss_bytes")
    device = row.get("device_bytes")
    latency = (f"p50 {lat['p50']:7.2f} ms  p99 {lat['p99']:7.2f} ms" if "p50" in lat and "p99" in lat
               else "no request completed")  # not "p50 0.00 ms"
    return (f"  {row['mode']:>9} x{row['predictors']:<3} {row['throughput_rps']:9.1f} req/s  {latency}"
            f"  host USS {format_bytes(host) if is_available(host) else 'n/a'}"
            f"  device {format_bytes(device) if is_available(device) else 'n/a'}"
            + (f"  errors {row['errors']}" if row.get("errors") else ""))
