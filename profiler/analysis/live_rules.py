"""Findings that apply to a live process seen over time (`watch`, `gpuscope.profile()`, `export`).

A watch has no predictor sweep, so the step-based rules of profiler/analysis/findings.py
stay quiet; these rules read `record.extra["live"]` instead, which the live
sessions fill (profiler/commands/watch.py `LiveTracker.summary()`):

  {"target_pid": 1234, "gpu_index": 0 | None, "duration_s": 600.0,
   "series": {"process_gpu_bytes": SERIES, "rss_bytes": SERIES, "outside_allocator_bytes": SERIES},
   "devices": [{"index": 0, "total_bytes": ..., "peak_used_bytes": ..., "peak_t_s": ..., "last_used_bytes": ...}],
   "context": {"bytes": ..., "source": "observed" | "allocator" | "reference", "detail": "..."}}
  SERIES = {"first": .., "mid": .., "last": .., "peak": .., "peak_t_s": .., "first_t_s": .., "last_t_s": ..,
            "slope_bytes_per_s": .., "points": n}

Like every rule, these are pure functions of the record, so `gpuscope report`
re-derives them. `live_findings()` runs gpuscope.analysis.findings.evaluate (the
process-level rules: FOREIGN_PROCESS, MULTIPLE_ENGINES, ENGINE_PREALLOCATION,
PID_NAMESPACE, MEASUREMENT_GAP, CACHE_BLOAT) and then these, never two findings
with one code where the step rules already spoke.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from gpuscope.analysis.findings import DEFAULT_THRESHOLDS, Thresholds, evaluate
from gpuscope.analysis.live_traffic import rule_served_model_copies
from gpuscope.probes import scopes
from gpuscope.probes.readings import is_available
from gpuscope.probes.units import MiB, format_bytes
from gpuscope.record.run import Finding, RunRecord

GROWTH_CODE = "MEMORY_GROWTH"

# The CUDA context and module images of a fresh process, measured on an H200 with CUDA 13 and lazy
# loading (shared/gpu-facts: 612 MiB; 1,252 MiB with CUDA_MODULE_LOADING=EAGER). Used only when the
# watch could not see the context itself, and always labelled as a reference figure.
REFERENCE_CONTEXT_BYTES = 612 * MiB
EAGER_CONTEXT_BYTES = 1252 * MiB  # the same H200 with CUDA_MODULE_LOADING=EAGER (FINDINGS.md)


@dataclass(frozen=True)
class LiveThresholds:
    growth_min_bytes: int = 64 * MiB      # MEMORY_GROWTH: less than this over the watch is noise
    growth_min_share: float = 0.10        # ... and at least this share of the first reading
    still_growing_share: float = 0.25     # warn when the second half holds this share of the growth
    min_points: int = 5                   # fewer ticks than this say nothing about a trend
    outside_growth_bytes: int = 512 * MiB  # OUTSIDE_ALLOCATOR warns when it grows this much


DEFAULT_LIVE_THRESHOLDS = LiveThresholds()

SERIES_LABELS = {
    "process_gpu_bytes": "GPU memory (NVML)",
    "rss_bytes": "resident memory (RSS)",
    "outside_allocator_bytes": "memory outside the allocator",
}


def _live(record: RunRecord) -> dict[str, Any]:
    live = record.extra.get("live")
    return live if isinstance(live, dict) else {}


def _num(value: Any) -> float | None:
    return float(value) if is_available(value) else None


def _rate_text(bytes_per_s: float) -> str:
    """A growth rate in the unit that reads best: per second, per minute, or per hour."""
    if abs(bytes_per_s) >= MiB:
        return f"{format_bytes(bytes_per_s)}/s"
    if abs(bytes_per_s) * 60 >= MiB:
        return f"{format_bytes(bytes_per_s * 60)}/min"
    return f"{format_bytes(bytes_per_s * 3600)}/h"


def _duration_text(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.1f} s"


def rule_memory_growth(record: RunRecord, t: LiveThresholds = DEFAULT_LIVE_THRESHOLDS) -> list[Finding]:
    """Memory that grew over the watch: info when it levelled off, warn while it was still growing at the end."""
    live = _live(record)
    out: list[Finding] = []
    for key in ("process_gpu_bytes", "rss_bytes"):
        series = (live.get("series") or {}).get(key)
        if not isinstance(series, dict) or int(series.get("points") or 0) < t.min_points:
            continue
        first, mid, last = _num(series.get("first")), _num(series.get("mid")), _num(series.get("last"))
        if first is None or last is None:
            continue
        growth = last - first
        if growth < t.growth_min_bytes or growth < t.growth_min_share * first:
            continue
        span = max(1e-9, float(series.get("last_t_s", 0.0)) - float(series.get("first_t_s", 0.0)))
        late = last - (mid if mid is not None else first)
        # Still growing: the second half of the watch holds a real share of the growth. The growth itself
        # already passed the absolute floor, so no second floor here (a short watch of a steady leak
        # would otherwise read as levelled off).
        still = late >= t.still_growing_share * growth
        slope = _num(series.get("slope_bytes_per_s")) or growth / span
        who = "this process's" if record.mode == "profile" else f"pid {live.get('target_pid', record.pid)}'s"
        # The decision uses medians of the first and last tenth (a spike cannot fake a trend); the title shows
        # the first and last readings, as the summary does.
        shown_first = _num(series.get("first_value"))
        shown_last = _num(series.get("last_value"))
        if shown_first is None or shown_last is None or shown_last - shown_first < t.growth_min_bytes:
            shown_first, shown_last = first, last  # a spike at either end: the medians tell it truly
        title = (f"{who} {SERIES_LABELS[key]} grew by {format_bytes(shown_last - shown_first)} over "
                 f"{_duration_text(span)} ({format_bytes(shown_first)} -> {format_bytes(shown_last)}, "
                 f"{_rate_text(slope)})")
        title += "; it was still growing at the end" if still else "; then it levelled off"
        remedy = ("a steady climb is a leak or an unbounded cache: compare the allocator's view "
                  "(gpuscope.profile() inside the server shows torch allocated vs reserved), look for tensors "
                  "kept per request (lists, caches keyed by input, autograd graphs), and cap caches; "
                  "growth that levels off after warm-up is the allocator filling its pool")
        if key == "rss_bytes":
            remedy = ("a steady climb of host memory is a leak or an unbounded cache in the process (per-request "
                      "lists, caches keyed by input, growing queues); tracemalloc or memray in the server finds the "
                      "owner; growth that levels off after warm-up is normal")
        out.append(Finding(
            GROWTH_CODE, "warn" if still else "info", title,
            {"figure": key, "first_bytes": first, "mid_bytes": mid, "last_bytes": last,
             "peak_bytes": _num(series.get("peak")), "growth_bytes": growth, "late_growth_bytes": late,
             "bytes_per_s": slope, "span_s": span, "t_s": series.get("peak_t_s"), "still_growing": still},
            remedy, None))
    return out


def rule_live_low_headroom(record: RunRecord, t: Thresholds = DEFAULT_THRESHOLDS) -> list[Finding]:
    """Peak device used / total over the watch, for the target's device (or every device without a target)."""
    live = _live(record)
    target_gpu = live.get("gpu_index")
    out = []
    for device in live.get("devices") or []:
        if not isinstance(device, dict):
            continue
        if target_gpu is not None and device.get("index") != target_gpu:
            continue
        used, total = _num(device.get("peak_used_bytes")), _num(device.get("total_bytes"))
        if not used or not total:
            continue
        share = used / total
        if share <= t.headroom_warn:
            continue
        severity = "fail" if share > t.headroom_fail else "warn"
        out.append(Finding(
            "LOW_HEADROOM", severity,
            f"{scopes.device(device.get('index'))} was {share:.0%} full at its peak ({format_bytes(total - used)} free)",
            {"gpu": device.get("index"), "device_used_bytes": used, "device_total_bytes": total, "used_share": share,
             "t_s": device.get("peak_t_s")},
            "fewer predictors or processes on this device, a smaller batch, a memory cap per engine, "
            "or a bigger device", None))
    return out


def rule_live_outside_allocator(record: RunRecord, t: LiveThresholds = DEFAULT_LIVE_THRESHOLDS) -> list[Finding]:
    """Memory no allocator shows: measured against the allocator in-process, against the context from outside."""
    live = _live(record)
    if live.get("gpu_index") is None:
        return []
    series = live.get("series") or {}
    context = live.get("context") or {}
    context_bytes = _num(context.get("bytes"))
    outside = series.get("outside_allocator_bytes")
    if isinstance(outside, dict) and _num(outside.get("peak")) is not None:
        first, last, peak = _num(outside.get("first")) or 0.0, _num(outside.get("last")) or 0.0, _num(outside["peak"])
        growth = last - first
        severity = "warn" if growth > t.outside_growth_bytes else "info"
        title = (f"{format_bytes(peak)} of this process's GPU memory is outside PyTorch's allocator "
                 f"({format_bytes(first)} at the start of profiling)")
        if severity == "warn":
            title += f"; it grew by {format_bytes(growth)}"
        return [Finding(
            "OUTSIDE_ALLOCATOR", severity, title,
            {"outside_first_bytes": first, "outside_last_bytes": last, "outside_peak_bytes": peak,
             "growth_bytes": growth, "context_bytes": context_bytes, "context_source": context.get("source"),
             "t_s": outside.get("peak_t_s")},
            "this is the CUDA context, loaded kernels, cuBLAS/cuDNN workspaces and any other engine's pool: keep "
            "lazy module loading (CUDA_MODULE_LOADING=LAZY), a fixed pool of long-lived threads (each thread "
            "gets its own cuBLAS workspace), fewer processes per GPU", None)]
    process = series.get("process_gpu_bytes")
    peak = _num(process.get("peak")) if isinstance(process, dict) else None
    if peak is None or context_bytes is None:
        return []
    source = context.get("source")
    if source == "observed":
        how = f"its CUDA context and kernels took {format_bytes(context_bytes)} when it first appeared on the device"
    else:
        how = (f"a CUDA context and its kernels typically take about {format_bytes(context_bytes)} "
               f"(a reference measured on an H200 with CUDA 13 and lazy loading, {format_bytes(EAGER_CONTEXT_BYTES)} "
               "with CUDA_MODULE_LOADING=EAGER; the watch began after this process started)")
    # a reference figure is not this process's measurement: its evidence says which it is
    context_key = "reference_context_bytes" if source == "reference" else "context_bytes"
    pid = live.get("target_pid", record.pid)
    return [Finding(
        "OUTSIDE_ALLOCATOR", "info",
        f"pid {pid} holds {format_bytes(peak)} on gpu:{live.get('gpu_index')}; no allocator statistic shows all of "
        f"it: {how}",
        {"process_peak_bytes": peak, context_key: context_bytes, "context_source": source,
         "context_detail": context.get("detail"), "allocator_visible": False},
        "from outside only NVML's total per process is visible: wrap the server's loop in gpuscope.profile() to "
        "split it into weights, activations, allocator cache and the rest; keep CUDA_MODULE_LOADING=LAZY", None)]


LiveRule = Callable[[RunRecord], list[Finding]]
LIVE_RULES: tuple[LiveRule, ...] = (rule_memory_growth, rule_live_low_headroom, rule_live_outside_allocator,
                                    rule_served_model_copies)


def live_findings(record: RunRecord, thresholds: Thresholds = DEFAULT_THRESHOLDS,
                  live_thresholds: LiveThresholds = DEFAULT_LIVE_THRESHOLDS) -> list[Finding]:
    """The step-free rules of gpuscope.analysis.findings plus the live ones; a crashing rule is skipped, never fatal."""
    findings = list(evaluate(record, thresholds))
    spoken = {f.code for f in findings}
    for rule in LIVE_RULES:
        try:
            if rule in (rule_live_low_headroom, rule_served_model_copies):
                produced = rule(record, thresholds)
            else:
                produced = rule(record, live_thresholds)
        except Exception as exc:  # defensive: a report without one finding beats no report
            findings.append(Finding("MEASUREMENT_GAP", "info", f"rule {rule.__name__} could not run: {exc}", {}, "", None))
            continue
        findings.extend(f for f in produced if f.code not in spoken)
    return findings