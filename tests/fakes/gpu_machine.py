"""A machine with GPUs as NVML and torch both see it, for running a GPU session's wiring without a GPU.

NVML (a ScriptedNvml) lists `gpus` H200s; torch (a FakeCudaDevices) sees them through CUDA_VISIBLE_DEVICES.
Once the run creates its CUDA context on a device, NVML lists the profiled pid there holding what the H200
showed for a context (612 MiB: 610 MiB outside the allocator plus the 2 MiB segment torch reserved,
h200-2026-11-26.json `alloc_ladder` "ctx+1 elem") plus whatever else torch's allocator reserves on it since,
the model among it: NVML's row is the allocator's reserve plus a fixed outside part, as on the real card.
`neighbours` puts other processes on chosen NVML devices. Both fakes go in through run_diagnose's parameters.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from tests.fakes.nvml import FACTS_H200, DeviceState, FakeDevice, FakeProcess, ScriptedNvml
from tests.fakes.torch_cuda import FakeCudaDevices

MiB = 1024**2


def _context_row() -> dict[str, Any]:
    ladder = json.loads(FACTS_H200.read_text())["alloc_ladder"]
    return next(row for row in ladder if row.get("tag") == "ctx+1 elem")


CONTEXT_BYTES = int(_context_row()["nvml_self_mib"] * MiB)                               # 612 MiB in NVML
OUTSIDE_ALLOCATOR_BYTES = int((_context_row()["nvml_self_mib"] - _context_row()["reserved_mib"]) * MiB)  # 610 MiB
SELF_SM_PCT = 40


def gpu_uuid(index: int) -> str:
    return f"GPU-00000000-0000-0000-0000-0000000000c{index}"


class FakeGpuMachine:
    """`nvml_opener` and `cuda` are what run_diagnose takes; `pid` is the profiled process (the test's own)."""

    def __init__(self, pid: int, gpus: int = 1, visible: str | None = None, *, model_bytes: int = 0,
                 neighbours: Mapping[int, Sequence[FakeProcess]] | None = None, torch_uuid: str | None = None,
                 uuid_error: Exception | None = None) -> None:
        self.pid = pid
        self.uuids = [gpu_uuid(i) for i in range(gpus)]
        self.neighbours = {i: tuple(rows) for i, rows in (neighbours or {}).items()}
        self.cuda = FakeCudaDevices(self.uuids, visible, model_bytes=model_bytes, torch_uuid=torch_uuid,
                                    uuid_error=uuid_error)
        self.nvml = ScriptedNvml(devices=[FakeDevice(uuid=u) for u in self.uuids], script=self._states)
        self.opened = 0

    def nvml_opener(self) -> tuple[ScriptedNvml, None]:
        self.opened += 1
        return self.nvml, None

    def self_used_bytes(self, ordinal: int) -> int:
        """What NVML lists for the profiled pid on torch's cuda:`ordinal` now."""
        return OUTSIDE_ALLOCATOR_BYTES + self.cuda.torch.current(ordinal)["reserved"]

    def _states(self, tick: int) -> list[DeviceState]:
        rows: list[list[FakeProcess]] = [list(self.neighbours.get(i, ())) for i in range(len(self.uuids))]
        for ordinal in sorted(self.cuda.initialised):
            rows[self.cuda.nvml_index(ordinal)].append(
                FakeProcess(self.pid, self.self_used_bytes(ordinal), "python3", sm_util_pct=SELF_SM_PCT))
        return [DeviceState(processes=tuple(r), gpu_util_pct=50 if r else 0) for r in rows]
