"""On a real GPU: NVML and torch agree, through the probes (skipped without CUDA).

These check the claims the fakes are built on (tests/fixtures/gpu-facts): per-process
NVML memory covers torch's reserved pool plus the CUDA context, it grows by exactly
what the allocator reserves, freed memory stays cached until empty_cache(), and
memory info v2 splits out the driver's reserve.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gpuscope.probes.allocator import AllocatorProbe, RealTorchCuda
from gpuscope.probes.gpu import GpuProbe
from gpuscope.probes.nvml import PynvmlBackend

pytestmark = pytest.mark.gpu

MiB = 1024**2
GiB = 1024**3


@pytest.fixture(scope="module")
def torch():
    import torch

    torch.zeros(1, device="cuda")  # initialise CUDA: the context exists from here on
    torch.cuda.synchronize()
    return torch


@pytest.fixture(scope="module")
def backend():
    backend = PynvmlBackend.open()
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def nvml_index(torch, backend) -> int:
    """The NVML index of torch's device 0 (they differ under CUDA_VISIBLE_DEVICES)."""
    uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", ""))
    for index in range(backend.device_count()):
        if uuid and backend.device_uuid(index).endswith(uuid):
            return index
    return 0


def readings(*probes) -> dict:
    return {(scope, metric): value for probe in probes for scope, metric, value in probe.read()}


def own_nvml_used(backend, nvml_index: int) -> int:
    rows = {row.pid: row.used_bytes for row in backend.running_processes(nvml_index)}
    if os.getpid() not in rows:
        pytest.skip(f"NVML does not list this pid ({os.getpid()}): another pid namespace (PID_NAMESPACE)")
    return rows[os.getpid()]


def test_memory_info_v2_adds_up(backend, nvml_index):
    info = backend.memory_info(nvml_index)
    assert info.used_bytes + info.free_bytes == info.total_bytes
    if info.reserved_bytes is not None:
        assert 0 < info.reserved_bytes < info.used_bytes


def test_nvml_per_process_used_covers_torch_reserved_and_a_1_gib_allocation_shows_in_both(torch, backend, nvml_index):
    scope = f"pid:{os.getpid()}/gpu:{nvml_index}"
    gpu = GpuProbe(backend)
    alloc = AllocatorProbe(RealTorchCuda(), {0: scope})
    own_nvml_used(backend, nvml_index)
    torch.cuda.empty_cache()
    before = readings(gpu, alloc)
    assert before[(scope, "used_bytes")] >= before[(scope, "torch_reserved_bytes")] + 100 * MiB  # + the context
    block = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    after = readings(gpu, alloc)
    grown_alloc = after[(scope, "torch_allocated_bytes")] - before[(scope, "torch_allocated_bytes")]
    grown_reserved = after[(scope, "torch_reserved_bytes")] - before[(scope, "torch_reserved_bytes")]
    grown_nvml = after[(scope, "used_bytes")] - before[(scope, "used_bytes")]
    assert grown_alloc == GiB
    assert GiB <= grown_reserved < GiB + 32 * MiB
    assert abs(grown_nvml - grown_reserved) <= 2 * MiB, "NVML grows by what the allocator reserved, to the MiB"
    assert after[(scope, "used_bytes")] >= after[(scope, "torch_reserved_bytes")]
    device_growth = after[(f"gpu:{nvml_index}", "used_bytes")] - before[(f"gpu:{nvml_index}", "used_bytes")]
    assert device_growth >= GiB - 64 * MiB  # other processes may move the device figure a little

    # freed: allocated drops, reserved and NVML stay (cached); empty_cache() gives it back
    del block
    cached = readings(gpu, alloc)
    assert cached[(scope, "torch_allocated_bytes")] == before[(scope, "torch_allocated_bytes")]
    assert cached[(scope, "torch_reserved_bytes")] == after[(scope, "torch_reserved_bytes")]
    assert abs(cached[(scope, "used_bytes")] - after[(scope, "used_bytes")]) <= 2 * MiB
    torch.cuda.empty_cache()
    emptied = readings(gpu, alloc)
    assert after[(scope, "used_bytes")] - emptied[(scope, "used_bytes")] >= GiB - 2 * MiB


def test_a_spike_between_ticks_shows_in_the_peak(torch):
    scope = "pid:self/gpu:0"
    alloc = AllocatorProbe(RealTorchCuda(), {0: scope})
    alloc.read()
    spike = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    del spike
    reading = readings(alloc)
    assert reading[(scope, "torch_peak_allocated_bytes")] - reading[(scope, "torch_allocated_bytes")] >= 256 * MiB
    again = readings(alloc)  # the previous read reset the peaks
    assert again[(scope, "torch_peak_allocated_bytes")] == again[(scope, "torch_allocated_bytes")]


def test_a_foreign_torch_process_is_seen_with_its_memory_name_and_engine(torch, backend, nvml_index):
    own_nvml_used(backend, nvml_index)
    code = ("import torch, sys, time; a = torch.empty(512 * 1024**2, dtype=torch.uint8, device='cuda'); "
            "torch.cuda.synchronize(); print('ready', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, "--api-key=SECRET123"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        probe = GpuProbe(backend, describe_every_s=0.0)
        deadline = time.monotonic() + 10
        while True:
            values = readings(probe)
            used = values.get((f"pid:{child.pid}/gpu:{nvml_index}", "used_bytes"))
            if used is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert used is not None, "NVML never listed the child"
        assert used >= 512 * MiB + 100 * MiB  # its tensor and its own CUDA context
        info = probe.processes[child.pid]
        assert info.exists and "python" in info.name
        assert "torch" in info.engines  # libtorch_cuda in its /proc/PID/maps
        assert "SECRET123" not in info.cmdline
    finally:
        child.kill()
        child.wait()
