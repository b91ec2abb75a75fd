"""Test doubles injected through constructors: a scripted NVML, a replay of real H200
readings, a fake torch.cuda (the allocator view and the devices torch sees), and a machine
combining them (gpu_machine.FakeGpuMachine). No GPU needed, nothing patched."""
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
from tests.fakes.torch_cuda import FakeCudaDevices, FakeTorchCuda, TorchFigures

__all__ = ["FACTS_H200", "GiB", "MiB", "RAW_H200", "TIMELINE_H200", "DeviceState", "FakeDevice", "FakeProcess",
           "FakeCudaDevices", "FakeTorchCuda", "ReplayNvml", "ScriptedNvml", "TorchFigures", "load_raw_h200", "load_timeline_h200"]
