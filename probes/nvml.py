"""The NVML boundary: the only module that imports pynvml (package nvidia-ml-py).

Everything above talks to the narrow `NvmlBackend` protocol so tests can inject
a scripted fake or a replay of real readings (tests/fakes). A backend method
raises `MetricError` for one failing metric; probes turn that into
`Unavailable(reason)`. Failing to initialise at all raises `DeviceUnavailable`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from gpuscope.probes.readings import ERROR, NO_DEVICE, NO_PERMISSION, NOT_INITIALIZED, NOT_SUPPORTED, PROCESS_GONE


class DeviceUnavailable(Exception):
    """NVML cannot be used here at all (no library, no driver, no device)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class MetricError(Exception):
    """One metric could not be read; `reason` is one of probes.readings.REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class MemoryInfo:
    """Device memory. `reserved_bytes` is the driver's own reserve (memory info v2), or None on v1."""

    total_bytes: int
    used_bytes: int
    free_bytes: int
    reserved_bytes: int | None = None


@dataclass(frozen=True)
class ProcessRow:
    """One row of NVML's running-process list, as the binding returned it (not yet sanity-checked)."""

    pid: int
    used_bytes: int | None  # None: NVML says "not available" (e.g. no permission on Windows/WSL)


@runtime_checkable
class NvmlBackend(Protocol):
    """What gpuscope needs from NVML, nothing more. Indices are NVML device indices."""

    def device_count(self) -> int: ...
    def device_name(self, index: int) -> str: ...
    def device_uuid(self, index: int) -> str: ...
    def driver_version(self) -> str: ...
    def cuda_driver_version(self) -> str: ...
    def memory_info(self, index: int) -> MemoryInfo: ...
    def utilization_pct(self, index: int) -> tuple[int, int]: ...
    def running_processes(self, index: int) -> list[ProcessRow]: ...
    def process_utilization_pct(self, index: int, since_us: int) -> dict[int, int]: ...
    def process_name(self, pid: int) -> str: ...
    def shutdown(self) -> None: ...


def _reason_for(exc: Exception, pynvml: Any) -> str:
    """Map an NVMLError to one of our reasons."""
    code = getattr(exc, "value", None)
    table = {
        getattr(pynvml, "NVML_ERROR_NOT_SUPPORTED", -1): NOT_SUPPORTED,
        getattr(pynvml, "NVML_ERROR_NO_PERMISSION", -1): NO_PERMISSION,
        getattr(pynvml, "NVML_ERROR_UNINITIALIZED", -1): NOT_INITIALIZED,
        getattr(pynvml, "NVML_ERROR_GPU_IS_LOST", -1): NO_DEVICE,
        getattr(pynvml, "NVML_ERROR_NOT_FOUND", -1): PROCESS_GONE,
        getattr(pynvml, "NVML_ERROR_DRIVER_NOT_LOADED", -1): NO_DEVICE,
    }
    return table.get(code, ERROR)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class PynvmlBackend:
    """The real backend. Construct with `PynvmlBackend.open()`."""

    def __init__(self, pynvml: Any) -> None:
        self._nv = pynvml
        self._handles: dict[int, Any] = {}
        # Per device, the newest process-utilisation sample's own timestamp: NVML wants the timestamp of a
        # sample it returned, not our clock (samples can arrive after their timestamp and be skipped).
        self._util_cursor_us: dict[int, int] = {}

    @classmethod
    def open(cls) -> "PynvmlBackend":
        """Initialise NVML or raise DeviceUnavailable saying why."""
        try:
            import pynvml  # the nvidia-ml-py distribution
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise DeviceUnavailable(NO_DEVICE, f"pynvml is not installed ({exc})") from exc
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            raise DeviceUnavailable(NO_DEVICE, f"NVML could not start: {exc or type(exc).__name__} (no NVIDIA driver or GPU here)") from exc
        backend = cls(pynvml)
        try:
            count = backend.device_count()
        except MetricError as exc:
            raise DeviceUnavailable(exc.reason, f"NVML could not count devices: {exc}") from exc
        if count == 0:
            backend.shutdown()
            raise DeviceUnavailable(NO_DEVICE, "NVML found no GPU")
        return backend

    def _call(self, fn_name: str, *args: Any) -> Any:
        try:
            return getattr(self._nv, fn_name)(*args)
        except self._nv.NVMLError as exc:
            raise MetricError(_reason_for(exc, self._nv), f"{fn_name}: {exc}") from exc
        except AttributeError as exc:  # an old binding without this call
            raise MetricError(NOT_SUPPORTED, f"{fn_name} missing in this pynvml") from exc
        except Exception as exc:  # e.g. NVMLLibraryMismatchError, which is not an NVMLError
            raise MetricError(ERROR, f"{fn_name}: {type(exc).__name__}: {exc}") from exc

    def _handle(self, index: int) -> Any:
        if index not in self._handles:
            self._handles[index] = self._call("nvmlDeviceGetHandleByIndex", index)
        return self._handles[index]

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def device_name(self, index: int) -> str:
        return _text(self._call("nvmlDeviceGetName", self._handle(index)))

    def device_uuid(self, index: int) -> str:
        return _text(self._call("nvmlDeviceGetUUID", self._handle(index)))

    def driver_version(self) -> str:
        return _text(self._call("nvmlSystemGetDriverVersion"))

    def cuda_driver_version(self) -> str:
        version = int(self._call("nvmlSystemGetCudaDriverVersion"))
        return f"{version // 1000}.{(version % 1000) // 10}"

    def memory_info(self, index: int) -> MemoryInfo:
        handle = self._handle(index)
        v2 = getattr(self._nv, "nvmlMemory_v2", None)
        if v2 is not None:
            try:
                info = self._nv.nvmlDeviceGetMemoryInfo(handle, version=v2)
                # v2: `used` excludes the driver's reserve; report v1-style device used
                # (what nvidia-smi shows) and the reserve beside it.
                return MemoryInfo(int(info.total), int(info.used) + int(info.reserved), int(info.free), int(info.reserved))
            except (self._nv.NVMLError, TypeError):
                pass  # fall back to v1 (older drivers)
        info = self._call("nvmlDeviceGetMemoryInfo", handle)
        return MemoryInfo(int(info.total), int(info.used), int(info.free), None)

    def utilization_pct(self, index: int) -> tuple[int, int]:
        rates = self._call("nvmlDeviceGetUtilizationRates", self._handle(index))
        return int(rates.gpu), int(rates.memory)

    def running_processes(self, index: int) -> list[ProcessRow]:
        handle = self._handle(index)
        rows: dict[int, ProcessRow] = {}
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                procs = self._process_rows(getter, handle)
            except MetricError as exc:
                if getter.startswith("nvmlDeviceGetGraphics"):
                    continue  # graphics rows are optional on compute-only boards
                raise exc
            for proc in procs:
                used = getattr(proc, "usedGpuMemory", None)
                rows.setdefault(int(proc.pid), ProcessRow(int(proc.pid), None if used is None else int(used)))
        return list(rows.values())

    def _process_rows(self, getter: str, handle: Any) -> Any:
        """nvidia-ml-py's getter calls the driver's _v3 function only, and raises NVMLLibraryMismatchError
        (not an NVMLError) on a driver without it; the _v2 call still answers there."""
        try:
            return self._call(getter, handle)
        except MetricError as exc:
            if exc.reason not in (ERROR, NOT_SUPPORTED) or not hasattr(self._nv, getter + "_v2"):
                raise
            try:
                return self._call(getter + "_v2", handle)
            except MetricError:
                raise exc from None

    def process_utilization_pct(self, index: int, since_us: int) -> dict[int, int]:
        cursor = self._util_cursor_us.get(index, since_us)
        try:
            samples = self._call("nvmlDeviceGetProcessUtilization", self._handle(index), cursor)
        except MetricError as exc:
            if "NOT_FOUND" in str(exc).upper() or exc.reason == PROCESS_GONE:
                return {}  # no samples since `since_us`: nothing ran
            raise
        out: dict[int, int] = {}
        for sample in samples:  # clamped: drivers have been seen returning garbage above 100
            out[int(sample.pid)] = max(out.get(int(sample.pid), 0), min(100, max(0, int(sample.smUtil))))
            stamp = int(getattr(sample, "timeStamp", 0) or 0)
            if stamp > self._util_cursor_us.get(index, 0):
                self._util_cursor_us[index] = stamp
        return out

    def process_name(self, pid: int) -> str:
        return _text(self._call("nvmlSystemGetProcessName", pid))

    def shutdown(self) -> None:
        try:
            self._nv.nvmlShutdown()
        except Exception:
            pass


def open_backend() -> NvmlBackend:
    """The real backend, or DeviceUnavailable."""
    return PynvmlBackend.open()
