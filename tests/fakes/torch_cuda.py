"""A fake `torch.cuda` allocator view (probes.allocator.TorchCudaBackend) for tests without a GPU.

It behaves like PyTorch's caching allocator statistics: `*.peak` keys hold the
maximum since the last `reset_peak_memory_stats()`, which sets every peak back
to the current value. Figures come from a script (one `TorchFigures` per
tick, e.g. the H200 timeline) or from `set()` calls; `memory_stats()` returns
a dict with the real key set captured on the H200
(raw-h200-2026-11-26.json `memory_stats_ctx`), so code that looks up keys
meets the shapes a real card gives. Only the `.all` byte counters the
figures describe (allocated, reserved, active, inactive split, requested)
and the retry/OOM counters follow the figures; the other keys keep their
captured values.

Every call is logged in order (`calls`), and every reset in `resets`, so a
test can assert that peaks are read before they are reset.

`FakeCudaDevices` is the rest of torch.cuda a workload run asks about
(gpuscope.measure.devices.CudaDevices): which devices torch sees through
CUDA_VISIBLE_DEVICES, their UUIDs, creating the context, and where the
model's tensors go. It computes on the CPU; what the run reports about the
device comes from the fakes.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Sequence, Union

from tests.fakes.nvml import load_raw_h200, load_timeline_h200


@dataclass(frozen=True)
class TorchFigures:
    """Allocator figures of one device at one tick (bytes).

    `peak_*` are the peaks since the previous tick's reset as a real card showed
    them (the timeline has them); None means "no spike beyond the current value".
    """

    allocated: int
    reserved: int
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    active: int | None = None           # None: same as allocated
    inactive_split: int = 0
    alloc_retries: int = 0
    ooms: int = 0


Entry = Union[TorchFigures, Sequence[TorchFigures]]

# (our figure, stats key prefix) for the byte counters that have current/peak pairs
_PAIRS = (("allocated", "allocated_bytes.all"), ("reserved", "reserved_bytes.all"),
          ("active", "active_bytes.all"), ("inactive_split", "inactive_split_bytes.all"),
          ("allocated", "requested_bytes.all"))


def real_memory_stats_keys() -> dict[str, int]:
    """torch.cuda.memory_stats() right after CUDA initialisation on the H200 (the full key set)."""
    return dict(load_raw_h200()["memory_stats_ctx"])


class _Device:
    def __init__(self, template: dict[str, int]) -> None:
        self.template = template
        self.current: dict[str, int] = {"allocated": 0, "reserved": 0, "active": 0, "inactive_split": 0}
        self.peak: dict[str, int] = dict(self.current)
        self.alloc_retries = 0
        self.ooms = 0
        self.ever_used = False

    def apply(self, figures: TorchFigures) -> None:
        self.ever_used = True
        self.current = {"allocated": figures.allocated, "reserved": figures.reserved,
                        "active": figures.allocated if figures.active is None else figures.active,
                        "inactive_split": figures.inactive_split}
        spikes = {"allocated": figures.peak_allocated, "reserved": figures.peak_reserved,
                  "active": figures.peak_allocated if figures.active is None else None}
        for name, value in self.current.items():
            spike = spikes.get(name)
            self.peak[name] = max(self.peak.get(name, 0), value, spike if spike is not None else 0)
        self.alloc_retries = figures.alloc_retries
        self.ooms = figures.ooms

    def reset_peaks(self) -> None:
        self.peak = dict(self.current)

    def stats(self) -> dict[str, int]:
        if not self.ever_used:
            return {}
        out = dict(self.template)
        for name, prefix in _PAIRS:
            out[f"{prefix}.current"] = self.current[name]
            out[f"{prefix}.peak"] = self.peak[name]
        out["num_alloc_retries"] = self.alloc_retries
        out["num_ooms"] = self.ooms
        return out


class FakeTorchCuda:
    """TorchCudaBackend driven by a script of per-tick figures or by `set()`.

    `follow`: an object with a `tick` attribute (a ScriptedNvml/ReplayNvml) whose
    tick this fake uses, so both replay the same instant; without it, call `advance()`.
    """

    def __init__(self, script: Sequence[Entry] | None = None, *, devices: int = 1, available: bool = True,
                 initialized: bool = True, follow: Any = None, stats_keys: dict[str, int] | None = None) -> None:
        self._script = list(script) if script is not None else []
        self._available = available
        self._initialized = initialized
        self._follow = follow
        self._own_tick = 0
        self._applied_tick: int | None = None
        template = stats_keys if stats_keys is not None else real_memory_stats_keys()
        self._devices = [_Device(template) for _ in range(devices)]
        self.calls: list[tuple[str, int]] = []
        self.resets: list[tuple[int, int]] = []  # (tick, device)
        self.error: Exception | None = None  # raised by memory_stats when set (a broken CUDA context)

    @classmethod
    def from_timeline(cls, lines: list[dict[str, Any]] | None = None, **kwargs: Any) -> "FakeTorchCuda":
        """Replay the torch columns of the H200 timeline (alloc, reserved, peak_alloc, peak_reserved)."""
        lines = lines if lines is not None else load_timeline_h200()
        script = [TorchFigures(int(line["alloc"]), int(line["reserved"]), int(line["peak_alloc"]),
                               int(line["peak_reserved"])) for line in lines]
        return cls(script, **kwargs)

    # -- driving it ------------------------------------------------------------------
    @property
    def tick(self) -> int:
        return int(self._follow.tick) if self._follow is not None else self._own_tick

    def advance(self, ticks: int = 1) -> "FakeTorchCuda":
        if self._follow is not None:
            raise RuntimeError("this fake follows another backend's tick; advance that one")
        self._own_tick += ticks
        return self

    def initialize(self) -> "FakeTorchCuda":
        """What the first CUDA call in a process does."""
        self._initialized = True
        return self

    def set(self, device: int = 0, **figures: Any) -> "FakeTorchCuda":
        """Set the current figures now (allocated=..., reserved=..., ...); peaks rise to meet them."""
        self._sync()
        dev = self._devices[device]
        current = {"allocated": dev.current["allocated"], "reserved": dev.current["reserved"],
                   "inactive_split": dev.current["inactive_split"], "alloc_retries": dev.alloc_retries,
                   "ooms": dev.ooms}
        current.update(figures)
        dev.apply(TorchFigures(**current))
        return self

    def peak(self, device: int = 0) -> dict[str, int]:
        self._sync()
        return dict(self._devices[device].peak)

    def current(self, device: int = 0) -> dict[str, int]:
        """The figures now (allocated, reserved, active, inactive_split), as `*.current` gives them."""
        self._sync()
        return dict(self._devices[device].current)

    def _sync(self) -> None:
        tick = self.tick
        if tick == self._applied_tick or not self._script:
            return
        self._applied_tick = tick
        entry = self._script[min(tick, len(self._script) - 1)]
        entries = [entry] if isinstance(entry, TorchFigures) else list(entry)
        for device, figures in zip(self._devices, entries):
            device.apply(figures)

    # -- TorchCudaBackend --------------------------------------------------------------
    def available(self) -> bool:
        return self._available

    def is_initialized(self) -> bool:
        return self._available and self._initialized

    def memory_stats(self, device: int) -> dict[str, int]:
        self.calls.append(("memory_stats", device))
        if self.error is not None:
            raise self.error
        if not self.is_initialized():
            return {}  # what torch.cuda.memory_stats() returns before CUDA is initialised
        self._sync()
        return self._devices[device].stats()

    def reset_peak_memory_stats(self, device: int) -> None:
        self.calls.append(("reset_peak_memory_stats", device))
        self._sync()
        self.resets.append((self.tick, device))
        self._devices[device].reset_peaks()


SEGMENT_BYTES = 2 * 1024**2  # the caching allocator's small-pool segment: what one tiny tensor reserves


def visible_nvml_indices(visible: str | None, nvml_uuids: Sequence[str]) -> list[int]:
    """The NVML devices torch sees, in torch's order, for a CUDA_VISIBLE_DEVICES value as CUDA reads it:
    indices or UUIDs ("GPU-..."), comma-separated; the list ends at the first entry that names no device.
    None (unset) is every device in NVML's order."""
    if visible is None:
        return list(range(len(nvml_uuids)))
    out: list[int] = []
    for item in (part.strip() for part in visible.split(",")):
        if item.isdigit() and int(item) < len(nvml_uuids):
            index = int(item)
        else:
            index = next((i for i, uuid in enumerate(nvml_uuids) if item and uuid.startswith(item)), -1)
        if index < 0 or index in out:
            break
        out.append(index)
    return out


class FakeCudaDevices:
    """gpuscope.measure.devices.CudaDevices for tests without a GPU: torch's view of NVML's devices.

    `nvml_uuids` are the machine's GPUs as NVML lists them, `visible` the CUDA_VISIBLE_DEVICES value: torch's
    cuda:N is NVML's `nvml_index(N)`, and `device_properties(N).uuid` is that device's UUID (without "GPU-", as
    torch prints it). `torch_uuid` replaces the UUID torch reports (a MIG slice, whose UUID NVML's device list
    does not have); `uuid_error` makes reading it raise (a driver too old to report one).

    `initialise(device)` creates the context: the allocator (`allocator()`, a FakeTorchCuda) then holds one
    segment, as torch.zeros(1) leaves it. `tensor_device(device)` is asked where the model goes: from then on the
    allocator holds `model_bytes` (in whole segments), and the tensors really go to the CPU. `events` lists both
    calls in order, so a test can see what the run did before its model was placed.
    """

    def __init__(self, nvml_uuids: Sequence[str], visible: str | None = None, *, model_bytes: int = 0,
                 name: str = "NVIDIA H200", torch_uuid: str | None = None, uuid_error: Exception | None = None) -> None:
        self.nvml_uuids = list(nvml_uuids)
        self.visible = visible_nvml_indices(visible, self.nvml_uuids)
        self.model_bytes = model_bytes
        self.name = name
        self.torch_uuid = torch_uuid
        self.uuid_error = uuid_error
        self.torch = FakeTorchCuda(devices=max(1, len(self.visible)), available=bool(self.visible), initialized=False)
        self.initialised: set[int] = set()  # torch ordinals with a context
        self.events: list[str] = []

    @staticmethod
    def ordinal(device: str) -> int:
        return int(device.split(":")[1]) if ":" in device else 0

    def nvml_index(self, ordinal: int) -> int:
        """NVML's index of torch's cuda:`ordinal` (the truth the run must find by UUID)."""
        return self.visible[ordinal]

    # -- CudaDevices -------------------------------------------------------------------
    def is_available(self) -> bool:
        return bool(self.visible)

    def device_count(self) -> int:
        return len(self.visible)

    def device_properties(self, index: int) -> Any:
        if self.uuid_error is not None:
            raise self.uuid_error
        uuid = self.torch_uuid if self.torch_uuid is not None else self.nvml_uuids[self.visible[index]]
        return types.SimpleNamespace(name=self.name, uuid=uuid.replace("GPU-", "", 1))

    def device_name(self, device: str) -> str:
        return self.name

    def _context(self, ordinal: int) -> None:
        """The first CUDA call on a device creates its context; later ones find it there."""
        if ordinal not in self.initialised:
            self.initialised.add(ordinal)
            self.torch.initialize().set(ordinal, allocated=0, reserved=SEGMENT_BYTES)

    def initialise(self, device: str) -> None:
        self.events.append(f"initialise {device}")
        self._context(self.ordinal(device))

    def tensor_device(self, device: str) -> str:
        ordinal = self.ordinal(device)
        self.events.append(f"model placed on {device}")
        self._context(ordinal)  # moving a model to a device creates the context too
        segments = -(-self.model_bytes // SEGMENT_BYTES)
        self.torch.set(ordinal, allocated=self.model_bytes, reserved=(1 + segments) * SEGMENT_BYTES)
        return "cpu"

    def allocator(self) -> FakeTorchCuda:
        return self.torch
