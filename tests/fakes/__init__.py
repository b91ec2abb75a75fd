"""Test doubles injected through constructors: a scripted NVML, a replay of real H200
readings, and a fake torch.cuda allocator view. No GPU needed, nothing patched."""
from tests.fakes.nvml import (
                              FACTS_H200,
                              RAW_H200,
                              TIMELINE_H200,
                              DeviceState,
                              FakeDevice,
                              FakeProcess,
                              GiB,
                              MiB,
                              ReplayNvml,
                              ScriptedNvml,
                              load_raw_h200,
                              load_timeline_h200,
)
from tests.fakes.torch_cuda import FakeTorchCuda, TorchFigures

__all__ = ["FACTS_H200", "GiB", "MiB", "RAW_H200", "TIMELINE_H200", "DeviceState", "FakeDevice", "FakeProcess",
           "FakeTorchCuda", "ReplayNvml", "ScriptedNvml", "TorchFigures", "load_raw_h200", "load_timeline_h200"]
