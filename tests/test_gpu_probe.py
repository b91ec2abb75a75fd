"""GpuProbe and check_row, driven by the scripted NVML and by a replay of the H200's readings.

Each scenario is named after the failure it reproduces on a real card.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gpuscope.probes.allocator import AllocatorProbe
from gpuscope.probes.gpu import MAX_PID, CheckedRow, GpuProbe, check_row
from gpuscope.probes.nvml import ProcessRow
from gpuscope.probes.processes import ProcessInfo, describe_process
from gpuscope.probes.readings import ERROR, NO_DEVICE, NO_PERMISSION, NOT_SUPPORTED, PROCESS_GONE, Unavailable
from gpuscope.probes.samplefile import SampleWriter, load_timeline
from gpuscope.probes.sampler import Sampler
from tests.fakes.nvml import (
    H200_DRIVER_RESERVED_BYTES,
    H200_TOTAL_BYTES,
    DeviceState,
    FakeDevice,
    FakeProcess,
    GiB,
    MiB,
    ReplayNvml,
    ScriptedNvml,
)
from tests.fakes.torch_cuda import FakeTorchCuda
from tests.children import running_python

OWN = FakeProcess(474, 1620 * MiB, "python3", sm_util_pct=62)
FOREIGN = FakeProcess(505, 2566 * MiB, "/opt/torch/.venv/bin/python3", sm_util_pct=1)
NOT_IN_PROC = 4_000_123  # a host-namespace pid: above this machine's pid_max, below Linux's 2**22 cap


class RecordingDescriber:
    """Stands in for describe_process (which reads /proc) and records who was described."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []

    def __call__(self, pid: int, nvml_name: str) -> ProcessInfo:
        self.calls.append((pid, nvml_name))
        return ProcessInfo(pid, True, nvml_name or "?", "alice", "python serve.py", ("torch",), {})


class FakeClockS:
    """A monotonic clock in seconds that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def probe_for(backend, **kwargs) -> GpuProbe:
    kwargs.setdefault("describe", RecordingDescriber())
    kwargs.setdefault("pid_exists", lambda pid: True)
    return GpuProbe(backend, **kwargs)


def as_dict(values) -> dict[tuple[str, str], object]:
    out = {}
    for scope, metric, value in values:
        assert (scope, metric) not in out, f"duplicate reading {scope} {metric}"
        out[(scope, metric)] = value
    return out


def pids_in(readings: dict) -> set[int]:
    return {int(scope.split("/")[0][4:]) for scope, _ in readings if scope.startswith("pid:")}


# -- devices ----------------------------------------------------------------------------------

def test_device_info_comes_from_the_backend():
    probe = probe_for(ScriptedNvml([FakeDevice(), FakeDevice(name="NVIDIA H100", uuid="GPU-h100", total_bytes=80 * GiB)]))
    assert probe.device_count == 2
    assert probe.devices[0].to_json() == {"index": 0, "name": "NVIDIA H200", "uuid": probe.devices[0].uuid,
                                          "total_bytes": H200_TOTAL_BYTES, "driver": "580.159.04"}
    assert probe.devices[1].name == "NVIDIA H100" and probe.devices[1].total_bytes == 80 * GiB


def test_device_info_with_a_failing_name_keeps_the_rest():
    nvml = ScriptedNvml().fail("device_name", NOT_SUPPORTED)
    info = probe_for(nvml).devices[0]
    assert info.name == Unavailable(NOT_SUPPORTED, "device_name: injected not_supported")
    assert info.total_bytes == H200_TOTAL_BYTES
    assert info.to_json()["name"] == {"unavailable": NOT_SUPPORTED, "detail": "device_name: injected not_supported"}


def test_every_device_is_sampled_under_its_own_scope():
    nvml = ScriptedNvml([FakeDevice(), FakeDevice(uuid="GPU-2")],
                        [[DeviceState((OWN,)), DeviceState((FOREIGN,), gpu_util_pct=40)]])
    readings = as_dict(probe_for(nvml).read())
    assert readings[("gpu:1", "util_pct")] == 40
    assert readings[("pid:474/gpu:0", "used_bytes")] == OWN.used_bytes
    assert readings[("pid:505/gpu:1", "used_bytes")] == FOREIGN.used_bytes
    assert ("pid:505/gpu:0", "used_bytes") not in readings


# -- scenarios from the H200 -------------------------------------------------------------------

def test_cuda_context_only_process_shows_612_mib_in_nvml_and_2_mib_in_torch():
    replay = ReplayNvml()
    torch_cuda = FakeTorchCuda.from_timeline(replay.lines, follow=replay)
    assert replay.phase == "idle-ctx"
    gpu = as_dict(probe_for(replay).read())
    alloc = as_dict(AllocatorProbe(torch_cuda, {0: "pid:474/gpu:0"}).read())
    nvml_self = gpu[("pid:474/gpu:0", "used_bytes")]
    reserved = alloc[("pid:474/gpu:0", "torch_reserved_bytes")]
    assert nvml_self == 612 * MiB
    assert reserved == 2 * MiB
    assert alloc[("pid:474/gpu:0", "torch_allocated_bytes")] == 0
    assert nvml_self - reserved == 610 * MiB  # outside the allocator: the CUDA context and module images
    # device used (v1 style) includes the driver's 615 MiB reserve, which no process owns
    assert gpu[("gpu:0", "driver_reserved_bytes")] == H200_DRIVER_RESERVED_BYTES
    assert round(H200_DRIVER_RESERVED_BYTES / MiB) == 615
    assert gpu[("gpu:0", "used_bytes")] == 1_295_908_864
    assert gpu[("gpu:0", "used_bytes")] > nvml_self + H200_DRIVER_RESERVED_BYTES
    assert gpu[("gpu:0", "used_bytes")] + gpu[("gpu:0", "free_bytes")] == gpu[("gpu:0", "total_bytes")]
    assert gpu[("gpu:0", "process_count")] == 1


def _last_tick_with(replay: ReplayNvml, predicate) -> int:
    ticks = [tick for tick, line in enumerate(replay.lines) if predicate(line)]
    assert ticks, "the timeline has no such tick"
    return ticks[-1]


def test_cached_memory_after_a_free_allocated_drops_reserved_and_nvml_stay():
    replay = ReplayNvml()
    torch_cuda = FakeTorchCuda.from_timeline(replay.lines, follow=replay)
    gpu, alloc = probe_for(replay), AllocatorProbe(torch_cuda, {0: "pid:474/gpu:0"})

    def tick_at(tick: int) -> dict:
        replay.goto(tick)
        return as_dict(gpu.read() + alloc.read())

    held = tick_at(_last_tick_with(replay, lambda line: line["phase"] == "4GiB-held"))
    freed = tick_at(_last_tick_with(replay, lambda line: line["phase"] == "4GiB-freed-cached"))
    emptied = tick_at(_last_tick_with(replay, lambda line: line["phase"] == "empty-cache" and len(line["procs"]) == 1))
    scope = "pid:474/gpu:0"
    assert held[(scope, "torch_allocated_bytes")] - freed[(scope, "torch_allocated_bytes")] == 4096 * MiB
    assert freed[(scope, "torch_reserved_bytes")] == held[(scope, "torch_reserved_bytes")]
    assert freed[(scope, "used_bytes")] == held[(scope, "used_bytes")] == 5716 * MiB  # NVML does not drop
    assert freed[("gpu:0", "used_bytes")] == held[("gpu:0", "used_bytes")]
    cached = freed[(scope, "torch_reserved_bytes")] - freed[(scope, "torch_allocated_bytes")]
    assert cached > 4 * GiB
    # only empty_cache() gives it back
    assert emptied[(scope, "used_bytes")] == 1620 * MiB
    assert held[(scope, "used_bytes")] - emptied[(scope, "used_bytes")] == (
        held[(scope, "torch_reserved_bytes")] - emptied[(scope, "torch_reserved_bytes")])


def test_a_foreign_process_appearing_is_read_with_pid_name_and_memory():
    nvml = ScriptedNvml(script=[DeviceState((OWN,)), DeviceState((OWN, FOREIGN), gpu_util_pct=63)])
    describer = RecordingDescriber()
    probe = probe_for(nvml, describe=describer)
    before = as_dict(probe.read())
    assert before[("gpu:0", "process_count")] == 1 and pids_in(before) == {474}
    probe.drain_events()
    nvml.advance()
    after = as_dict(probe.read())
    assert after[("gpu:0", "process_count")] == 2
    assert after[("pid:505/gpu:0", "used_bytes")] == 2566 * MiB
    assert after[("pid:505/gpu:0", "sm_util_pct")] == 1
    assert after[("pid:474/gpu:0", "sm_util_pct")] == 62
    assert after[("gpu:0", "used_bytes")] == (1620 + 2566) * MiB + H200_DRIVER_RESERVED_BYTES
    assert (505, "/opt/torch/.venv/bin/python3") in describer.calls
    events = probe.drain_events()
    assert [(e["event"], e["pid"], e["name"]) for e in events] == [("process", 505, "/opt/torch/.venv/bin/python3")]
    assert probe.processes[505].name == "/opt/torch/.venv/bin/python3"


def test_a_foreign_process_appears_in_the_h200_replay():
    replay = ReplayNvml()
    probe = probe_for(replay)
    seen: dict[int, int] = {}
    for tick in range(len(replay.lines)):
        replay.goto(tick)
        for (scope, metric), value in as_dict(probe.read()).items():
            if metric == "used_bytes" and scope.startswith("pid:"):
                pid = int(scope[4:].split("/")[0])
                seen[pid] = max(seen.get(pid, 0), value)
    assert seen[474] == 5716 * MiB                         # own process with 4 GiB held
    assert seen[505] == 2566 * MiB                         # the foreign torch process holding 2 GiB
    assert seen[527] == 107_918 * MiB                      # the JAX sibling at default settings (~75% of the card)
    assert probe.processes[527].name == "/opt/torch/.venv/bin/python3"


def test_a_process_that_exits_between_two_ticks_loses_its_row():
    replay = ReplayNvml()
    last_with_jax = _last_tick_with(replay, lambda line: any(p["pid"] == 527 for p in line["procs"]))
    probe = probe_for(replay)
    replay.goto(last_with_jax)
    before = as_dict(probe.read())
    replay.advance()
    after = as_dict(probe.read())
    assert ("pid:527/gpu:0", "used_bytes") in before
    assert pids_in(after) == {474}
    assert after[("gpu:0", "process_count")] == 1
    jax_row = before[("pid:527/gpu:0", "used_bytes")]
    assert jax_row == 550 * MiB
    # the device gives back the process's memory and the driver's few MiB of per-process bookkeeping
    assert 0 <= before[("gpu:0", "used_bytes")] - after[("gpu:0", "used_bytes")] - jax_row < 16 * MiB


def test_a_process_that_exits_after_nvml_listed_it_is_described_as_gone():
    child = running_python("import time; time.sleep(30)")
    try:
        row = FakeProcess(child.pid, 300 * MiB, "python3")
        # NVML still lists the pid one tick after it exited; the tick after, it is gone
        nvml = ScriptedNvml(script=[DeviceState((OWN, row)), DeviceState((OWN, row)), DeviceState((OWN,))])
        probe = GpuProbe(nvml, describe_every_s=0.0)  # the real describe_process and psutil.pid_exists
        probe.read()
        alive = probe.processes[child.pid]
        assert alive.exists and alive.name.startswith("python")
        probe.drain_events()
    finally:
        child.kill()
        child.wait()
    nvml.advance()
    readings = as_dict(probe.read())
    assert readings[(f"pid:{child.pid}/gpu:0", "used_bytes")] == 300 * MiB  # NVML's row still counts
    gone = probe.processes[child.pid]
    assert not gone.exists
    assert gone.user == Unavailable(PROCESS_GONE, f"pid {child.pid} is not in this pid namespace")
    assert gone.name == "python3"  # NVML's name is the fallback
    assert [e["exists"] for e in probe.drain_events() if e["pid"] == child.pid] == [False]
    nvml.advance()
    assert child.pid not in pids_in(as_dict(probe.read()))


def test_describe_process_of_an_exited_pid_gives_process_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    info = describe_process(child.pid, "python3")
    assert info.exists is False
    for field in (info.user, info.cmdline, info.engines, info.memory_env):
        assert isinstance(field, Unavailable) and field.reason == PROCESS_GONE
    assert info.to_json()["user"] == {"unavailable": PROCESS_GONE, "detail": f"pid {child.pid} is not in this pid namespace"}


def test_processes_are_described_at_most_every_describe_every_s():
    describer = RecordingDescriber()
    nvml = ScriptedNvml(script=[DeviceState((OWN,))])
    probe = probe_for(nvml, describe=describer, describe_every_s=60.0)
    for _ in range(5):
        probe.read()
        nvml.advance()
    assert describer.calls == [(474, "python3")]
    assert nvml.calls["process_name"] == 1


def test_a_tick_asks_nothing_per_process_beyond_nvml():
    """Whether a pid is in this namespace is its description's `exists` (every describe_every_s): a tick
    makes no pid_exists call (a syscall) per listed process."""
    asked: list[int] = []
    nvml = ScriptedNvml(script=[DeviceState((OWN, FakeProcess(505, 2 * GiB)))])
    probe = probe_for(nvml, pid_exists=lambda pid: asked.append(pid) or True, describe_every_s=60.0)
    for _ in range(5):
        readings = as_dict(probe.read())
        nvml.advance()
    assert asked == []
    assert pids_in(readings) == {474, 505} and readings[("pid:505/gpu:0", "used_bytes")] == 2 * GiB


# -- NVML failing --------------------------------------------------------------------------------

def test_nvml_failing_mid_run_makes_that_metric_unavailable_and_keeps_the_rest(samples_path):
    nvml = ScriptedNvml(script=[DeviceState((OWN,), gpu_util_pct=50)])
    nvml.fail("memory_info", ERROR, from_tick=2, detail="nvmlDeviceGetMemoryInfo: Unknown Error")
    probe = probe_for(nvml)
    writer = SampleWriter(str(samples_path), {"t0_ns": 0})
    sampler = Sampler({"gpu": probe}, writer=writer)
    results = []
    for _ in range(4):
        results.append(as_dict(sampler.tick()))
        nvml.advance()
    writer.close()
    assert results[1][("gpu:0", "used_bytes")] == OWN.used_bytes + H200_DRIVER_RESERVED_BYTES
    failed = Unavailable(ERROR, "nvmlDeviceGetMemoryInfo: Unknown Error")
    for metric in ("total_bytes", "used_bytes", "free_bytes", "driver_reserved_bytes"):
        assert results[2][("gpu:0", metric)] == failed
        assert results[3][("gpu:0", metric)] == failed
    assert results[2][("gpu:0", "util_pct")] == 50
    assert results[2][("pid:474/gpu:0", "used_bytes")] == OWN.used_bytes  # without a total, still plausible
    assert sampler.ticks == 4 and sampler.probe_errors == {}
    timeline = load_timeline(str(samples_path))
    assert timeline.column("gpu:0", "used_bytes")[2] == failed  # the reason survives the file
    assert timeline.column("gpu:0", "util_pct") == [50, 50, 50, 50]


def test_running_processes_failing_leaves_device_memory():
    nvml = ScriptedNvml(script=[DeviceState((OWN,))]).fail("running_processes", NO_PERMISSION)
    readings = as_dict(probe_for(nvml).read())
    assert readings[("gpu:0", "process_count")] == Unavailable(NO_PERMISSION, "running_processes: injected no_permission")
    assert readings[("gpu:0", "used_bytes")] == OWN.used_bytes + H200_DRIVER_RESERVED_BYTES
    assert pids_in(readings) == set()


def test_process_utilization_not_supported_leaves_process_memory():
    nvml = ScriptedNvml(script=[DeviceState((OWN,))]).fail("process_utilization_pct", NOT_SUPPORTED)
    readings = as_dict(probe_for(nvml).read())
    assert readings[("pid:474/gpu:0", "sm_util_pct")].reason == NOT_SUPPORTED
    assert readings[("pid:474/gpu:0", "used_bytes")] == OWN.used_bytes


def test_a_failing_process_name_still_describes_the_process():
    describer = RecordingDescriber()
    nvml = ScriptedNvml(script=[DeviceState((OWN,))]).fail("process_name", NO_PERMISSION)
    probe_for(nvml, describe=describer).read()
    assert describer.calls == [(474, "")]


def test_a_failure_can_be_transient():
    nvml = ScriptedNvml(script=[DeviceState((OWN,), gpu_util_pct=5)]).fail("utilization_pct", ERROR, from_tick=1, until_tick=2)
    probe = probe_for(nvml)
    utils = []
    for _ in range(3):
        utils.append(as_dict(probe.read())[("gpu:0", "util_pct")])
        nvml.advance()
    assert utils[0] == 5 and isinstance(utils[1], Unavailable) and utils[2] == 5


def test_gpu_lost_every_reading_is_no_device_and_sampling_goes_on(samples_path):
    nvml = ScriptedNvml(script=[DeviceState((OWN, FOREIGN), gpu_util_pct=80)]).lose_gpu(from_tick=2)
    writer = SampleWriter(str(samples_path), {"t0_ns": 0})
    sampler = Sampler({"gpu": probe_for(nvml)}, writer=writer)
    results = []
    for _ in range(4):
        results.append(as_dict(sampler.tick()))
        nvml.advance()
    writer.close()
    assert pids_in(results[1]) == {474, 505}
    for lost in results[2:]:
        assert pids_in(lost) == set()
        assert set(lost) == {("gpu:0", m) for m in ("total_bytes", "used_bytes", "free_bytes",
                                                   "driver_reserved_bytes", "util_pct", "mem_util_pct",
                                                   "process_count")}
        assert all(isinstance(v, Unavailable) and v.reason == NO_DEVICE for v in lost.values())
    assert sampler.ticks == 4 and sampler.probe_errors == {}
    assert load_timeline(str(samples_path)).column("gpu:0", "used_bytes")[3].reason == NO_DEVICE


def test_a_binding_bug_becomes_an_error_reading_not_a_crash():
    class Broken(ScriptedNvml):
        def utilization_pct(self, index):
            raise ValueError("ctypes returned garbage")

    readings = as_dict(probe_for(Broken(script=[DeviceState((OWN,))])).read())
    assert readings[("gpu:0", "util_pct")] == Unavailable(ERROR, "ValueError: ctypes returned garbage")
    assert readings[("gpu:0", "used_bytes")] == OWN.used_bytes + H200_DRIVER_RESERVED_BYTES


# -- check_row ---------------------------------------------------------------------------------

def test_a_pid_nvml_lists_that_proc_does_not_have_is_outside_the_namespace():
    row = check_row(ProcessRow(NOT_IN_PROC, 2 * GiB), H200_TOTAL_BYTES, pid_exists=__import__("psutil").pid_exists)
    assert row == CheckedRow(NOT_IN_PROC, 2 * GiB, in_namespace=False)
    own = check_row(ProcessRow(os.getpid(), 2 * GiB), H200_TOTAL_BYTES, pid_exists=__import__("psutil").pid_exists)
    assert own.in_namespace is True


def test_a_pid_not_in_proc_is_still_read_and_described_from_nvml():
    host_pid_process = FakeProcess(NOT_IN_PROC, 1124 * MiB, "python3")
    probe = GpuProbe(ScriptedNvml(script=[DeviceState((host_pid_process,))]))  # real psutil and /proc
    readings = as_dict(probe.read())
    assert readings[(f"pid:{NOT_IN_PROC}/gpu:0", "used_bytes")] == 1124 * MiB
    info = probe.processes[NOT_IN_PROC]
    assert info.exists is False and info.name == "python3" and info.user.reason == PROCESS_GONE


def test_swapped_pid_and_used_gpu_memory_fields_are_fixed():
    swapped = ProcessRow(pid=641_728_512, used_bytes=474)
    row = check_row(swapped, H200_TOTAL_BYTES, pid_exists=lambda pid: pid == 474)
    assert (row.pid, row.used_bytes, row.in_namespace) == (474, 641_728_512, True)
    assert "swapped" in row.note


def test_swapped_fields_are_fixed_in_the_probe_and_reported_as_an_event():
    nvml = ScriptedNvml(script=[DeviceState((OWN,), raw_rows=(ProcessRow(OWN.used_bytes, OWN.pid),))])
    probe = probe_for(nvml)
    readings = as_dict(probe.read())
    assert readings[("pid:474/gpu:0", "used_bytes")] == OWN.used_bytes
    assert not any(scope.startswith(f"pid:{OWN.used_bytes}") for scope, _ in readings)
    assert {"event": "nvml_row_fixed", "pid": 474, "gpu": 0,
            "note": "pid and usedGpuMemory were swapped by the binding"} in probe.drain_events()


@pytest.mark.parametrize("row", [
    ProcessRow(474, 612 * MiB),             # ordinary row
    ProcessRow(474, 3 * MiB),               # small but above MAX_PID
    ProcessRow(MAX_PID, 1000),              # a pid at the cap is a pid, not bytes
])
def test_ordinary_rows_are_not_swapped(row):
    checked = check_row(row, H200_TOTAL_BYTES, pid_exists=lambda pid: True)
    assert (checked.pid, checked.used_bytes, checked.note) == (row.pid, row.used_bytes, "")


def test_used_greater_than_total_is_rejected_as_unavailable_error():
    row = check_row(ProcessRow(474, H200_TOTAL_BYTES + 1), H200_TOTAL_BYTES, pid_exists=lambda pid: True)
    assert isinstance(row.used_bytes, Unavailable) and row.used_bytes.reason == ERROR
    assert str(H200_TOTAL_BYTES) in row.used_bytes.detail
    negative = check_row(ProcessRow(474, -1), H200_TOTAL_BYTES, pid_exists=lambda pid: True)
    assert negative.used_bytes.reason == ERROR


def test_used_greater_than_total_in_the_probe_is_an_error_reading():
    bogus = FakeProcess(474, H200_TOTAL_BYTES * 2)
    readings = as_dict(probe_for(ScriptedNvml(script=[DeviceState((bogus,), used_bytes=GiB)])).read())
    assert readings[("pid:474/gpu:0", "used_bytes")].reason == ERROR


def test_no_per_process_memory_is_not_supported_not_zero():
    row = check_row(ProcessRow(474, None), H200_TOTAL_BYTES, pid_exists=lambda pid: True)
    assert row.used_bytes == Unavailable(NOT_SUPPORTED, "NVML reports no per-process memory")


def test_process_utilization_is_asked_since_the_previous_tick():
    nvml = ScriptedNvml(script=[DeviceState((OWN,))])
    probe = probe_for(nvml)
    probe.read()
    probe.read()
    first, second = nvml.calls.since_us
    assert second > first


def test_a_tick_without_a_new_utilisation_sample_keeps_nvmls_last_one_for_its_sampling_period():
    """NVML samples a process's utilisation every 1/6 to 1 s: at 50 ms ticks most reads find no new
    sample. The process is not idle then (a 62 -> 0 -> 0 -> 62 flicker): the last sample stands for
    SM_HOLD_S, then 0 (NVML samples only processes that used the SMs)."""
    busy = FakeProcess(OWN.pid, OWN.used_bytes, OWN.name, sm_util_pct=62)
    quiet = FakeProcess(OWN.pid, OWN.used_bytes, OWN.name, sm_util_pct=None)  # no sample since the last query
    nvml = ScriptedNvml(script=[DeviceState((busy,)), DeviceState((quiet,)), DeviceState((quiet,)),
                                DeviceState((quiet,))])
    clock = FakeClockS()
    probe = probe_for(nvml, clock_s=clock)
    scope = (f"pid:{OWN.pid}/gpu:0", "sm_util_pct")
    seen = []
    for dt in (0.0, 1.0, GpuProbe.SM_HOLD_S - 1.0):  # the sample, then ticks without one up to the hold's end
        clock.now += dt
        seen.append(as_dict(probe.read())[scope])
        nvml.advance()
    assert seen == [62, 62, 62]  # held for exactly SM_HOLD_S
    clock.now += 0.001  # the sampling period has passed without a sample: idle
    assert as_dict(probe.read())[scope] == 0
    assert probe._last_sm == {}  # and the expired sample is dropped, not held forever


def test_a_new_utilisation_sample_restarts_the_hold():
    busy = FakeProcess(OWN.pid, OWN.used_bytes, OWN.name, sm_util_pct=62)
    busier = FakeProcess(OWN.pid, OWN.used_bytes, OWN.name, sm_util_pct=80)
    quiet = FakeProcess(OWN.pid, OWN.used_bytes, OWN.name, sm_util_pct=None)
    nvml = ScriptedNvml(script=[DeviceState((busy,)), DeviceState((busier,)), DeviceState((quiet,)),
                                DeviceState((quiet,))])
    clock = FakeClockS()
    probe = probe_for(nvml, clock_s=clock)
    scope = (f"pid:{OWN.pid}/gpu:0", "sm_util_pct")
    seen = []
    for dt in (0.0, 1.5, GpuProbe.SM_HOLD_S, 0.001):  # 80 at 1.5 s holds until 3.5 s; 3.501 s is past it
        clock.now += dt
        seen.append(as_dict(probe.read())[scope])
        nvml.advance()
    assert seen == [62, 80, 80, 0]


def test_older_drivers_answer_the_process_list_through_the_v2_call():
    """nvidia-ml-py's getter calls the driver's _v3 function only and raises NVMLLibraryMismatchError
    (not an NVMLError) on a driver without it: the backend asks the _v2 call instead."""
    import types

    from gpuscope.probes.nvml import PynvmlBackend

    class NVMLLibraryMismatchError(Exception):
        pass

    nv = types.ModuleType("pynvml")
    nv.NVMLError = type("NVMLError", (Exception,), {})

    def v3_missing(handle):
        raise NVMLLibraryMismatchError("nvmlDeviceGetComputeRunningProcesses_v3 is not in this driver")

    nv.nvmlDeviceGetHandleByIndex = lambda index: "handle"
    nv.nvmlDeviceGetComputeRunningProcesses = v3_missing
    nv.nvmlDeviceGetComputeRunningProcesses_v2 = lambda handle: [types.SimpleNamespace(pid=415, usedGpuMemory=6 * MiB)]
    nv.nvmlDeviceGetGraphicsRunningProcesses = v3_missing
    rows = PynvmlBackend(nv).running_processes(0)
    assert [(r.pid, r.used_bytes) for r in rows] == [(415, 6 * MiB)]


# -- the replay itself -----------------------------------------------------------------------------

def test_the_replay_keeps_the_cards_own_arithmetic_on_every_tick():
    replay = ReplayNvml()
    probe = probe_for(replay)
    for tick, line in enumerate(replay.lines):
        replay.goto(tick)
        readings = as_dict(probe.read())
        assert readings[("gpu:0", "used_bytes")] == line["dev_used"]
        assert readings[("gpu:0", "used_bytes")] + readings[("gpu:0", "free_bytes")] == readings[("gpu:0", "total_bytes")]
        assert readings[("gpu:0", "driver_reserved_bytes")] == H200_DRIVER_RESERVED_BYTES
        process_sum = sum(v for (s, m), v in readings.items() if s.startswith("pid:") and m == "used_bytes")
        # device used = the processes + the driver reserve (+ 9 to 14 MiB of per-process driver bookkeeping,
        # up to 27 MiB on a tick where NVML read the device and the process list at different instants)
        assert 0 <= readings[("gpu:0", "used_bytes")] - process_sum - H200_DRIVER_RESERVED_BYTES < 32 * MiB
    replay.advance(10)
    assert replay.state().used_bytes == replay.lines[-1]["dev_used"]  # the last line stays


def test_a_description_s_json_is_encoded_once_and_each_caller_gets_its_own_copy():
    info = ProcessInfo(474, True, "python3", Unavailable(NO_PERMISSION, "denied"), "python serve.py", ("torch",),
                       {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    first = info.to_json()
    first["engines"].append("jax")
    first["memory_env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    first["user"]["detail"] = "changed by a caller"
    first["pid"] = 1
    assert info.to_json() == {"pid": 474, "exists": True, "name": "python3",
                              "user": {"unavailable": NO_PERMISSION, "detail": "denied"}, "cmdline": "python serve.py",
                              "engines": ["torch"], "memory_env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}}
    assert info == ProcessInfo(474, True, "python3", Unavailable(NO_PERMISSION, "denied"), "python serve.py",
                               ("torch",), {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
