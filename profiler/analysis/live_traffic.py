"""The pool size from live traffic: pure functions from the requests a profile saw to steps and findings.

`gpuscope diagnose` sweeps predictor counts with its own load. A server wrapped in
`gpuscope.profile()` with its handlers marked by `gpuscope.request` already runs
at several concurrencies as its traffic rises and falls; this module turns what
the tracker aggregated (profiler/measure/requests.py `RequestTracker.snapshot()`)
into the same curve:

  - requests are grouped by level (the most requests in flight at once while each
    ran) into 1, 2, 3-4, 5-8, 9-16, ... in flight;
  - each group becomes one `Step` with `observed: true` (never swept), `level`
    ("3-4"), `predictors` (the highest level in the group: the pool size that
    served it), p50/p99/mean latency of the requests that succeeded, errors,
    `stages_ms` per stage ({"p50", "p99", "mean"}, the keys of diagnose's
    per-step stages), the threads that served it;
  - throughput at a level is Little's law, requests in flight / mean latency:
    what a pool of that size sustains while kept busy. A wall-clock rate would
    mix in the time the server sat idle or at other levels;
  - a group with fewer than `min_requests` requests is kept and marked
    `too_few_requests` (shown, never recommended, plateaued or gated on);
  - the recommendation is findings.recommend on those steps: the smallest pool
    within `plateau_share` of the best throughput whose p99 meets max_p99_ms.

GIL_CONTENTION and THREAD_UNSAFE rules read `Step.stages_ms` and the step's
threads like any diagnose step: a rule written for diagnose's stages applies to
observed steps unchanged (that is why the keys and shapes are the same).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gpuscope.analysis.findings import DEFAULT_THRESHOLDS, Thresholds, recommend
from gpuscope.probes.readings import is_available
from gpuscope.probes.units import format_bytes, format_ms
from gpuscope.record.run import Finding, RunRecord, Step

STAGES = ("preprocess", "model", "postprocess")  # diagnose's stages_ms keys


@dataclass(frozen=True)
class TrafficThresholds:
    min_requests: int = 50  # a level backed by fewer requests is marked too_few_requests, not used


DEFAULT_TRAFFIC_THRESHOLDS = TrafficThresholds()


def level_group(level: int) -> tuple[int, int]:
    """1 -> (1, 1), 2 -> (2, 2), 3..4 -> (3, 4), 5..8 -> (5, 8), 9..16 -> (9, 16), ..."""
    if level <= 2:
        return level, level
    high = 1 << (level - 1).bit_length()
    return high // 2 + 1, high


def group_label(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def percentile(values: list[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on a non-empty list."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _summary(values: list[float], total: float | None = None, count: int | None = None) -> dict[str, float]:
    """{"p50", "p99", "mean"} in ms; the mean from the exact running sum when given (reservoirs sample)."""
    mean = total / count if total is not None and count else sum(values) / len(values)
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "mean": mean}


def observed_steps(levels: list[dict[str, Any]], t: TrafficThresholds = DEFAULT_TRAFFIC_THRESHOLDS) -> list[Step]:
    """One observed Step per group of levels, lowest first. `levels`: RequestTracker.snapshot()["levels"]."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for entry in levels:
        level = int(entry.get("level") or 0)
        if level >= 1:
            groups.setdefault(level_group(level), []).append(entry)
    steps: list[Step] = []
    for (low, high), members in sorted(groups.items()):
        requests = sum(int(m.get("requests") or 0) for m in members)
        errors = sum(int(m.get("errors") or 0) for m in members)
        latencies = [v for m in members for v in (m.get("latency_ms") or [])]
        latency_sum = sum(float(m.get("latency_sum_ms") or 0.0) for m in members)
        weighted_level = sum(int(m["level"]) * int(m.get("requests") or 0) for m in members)
        step = Step(predictors=max(int(m["level"]) for m in members), requests=requests, errors=errors)
        step.observed = True
        step.level = group_label(low, high)
        step.too_few_requests = requests < t.min_requests
        step.threads = len({tid for m in members for tid in (m.get("thread_ids") or [])}) or None
        step.concurrency_mean = weighted_level / requests if requests else None
        if latencies:
            step.latency_ms = _summary(latencies, latency_sum, requests)
            if latency_sum > 0:
                step.throughput_rps = weighted_level / (latency_sum / 1000.0)  # Little: in flight / latency
        stage_names = sorted({name for m in members for name in (m.get("stages_ms") or {})},
                             key=lambda n: (STAGES.index(n) if n in STAGES else len(STAGES), n))
        stages: dict[str, dict[str, float]] = {}
        for name in stage_names:
            values = [v for m in members for v in (m.get("stages_ms") or {}).get(name, [])]
            total = sum(float((m.get("stage_sums_ms") or {}).get(name, 0.0)) for m in members)
            count = sum(int((m.get("stage_counts") or {}).get(name, 0)) for m in members)
            if values:
                stages[name] = _summary(values, total, count)
        step.stages_ms = stages or None
        step.error_messages = [msg for m in members for msg in (m.get("error_messages") or [])][:5]
        step.distinct_weight_sets = 0  # measured per run from the threads (record.sharing), not per level
        steps.append(step)
    return steps


def _in_flight(n: int) -> str:
    return f"{n} request{'s' if n != 1 else ''} in flight"


def traffic_recommendation(record: RunRecord, thresholds: Thresholds = DEFAULT_THRESHOLDS,
                           t: TrafficThresholds = DEFAULT_TRAFFIC_THRESHOLDS) -> dict[str, Any]:
    """The pool size from the observed steps (record.config["max_p99_ms"] applies), said in requests in flight."""
    usable = [s for s in record.steps if s.observed and not s.too_few_requests and s.requests > 0]
    if not usable:
        most = max((s.requests for s in record.steps), default=0)
        return {"predictors": None, "source": "observed",
                "reason": (f"no level of concurrency was backed by {t.min_requests} requests (the most at one "
                           f"level: {most})" if record.steps else "no request was marked (gpuscope.request)")}
    out = recommend(record, thresholds)
    out["source"] = "observed"
    n = out.get("predictors")
    if n is None:
        return out
    chosen = record.step_at(n)
    assert chosen is not None
    best = max(s.throughput_rps for s in usable)
    highest = max(usable, key=lambda s: s.predictors)
    reason = (f"a pool of {n}: at {chosen.level} in flight the server served {chosen.throughput_rps:.0f} req/s"
              + (f" at p99 {format_ms(chosen.latency_ms['p99'])}"
                 if is_available(chosen.latency_ms.get("p99")) else ", p99 not measured"))
    reason += ", the best measured" if chosen.throughput_rps >= best else \
        f", within {thresholds.plateau_share:.0%} of the best ({best:.0f} req/s)"
    limit = record.config.get("max_p99_ms")
    if limit:
        reason += f" (limit p99 {limit} ms)"
    if len(usable) == 1:
        out["single_level"] = True
        reason += ("; the traffic showed only this level of concurrency, so nothing says whether a larger pool "
                   "serves more (more concurrent clients would show it)")
    elif chosen is highest and not limit:
        out["still_growing"] = True
        reason += ("; throughput was still growing at the highest level the traffic reached, so a larger pool "
                   "may serve more (more concurrent clients would show it)")
    out["reason"] = reason
    return out


def unmeasured_codes(record: RunRecord, models_registered: bool) -> dict[str, str]:
    """Codes a profile's rules could not look for, with why (the gate reports them unmeasured, never passed)."""
    out: dict[str, str] = {}
    usable = [s for s in record.steps if s.observed and not s.too_few_requests and s.requests > 0]
    if not models_registered:
        out["DUPLICATE_MODEL"] = "no model was registered (gpuscope.profile(model=...))"
    if not record.steps:
        out["PREDICTOR_ERRORS"] = "no request was marked (gpuscope.request)"
    if len(usable) < 2:
        out["THROUGHPUT_PLATEAU"] = (f"the traffic reached fewer than two levels of concurrency backed by enough "
                                     f"requests ({len(usable)})")
    return out


def rule_served_model_copies(record: RunRecord, t: Thresholds = DEFAULT_THRESHOLDS) -> list[Finding]:
    """DUPLICATE_MODEL from the threads that ran the registered model(s): their weight storages differ."""
    sharing = record.sharing or {}
    if sharing.get("source") != "threads":
        return []
    distinct = int(sharing.get("distinct_weight_sets") or 0)
    if distinct <= 1:
        return []
    model_bytes = sharing.get("model_bytes")
    size = f" of {format_bytes(model_bytes)} each" if isinstance(model_bytes, (int, float)) and model_bytes else ""
    threads = sharing.get("threads") or []
    return [Finding(
        "DUPLICATE_MODEL", "fail",
        f"{len(threads)} threads ran {distinct} distinct copies of the model{size}",
        {"distinct_weight_sets": distinct, "model_bytes": model_bytes, "threads": threads,
         "how": "a forward pre-hook on each registered model recorded which weight storages each thread ran"},
        "load the model once and hand the same module to every thread (no copy.deepcopy or reload per "
        "thread); for process-based servers, fewer processes with more threads each", None)]
