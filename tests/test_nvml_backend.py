"""The NVML boundary: PynvmlBackend against the real library (no driver here) and a small fake pynvml module.

PynvmlBackend takes the pynvml module as a constructor argument, so the fake
module is passed in; no import path is patched. The fake returns the shapes
the real bindings returned on the H200 (raw-h200-2026-11-26.json).
"""
from __future__ import annotations

import os
import types
from typing import Any

import pynvml as real_pynvml
import pytest

from gpuscope.probes.nvml import DeviceUnavailable, MemoryInfo, MetricError, NvmlBackend, ProcessRow, PynvmlBackend
from gpuscope.probes.readings import ERROR, NO_DEVICE, NO_PERMISSION, NOT_INITIALIZED, NOT_SUPPORTED, PROCESS_GONE
from tests.fakes.nvml import H200_DRIVER_RESERVED_BYTES, H200_TOTAL_BYTES, ReplayNvml, ScriptedNvml


class FakeNVMLError(Exception):
    """Like pynvml.NVMLError: carries the NVML return code in `value`."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return f"NVML error code {self.value}"


def fake_pynvml(raw: dict[str, Any], errors: dict[str, int] | None = None, *, v2: bool = True,
                v2_kwarg: bool = True, graphics: bool = True) -> types.ModuleType:
    """A stand-in pynvml module answering with the H200's raw readings.

    errors: function name -> NVML return code it raises. v2: whether the binding
    knows memory info v2; v2_kwarg: whether nvmlDeviceGetMemoryInfo takes `version`.
    """
    errors = errors or {}
    nv = types.ModuleType("pynvml")
    nv.NVMLError = FakeNVMLError
    for name in ("NVML_ERROR_UNINITIALIZED", "NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_NO_PERMISSION",
                 "NVML_ERROR_NOT_FOUND", "NVML_ERROR_GPU_IS_LOST", "NVML_ERROR_DRIVER_NOT_LOADED",
                 "NVML_ERROR_UNKNOWN"):
        setattr(nv, name, getattr(real_pynvml, name))  # the real codes
    nv.calls = []

    def fn(name: str, result: Any) -> None:
        def call(*args: Any, **kwargs: Any) -> Any:
            nv.calls.append((name, args, kwargs))
            if name in errors:
                raise FakeNVMLError(errors[name])
            return result(*args, **kwargs) if callable(result) else result
        setattr(nv, name, call)

    rows = [types.SimpleNamespace(**row) for row in raw["procs_struct"]]
    fn("nvmlInit", None)
    fn("nvmlShutdown", None)
    fn("nvmlDeviceGetCount", 1)
    fn("nvmlDeviceGetHandleByIndex", lambda index: f"handle{index}")
    fn("nvmlDeviceGetName", b"NVIDIA H200")
    fn("nvmlDeviceGetUUID", "GPU-5f1b0c1e-aaaa-bbbb-cccc-0123456789ab")
    fn("nvmlSystemGetDriverVersion", b"580.159.04")
    fn("nvmlSystemGetCudaDriverVersion", 13000)
    fn("nvmlDeviceGetUtilizationRates", types.SimpleNamespace(**raw["util"]))
    fn("nvmlDeviceGetComputeRunningProcesses", rows)
    if graphics:
        fn("nvmlDeviceGetGraphicsRunningProcesses", [])
    fn("nvmlDeviceGetProcessUtilization",
       [types.SimpleNamespace(pid=415, smUtil=62, memUtil=27, timeStamp=1),
        types.SimpleNamespace(pid=576, smUtil=1, memUtil=0, timeStamp=1),
        types.SimpleNamespace(pid=415, smUtil=70, memUtil=30, timeStamp=2)])
    fn("nvmlSystemGetProcessName", "python3")
    if v2:
        nv.nvmlMemory_v2 = real_pynvml.nvmlMemory_v2

    if v2_kwarg:
        def memory(handle: Any, version: Any = None) -> Any:
            return types.SimpleNamespace(**(raw["mem_v2"] if version == real_pynvml.nvmlMemory_v2 else raw["mem_v1"]))
    else:  # an old binding: no `version` argument
        def memory(handle: Any) -> Any:
            return types.SimpleNamespace(**raw["mem_v1"])
    fn("nvmlDeviceGetMemoryInfo", memory)
    return nv


# -- the real library on a machine without a driver ----------------------------------------------

def test_open_without_a_driver_raises_device_unavailable_no_device():
    try:
        backend = PynvmlBackend.open()
    except DeviceUnavailable as exc:
        assert exc.reason == NO_DEVICE
        message = str(exc)
        assert message == exc.detail
        assert message.startswith("NVML could not start: ")
        assert "no NVIDIA driver or GPU here" in message
        assert isinstance(exc.__cause__, real_pynvml.NVMLError)
        return
    backend.shutdown()
    pytest.skip("an NVIDIA driver and GPU are present here; the no-driver path cannot be exercised")


# -- memory info v1/v2 ----------------------------------------------------------------------------

def test_memory_info_v2_reports_v1_style_used_and_the_driver_reserve(h200_raw):
    backend = PynvmlBackend(fake_pynvml(h200_raw))
    info = backend.memory_info(0)
    v1, v2 = h200_raw["mem_v1"], h200_raw["mem_v2"]
    assert info == MemoryInfo(v2["total"], v2["used"] + v2["reserved"], v2["free"], v2["reserved"])
    assert info.used_bytes == v1["used"]  # what nvidia-smi shows
    assert info.reserved_bytes == H200_DRIVER_RESERVED_BYTES
    assert info.used_bytes + info.free_bytes == info.total_bytes == H200_TOTAL_BYTES


def test_memory_info_falls_back_to_v1_when_the_binding_takes_no_version(h200_raw):
    backend = PynvmlBackend(fake_pynvml(h200_raw, v2_kwarg=False))
    info = backend.memory_info(0)
    assert info == MemoryInfo(h200_raw["mem_v1"]["total"], h200_raw["mem_v1"]["used"], h200_raw["mem_v1"]["free"], None)


def test_memory_info_falls_back_to_v1_when_the_binding_lacks_v2(h200_raw):
    nv = fake_pynvml(h200_raw, v2=False)
    info = PynvmlBackend(nv).memory_info(0)
    assert info.reserved_bytes is None
    assert info.used_bytes == h200_raw["mem_v1"]["used"]
    assert all("version" not in kwargs for name, _, kwargs in nv.calls if name == "nvmlDeviceGetMemoryInfo")


def test_memory_info_fails_as_metric_error_when_both_versions_fail(h200_raw):
    nv = fake_pynvml(h200_raw, errors={"nvmlDeviceGetMemoryInfo": real_pynvml.NVML_ERROR_GPU_IS_LOST})
    with pytest.raises(MetricError) as info:
        PynvmlBackend(nv).memory_info(0)
    assert info.value.reason == NO_DEVICE
    assert "nvmlDeviceGetMemoryInfo" in info.value.detail


# -- error codes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, reason", [
    (real_pynvml.NVML_ERROR_NOT_SUPPORTED, NOT_SUPPORTED),
    (real_pynvml.NVML_ERROR_NO_PERMISSION, NO_PERMISSION),
    (real_pynvml.NVML_ERROR_UNINITIALIZED, NOT_INITIALIZED),
    (real_pynvml.NVML_ERROR_GPU_IS_LOST, NO_DEVICE),
    (real_pynvml.NVML_ERROR_DRIVER_NOT_LOADED, NO_DEVICE),
    (real_pynvml.NVML_ERROR_NOT_FOUND, PROCESS_GONE),
    (real_pynvml.NVML_ERROR_UNKNOWN, ERROR),
])
def test_nvml_error_codes_map_to_reasons(h200_raw, code, reason):
    backend = PynvmlBackend(fake_pynvml(h200_raw, errors={"nvmlDeviceGetUtilizationRates": code}))
    with pytest.raises(MetricError) as info:
        backend.utilization_pct(0)
    assert info.value.reason == reason
    assert info.value.detail.startswith("nvmlDeviceGetUtilizationRates: ")
    assert backend.memory_info(0).total_bytes == H200_TOTAL_BYTES  # one failing metric leaves the others


def test_a_call_missing_from_an_old_binding_is_not_supported(h200_raw):
    nv = fake_pynvml(h200_raw)
    del nv.nvmlSystemGetCudaDriverVersion
    with pytest.raises(MetricError) as info:
        PynvmlBackend(nv).cuda_driver_version()
    assert info.value.reason == NOT_SUPPORTED
    assert "missing in this pynvml" in info.value.detail


# -- processes --------------------------------------------------------------------------------------

def test_running_processes_read_the_real_row_shape(h200_raw):
    rows = PynvmlBackend(fake_pynvml(h200_raw)).running_processes(0)
    assert rows == [ProcessRow(474, 641_728_512)]  # 612 MiB: the CUDA context of a fresh torch process


def test_graphics_process_getter_missing_still_gives_compute_rows(h200_raw):
    nv = fake_pynvml(h200_raw, graphics=False)
    assert not hasattr(nv, "nvmlDeviceGetGraphicsRunningProcesses")
    assert PynvmlBackend(nv).running_processes(0) == [ProcessRow(474, 641_728_512)]


def test_graphics_process_getter_not_supported_still_gives_compute_rows(h200_raw):
    nv = fake_pynvml(h200_raw, errors={"nvmlDeviceGetGraphicsRunningProcesses": real_pynvml.NVML_ERROR_NOT_SUPPORTED})
    assert PynvmlBackend(nv).running_processes(0) == [ProcessRow(474, 641_728_512)]


def test_compute_process_getter_failing_is_an_error(h200_raw):
    nv = fake_pynvml(h200_raw, errors={"nvmlDeviceGetComputeRunningProcesses": real_pynvml.NVML_ERROR_NO_PERMISSION})
    with pytest.raises(MetricError) as info:
        PynvmlBackend(nv).running_processes(0)
    assert info.value.reason == NO_PERMISSION


def test_a_pid_in_both_lists_is_one_row_and_unknown_memory_is_none(h200_raw):
    nv = fake_pynvml(h200_raw)
    nv.nvmlDeviceGetGraphicsRunningProcesses = lambda handle: [
        types.SimpleNamespace(pid=474, usedGpuMemory=1), types.SimpleNamespace(pid=900, usedGpuMemory=None)]
    rows = PynvmlBackend(nv).running_processes(0)
    assert rows == [ProcessRow(474, 641_728_512), ProcessRow(900, None)]


def test_process_utilization_keeps_each_pids_highest_sample(h200_raw):
    backend = PynvmlBackend(fake_pynvml(h200_raw))
    assert backend.process_utilization_pct(0, since_us=0) == {415: 70, 576: 1}


def test_process_utilization_with_no_samples_since_is_empty_not_an_error(h200_raw):
    nv = fake_pynvml(h200_raw, errors={"nvmlDeviceGetProcessUtilization": real_pynvml.NVML_ERROR_NOT_FOUND})
    assert PynvmlBackend(nv).process_utilization_pct(0, since_us=0) == {}


def test_process_utilization_not_supported_is_raised(h200_raw):
    nv = fake_pynvml(h200_raw, errors={"nvmlDeviceGetProcessUtilization": real_pynvml.NVML_ERROR_NOT_SUPPORTED})
    with pytest.raises(MetricError) as info:
        PynvmlBackend(nv).process_utilization_pct(0, since_us=0)
    assert info.value.reason == NOT_SUPPORTED


# -- identity ---------------------------------------------------------------------------------------

def test_names_versions_and_cached_handles(h200_raw):
    nv = fake_pynvml(h200_raw)
    backend = PynvmlBackend(nv)
    assert backend.device_count() == 1
    assert backend.device_name(0) == "NVIDIA H200"  # bytes decoded
    assert backend.device_uuid(0).startswith("GPU-")
    assert backend.driver_version() == "580.159.04"
    assert backend.cuda_driver_version() == "13.0"
    assert backend.process_name(474) == "python3"
    assert sum(1 for name, _, _ in nv.calls if name == "nvmlDeviceGetHandleByIndex") == 1


@pytest.mark.parametrize("raw_version, text", [(13000, "13.0"), (12080, "12.8"), (11040, "11.4")])
def test_cuda_driver_version_is_formatted_major_minor(h200_raw, raw_version, text):
    nv = fake_pynvml(h200_raw)
    nv.nvmlSystemGetCudaDriverVersion = lambda: raw_version
    assert PynvmlBackend(nv).cuda_driver_version() == text


def test_shutdown_swallows_errors(h200_raw):
    nv = fake_pynvml(h200_raw, errors={"nvmlShutdown": real_pynvml.NVML_ERROR_UNINITIALIZED})
    PynvmlBackend(nv).shutdown()


def test_every_backend_satisfies_the_protocol(h200_raw):
    for backend in (PynvmlBackend(fake_pynvml(h200_raw)), ScriptedNvml(), ReplayNvml()):
        assert isinstance(backend, NvmlBackend)


def test_only_probes_nvml_imports_pynvml():
    probes_dir = os.path.join(os.path.dirname(__file__), os.pardir, "probes")
    importers = []
    for name in sorted(os.listdir(probes_dir)):
        if name.endswith(".py") and name != "nvml.py":
            with open(os.path.join(probes_dir, name), encoding="utf-8") as fh:
                if "import pynvml" in fh.read():
                    importers.append(name)
    assert importers == []


def test_process_utilization_asks_from_the_newest_sample_nvml_returned(h200_raw):
    # NVML wants the timestamp of a sample it returned, not our clock: samples may arrive after their
    # own timestamp, and a host-clock cursor would skip them (SM use would read 0).
    nv = fake_pynvml(h200_raw)
    backend = PynvmlBackend(nv)
    backend.process_utilization_pct(0, since_us=1_000)
    backend.process_utilization_pct(0, since_us=9_999_999)
    cursors = [args[1] for name, args, _ in nv.calls if name == "nvmlDeviceGetProcessUtilization"]
    assert cursors == [1_000, 2]  # the first call uses the caller's start; then the newest sample's timeStamp


def test_a_non_nvml_error_from_the_binding_becomes_a_metric_error(h200_raw):
    nv = fake_pynvml(h200_raw)

    def mismatch(*args, **kwargs):
        raise RuntimeError("NVMLLibraryMismatchError: the driver is older than the binding")

    nv.nvmlDeviceGetComputeRunningProcesses = mismatch
    with pytest.raises(MetricError) as info:
        PynvmlBackend(nv).running_processes(0)
    assert info.value.reason == "error" and "Mismatch" in str(info.value)
