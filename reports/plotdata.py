"""The plots' data, prepared apart from drawing: layers per step and per tick, spans, downsampling."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpuscope.probes import scopes
from gpuscope.probes.readings import ERROR, Unavailable, is_available
from gpuscope.probes.units import GiB, MiB
from gpuscope.record.catalogue import LIVE_MODES
from gpuscope.record.layers import (
    CPU_LAYERS,
    DEVICE_METRICS,
    GPU_LAYERS,
    PROCESS_METRICS,
    DeviceTick,
    cpu_layers,
    device_tick,
    tick_layers,
)

if TYPE_CHECKING:  # pragma: no cover
    from gpuscope.probes.samplefile import Timeline
    from gpuscope.record.run import RunRecord, Step

MAX_BUCKETS = 1200  # buckets for the timeline: each keeps its min/max total and every layer's max



@dataclass
class TimelineLayers:
    """Layers per tick for the memory-over-time plot (numpy arrays), already downsampled."""

    t_s: Any
    layers: dict[str, Any]
    keys: list[str]
    capacity_bytes: float | None = None
    uss: Any = None
    ticks: int = 0
    peak_total: float = 0.0
    peak_t_s: float = 0.0
    note: str = ""
    unit_t: tuple[str, float] = ("s", 1.0)
    extras: dict[str, Any] = field(default_factory=dict)


def finite(value: Any) -> bool:
    """A real, finite number: what may be plotted or printed. `Infinity` and `NaN` in a damaged run.json
    or samples file are not; they are treated as unavailable, never drawn."""
    if not is_available(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def clean(value: Any) -> Any:
    """The value, or Unavailable when it is a non-finite number (other values unchanged)."""
    if is_available(value) and not finite(value):
        return Unavailable(ERROR, "not a finite number")
    return value


def predictors(n: Any) -> str:
    """`1 predictor`, `4 predictors`."""
    return f"{n} predictor{'' if n == 1 else 's'}"


def gpu_index(record: "RunRecord") -> int:
    """NVML's index of the profiled GPU (what sample scopes use), not torch's cuda:N."""
    return record.nvml_index


def model_bytes(record: "RunRecord") -> int | None:
    model = record.model or {}
    params, buffers = model.get("param_bytes"), model.get("buffer_bytes")
    if finite(params):
        return int(params) + (int(buffers) if finite(buffers) else 0)
    if finite(model.get("model_bytes")):
        return int(model["model_bytes"])
    return None


def layer_order(record: "RunRecord") -> list[str]:
    return [key for key, _ in (GPU_LAYERS if record.gpu else CPU_LAYERS)]


def step_layers(record: "RunRecord", step: "Step") -> dict[str, int]:
    """The step's decomposition at its peak: `memory["layers"]`, or recomputed from the peak figures."""
    memory = {k: clean(v) for k, v in (step.memory or {}).items()}
    layers = step.memory.get("layers") if isinstance(step.memory, dict) else None
    if isinstance(layers, dict) and layers:
        return {k: int(v) for k, v in layers.items() if finite(v)}
    model = memory.get("model_bytes") if finite(memory.get("model_bytes")) else model_bytes(record)
    if record.gpu:
        # An older record without layers: its peak figures attributed as one tick would be. A step's peaks
        # carry no process count; "nobody else" (0) is the sign that NVML listed no process there.
        other = memory.get("other_processes_bytes")
        tick = DeviceTick(process_bytes=memory.get("process_gpu_bytes"),
                          allocated_bytes=memory.get("torch_allocated_bytes"),
                          reserved_bytes=memory.get("torch_reserved_bytes"),
                          device_used_bytes=memory.get("device_used_bytes"),
                          driver_reserved_bytes=memory.get("driver_reserved_bytes"),
                          process_list=0 if other == 0 else None, other_processes_bytes=other)
        return tick_layers(tick, model)
    return cpu_layers(memory.get("rss_bytes"), model)


def as_unavailable(value: Any) -> Unavailable | None:
    """Unavailable for an Unavailable or its JSON forms ({"unavailable": r} and dataclass-dict {"reason": r})."""
    if isinstance(value, Unavailable):
        return value
    if isinstance(value, dict):
        reason = value.get("unavailable", value.get("reason"))
        if isinstance(reason, str) and set(value) <= {"unavailable", "reason", "detail"}:
            try:
                return Unavailable(reason, str(value.get("detail", "") or ""))
            except ValueError:
                return None
    return None


def missing_reason(memory: dict[str, Any], keys: tuple[str, ...]) -> str:
    for key in keys:
        missing = as_unavailable(memory.get(key))
        if missing is not None:
            return str(missing)
    return "not measured"


def capacity_bytes(record: "RunRecord", timeline: "Timeline | None" = None) -> float | None:
    """The device's total memory (GPU runs) or the host's (CPU runs), None when unknown."""
    if record.gpu:
        index = gpu_index(record)
        for device in record.devices or []:
            if device.get("index", 0) == index and finite(device.get("total_bytes")):
                return float(device["total_bytes"])
        for step in record.steps:
            if finite((step.memory or {}).get("device_total_bytes")):
                return float(step.memory["device_total_bytes"])
        if timeline is not None:
            values = [v for v in timeline.column(scopes.device(index), "total_bytes") if finite(v)]
            if values:
                return float(max(values))
        return None
    total = (record.host or {}).get("memory_total_bytes")
    return float(total) if finite(total) else None


def profiled_pid(record: "RunRecord", timeline: "Timeline | None") -> int | None:
    if record.pid:
        return int(record.pid)
    if timeline is not None and isinstance(timeline.header.get("pid"), int):
        return int(timeline.header["pid"])
    return None


def _minmax_indices(total: Any, layers: list[Any], max_buckets: int) -> Any:
    """Indices to keep: per bucket, the ticks of the min and max total and of every layer's max."""
    import numpy as np

    n = len(total)
    if n <= 3 * max_buckets:
        return np.arange(n)
    size = int(math.ceil(n / max_buckets))
    full = (n // size) * size
    keep = [np.array([0, n - 1])]
    starts = np.arange(0, full, size)

    def per_bucket(values: Any) -> list[Any]:
        blocks = values[:full].reshape(-1, size)
        out = [starts + blocks.argmax(axis=1)]
        if full < n:
            out.append(np.array([full + int(values[full:].argmax())]))
        return out

    keep += per_bucket(total)
    keep += per_bucket(-total)
    for series in layers:
        keep += per_bucket(series)
    return np.unique(np.concatenate(keep))


def downsample_minmax(t_s: Any, total: Any, layers: dict[str, Any] | None = None,
                      max_buckets: int = MAX_BUCKETS) -> Any:
    """Indices of the ticks to plot so that no peak is lost.

    Long runs (a 24-hour watch at 1 s is 86,400 ticks) are cut into `max_buckets`
    buckets; each bucket keeps the ticks with its minimum and maximum total and
    the tick with each layer's maximum. Every kept point is a real tick, so the
    stacked layers still add up, and the global peak of the total and of every
    layer survives exactly.
    """
    import numpy as np

    total = np.asarray(total, dtype=float)
    series = [np.asarray(v, dtype=float) for v in (layers or {}).values()]
    return _minmax_indices(total, series, max_buckets)


def time_unit(duration_s: float) -> tuple[str, float]:
    if duration_s >= 3 * 3600:
        return "h", 3600.0
    if duration_s >= 600:
        return "min", 60.0
    return "s", 1.0


def column(timeline: "Timeline", scope: str, metric: str) -> list[Any]:
    """timeline.column with non-finite numbers made Unavailable (they are never drawn)."""
    return [clean(v) for v in timeline.column(scope, metric)]


def timeline_layers(record: "RunRecord", timeline: "Timeline | None",
                    max_buckets: int = MAX_BUCKETS) -> TimelineLayers | None:
    """The decomposition at every tick of the samples file (the same layers as the steps), downsampled."""
    import numpy as np

    if timeline is None or not timeline.t_s:
        return None
    pid = profiled_pid(record, timeline)
    model = model_bytes(record)
    keys = layer_order(record)
    rows_t: list[float] = []
    rows: dict[str, list[float]] = {k: [] for k in keys}
    uss_values: list[float] = []
    if record.gpu:
        index = gpu_index(record)
        # The tick's readings rebuilt from the columns the attribution reads, then attributed by the one
        # function the run itself used (record/layers.py), so the timeline and the steps cannot disagree.
        columns = [(scope, metric, column(timeline, scope, metric)) for scope, metric in timeline.series
                   if scopes.parse(scope).gpu == index
                   and (metric in DEVICE_METRICS if scopes.parse(scope).is_device else metric in PROCESS_METRICS)]
        for i, t in enumerate(timeline.t_s):
            tick = device_tick([(scope, metric, col[i]) for scope, metric, col in columns if col[i] is not None],
                               pid, index)
            layers = tick_layers(tick, model)
            if not layers:
                continue
            rows_t.append(t)
            for k in keys:
                rows[k].append(layers.get(k, 0))
    else:
        rss = column(timeline, scopes.process(pid), "rss_bytes")
        uss = column(timeline, scopes.process(pid), "uss_bytes")
        for i, t in enumerate(timeline.t_s):
            layers = cpu_layers(rss[i], model)
            if not layers:
                continue
            rows_t.append(t)
            for k in keys:
                rows[k].append(layers.get(k, 0))
            uss_values.append(float(uss[i]) if is_available(uss[i]) else float("nan"))
    if not rows_t:
        return TimelineLayers(t_s=np.array([]), layers={}, keys=[], ticks=0,
                              note="the samples file holds no memory readings for this process")
    t_arr = np.asarray(rows_t, dtype=float)
    arrays = {k: np.asarray(v, dtype=float) for k, v in rows.items() if any(v)}
    present = [k for k in keys if k in arrays]
    total = np.zeros(len(t_arr))
    for k in present:
        total += arrays[k]
    peak_i = int(total.argmax())
    keep = downsample_minmax(t_arr, total, arrays, max_buckets)
    result = TimelineLayers(
        t_s=t_arr[keep], layers={k: arrays[k][keep] for k in present}, keys=present,
        capacity_bytes=capacity_bytes(record, timeline), ticks=len(t_arr),
        peak_total=float(total[peak_i]), peak_t_s=float(t_arr[peak_i]),
        unit_t=time_unit(float(t_arr[-1] - min(0.0, t_arr[0]))))
    if uss_values:
        uss_arr = np.asarray(uss_values, dtype=float)
        if not np.all(np.isnan(uss_arr)):
            result.uss = uss_arr[keep]
    result.extras["peak_layers"] = {k: float(arrays[k][peak_i]) for k in present}
    # Readings that stop before the samples do (the GPU lost, NVML failing): the plot shows where, rather
    # than ending its axis at the last reading as if the run ended there.
    later = [t for t in timeline.t_s if t > rows_t[-1]]
    if later:
        result.extras["readings_stop_t_s"] = float(later[0])
        result.extras["samples_end_t_s"] = float(later[-1])
    return result


def step_spans(record: "RunRecord", timeline: "Timeline | None") -> list[tuple[float, float, int]]:
    """(start_s, end_s, predictors) per step, from the steps or else from the samples' events."""
    spans = [(float(s.started_s), float(s.ended_s), s.predictors) for s in record.steps
             if finite(s.started_s) and finite(s.ended_s) and s.ended_s > s.started_s]
    if spans or timeline is None:
        return spans
    open_steps: dict[Any, float] = {}
    for event in timeline.events:
        kind, n = event.get("event"), event.get("predictors")
        if not finite(event.get("t_s")):
            continue
        if kind == "step_start":
            open_steps[n] = event["t_s"]
        elif kind == "step_end" and n in open_steps:
            spans.append((open_steps.pop(n), event["t_s"], n))
    if open_steps and timeline.t_s:  # a step still running when the run was interrupted
        for n, start in open_steps.items():
            spans.append((start, timeline.t_s[-1], n))
    return sorted(spans)


def finding_moments(record: "RunRecord", spans: list[tuple[float, float, int]]) -> list[tuple[float, Any]]:
    """(t_s, finding) for findings with a moment: evidence t_s, or the start of their step."""
    starts = {n: a for a, _b, n in spans}
    out = []
    for finding in record.findings:
        t = (finding.evidence or {}).get("t_s")
        if not finite(t) and finding.at_predictors in starts:
            t = starts[finding.at_predictors]
        if finite(t):
            out.append((float(t), finding))
    return out


def byte_unit(max_bytes: float) -> tuple[str, float]:
    return ("GiB", float(GiB)) if max_bytes >= GiB else ("MiB", float(MiB))


PROCESS_KEYS = ("model_weights_bytes", "activations_bytes", "allocator_cache_bytes", "outside_allocator_bytes",
                "unattributed_process_bytes", "rest_of_process_bytes")


def predictors_axis_label(record: "RunRecord", starred: bool = False) -> str:
    """What the x axis counts: threads sharing one model only where the run showed it; `starred`: the
    recommended count's tick carries a star."""
    verified = (record.sharing or {}).get("verified")
    if is_observed(record):
        return "requests in flight (observed levels of the server's own traffic)" + (
            "; \u2605 recommended pool size" if starred else "")
    if (record.config or {}).get("copy_model"):
        what = "threads, each with its own copy of the model"
    elif verified is True:
        what = "threads sharing one model"
    elif verified is False:
        what = "threads not sharing one model"
    else:
        what = "threads"
    return f"predictors ({what})" + ("; \u2605 recommended" if starred else "")


def _recommended(record: "RunRecord") -> int | None:
    rec = (record.recommendation or {}).get("predictors")
    return rec if isinstance(rec, int) and not isinstance(rec, bool) else None


def _bytes_per_extra_predictor(record: "RunRecord") -> float | None:
    """The run's own figure (record.sharing, what the report's Sharing row and the rules use: steps that
    ran out of memory or were cut short excluded); else the same slope recomputed from the steps."""
    value = (record.sharing or {}).get("bytes_per_extra_predictor")
    if finite(value):
        return float(value)
    if as_unavailable(value) is not None:
        return None
    from gpuscope.analysis.findings import bytes_per_extra_predictor

    return bytes_per_extra_predictor(record)




def is_live(record: "RunRecord") -> bool:
    """A watch or an in-process profile (no sweep; its steps, if any, are observed levels of its own traffic):
    its plots are the memory over time, and the observed curve when requests were marked."""
    return record.mode in LIVE_MODES and all(s.observed for s in record.steps)


def is_observed(record: "RunRecord") -> bool:
    """The steps are levels of concurrency seen in live traffic (gpuscope.request), not a sweep."""
    return bool(record.steps) and all(s.observed for s in record.steps)
