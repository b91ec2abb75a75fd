"""Accuracy on a real GPU, at the same instant (issue 10):

- NVML's per-process figure, through GpuProbe, equals `nvidia-smi --query-compute-apps` to the MiB,
  for this process and a foreign one;
- AllocatorProbe's allocated / reserved / peaks equal torch.cuda's own figures to the byte;
- the decomposition of one real tick (GpuProbe + AllocatorProbe through a Sampler into StepMonitor, as
  diagnose wires them): the process total is nvidia-smi's figure for this pid (a separate reader), and
  torch's layers are the differences torch.cuda.memory_stats(), read right after the tick, gives.

"The same instant": nothing allocates between the reads (no other thread here touches the GPU), and
where two processes are read, the probe is read before and after nvidia-smi and must agree with itself.

These create a CUDA context in the pytest process; conftest.py runs the planted scenarios before them.
"""
from __future__ import annotations

import os
import shutil

import pytest

from . import scenarios as sc

pytestmark = pytest.mark.gpu

MiB, GiB = sc.MiB, sc.GiB


@pytest.fixture(scope="module")
def torch_cuda():
    import torch

    torch.zeros(1, device="cuda:0")  # the CUDA context exists from here on
    torch.cuda.synchronize()
    return torch


@pytest.fixture(scope="module")
def index(torch_cuda, nvml) -> int:
    """NVML's index of torch's cuda:0 (matched by UUID, as diagnose does)."""
    from gpuscope.measure.devices import nvml_index_for

    return nvml_index_for(0, [nvml.device_uuid(i) for i in range(nvml.device_count())])


def _per_process(values, index: int) -> dict[int, object]:
    suffix = f"/gpu:{index}"
    return {int(scope[len("pid:"):-len(suffix)]): value for scope, metric, value in values
            if scope.startswith("pid:") and scope.endswith(suffix) and metric == "used_bytes"}


def _need_smi() -> None:
    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi is not on PATH: nothing to compare NVML's figures with")


def test_nvml_per_process_memory_equals_nvidia_smi_to_the_mib(torch_cuda, nvml, index, figures):
    from gpuscope.probes.gpu import GpuProbe

    _need_smi()
    torch = torch_cuda
    held = torch.empty(GiB + 3 * MiB + 12345, dtype=torch.uint8, device="cuda:0")  # not a round size
    torch.cuda.synchronize()
    uuid = nvml.device_uuid(index)
    probe = GpuProbe(nvml, describe_every_s=3600.0)
    with sc.foreign_process(1) as child:
        sc.wait_listed(nvml, child.pid, GiB)
        for attempt in range(1, 6):
            before = _per_process(probe.read(), index)
            smi = sc.nvidia_smi_apps(uuid)
            after = _per_process(probe.read(), index)
            if before == after:
                break
        figures.record(attempts=attempt, self_pid=os.getpid(), foreign_pid=child.pid,
                       probe_bytes={str(k): v for k, v in before.items()},
                       probe_mib={str(k): (v / MiB if isinstance(v, int) else v) for k, v in before.items()},
                       nvidia_smi_mib={str(k): v for k, v in smi.items()},
                       whole_mib={str(k): (isinstance(v, int) and v % MiB == 0) for k, v in before.items()})
    del held

    assert before == after, f"NVML kept moving between reads: {before} vs {after}"
    assert os.getpid() in before and child.pid in before, f"NVML lists {sorted(before)}"
    assert set(before) == set(smi), f"NVML lists {sorted(before)}, nvidia-smi {sorted(smi)}"
    for pid, used in before.items():
        assert isinstance(used, int), f"pid {pid}: {used}"
        assert smi[pid] is not None, f"nvidia-smi prints N/A for pid {pid}"
        assert abs(used / MiB - smi[pid]) < 1.0, f"pid {pid}: gpuscope {used / MiB:.3f} MiB, nvidia-smi {smi[pid]} MiB"


def test_allocator_probe_equals_torch_to_the_byte(torch_cuda, figures):
    from gpuscope.probes.allocator import AllocatorProbe, RealTorchCuda

    torch = torch_cuda
    probe = AllocatorProbe(RealTorchCuda(), {0: "pid:self/gpu:0"})
    rows = []

    def compare(label: str) -> None:
        torch.cuda.synchronize()
        peak_allocated = torch.cuda.max_memory_allocated(0)  # read before the probe resets the peaks
        peak_reserved = torch.cuda.max_memory_reserved(0)
        values = {metric: value for _, metric, value in probe.read()}
        rows.append({"state": label,
                     "probe_allocated": values["torch_allocated_bytes"], "torch_allocated": torch.cuda.memory_allocated(0),
                     "probe_reserved": values["torch_reserved_bytes"], "torch_reserved": torch.cuda.memory_reserved(0),
                     "probe_peak_allocated": values["torch_peak_allocated_bytes"], "torch_peak_allocated": peak_allocated,
                     "probe_peak_reserved": values["torch_peak_reserved_bytes"], "torch_peak_reserved": peak_reserved})

    compare("start")
    odd = torch.empty(123_456_789, dtype=torch.uint8, device="cuda:0")
    compare("+ 123,456,789 bytes")
    floats = torch.ones(3, 1000, 1001, device="cuda:0")
    compare("+ 3x1000x1001 float32")
    spike = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda:0")
    del spike
    compare("256 MiB spike freed between reads")
    del odd
    compare("odd tensor freed (cached)")
    torch.cuda.empty_cache()
    compare("empty_cache")
    del floats
    torch.cuda.empty_cache()
    compare("all freed")
    figures.record(rows=rows)

    for row in rows:
        for what in ("allocated", "reserved", "peak_allocated", "peak_reserved"):
            assert row[f"probe_{what}"] == row[f"torch_{what}"], f"{row['state']}: {what} {row}"
    spike_row = rows[3]
    assert spike_row["probe_peak_allocated"] - spike_row["probe_allocated"] >= 256 * MiB


def test_decomposition_matches_nvidia_smi_and_torchs_memory_stats_at_the_same_moment(torch_cuda, nvml, index, figures):
    """One real tick: the process total against nvidia-smi's figure for this pid (to the MiB), and torch's
    layers against torch.cuda.memory_stats() read in this process right after the tick, with nothing
    allocated in between (to the byte): weights = the model's bytes, activations = allocated - weights,
    cache = reserved - allocated (>= the 300 MiB freed), outside = the total - reserved > 0. (That the
    layers add up to the total is how `outside` is defined, so it is not a check.)"""
    from torch import nn

    from gpuscope.measure.attribution import StepMonitor
    from gpuscope.probes.allocator import AllocatorProbe, RealTorchCuda
    from gpuscope.probes.gpu import GpuProbe
    from gpuscope.probes.sampler import Sampler

    _need_smi()
    torch = torch_cuda
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(4)]).to("cuda:0").eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.inference_mode():
        out = model(torch.randn(64, 2048, device="cuda:0"))  # activations and a cuBLAS workspace
    spare = torch.empty(300 * MiB, dtype=torch.uint8, device="cuda:0")
    del spare  # cached, not emptied
    torch.cuda.synchronize()

    pid = os.getpid()
    monitor = StepMonitor(pid, index, model_bytes)
    sampler = Sampler({"gpu": GpuProbe(nvml, describe_every_s=3600.0),
                       "allocator": AllocatorProbe(RealTorchCuda(), {0: f"pid:{pid}/gpu:{index}"})},
                      0.05, None, [monitor])
    sampler.tick()
    stats = torch.cuda.memory_stats(0)  # the same moment: nothing allocates between the tick and here
    smi = sc.nvidia_smi_apps(nvml.device_uuid(index))
    snapshot = monitor.snapshot()
    allocated, reserved = int(stats["allocated_bytes.all.current"]), int(stats["reserved_bytes.all.current"])
    memory = nvml.memory_info(index)
    layers = snapshot["layers"]
    process = snapshot.get("process_gpu_bytes")
    figures.record(layers=layers, process_gpu_bytes=process, nvidia_smi_mib=smi.get(pid),
                   torch_allocated=allocated, torch_reserved=reserved, model_bytes=model_bytes,
                   device_used_bytes=memory.used_bytes, other_processes_nvidia_smi_mib={str(p): v for p, v in smi.items() if p != pid},
                   driver_reserved_bytes=memory.reserved_bytes,
                   processes_plus_driver_minus_device_used=(
                       sum(layers.get(k, 0) for k in sc.PROCESS_LAYERS) + layers.get("other_processes_bytes", 0)
                       + layers.get("driver_reserved_bytes", 0) - memory.used_bytes))
    del out

    assert smi.get(pid) is not None, f"nvidia-smi does not list this process ({pid}): {smi} (another pid namespace?)"
    assert isinstance(process, int) and abs(process / MiB - smi[pid]) < 1.0, \
        f"gpuscope {process} bytes ({process / MiB:.3f} MiB), nvidia-smi {smi[pid]} MiB"
    assert layers["model_weights_bytes"] == model_bytes
    assert layers["activations_bytes"] == allocated - model_bytes
    assert layers["allocator_cache_bytes"] == reserved - allocated
    assert layers["allocator_cache_bytes"] >= 300 * MiB
    assert layers["outside_allocator_bytes"] == process - reserved > 0
