"""The memory decomposition: where a process's device memory went, layer by layer.

For one instant (one tick) the layers add up exactly to what NVML reports for
the process plus the rest of the device:

  model weights              unique parameter + buffer storages of the model
  activations + workspaces   torch allocated - model weights
  allocator cache            torch reserved - torch allocated
  outside the allocator      NVML per-process used - torch reserved (CUDA context, cuBLAS/cuDNN, other engines)
  other processes            NVML used by every other pid on the device
  driver reserve             memory info v2 `reserved`
  free                       NVML device free

Where NVML reports device memory but no figure for this process (a container without the host pid
namespace: PID_NAMESPACE), the process's own allocator still splits off weights, activations and cache,
and the rest of the device's used memory (this process's context and every other process, which NVML
cannot tell apart here) is one `unattributed_device_bytes` layer: the bar still adds up to NVML's
device `used`, rather than shrinking to the driver's reserve.

On the CPU the same picture uses the process's RSS and the model's bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from gpuscope.probes import scopes
from gpuscope.probes.readings import Unavailable, is_available

GPU_LAYERS = (
    ("model_weights_bytes", "model weights"),
    ("activations_bytes", "activations + workspaces"),
    ("allocator_cache_bytes", "allocator cache"),
    ("outside_allocator_bytes", "outside the allocator (context, cuBLAS, other engines)"),
    ("unattributed_process_bytes", "this process (allocator not visible)"),
    ("other_processes_bytes", "other processes"),
    ("unattributed_device_bytes", "not attributable here (NVML lists no process): contexts, other processes"),
    ("driver_reserved_bytes", "driver reserve"),
)
CPU_LAYERS = (
    ("model_weights_bytes", "model weights"),
    ("rest_of_process_bytes", "rest of the process (interpreter, torch, activations)"),
)
LAYER_LABELS = dict(GPU_LAYERS + CPU_LAYERS)


def _num(value: Any) -> int | None:
    return int(value) if is_available(value) else None


def gpu_layers(process_bytes: Any, allocated_bytes: Any, reserved_bytes: Any, model_bytes: Any,
               other_processes_bytes: Any = None, driver_reserved_bytes: Any = None,
               device_used_bytes: Any = None) -> dict[str, int]:
    """Layers for one GPU at one instant. Missing torch figures collapse the process into one layer.

    The process's own layers always sum to `process_bytes` (NVML) and none is
    negative: when torch's figures exceed NVML's (a tick that straddled an
    allocation), the excess comes off the allocator cache, then activations,
    then weights, and the layer outside the allocator is 0 for that tick.
    Without `process_bytes` but with `device_used_bytes`, the device-level
    fallback of the module docstring.
    """
    allocated, reserved, model = _num(allocated_bytes), _num(reserved_bytes), _num(model_bytes) or 0
    process = _num(process_bytes)
    device_used = _num(device_used_bytes)
    if process is None and device_used is not None:
        return _device_level_layers(device_used, allocated, reserved, model, _num(driver_reserved_bytes))
    layers: dict[str, int] = {}
    if process is not None:
        if allocated is not None and reserved is not None:
            weights = min(model, allocated)
            activations = allocated - weights
            cache = max(0, reserved - allocated)
            # NVML and torch are read a moment apart: torch's figures can exceed NVML's by what was allocated
            # in between. The excess comes off the allocator's layers (cache first), so no layer is negative
            # and the process's layers still add up to NVML's figure exactly.
            excess = max(0, weights + activations + cache - process)
            cut = min(cache, excess)
            cache, excess = cache - cut, excess - cut
            cut = min(activations, excess)
            activations, excess = activations - cut, excess - cut
            weights -= min(weights, excess)
            outside = process - weights - activations - cache
            layers.update(model_weights_bytes=weights, activations_bytes=activations,
                          allocator_cache_bytes=cache, outside_allocator_bytes=outside)
        else:
            layers["unattributed_process_bytes"] = process
    other = _num(other_processes_bytes)
    if other is not None:
        layers["other_processes_bytes"] = other
    driver = _num(driver_reserved_bytes)
    if driver is not None:
        layers["driver_reserved_bytes"] = driver
    return layers


def _device_level_layers(device_used: int, allocated: int | None, reserved: int | None, model: int,
                         driver: int | None) -> dict[str, int]:
    """NVML's device `used` split without a per-process figure: torch's own layers where known, the
    driver's reserve, and the rest unattributed. Sums to `device_used` exactly."""
    layers: dict[str, int] = {}
    rest = device_used
    if driver is not None:
        layers["driver_reserved_bytes"] = min(driver, rest)
        rest -= layers["driver_reserved_bytes"]
    if allocated is not None and reserved is not None and reserved <= rest:
        weights = min(model, allocated)
        layers.update(model_weights_bytes=weights, activations_bytes=allocated - weights,
                      allocator_cache_bytes=max(0, reserved - allocated))
        rest -= weights + (allocated - weights) + max(0, reserved - allocated)
    layers["unattributed_device_bytes"] = rest
    return layers


def cpu_layers(rss_bytes: Any, model_bytes: Any) -> dict[str, int]:
    """Layers of a CPU process: the model's bytes and the rest of its RSS."""
    rss = _num(rss_bytes)
    if rss is None:
        return {}
    model = min(_num(model_bytes) or 0, rss)
    return {"model_weights_bytes": model, "rest_of_process_bytes": rss - model}


def layers_total(layers: dict[str, int]) -> int:
    return sum(layers.values())


# ---------------------------------------------------------------- one tick of one device, attributed

# The process's NVML and allocator readings a tick's layers are made of (metric names in samples.jsonl).
PROCESS_METRICS = ("used_bytes", "torch_allocated_bytes", "torch_reserved_bytes")
DEVICE_METRICS = ("used_bytes", "driver_reserved_bytes", "process_count")


@dataclass
class DeviceTick:
    """What one tick's readings say about one device, from the profiled process's side.

    `other_processes_bytes` is a true sum only when NVML's process list was read (`process_list` is a
    count); otherwise it carries the list's Unavailable, so "nobody else" is never claimed unread.
    """

    process_bytes: Any = None
    allocated_bytes: Any = None
    reserved_bytes: Any = None
    device_used_bytes: Any = None
    driver_reserved_bytes: Any = None
    process_list: Any = None
    other_processes_bytes: Any = None
    other_pids: dict[int, int] = field(default_factory=dict)

    @property
    def nobody_listed(self) -> bool:
        """NVML's process list was read and is empty while the device counts memory (PID_NAMESPACE):
        this process's memory cannot be told apart from anyone else's."""
        return self.process_list == 0 and is_available(self.device_used_bytes)


def device_tick(values: Iterable[tuple[str, str, Any]], pid: int, gpu_index: int) -> DeviceTick:
    """Gather one tick's readings of `gpu_index` (as the sampler hands them over, or rebuilt from
    samples.jsonl) into the figures the layers are made of."""
    tick = DeviceTick()
    other_total = 0
    for text, metric, value in values:
        scope = scopes.parse(text)
        if scope.gpu != gpu_index:
            continue
        if scope.is_device:
            if metric == "used_bytes":
                tick.device_used_bytes = value
            elif metric == "driver_reserved_bytes":
                tick.driver_reserved_bytes = value
            elif metric == "process_count":
                tick.process_list = value
        elif scope.pid == pid:
            if metric == "used_bytes":
                tick.process_bytes = value
            elif metric == "torch_allocated_bytes":
                tick.allocated_bytes = value
            elif metric == "torch_reserved_bytes":
                tick.reserved_bytes = value
        elif metric == "used_bytes" and is_available(value):
            other_total += int(value)
            tick.other_pids[scope.pid] = int(value)
    if is_available(tick.process_list):
        tick.other_processes_bytes = other_total
    else:
        tick.other_processes_bytes = (tick.process_list if isinstance(tick.process_list, Unavailable)
                                      else Unavailable("no_device", "no process list"))
    return tick


def tick_layers(tick: DeviceTick, model_bytes: Any) -> dict[str, int]:
    """The layers of one tick: from the process's NVML figure when NVML lists it, from the device's
    `used` when NVML lists nobody (the PID_NAMESPACE fallback), else none."""
    if is_available(tick.process_bytes):
        return gpu_layers(tick.process_bytes, tick.allocated_bytes, tick.reserved_bytes, model_bytes,
                          tick.other_processes_bytes, tick.driver_reserved_bytes)
    if tick.nobody_listed:
        return gpu_layers(None, tick.allocated_bytes, tick.reserved_bytes, model_bytes, None,
                          tick.driver_reserved_bytes, device_used_bytes=tick.device_used_bytes)
    return {}


# ---------------------------------------------------------------- the same attribution, a column of ticks at once

@dataclass
class DeviceColumns:
    """`DeviceTick`'s figures for many ticks at once: float64 arrays (numpy), NaN where a tick has no
    usable reading (absent, Unavailable or not finite), as a columnar samples reader leaves them.

    `other_processes_bytes` holds the sum of every other process's NVML figure on the device (0 where
    none was listed); it counts only where `process_list` is a number, as in `device_tick`.
    """

    process_bytes: Any
    allocated_bytes: Any
    reserved_bytes: Any
    device_used_bytes: Any
    driver_reserved_bytes: Any
    process_list: Any
    other_processes_bytes: Any


def device_columns(columns: dict[tuple[str, str], Any], pid: int | None, gpu_index: int, ticks: int) -> DeviceColumns:
    """Gather the columns of `gpu_index` ({(scope, metric): float64 array}) as `device_tick` gathers one
    tick's readings: the profiled process's figures, the device's, and the sum of everyone else's."""
    import numpy as np

    def empty() -> Any:
        return np.full(ticks, np.nan)

    out = DeviceColumns(empty(), empty(), empty(), empty(), empty(), empty(), np.zeros(ticks))
    for (text, metric), values in columns.items():
        scope = scopes.parse(text)
        if scope.gpu != gpu_index:
            continue
        if scope.is_device:
            target = {"used_bytes": "device_used_bytes", "driver_reserved_bytes": "driver_reserved_bytes",
                      "process_count": "process_list"}.get(metric)
        elif scope.pid == pid:
            target = {"used_bytes": "process_bytes", "torch_allocated_bytes": "allocated_bytes",
                      "torch_reserved_bytes": "reserved_bytes"}.get(metric)
        else:
            if metric == "used_bytes":  # device_tick sums int(value) of each: truncate each, then add
                out.other_processes_bytes += np.nan_to_num(np.trunc(values), nan=0.0)
            continue
        if target is not None:  # a reading given twice in one scope cannot happen in a column: one per key
            setattr(out, target, np.asarray(values, dtype=float))
    return out


def column_layers(cols: DeviceColumns, model_bytes: Any) -> dict[str, tuple[Any, Any]]:
    """`tick_layers(device_tick(...))` for every tick at once: {layer: (int64 bytes, bool present)}.

    Why a second form of the one attribution: a day of 5 ms ticks is 17 million calls of the scalar
    one. This is the same arithmetic, branch for branch, on arrays (tests/test_layers_columns.py checks
    that both give the same layers, keys included, tick by tick); change both together. A layer is
    `present` at a tick exactly where `tick_layers` would hold that key. Bytes are exact up to 2**53
    (9 PB), the float64 the columns are read into.
    """
    import numpy as np

    def avail(values: Any) -> Any:
        return np.isfinite(values)

    def num(values: Any) -> Any:  # _num(): int(value) where available, 0 elsewhere (masked by `avail`)
        return np.where(avail(values), np.trunc(np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)),
                        0.0).astype(np.int64)

    n = len(cols.process_bytes)
    model = _num(model_bytes) or 0
    has_p, has_a, has_r = avail(cols.process_bytes), avail(cols.allocated_bytes), avail(cols.reserved_bytes)
    has_d, has_dr, has_list = avail(cols.device_used_bytes), avail(cols.driver_reserved_bytes), avail(cols.process_list)
    p, a, r = num(cols.process_bytes), num(cols.allocated_bytes), num(cols.reserved_bytes)
    d, dr = num(cols.device_used_bytes), num(cols.driver_reserved_bytes)
    other = np.trunc(np.nan_to_num(cols.other_processes_bytes, nan=0.0)).astype(np.int64)
    # which branch of tick_layers each tick takes
    by_process = has_p
    nobody = ~has_p & has_list & (np.nan_to_num(cols.process_list, nan=-1.0) == 0) & has_d
    split = has_a & has_r

    out: dict[str, tuple[Any, Any]] = {}
    zeros, none = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)

    def put(key: str, values: Any, present: Any) -> None:
        old_values, old_present = out.get(key, (zeros, none))
        out[key] = (np.where(present, values, old_values), old_present | present)

    # gpu_layers(process, allocated, reserved, model, other, driver): the NVML-per-process branch
    weights = np.minimum(model, a)
    activations = a - weights
    cache = np.maximum(0, r - a)
    excess = np.maximum(0, weights + activations + cache - p)
    cut = np.minimum(cache, excess)
    cache, excess = cache - cut, excess - cut
    cut = np.minimum(activations, excess)
    activations, excess = activations - cut, excess - cut
    weights = weights - np.minimum(weights, excess)
    outside = p - weights - activations - cache
    attributed = by_process & split
    put("model_weights_bytes", weights, attributed)
    put("activations_bytes", activations, attributed)
    put("allocator_cache_bytes", cache, attributed)
    put("outside_allocator_bytes", outside, attributed)
    put("unattributed_process_bytes", p, by_process & ~split)
    put("other_processes_bytes", other, by_process & has_list)
    put("driver_reserved_bytes", dr, by_process & has_dr)

    # _device_level_layers(device_used, allocated, reserved, model, driver): NVML lists nobody
    driver = np.minimum(dr, d)
    rest = np.where(has_dr, d - driver, d)
    fits = split & (r <= rest)
    weights = np.minimum(model, a)
    own = weights + (a - weights) + np.maximum(0, r - a)
    put("driver_reserved_bytes", driver, nobody & has_dr)
    put("model_weights_bytes", weights, nobody & fits)
    put("activations_bytes", a - weights, nobody & fits)
    put("allocator_cache_bytes", np.maximum(0, r - a), nobody & fits)
    put("unattributed_device_bytes", np.where(fits, rest - own, rest), nobody)
    return out


def column_cpu_layers(rss_bytes: Any, model_bytes: Any) -> dict[str, tuple[Any, Any]]:
    """`cpu_layers` for every tick at once, in `column_layers`' form."""
    import numpy as np

    present = np.isfinite(rss_bytes)
    rss = np.where(present, np.trunc(np.nan_to_num(rss_bytes, nan=0.0)), 0.0).astype(np.int64)
    model = np.minimum(_num(model_bytes) or 0, rss)
    return {"model_weights_bytes": (model, present), "rest_of_process_bytes": (rss - model, present)}
