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
    column_cpu_layers,
    column_layers,
    cpu_layers,
    device_columns,
    tick_layers,
)

if TYPE_CHECKING:  # pragma: no cover
    from gpuscope.probes.samplefile import SampleColumns, Timeline
    from gpuscope.record.run import RunRecord, Step

MAX_BUCKETS = 1200  # buckets for the timeline: each keeps its min/max total and every layer's max



@dataclass
class TimelineLayers:
    """Layers per tick for the memory-over-time plot (numpy arrays), already downsampled.

    `envelope` is (t_s, min_total, max_total) per bucket when the ticks were downsampled: the plot draws
    it so a single tick's spike stays visible whatever the width of a pixel. `uss`/`uss_t_s` are USS at
    the ticks it was read only (a slower cadence: never drawn as if read in between).
    """

    t_s: Any
    layers: dict[str, Any]
    keys: list[str]
    capacity_bytes: float | None = None
    uss: Any = None
    uss_t_s: Any = None
    ticks: int = 0
    peak_total: float = 0.0
    peak_t_s: float = 0.0
    note: str = ""
    unit_t: tuple[str, float] = ("s", 1.0)
    extras: dict[str, Any] = field(default_factory=dict)
    envelope: tuple[Any, Any, Any] | None = None
    bucket_ticks: int = 1

    @property
    def downsampled(self) -> bool:
        return self.ticks > len(self.t_s)

    def downsample_note(self) -> str:
        """What the report says when the timeline was downsampled ('' when every tick is drawn)."""
        if not self.downsampled:
            return ""
        return (f"The memory timeline draws {self.ticks:,} ticks as {len(self.t_s):,} points: buckets of "
                f"{self.bucket_ticks:,} ticks, each shown by its lowest and highest total (the shaded envelope) "
                "and the ticks of every layer's peak, so single-tick spikes stay visible.")


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


def capacity_bytes(record: "RunRecord", timeline: "Timeline | None" = None,
                   samples_total_bytes: float | None = None) -> float | None:
    """The device's total memory (GPU runs) or the host's (CPU runs), None when unknown. Without a figure
    in the record, the samples' largest `total_bytes` of the device (`samples_total_bytes`, or read from
    `timeline`)."""
    if record.gpu:
        index = gpu_index(record)
        for device in record.devices or []:
            if device.get("index", 0) == index and finite(device.get("total_bytes")):
                return float(device["total_bytes"])
        for step in record.steps:
            if finite((step.memory or {}).get("device_total_bytes")):
                return float(step.memory["device_total_bytes"])
        if samples_total_bytes is not None:
            return float(samples_total_bytes)
        if timeline is not None:
            values = [v for v in timeline.column(scopes.device(index), "total_bytes") if finite(v)]
            if values:
                return float(max(values))
        return None
    total = (record.host or {}).get("memory_total_bytes")
    return float(total) if finite(total) else None


def profiled_pid(record: "RunRecord", timeline: "Timeline | SampleColumns | None") -> int | None:
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


def _keep_for(record: "RunRecord", pid: int | None) -> Any:
    """The columns the timeline needs: the attribution's readings of the profiled device (and its total),
    or the process's RSS and USS on the CPU; the rest of a samples file is never put in columns."""
    if record.gpu:
        index = gpu_index(record)

        def keep_gpu(scope: str, metric: str) -> bool:
            parsed = scopes.parse(scope)
            if parsed.gpu != index:
                return False
            if parsed.is_device:
                return metric in DEVICE_METRICS or metric == "total_bytes"
            return metric == "used_bytes" or (parsed.pid == pid and metric in PROCESS_METRICS)

        return keep_gpu
    target = scopes.process(pid) if pid is not None else None
    return lambda scope, metric: scope == target and metric in ("rss_bytes", "uss_bytes")


def _chunk_layers(record: "RunRecord", chunk: Any, pid: int | None, model: Any) -> dict[str, tuple[Any, Any]]:
    """A chunk's layers by the one attribution (record/layers.py, in its columnar form)."""
    import numpy as np

    ticks = len(chunk.t_s)
    if record.gpu:
        return column_layers(device_columns(chunk.columns, pid, gpu_index(record), ticks), model)
    rss = chunk.columns.get((scopes.process(pid), "rss_bytes")) if pid is not None else None
    return column_cpu_layers(rss if rss is not None else np.full(ticks, np.nan), model)


def timeline_layers(record: "RunRecord", timeline: "Timeline | SampleColumns | None",
                    max_buckets: int = MAX_BUCKETS) -> TimelineLayers | None:
    """The decomposition at every tick of the samples (the same layers as the steps), downsampled.

    `timeline` is a loaded Timeline or a SampleColumns stream (read here, once, chunk by chunk: a day at
    5 ms never sits in memory as rows). Each chunk is attributed by record/layers.py's columnar form of
    the one attribution; only the ticks with layers, one int64 array per layer, are kept.
    """
    import numpy as np

    if timeline is None:
        return None
    pid = profiled_pid(record, timeline)
    model = model_bytes(record)
    keys = layer_order(record)
    t_parts: list[Any] = []
    layer_parts: dict[str, list[Any]] = {k: [] for k in keys}
    uss_parts: list[tuple[Any, Any]] = []
    samples_total = -math.inf
    after_last: float | None = None  # the first tick after the last one with layers (the readings stopped)
    uss_key = (scopes.process(pid), "uss_bytes") if pid is not None else None
    for chunk in timeline.chunks(_keep_for(record, pid)):
        if record.gpu:
            total_col = chunk.columns.get((scopes.device(gpu_index(record)), "total_bytes"))
            if total_col is not None and np.isfinite(total_col).any():
                samples_total = max(samples_total, float(np.nanmax(total_col)))
        layers = _chunk_layers(record, chunk, pid, model)
        has = np.zeros(len(chunk.t_s), dtype=bool)
        for _values, present in layers.values():
            has |= present
        if has.any():
            last = int(np.flatnonzero(has)[-1])
            after_last = float(chunk.t_s[last + 1]) if last + 1 < len(chunk.t_s) else None
            t_parts.append(chunk.t_s[has])
            for k in keys:
                layer_parts[k].append(layers[k][0][has] if k in layers else np.zeros(int(has.sum()), dtype=np.int64))
            uss = chunk.columns.get(uss_key) if not record.gpu else None
            if uss is not None:
                read = has & np.isfinite(uss)
                uss_parts.append((chunk.t_s[read], uss[read]))
        elif after_last is None and t_parts:
            after_last = float(chunk.t_s[0])
    if not t_parts:
        if not timeline.ticks:
            return None
        return TimelineLayers(t_s=np.array([]), layers={}, keys=[], ticks=0,
                              note="the samples file holds no memory readings for this process")
    t_arr = np.concatenate(t_parts)
    arrays = {k: np.concatenate(parts).astype(float) for k, parts in layer_parts.items()}
    arrays = {k: v for k, v in arrays.items() if v.any()}
    present = [k for k in keys if k in arrays]
    total = np.zeros(len(t_arr))
    for k in present:
        total += arrays[k]
    peak_i = int(total.argmax())
    keep = downsample_minmax(t_arr, total, arrays, max_buckets)
    capacity = capacity_bytes(record, samples_total_bytes=samples_total if math.isfinite(samples_total) else None)
    result = TimelineLayers(
        t_s=t_arr[keep], layers={k: arrays[k][keep] for k in present}, keys=present,
        capacity_bytes=capacity, ticks=len(t_arr),
        peak_total=float(total[peak_i]), peak_t_s=float(t_arr[peak_i]),
        unit_t=time_unit(float(t_arr[-1] - min(0.0, t_arr[0]))))
    if len(keep) < len(t_arr):
        result.envelope, result.bucket_ticks = minmax_envelope(t_arr, total, max_buckets)
    if uss_parts:
        uss_t = np.concatenate([t for t, _v in uss_parts])
        uss_v = np.concatenate([v for _t, v in uss_parts])
        if len(uss_v):
            uss_keep = downsample_minmax(uss_t, uss_v, None, max_buckets)
            result.uss_t_s, result.uss = uss_t[uss_keep], uss_v[uss_keep]
    result.extras["peak_layers"] = {k: float(arrays[k][peak_i]) for k in present}
    # Readings that stop before the samples do (the GPU lost, NVML failing): the plot shows where, rather
    # than ending its axis at the last reading as if the run ended there.
    if after_last is not None and timeline.last_t_s is not None:
        result.extras["readings_stop_t_s"] = after_last
        result.extras["samples_end_t_s"] = float(timeline.last_t_s)
    return result


def minmax_envelope(t_s: Any, total: Any, max_buckets: int = MAX_BUCKETS) -> tuple[tuple[Any, Any, Any], int]:
    """((bucket start t_s, lowest total, highest total), ticks a bucket) with the buckets of
    `downsample_minmax`, for the plot's envelope: what a line through the kept ticks cannot promise to
    show at a pixel's width, the band does."""
    import numpy as np

    n = len(total)
    size = int(math.ceil(n / max_buckets))
    starts = np.arange(0, n, size)
    lows = np.minimum.reduceat(total, starts)
    highs = np.maximum.reduceat(total, starts)
    # one more point at the last tick, so the band reaches the end of the axis (step drawing)
    return (np.append(t_s[starts], t_s[-1]), np.append(lows, lows[-1]), np.append(highs, highs[-1])), size


def step_spans(record: "RunRecord", timeline: "Timeline | SampleColumns | None") -> list[tuple[float, float, int]]:
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
    if open_steps and timeline.last_t_s is not None:  # a step still running when the run was interrupted
        for n, start in open_steps.items():
            spans.append((start, timeline.last_t_s, n))
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
