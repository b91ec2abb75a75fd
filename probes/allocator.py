"""What PyTorch's caching allocator holds, per CUDA device of this process.

NVML sees only what the allocator reserved from the driver; this probe sees
what tensors actually use (allocated) versus what is cached (reserved -
allocated). Peaks between ticks are caught by reading the peak statistics
and resetting them every tick, so a 5 ms spike is not missed at a 50 ms interval.
"""
from __future__ import annotations

from typing import Any, Protocol

from gpuscope.probes.readings import ERROR, NO_DEVICE, NOT_INITIALIZED, Unavailable

ScopedValue = tuple[str, str, Any]

# our metric name -> key in torch.cuda.memory_stats()
STAT_KEYS = {
    "torch_allocated_bytes": "allocated_bytes.all.current",
    "torch_reserved_bytes": "reserved_bytes.all.current",
    "torch_active_bytes": "active_bytes.all.current",
    "torch_inactive_split_bytes": "inactive_split_bytes.all.current",
    "torch_peak_allocated_bytes": "allocated_bytes.all.peak",
    "torch_peak_reserved_bytes": "reserved_bytes.all.peak",
    "torch_alloc_retries": "num_alloc_retries",
    "torch_ooms": "num_ooms",
}
METRICS = tuple(STAT_KEYS)
_METRIC_KEYS = tuple(STAT_KEYS.items())
# each flat key and its path in torch.cuda.memory_stats_as_nested_dict() (memory_stats joins the path with ".")
_STAT_PATHS = tuple((key, tuple(key.split("."))) for key in STAT_KEYS.values())


class TorchCudaBackend(Protocol):
    def available(self) -> bool: ...
    def is_initialized(self) -> bool: ...
    def memory_stats(self, device: int) -> dict[str, int]: ...
    def reset_peak_memory_stats(self, device: int) -> None: ...


class RealTorchCuda:
    """torch.cuda, imported lazily so the CLI starts fast (`cuda`: torch.cuda, or a stand-in for tests).

    `memory_stats` gives the counters the probe reads (STAT_KEYS), under torch.cuda.memory_stats()'s
    flat names, taken from torch's nested statistics: torch.cuda.memory_stats() flattens and sorts all
    of them (122 keys on the H200) in Python at each call, ~90 us on the 2-core development machine,
    every tick, for 8 values. A counter torch does not report is left out, as memory_stats leaves it out.
    """

    def __init__(self, cuda: Any = None) -> None:
        if cuda is None:
            import torch

            cuda = torch.cuda
        self._cuda = cuda

    def available(self) -> bool:
        return bool(self._cuda.is_available())

    def is_initialized(self) -> bool:
        return bool(self._cuda.is_initialized())

    def memory_stats(self, device: int) -> dict[str, int]:
        nested = self._cuda.memory_stats_as_nested_dict(device)
        out: dict[str, int] = {}
        for key, path in _STAT_PATHS:
            value: Any = nested
            for part in path:
                if not isinstance(value, dict) or part not in value:
                    break
                value = value[part]
            else:
                out[key] = value
        return out

    def reset_peak_memory_stats(self, device: int) -> None:
        self._cuda.reset_peak_memory_stats(device)


class AllocatorProbe:
    """Reads torch allocator statistics for the given torch devices.

    `scopes` maps a torch device index to the sample scope it belongs to
    (`pid:1234/gpu:0`, using the NVML index, which can differ from torch's under
    CUDA_VISIBLE_DEVICES).
    """

    def __init__(self, backend: TorchCudaBackend, scopes: dict[int, str], reset_peaks: bool = True) -> None:
        self._backend = backend
        self._scopes = scopes
        self._reset_peaks = reset_peaks

    def read(self) -> list[ScopedValue]:
        out: list[ScopedValue] = []
        if not self._backend.available():
            missing = Unavailable(NO_DEVICE, "torch sees no CUDA device")
        elif not self._backend.is_initialized():
            missing = Unavailable(NOT_INITIALIZED, "CUDA is not initialised in this process yet")
        else:
            missing = None
        for device, scope in self._scopes.items():
            if missing is not None:
                out += [(scope, metric, missing) for metric in METRICS]
                continue
            try:
                stats = self._backend.memory_stats(device)
                if self._reset_peaks:
                    self._backend.reset_peak_memory_stats(device)
            except Exception as exc:
                failed = Unavailable(ERROR, f"{type(exc).__name__}: {exc}")
                out += [(scope, metric, failed) for metric in METRICS]
                continue
            get = stats.get
            # An allocator that has never allocated has no keys yet: that is a true 0.
            out += [(scope, metric, int(get(key, 0))) for metric, key in _METRIC_KEYS]
        return out
