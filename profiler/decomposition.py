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

On the CPU the same picture uses the process's RSS and the model's bytes.
"""
from __future__ import annotations

from typing import Any

from probes.readings import Unavailable, is_available

GPU_LAYERS = (
    ("model_weights_bytes", "model weights"),
    ("activations_bytes", "activations + workspaces"),
    ("allocator_cache_bytes", "allocator cache"),
    ("outside_allocator_bytes", "outside the allocator (context, cuBLAS, other engines)"),
    ("unattributed_process_bytes", "this process (allocator not visible)"),
    ("other_processes_bytes", "other processes"),
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
               other_processes_bytes: Any = None, driver_reserved_bytes: Any = None) -> dict[str, int]:
    """Layers for one GPU at one instant. Missing torch figures collapse the process into one layer.

    The process's own layers always sum to `process_bytes` (NVML); negative
    differences (NVML rounding, a tick that straddled an allocation) are
    clamped to 0 and the remainder moved to `outside_allocator_bytes` so the
    sum still holds.
    """
    layers: dict[str, int] = {}
    process = _num(process_bytes)
    allocated, reserved, model = _num(allocated_bytes), _num(reserved_bytes), _num(model_bytes) or 0
    if process is not None:
        if allocated is not None and reserved is not None:
            weights = min(model, allocated)
            activations = allocated - weights
            cache = max(0, reserved - allocated)
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


def cpu_layers(rss_bytes: Any, model_bytes: Any) -> dict[str, int]:
    """Layers of a CPU process: the model's bytes and the rest of its RSS."""
    rss = _num(rss_bytes)
    if rss is None:
        return {}
    model = min(_num(model_bytes) or 0, rss)
    return {"model_weights_bytes": model, "rest_of_process_bytes": rss - model}


def layers_total(layers: dict[str, int]) -> int:
    return sum(layers.values())


def describe_missing(value: Any) -> str:
    return str(value) if isinstance(value, Unavailable) else "not measured"
