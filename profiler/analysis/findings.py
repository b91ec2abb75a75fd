"""Rules: pure functions from a run record to findings (../shared/FINDINGS.md).

Each rule reads only the record, so `gpuscope report run.json` can re-derive
findings and tests can feed scripted or replayed runs. Thresholds are fields of
`Thresholds`, not literals in the rules; the defaults are FINDINGS.md's starting
points, checked against the H200 readings in shared/gpu-facts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from gpuscope.analysis.gil import CONTENDED_RUNQUEUE_SHARE, estimate
from gpuscope.probes.readings import Unavailable, is_available
from gpuscope.probes.units import MiB, format_bytes, format_ms
from gpuscope.record.run import Finding, RunRecord, Step


@dataclass(frozen=True)
class Thresholds:
    cache_share: float = 0.25                 # CACHE_BLOAT: cached / reserved
    cache_min_bytes: int = 256 * MiB
    outside_growth_bytes: int = 512 * MiB     # OUTSIDE_ALLOCATOR warns when it grows this much
    growth_warn_device_share: float = 0.10    # PER_PREDICTOR_GROWTH: slope x recommended / device total
    growth_min_bytes: int = 4 * MiB           # below this per predictor, growth is noise
    duplicate_growth_share: float = 0.5       # DUPLICATE_MODEL: growth per predictor / model bytes
    duplicate_min_model_bytes: int = 8 * MiB  # smaller models drown in allocator noise
    headroom_warn: float = 0.85               # LOW_HEADROOM: peak used / total
    headroom_fail: float = 0.95
    fragmentation_split_share: float = 0.20
    foreign_fail_share: float = 0.10
    overload_short_share: float = 0.05        # OVERLOADED: served more than this below the offered rate
    oversubscription_busy_share: float = 0.5  # CPU_OVERSUBSCRIPTION: quiet when the step used less of the cores
    step_growth_min_bytes: int = 32 * MiB     # MEMORY_GROWTH (diagnose): growth in the second half of every step
    # FOREIGN_PROCESS fails when another process computes on the card. Tuned on the H200 readings:
    # a process that only holds a 2 GiB tensor still shows 1% SM, so "any utilisation" would fail idle holders.
    foreign_busy_sm_pct: float = 5.0
    plateau_share: float = 0.05               # THROUGHPUT_PLATEAU and the recommendation
    stream_gain: float = 0.05                 # DEFAULT_STREAM_SERIALIZATION: throughput gain N -> 2N
    stream_latency_ratio: float = 1.7         # ... while p50 grows ~2x
    oversubscription_drop: float = 0.05       # CPU_OVERSUBSCRIPTION warns when throughput falls this much
    error_fail_rate: float = 0.5
    preallocation_unreadable_share: float = 0.5  # ENGINE_PREALLOCATION when the environment cannot be read
    pid_namespace_min_bytes: int = 64 * MiB
    # GIL_CONTENTION (starting points, tuned on this 2-core machine's pure-Python and numpy translators)
    gil_min_python_share: float = 0.2         # quiet when the Python stages are less of a request at 1 predictor
    gil_wait_share: float = 0.1               # signal A: blocked share of active predictor time, grown from 1
    gil_one_core_cpu: float = 1.35            # signal B: process CPU at most this many cores ...
    gil_free_runqueue_share: float = 0.25     # ... while predictors waited this little for a core (cores were free)
    gil_plateau_gain: float = 0.3             # ... and N predictors gained less than this over 1
    recommend_max_error_rate: float = 0.01   # the recommendation skips counts with this share of failed requests


DEFAULT_THRESHOLDS = Thresholds()


# ---------------------------------------------------------------- helpers

def _mem(step: Step, key: str) -> int | None:
    """A step's memory figure in bytes, or None when it was not read (or is not a finite number)."""
    value = step.memory.get(key)
    if not is_available(value) or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if math.isfinite(value) else None


def _ok_steps(record: RunRecord) -> list[Step]:
    """Steps that measured something whole: requests served, no OOM, not cut short by an interruption, and
    (an observed level of live traffic) backed by enough requests."""
    return [s for s in record.steps if s.requests > 0 and not s.oom and not s.partial and not s.too_few_requests]


def least_squares_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y against x; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def robust_slope(points: list[tuple[float, float]]) -> float | None:
    """Theil-Sen slope (median of pairwise slopes): one step that jumps for another reason
    (an engine loading its pool) cannot pass itself off as per-predictor growth."""
    slopes = sorted((y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points) for x2, y2 in points[i + 1:]
                    if x2 != x1)
    if not slopes:
        return None
    mid = len(slopes) // 2
    return slopes[mid] if len(slopes) % 2 else (slopes[mid - 1] + slopes[mid]) / 2


def _ms_text(value: Any) -> str:
    """Milliseconds with the digits that matter (sub-millisecond models included)."""
    if not is_available(value):
        return "n/a"
    return format_ms(value)


def _reading(process: dict[str, Any], key: str) -> float:
    """A process entry's number, 0 when it could not be read. Entries may hold Unavailable or its JSON form
    ({"unavailable": reason}); a missing figure must neither crash a rule nor count as data."""
    value = process.get(key)
    return float(value) if is_available(value) else 0.0


def _device_total(record: RunRecord) -> int | None:
    total = record.device_entry().get("total_bytes")
    return int(total) if is_available(total) else None


def memory_key(record: RunRecord) -> str:
    """The figure that stands for 'this process's memory': NVML on a GPU, RSS on the CPU."""
    return "process_gpu_bytes" if record.gpu else "rss_bytes"


def bytes_per_extra_predictor(record: RunRecord, key: str | None = None) -> float | None:
    key = key or memory_key(record)
    points = [(s.predictors, v) for s in _ok_steps(record) if (v := _mem(s, key)) is not None]
    return least_squares_slope(points)


def recommend(record: RunRecord, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> dict[str, Any]:
    """The smallest predictor count within 5% of the best throughput that meets the p99 limit."""
    limit = record.config.get("max_p99_ms")
    measured = _ok_steps(record)
    candidates = [s for s in measured if s.error_rate < thresholds.recommend_max_error_rate]
    if measured and not candidates:
        return {"predictors": None, "reason": f"every predictor count had {thresholds.recommend_max_error_rate:.0%} "
                                              "or more failed requests"}
    keeping_up = [s for s in candidates if not overloaded(s, thresholds)]
    if candidates and not keeping_up:
        rate = candidates[0].offered_rps
        return {"predictors": None, "reason": f"no predictor count kept up with --rate {rate:g} req/s",
                "unmet": "rate_rps"}
    candidates = keeping_up
    if limit:
        within = [s for s in candidates if s.latency_ms.get("p99", float("inf")) <= float(limit)]
        if not within and candidates:  # `unmet`: the limit no count met (check gates on it)
            return {"predictors": None, "reason": f"no predictor count met p99 <= {limit} ms", "unmet": "max_p99_ms"}
        candidates = within
    if not candidates:
        if any(s.partial for s in record.steps):
            return {"predictors": None, "reason": "the run was interrupted before a predictor count was fully measured"}
        return {"predictors": None, "reason": "no step completed requests"}
    best = max(s.throughput_rps for s in candidates)
    chosen = min((s for s in candidates if s.throughput_rps >= best * (1 - thresholds.plateau_share)),
                 key=lambda s: s.predictors)
    closeness = ("the best throughput measured" if chosen.throughput_rps >= best
                 else f"within {thresholds.plateau_share:.0%} of the best ({best:.0f} req/s)")
    reason = (f"{chosen.predictors} predictor{'s reach' if chosen.predictors != 1 else ' reaches'} "
              f"{chosen.throughput_rps:.0f} req/s, {closeness}, at p99 {_ms_text(chosen.latency_ms.get('p99'))}")
    if limit:
        reason += f" (limit {limit} ms)"
    out: dict[str, Any] = {"predictors": chosen.predictors, "reason": reason,
                           "throughput_rps": chosen.throughput_rps, "p99_ms": chosen.latency_ms.get("p99")}
    key = memory_key(record)
    memory = _mem(chosen, key)
    out["memory_bytes"] = memory if memory is not None else chosen.memory.get(key, Unavailable("not_supported"))
    slope = bytes_per_extra_predictor(record)
    if record.gpu:
        total, used = _mem(chosen, "device_total_bytes"), _mem(chosen, "device_used_bytes")
        if total and used is not None and slope and slope > 0:
            out["more_would_fit"] = max(0, int((total - used) / slope))
    return out


# ---------------------------------------------------------------- rules

Rule = Callable[[RunRecord, Thresholds], list[Finding]]


def _count_text(record: RunRecord, n: int) -> str:
    """`4 predictors` for a sweep; `4 requests in flight` for a live profile's observed traffic."""
    if any(s.observed for s in record.steps):
        return f"{n} request{'s' if n != 1 else ''} in flight"
    return f"{n} predictor{'s' if n != 1 else ''}"


def rule_throughput_plateau(record: RunRecord, t: Thresholds) -> list[Finding]:
    steps = _ok_steps(record)
    if len(steps) < 2 or record.config.get("rate_rps"):
        return []  # open loop: throughput is the offered rate at every count, so flat throughput says nothing
    best = max(steps, key=lambda s: s.throughput_rps)
    knee = min((s for s in steps if s.throughput_rps >= best.throughput_rps * (1 - t.plateau_share)),
               key=lambda s: s.predictors)
    beyond = [s for s in steps if s.predictors > knee.predictors]
    if not beyond:
        return []
    last = max(beyond, key=lambda s: s.predictors)
    observed = knee.observed
    remedy = (f"run {_count_text(record, knee.predictors)}; more only add latency and memory" if not observed else
              f"cap the server's worker pool at {knee.predictors} (the concurrency limit); more requests in "
              "flight only queue inside the process and add latency")
    return [Finding(
        "THROUGHPUT_PLATEAU", "info",
        f"throughput stops growing at {_count_text(record, knee.predictors)} "
        f"({knee.throughput_rps:.0f} req/s); {last.predictors} add only latency (p50 {_ms_text(knee.latency_ms.get('p50'))}"
        f" -> {_ms_text(last.latency_ms.get('p50'))})",
        {"knee_predictors": knee.predictors, "knee_throughput_rps": knee.throughput_rps,
         "best_predictors": best.predictors, "best_throughput_rps": best.throughput_rps,
         "p50_ms_by_predictors": {str(s.predictors): s.latency_ms.get("p50") for s in steps},
         "throughput_rps_by_predictors": {str(s.predictors): s.throughput_rps for s in steps},
         "observed": observed},
        remedy, knee.predictors)]


def rule_cpu_oversubscription(record: RunRecord, t: Thresholds) -> list[Finding]:
    cores = record.host.get("usable_cores")
    if not cores:
        return []
    steps = [s for s in _ok_steps(record) if not s.observed]  # observed levels carry no CPU reading of their own

    def busy_threads(step: Step) -> int:
        # On a GPU the intra-op pool idles (kernels run on the device), but each predictor spins a core
        # while it synchronises: one busy thread per predictor. On the CPU each predictor runs its pool.
        return step.predictors if record.gpu else step.predictors * (step.intra_op_threads or 1)

    def idle(step: Step) -> bool:
        # The step's measured CPU (the process's mean over the window) shows whether those threads were busy:
        # a model that sleeps or waits on I/O starts them and leaves the cores free.
        cpu = step.cpu_util_pct
        return isinstance(cpu, (int, float)) and not isinstance(cpu, bool) and math.isfinite(cpu) \
            and cpu < t.oversubscription_busy_share * 100.0 * cores

    over = [s for s in steps if busy_threads(s) > cores and not idle(s)]
    if not over:
        return []
    fitting = [s for s in steps if s not in over]
    best_fitting = max((s.throughput_rps for s in fitting), default=None)
    worst_over = min(over, key=lambda s: s.throughput_rps)
    falls = best_fitting is not None and worst_over.throughput_rps < best_fitting * (1 - t.oversubscription_drop)
    first = min(over, key=lambda s: s.predictors)
    threads = 1 if record.gpu else (first.intra_op_threads or 1)
    severity = "warn" if falls else "info"
    if record.gpu:
        title = (f"{first.predictors} predictors each spin a CPU core while they wait on the GPU, "
                 f"on {cores} usable core{'s' if cores != 1 else ''}")
        remedy = (f"run at most {cores} predictors per process, or give each predictor its own CUDA stream and "
                  "batch requests so fewer threads wait")
    else:
        title = (f"{first.predictors} predictor{'s' if first.predictors != 1 else ''} x {threads} intra-op threads = "
                 f"{busy_threads(first)} busy threads "
                 f"on {cores} usable core{'s' if cores != 1 else ''}")
        remedy = (f"torch.set_num_threads(max(1, {cores} // predictors)) in the server (or OMP_NUM_THREADS), "
                  "or run fewer predictors")
    if falls:
        title += f"; throughput falls to {worst_over.throughput_rps:.0f} req/s at {worst_over.predictors}"
    return [Finding(
        "CPU_OVERSUBSCRIPTION", severity, title,
        {"usable_cores": cores, "intra_op_threads": threads,
         "oversubscribed_predictors": [s.predictors for s in over],
         "throughput_rps_by_predictors": {str(s.predictors): s.throughput_rps for s in steps},
         "involuntary_ctx_switches_by_predictors": {str(s.predictors): s.ctx_switches_involuntary for s in steps}},
        remedy, first.predictors)]


def rule_duplicate_model(record: RunRecord, t: Thresholds) -> list[Finding]:
    steps = _ok_steps(record) or record.steps
    distinct = max((s.distinct_weight_sets for s in steps), default=1)
    model_bytes = int(record.model.get("model_bytes") or 0)
    slope = bytes_per_extra_predictor(record)
    # Growth alone speaks only where no predictor could read its weight pointers (distinct == 0): once the
    # pointers show one shared set, growth is per-thread activations and cuBLAS workspaces (H200: 104 MiB per
    # thread for a 16 MiB Linear(2048)), which would otherwise fail every small or activation-heavy model.
    growth_says_copy = (distinct == 0 and slope is not None and model_bytes >= t.duplicate_min_model_bytes
                        and slope >= t.duplicate_growth_share * model_bytes)
    if distinct <= 1 and not growth_says_copy:
        return []
    at = max(steps, key=lambda s: s.distinct_weight_sets).predictors if steps else None
    if distinct > 1:
        title = f"predictors run {distinct} distinct copies of the model"
    else:
        title = "memory grows by about one model per predictor"
    if slope is not None:
        title += f" ({format_bytes(slope)} per extra predictor; the model is {format_bytes(model_bytes)})"
    return [Finding(
        "DUPLICATE_MODEL", "fail", title,
        {"distinct_weight_sets": distinct, "model_bytes": model_bytes,
         "bytes_per_extra_predictor": slope, "memory_figure": memory_key(record)},
        "load the model once and hand the same module to every predictor; for process-based servers, "
        "fewer processes with more threads each", at)]


def rule_grad_enabled(record: RunRecord, t: Thresholds) -> list[Finding]:
    bad = [s for s in record.steps if s.grad_enabled_in_workers or s.outputs_with_grad]
    if not bad:
        return []
    threads = max(s.outputs_with_grad for s in bad)
    return [Finding(
        "GRAD_ENABLED", "warn",
        f"autograd is on inside the predictor threads ({threads} predictor thread{'s' if threads != 1 else ''} "
        "returned outputs with grad_fn)",
        {"steps": [s.predictors for s in bad]},
        "enter torch.inference_mode() inside each predictor thread: grad mode is thread-local, "
        "so setting it in the main thread does nothing for workers", bad[0].predictors)]


def overloaded(step: Step, t: "Thresholds | None" = None) -> bool:
    """An open-loop step that did not keep up with its offered rate: arrivals were dropped, or it served
    clearly less than was offered (the backlog absorbed the rest, so its latencies are mostly queueing)."""
    if not step.offered_rps:
        return False
    short = (t or DEFAULT_THRESHOLDS).overload_short_share
    return step.dropped_arrivals > 0 or step.throughput_rps < step.offered_rps * (1 - short)


def rule_overloaded(record: RunRecord, t: Thresholds) -> list[Finding]:
    """--rate offered more than the pool served: arrivals dropped, or served clearly below the rate."""
    over = [s for s in _ok_steps(record) if overloaded(s, t)]
    if not over:
        return []
    least = min(over, key=lambda s: s.predictors)
    dropped = (f"{least.dropped_arrivals:,} arrivals were dropped" if least.dropped_arrivals
               else "the backlog queued the rest")
    return [Finding(
        "OVERLOADED", "warn",
        f"offered {least.offered_rps:g} req/s but {least.predictors} predictor{'s' if least.predictors != 1 else ''} "
        f"served {least.throughput_rps:.0f} req/s; {dropped}",
        {"offered_rps": least.offered_rps,
         "served_rps_by_predictors": {str(s.predictors): s.throughput_rps for s in over},
         "dropped_arrivals_by_predictors": {str(s.predictors): s.dropped_arrivals for s in over}},
        "the latencies of an overloaded step are queueing, not serving: lower --rate, or add predictors "
        "while throughput still grows", least.predictors)]


def rule_memory_growth_in_steps(record: RunRecord, t: Thresholds) -> list[Finding]:
    """This process's memory still climbing in the second half of every step (warm-up is in the first):
    a leak or an unbounded cache, which the sweep would otherwise report as a cost per predictor."""
    steps = _ok_steps(record)
    growing = []
    for step in steps:
        grew, span = step.memory.get("late_growth_bytes"), step.memory.get("late_growth_s")
        if not (isinstance(grew, (int, float)) and isinstance(span, (int, float)) and span > 0):
            return []  # a step without the figure (an older record, too few ticks): no verdict
        if grew >= t.step_growth_min_bytes:
            growing.append((step, grew, span))
    if not steps or len(growing) < len(steps):
        return []
    step, grew, span = max(growing, key=lambda g: g[1] / g[2])
    key = memory_key(record)
    what = "GPU memory" if key == "process_gpu_bytes" else "resident memory (RSS)"
    slope = bytes_per_extra_predictor(record, key)
    return [Finding(
        "MEMORY_GROWTH", "warn",
        f"this process's {what} kept growing while every step ran: +{format_bytes(grew)} in the last "
        f"{span:.1f} s at {step.predictors} predictor{'s' if step.predictors != 1 else ''} "
        f"({format_bytes(grew / span)}/s)",
        {"figure": key, "late_growth_bytes_by_predictors": {str(g.predictors): int(b) for g, b, _s in growing},
         "late_growth_s_by_predictors": {str(g.predictors): s for g, _b, s in growing},
         "bytes_per_extra_predictor": slope},
        "a leak or an unbounded cache (tensors kept per request: lists, caches keyed by input, autograd "
        "graphs), not a cost of predictors: the memory per extra predictor above includes it and grows with "
        "--duration; find the owner (tracemalloc or memray on the CPU, torch.cuda.memory_snapshot() on a GPU) "
        "and bound it", step.predictors)]


def rule_oom(record: RunRecord, t: Thresholds) -> list[Finding]:
    oom = [s for s in record.steps if s.oom]
    if not oom:
        return []
    step = oom[0]
    good = [s for s in record.steps if not s.oom and s.predictors < step.predictors]
    ceiling = max((s.predictors for s in good), default=None)
    return [Finding(
        "OOM", "fail",
        f"out of memory at {_count_text(record, step.predictors)}" + (f"; {ceiling} is the ceiling" if ceiling else ""),
        {"oom_predictors": step.predictors, "last_good_predictors": ceiling,
         "messages": step.error_messages[:3], "peak_memory": {k: v for k, v in step.memory.items() if k != "layers"}},
        "the largest count that fit is the ceiling; see the memory breakdown for which layer grew", step.predictors)]


def rule_predictor_errors(record: RunRecord, t: Thresholds) -> list[Finding]:
    bad = [s for s in record.steps if (s.errors and not s.oom) or s.dead_predictors]
    if not bad:
        return []
    worst = max(bad, key=lambda s: s.error_rate)
    severity = "fail" if worst.error_rate >= t.error_fail_rate or worst.dead_predictors else "warn"
    return [Finding(
        "PREDICTOR_ERRORS", severity,
        f"{worst.error_rate:.1%} of requests failed at {_count_text(record, worst.predictors)}"
        + (f"; {worst.dead_predictors} predictor thread(s) died" if worst.dead_predictors else ""),
        {"error_rate_by_predictors": {str(s.predictors): s.error_rate for s in record.steps},
         "messages": worst.error_messages[:5]},
        "fix the model's errors first: throughput and latency of failing requests are not comparable", worst.predictors)]


def _peak_step(record: RunRecord) -> Step | None:
    steps = [s for s in _ok_steps(record) if _mem(s, "process_gpu_bytes") is not None]
    return max(steps, key=lambda s: _mem(s, "process_gpu_bytes") or 0) if steps else None


def rule_cache_bloat(record: RunRecord, t: Thresholds) -> list[Finding]:
    if not record.gpu:
        return []
    candidates = []
    for s in _ok_steps(record):
        layers = s.memory.get("layers") or {}
        cache = layers.get("allocator_cache_bytes")
        if cache is None:
            continue
        reserved = cache + layers.get("activations_bytes", 0) + layers.get("model_weights_bytes", 0)
        candidates.append((cache, reserved, s.predictors, "peak of step"))
    end = record.baseline.get("end") or {}
    if is_available(end.get("torch_reserved_bytes")) and is_available(end.get("torch_allocated_bytes")):
        cache = end["torch_reserved_bytes"] - end["torch_allocated_bytes"]
        candidates.append((cache, end["torch_reserved_bytes"], None, "end of run"))
    fired = [c for c in candidates if c[1] > 0 and c[0] > t.cache_min_bytes and c[0] / c[1] > t.cache_share]
    if not fired:
        return []
    cache, reserved, at, when = max(fired, key=lambda c: c[0])
    return [Finding(
        "CACHE_BLOAT", "warn",
        f"{format_bytes(cache)} ({cache / reserved:.0%} of reserved) is cached by PyTorch's allocator, not used by tensors",
        {"cached_bytes": cache, "reserved_bytes": reserved, "cached_share": cache / reserved, "when": when},
        "nothing is leaking: NVML counts cached blocks as used until torch.cuda.empty_cache(). If other processes "
        "must share the card, call empty_cache() between phases or cap the process with "
        "torch.cuda.set_per_process_memory_fraction; consider PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True", at)]


def rule_outside_allocator(record: RunRecord, t: Thresholds) -> list[Finding]:
    if not record.gpu:
        return []
    per_step = [(s.predictors, (s.memory.get("layers") or {}).get("outside_allocator_bytes")) for s in _ok_steps(record)]
    per_step = [(n, v) for n, v in per_step if v is not None]
    context = record.baseline.get("context_bytes")
    if not per_step and not is_available(context):
        return []
    peak = max((v for _, v in per_step), default=context if is_available(context) else 0)
    growth = (per_step[-1][1] - per_step[0][1]) if len(per_step) >= 2 else 0
    # Per-thread cuBLAS state grows this layer with every predictor (PER_PREDICTOR_GROWTH says so); warn
    # only about growth the predictor count does not explain (beyond a robust per-predictor slope).
    slope = robust_slope([(float(n), float(v)) for n, v in per_step]) or 0.0
    explained = slope * (per_step[-1][0] - per_step[0][0]) if len(per_step) >= 2 else 0.0
    unexplained = growth - explained
    severity = "warn" if unexplained > t.outside_growth_bytes else "info"
    title = f"{format_bytes(peak)} of this process's GPU memory is outside PyTorch's allocator"
    if is_available(context):
        title += f" (CUDA context and kernels: {format_bytes(context)} right after initialisation)"
    if severity == "warn":
        title += f"; it grew by {format_bytes(unexplained)} more than the predictor count explains"
    return [Finding(
        "OUTSIDE_ALLOCATOR", severity, title,
        {"outside_bytes_by_predictors": {str(n): v for n, v in per_step}, "context_bytes": context,
         "growth_bytes": growth, "growth_per_predictor_bytes": slope, "unexplained_growth_bytes": unexplained,
         "CUDA_MODULE_LOADING": record.environment.get("memory_env", {}).get("CUDA_MODULE_LOADING")},
        "this is the CUDA context, loaded kernels and cuBLAS/cuDNN workspaces: keep lazy module loading "
        "(CUDA_MODULE_LOADING=LAZY), run fewer processes per GPU, see PER_PREDICTOR_GROWTH", None)]


def rule_per_predictor_growth(record: RunRecord, t: Thresholds) -> list[Finding]:
    if not record.gpu:
        return []
    steps = _ok_steps(record)
    if len(steps) < 2 or max(s.distinct_weight_sets for s in steps) > 1:
        return []
    nvml_slope = bytes_per_extra_predictor(record, "process_gpu_bytes")
    reserved_slope = bytes_per_extra_predictor(record, "torch_reserved_bytes")
    if nvml_slope is None or nvml_slope < t.growth_min_bytes:
        return []
    recommended = record.recommendation.get("predictors") or max(s.predictors for s in steps)
    total = _device_total(record)
    severity = "warn" if total and nvml_slope * recommended > t.growth_warn_device_share * total else "info"
    outside_slope = nvml_slope - (reserved_slope or 0)
    return [Finding(
        "PER_PREDICTOR_GROWTH", severity,
        f"each extra predictor costs {format_bytes(nvml_slope)} of device memory "
        f"({format_bytes(max(0, reserved_slope or 0))} in PyTorch's pool, {format_bytes(max(0, outside_slope))} outside it) "
        "although the model is shared",
        {"nvml_bytes_per_predictor": nvml_slope, "reserved_bytes_per_predictor": reserved_slope,
         "outside_bytes_per_predictor": outside_slope,
         "process_gpu_bytes_by_predictors": {str(s.predictors): s.memory.get("process_gpu_bytes") for s in steps},
         "streams": record.config.get("streams", False),
         "CUBLAS_WORKSPACE_CONFIG": record.environment.get("memory_env", {}).get("CUBLAS_WORKSPACE_CONFIG")},
        "keep a fixed pool of long-lived predictor threads (never a thread per request); set CUBLAS_WORKSPACE_CONFIG "
        "to shrink or disable cuBLAS workspaces (measured on an H200: :0:0 removed all of it; measure the speed cost); "
        "reuse one stream per thread", None)]


def _others(record: RunRecord) -> list[dict[str, Any]]:
    gpu = record.config.get("gpu_index")
    return [p for p in record.processes if not p.get("self") and (gpu is None or p.get("gpu") == gpu)]


def rule_foreign_process(record: RunRecord, t: Thresholds) -> list[Finding]:
    if not record.gpu:
        return []
    others = [p for p in _others(record) if _reading(p, "peak_used_bytes") > 0]
    if not others:
        return []
    total = _device_total(record)
    held = int(sum(_reading(p, "peak_used_bytes") for p in others))
    busy = [p for p in others if _reading(p, "peak_sm_util_pct") >= t.foreign_busy_sm_pct]
    severity = "fail" if (total and held > t.foreign_fail_share * total) or busy else "warn"
    named = ", ".join(f"pid {p['pid']} ({p.get('name', '?')}, {format_bytes(_reading(p, 'peak_used_bytes'))})" for p in others[:4])
    return [Finding(
        "FOREIGN_PROCESS", severity,
        f"{len(others)} other process{'es' if len(others) != 1 else ''} on this GPU hold{'s' if len(others) == 1 else ''} "
        f"{format_bytes(held)}: {named}",
        {"processes": [{k: p.get(k) for k in ("pid", "name", "user", "cmdline", "engines", "peak_used_bytes",
                                               "peak_sm_util_pct")} for p in others],
         "held_bytes": held, "device_total_bytes": total},
        "one process per GPU with threads; or cap each engine's memory; or MPS for unavoidable sharing", None)]


def _engines(p: dict[str, Any]) -> list[str]:
    engines = p.get("engines")
    return list(engines) if isinstance(engines, list) else []


def rule_multiple_engines(record: RunRecord, t: Thresholds) -> list[Finding]:
    out = []
    for p in record.processes:
        engines = _engines(p)
        if len(engines) >= 2:
            who = "this process" if p.get("self") else f"pid {p['pid']} ({p.get('name', '?')})"
            out.append(Finding(
                "MULTIPLE_ENGINES", "warn",
                f"{who} has {len(engines)} GPU engines loaded, each with its own allocator: {', '.join(engines)}",
                {"pid": p.get("pid"), "engines": engines, "memory_env": p.get("memory_env")},
                "cap every engine's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, TF memory limit, CuPy's "
                "set_limit, torch.cuda.set_per_process_memory_fraction) or split engines across devices", None))
    return out[:1] if len(out) > 1 and all(f.evidence["pid"] == out[0].evidence["pid"] for f in out) else out


def _preallocating(engine: str, env: dict[str, str]) -> str | None:
    if engine == "jax":
        if env.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0"):
            return None
        if env.get("XLA_PYTHON_CLIENT_MEM_FRACTION") or env.get("XLA_PYTHON_CLIENT_ALLOCATOR") == "platform":
            return None
        return "JAX preallocates ~75% of the card at its first operation (XLA_PYTHON_CLIENT_PREALLOCATE is not false)"
    if engine == "tensorflow":
        if env.get("TF_FORCE_GPU_ALLOW_GROWTH", "").lower() == "true":
            return None
        return "TensorFlow maps nearly all GPU memory unless memory growth is enabled"
    return None


def rule_engine_preallocation(record: RunRecord, t: Thresholds) -> list[Finding]:
    out = []
    total = _device_total(record)
    for p in record.processes:
        env = p.get("memory_env")
        readable = not (isinstance(env, dict) and "unavailable" in env) and env is not None
        env_dict = env if readable and isinstance(env, dict) else {}
        held = int(_reading(p, "peak_used_bytes"))
        for engine in _engines(p):
            why = _preallocating(engine, env_dict)
            if why is None:
                continue
            # Without its environment we cannot see the settings: only the memory it holds can tell.
            if not readable and not (total and held >= t.preallocation_unreadable_share * total):
                continue
            who = "this process" if p.get("self") else f"pid {p['pid']} ({p.get('name', '?')})"
            out.append(Finding(
                "ENGINE_PREALLOCATION", "warn",
                f"{who} runs {engine} at default memory settings and holds {format_bytes(held)}: {why}",
                {"pid": p.get("pid"), "engine": engine, "held_bytes": held, "memory_env": env,
                 "env_readable": readable},
                "JAX: XLA_PYTHON_CLIENT_PREALLOCATE=false or XLA_PYTHON_CLIENT_MEM_FRACTION=0.3; TensorFlow: "
                "TF_FORCE_GPU_ALLOW_GROWTH=true or a memory limit; ONNX Runtime: gpu_mem_limit and "
                "arena_extend_strategy=kSameAsRequested", None))
    return out


# Where the remedy's figure comes from: the H200 sweeps in shared/gpu-facts (threads_shared_model with and
# without per-thread streams, torch 2.11): best 2,551.6 req/s on the default stream, 3,304.7 with streams.
STREAMS_REFERENCE = "an H200 with torch 2.11 served +30% with per-thread streams (gpuscope's reference sweeps)"


def rule_default_stream_serialization(record: RunRecord, t: Thresholds) -> list[Finding]:
    # Open loop (--rate): throughput is the offered rate at every count, so a flat throughput says nothing
    # about serialization (as for THROUGHPUT_PLATEAU).
    if not record.gpu or record.config.get("streams") or record.config.get("rate_rps"):
        return []
    # a sweep's own steps only: observed traffic does not say which stream its requests ran on
    steps = sorted((s for s in _ok_steps(record) if not s.observed), key=lambda s: s.predictors)
    by_n = {s.predictors: s for s in steps}
    for s in steps:
        double = by_n.get(s.predictors * 2)
        if double is None or not s.throughput_rps or not s.latency_ms.get("p50"):
            continue
        gain = double.throughput_rps / s.throughput_rps - 1
        ratio = double.latency_ms.get("p50", 0) / s.latency_ms["p50"]
        if gain < t.stream_gain and ratio >= t.stream_latency_ratio:
            return [Finding(
                "DEFAULT_STREAM_SERIALIZATION", "warn",
                f"from {s.predictors} to {double.predictors} predictors throughput changes {gain:+.0%} while p50 "
                f"grows {ratio:.1f}x: every predictor queues on the default CUDA stream",
                {"from_predictors": s.predictors, "to_predictors": double.predictors, "throughput_gain": gain,
                 "p50_ratio": ratio, "streams": False},
                f"give each predictor its own long-lived CUDA stream, or batch requests. Here {s.predictors} -> "
                f"{double.predictors} predictors gained {gain:+.0%} throughput at {ratio:.1f}x p50; rerun with "
                f"gpuscope diagnose --streams to measure what streams gain on this model (for reference, "
                f"{STREAMS_REFERENCE})", double.predictors)]
    return []


def rule_low_headroom(record: RunRecord, t: Thresholds) -> list[Finding]:
    if not record.gpu:
        return []
    n = record.recommendation.get("predictors")
    step = record.step_at(n) if n else _peak_step(record)
    if step is None:
        return []
    used, total = _mem(step, "device_used_bytes"), _mem(step, "device_total_bytes")
    if not used or not total:
        return []
    share = used / total
    if share <= t.headroom_warn:
        return []
    severity = "fail" if share > t.headroom_fail else "warn"
    return [Finding(
        "LOW_HEADROOM", severity,
        f"the device is {share:.0%} full at {step.predictors} predictors ({format_bytes(total - used)} free)",
        {"device_used_bytes": used, "device_total_bytes": total, "used_share": share, "predictors": step.predictors},
        "fewer predictors, a smaller batch, a memory cap, or a bigger device", step.predictors)]


def rule_fragmentation(record: RunRecord, t: Thresholds) -> list[Finding]:
    if not record.gpu:
        return []
    for s in _ok_steps(record) + [s for s in record.steps if s.oom]:
        retries = _mem(s, "torch_alloc_retries") or 0
        split = _mem(s, "torch_inactive_split_bytes") or 0
        reserved = _mem(s, "torch_reserved_bytes") or 0
        if retries > 0 or (reserved and split / reserved > t.fragmentation_split_share):
            return [Finding(
                "FRAGMENTATION", "warn",
                f"the allocator is fragmented at {s.predictors} predictors: {retries} alloc retries, "
                f"{format_bytes(split)} in inactive split blocks ({split / reserved if reserved else 0:.0%} of reserved)",
                {"alloc_retries": retries, "inactive_split_bytes": split, "reserved_bytes": reserved},
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; fixed input shapes or shape buckets; "
                "garbage_collection_threshold", s.predictors)]
    return []


def rule_pid_namespace(record: RunRecord, t: Thresholds) -> list[Finding]:
    evidence = record.extra.get("pid_namespace") or {}
    missing = [p for p in record.processes if p.get("exists") is False]
    unlisted = evidence.get("unlisted_used_bytes") or 0
    self_unlisted = evidence.get("self_not_listed", False)
    if not missing and unlisted < t.pid_namespace_min_bytes and not self_unlisted:
        return []
    parts = []
    if missing:
        parts.append(f"NVML lists pid{'s' if len(missing) != 1 else ''} {', '.join(str(p['pid']) for p in missing[:5])} "
                     "that this pid namespace does not have")
    if unlisted >= t.pid_namespace_min_bytes:
        parts.append(f"{format_bytes(unlisted)} is used on the device while NVML lists no process")
    if self_unlisted:
        parts.append("this process holds GPU memory but NVML does not list its pid")
    return [Finding(
        "PID_NAMESPACE", "warn", "process attribution is not possible here: " + "; ".join(parts),
        {"missing_pids": [p["pid"] for p in missing], **evidence},
        "run with the host pid namespace (docker run --pid=host); the report falls back to device-level "
        "figures and the process's own allocator statistics", None)]


def rule_measurement_gap(record: RunRecord, t: Thresholds) -> list[Finding]:
    gaps = record.extra.get("measurement_gaps") or {}
    if not gaps:
        return []
    metrics = ", ".join(f"{k} ({v.get('reason', '?')}, {v.get('ticks', 0)} ticks)" for k, v in list(gaps.items())[:4])
    return [Finding(
        "MEASUREMENT_GAP", "warn", f"readings stopped during the run: {metrics}",
        {"gaps": gaps},
        "figures after the gap are missing, not zero; check the driver (nvidia-smi -q, dmesg for Xid errors) "
        "and rerun", None)]


def rule_gil_contention(record: RunRecord, t: Thresholds) -> list[Finding]:
    """Python stages serialise the predictors on the GIL (analysis/gil.py has the estimate).

    Signal A: at a count whose busy threads fit the cores, the predictor threads spend a share of their time
    blocked (neither on a CPU nor waiting for one) that grew by `gil_wait_share` over 1 predictor.
    Signal B: the process used at most `gil_one_core_cpu` cores, its threads hardly waited for a core (so more
    were free), and throughput gained less than `gil_plateau_gain` over 1 predictor.
    Both need the Python stages to be `gil_min_python_share` of a request; open loop (--rate) is not judged
    (waiting for arrivals is blocked time too)."""
    if record.config.get("rate_rps"):
        return []
    found = estimate(record)
    if found is None or found["python_share"] < t.gil_min_python_share:
        return []
    cores = found["cores"]
    signals: list[str] = []
    fired_at: list[int] = []
    for key, row in found["by_predictors"].items():
        n = int(key)
        if n < 2:
            continue
        wait = row["gil_wait_share"]
        if (wait is not None and wait >= t.gil_wait_share and (record.gpu or row["busy_threads"] <= cores)):
            signals.append(f"at {n} predictors the threads were blocked (neither running nor waiting for a core) "
                           f"{wait:.0%} more of their active time than at 1")
            fired_at.append(n)
        cpu, runq = row["cpu_cores"], row["runqueue_share"]
        if (cores >= 2 and cpu is not None and cpu <= t.gil_one_core_cpu and runq is not None
                and runq <= t.gil_free_runqueue_share and row["measured"] < 1 + t.gil_plateau_gain):
            signals.append(f"at {n} predictors the process used {cpu:.2f} of {cores} cores while its threads "
                           f"waited {runq:.0%} of their time for one, and throughput reached {row['measured']:.2f}x")
            fired_at.append(n)
    if not signals:
        return []
    at = min(fired_at)
    row = found["by_predictors"][str(at)]
    p = found["python_share"]
    limit = found["amdahl_limit"]
    shares = found["stage_shares"]
    queued = [q for q in (row["runqueue_share"], found["by_predictors"].get("1", {}).get("runqueue_share"))
              if q is not None]
    contended = ""
    if queued and max(queued) >= CONTENDED_RUNQUEUE_SHARE:  # the evidence has the scaling per unqueued second
        contended = (f" on a busy machine (its threads waited for a core up to {max(queued):.0%} of the time: "
                     f"the measured scaling says as much about the other work as about the GIL)")
    return [Finding(
        "GIL_CONTENTION", "warn",
        f"the Python stages are {p:.0%} of a request and hold the GIL: threads reach at most "
        f"{limit:.2f}x one predictor's throughput (Amdahl; {row['bound']:.2f}x at {at} on {cores} "
        f"core{'s' if cores != 1 else ''}), measured {row['measured']:.2f}x{contended}",
        {"stage_shares_at_1": shares, "python_share_at_1": p, "amdahl_limit": limit,
         "amdahl_bound_by_predictors": {k: r["bound"] for k, r in found["by_predictors"].items()},
         "measured_scaling_by_predictors": {k: r["measured"] for k, r in found["by_predictors"].items()},
         "unqueued_scaling_by_predictors": {k: r["unqueued"] for k, r in found["by_predictors"].items()},
         "cpu_cores_by_predictors": {k: r["cpu_cores"] for k, r in found["by_predictors"].items()},
         "gil_wait_share_by_predictors": {k: r["gil_wait_share"] for k, r in found["by_predictors"].items()},
         "runqueue_share_by_predictors": {k: r["runqueue_share"] for k, r in found["by_predictors"].items()},
         "usable_cores": cores, "signals": signals},
        "make the Python stages release the GIL: vectorise them (numpy, torch ops), use a tokenizer's fast (Rust) "
        "path, build fewer Python objects per request; or serve from processes (gpuscope compare shows what they "
        "cost in memory)", at)]


def _thread_safety(record: RunRecord) -> dict[str, Any] | None:
    check = record.thread_safety
    return check if isinstance(check, dict) and check.get("checked") else None


def _mismatch_text(mismatches: list[dict[str, Any]]) -> str:
    parts = []
    for m in mismatches[:3]:
        gap = m.get("max_abs_diff")
        how = (f"by up to {gap:.3g}" if is_available(gap) else m.get("error") or f"in {m.get('differs_in', 'value')}")
        parts.append(f"request {m.get('request')}" + (f" (predictor {m['predictor']})" if "predictor" in m else "")
                     + f" {how}")
    return "; ".join(parts)


def _beyond_rounding_count(check: dict[str, Any]) -> int:
    """Concurrent mismatches beyond float rounding (records before the rounding mark: every mismatch)."""
    count = check.get("concurrent_beyond_rounding_count")
    if isinstance(count, int):
        return count
    return int(check.get("concurrent_mismatch_count", len(check.get("concurrent_mismatches") or [])))


def rule_thread_unsafe(record: RunRecord, t: Thresholds) -> list[Finding]:
    """A request writes an attribute of a module or of the translator, or responses differ under concurrency
    though they agree one at a time (measure/thread_safety.py)."""
    check = _thread_safety(record)
    if check is None:
        return []
    writes = check.get("writes") or []
    concurrent = [m for m in check.get("concurrent_mismatches") or [] if not m.get("rounding")]
    differs = bool(concurrent) and not check.get("sequential_mismatches")
    if not writes and not differs:
        return []
    parts = []
    if writes:
        named = ", ".join(f"{w['attribute']} ({w['kind'].replace('_', ' ')})" for w in writes[:4])
        parts.append(f"a request writes {named}")
    if differs:
        count = _beyond_rounding_count(check)
        parts.append(f"{count} of {check.get('concurrent_requests', '?')} responses under "
                     f"{check.get('concurrent_predictors')} concurrent predictors differ from the same requests run "
                     f"one at a time: {_mismatch_text(concurrent)}")
    return [Finding(
        "THREAD_UNSAFE", "fail", "the predictor is not safe to share between threads: " + "; ".join(parts),
        {"writes": writes, "write_count": check.get("write_count", len(writes)),
         "concurrent_mismatches": concurrent, "concurrent_mismatch_count": check.get("concurrent_mismatch_count", 0),
         "concurrent_predictors": check.get("concurrent_predictors"), "requests": check.get("requests"),
         "tolerance": check.get("tolerance")},
        "keep per-request state in locals (never on self); use one translator per predictor; or put a lock around "
        "the stateful part", None)]


def rule_nondeterministic_output(record: RunRecord, t: Thresholds) -> list[Finding]:
    """Responses differ between two sequential passes and no write was seen: thread safety cannot be judged.
    Or they agree one at a time and differ under concurrency by float rounding alone: intra-op sums split
    differently when predictors share the cores, not shared state (a FAIL there would send users after a
    race that is not there)."""
    check = _thread_safety(record)
    if check is None or check.get("writes"):
        return []
    if not check.get("sequential_mismatches"):
        concurrent = check.get("concurrent_mismatches") or []
        if not concurrent or _beyond_rounding_count(check) or not all(m.get("rounding") for m in concurrent):
            return []
        return [Finding(
            "NONDETERMINISTIC_OUTPUT", "info",
            f"{check.get('concurrent_mismatch_count', len(concurrent))} of {check.get('concurrent_requests', '?')} "
            f"responses under {check.get('concurrent_predictors')} concurrent predictors differ from the same requests "
            f"run one at a time by float rounding only ({_mismatch_text(concurrent)}): the intra-op threads split "
            "their sums differently when predictors share the cores; no request wrote shared state",
            {"concurrent_mismatches": concurrent, "concurrent_mismatch_count": check.get("concurrent_mismatch_count"),
             "concurrent_predictors": check.get("concurrent_predictors"), "requests": check.get("requests"),
             "tolerance": check.get("tolerance"), "rounding_only": True},
            "nothing to fix if the last bits of a response may vary; to compare within rounding pass "
            "--output-tolerance 1e-5; for bitwise repeatable responses give each predictor one intra-op thread "
            "(torch.set_num_threads(1))", None)]
    mismatches = check["sequential_mismatches"]
    return [Finding(
        "NONDETERMINISTIC_OUTPUT", "info",
        f"{check.get('sequential_mismatch_count', len(mismatches))} of {check.get('requests')} responses differ "
        f"between two passes run one at a time ({_mismatch_text(mismatches)}): thread safety could not be judged "
        "from the outputs",
        {"sequential_mismatches": mismatches, "requests": check.get("requests"), "tolerance": check.get("tolerance")},
        "call model.eval() (dropout and batch-norm updates off); seed or disable sampling for the check; or pass "
        "--output-tolerance if the differences are rounding", None)]


RULES: tuple[Rule, ...] = (
    rule_oom, rule_predictor_errors, rule_overloaded, rule_duplicate_model, rule_foreign_process, rule_multiple_engines,
    rule_engine_preallocation, rule_low_headroom, rule_cache_bloat, rule_fragmentation, rule_per_predictor_growth,
    rule_default_stream_serialization, rule_cpu_oversubscription, rule_grad_enabled, rule_pid_namespace,
    rule_measurement_gap, rule_outside_allocator, rule_throughput_plateau, rule_memory_growth_in_steps,
    rule_thread_unsafe, rule_nondeterministic_output, rule_gil_contention,
)


def evaluate(record: RunRecord, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> list[Finding]:
    """All findings for a run; a rule that crashes on odd data is skipped, never fatal to the report."""
    findings: list[Finding] = []
    for rule in RULES:
        try:
            findings.extend(rule(record, thresholds))
        except Exception as exc:  # defensive: a report without one finding beats no report
            findings.append(Finding("MEASUREMENT_GAP", "info", f"rule {rule.__name__} could not run: {exc}", {}, "", None))
    return findings


def conclude(record: RunRecord, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> None:
    """Fill sharing, recommendation and findings from the measured steps (in place)."""
    steps = _ok_steps(record) or record.steps
    distinct = max((s.distinct_weight_sets for s in steps), default=0)
    key = memory_key(record)
    slope = bytes_per_extra_predictor(record, key)
    if slope is None:
        with_figure = [s for s in _ok_steps(record) if _mem(s, key) is not None]
        missing = (Unavailable("not_supported", "fewer than two predictor counts were measured"
                               if len(record.steps) < 2 else "fewer than two predictor counts completed requests")
                   if len(_ok_steps(record)) < 2 else
                   Unavailable("not_supported", "fewer than two steps have this process's "
                               + ("GPU memory from NVML" if key == "process_gpu_bytes" else "RSS")
                               + (" (NVML lists no process here)" if record.gpu and not with_figure else "")))
    record.sharing = {
        "verified": bool(steps) and distinct == 1,
        "distinct_weight_sets": distinct,
        "bytes_per_extra_predictor": slope if slope is not None else missing,
        "memory_figure": memory_key(record),
        "model_bytes": record.model.get("model_bytes"),
    }
    record.recommendation = recommend(record, thresholds)
    record.findings = evaluate(record, thresholds)
