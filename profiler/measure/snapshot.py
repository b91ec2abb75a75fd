"""One snapshot of every GPU process on the node: what `ps` prints and `export` serves."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from gpuscope.probes import scopes
from gpuscope.probes.readings import Unavailable, is_available, reading_to_json
from gpuscope.probes.units import MiB, format_bytes

PS_SCHEMA = "gpuscope.ps/1"


UNLISTED_MIN_BYTES = 64 * MiB          # memory in use with nobody listed, beyond this, means hidden processes


UNLISTED_MIN_BYTES_NO_RESERVE = 1024 * MiB  # without memory info v2 an idle card already shows the driver's reserve


@dataclass
class PsProcess:
    pid: int
    gpu: int
    used_bytes: Any
    sm_util_pct: Any
    info: Any = None  # probes.processes.ProcessInfo, or None when it could not be described

    @property
    def engines(self) -> list[str]:
        engines = getattr(self.info, "engines", None)
        return list(engines) if isinstance(engines, tuple) else []

    def to_json(self) -> dict[str, Any]:
        base = self.info.to_json() if self.info is not None else {"pid": self.pid, "exists": None, "name": "?"}
        # the description is JSON already (ProcessInfo.to_json): only the readings are encoded here
        return {**base, "gpu": self.gpu, "used_bytes": reading_to_json(self.used_bytes),
                "sm_util_pct": reading_to_json(self.sm_util_pct)}


@dataclass
class PsDevice:
    index: int
    name: Any
    uuid: Any
    total_bytes: Any
    used_bytes: Any
    free_bytes: Any
    driver_reserved_bytes: Any
    util_pct: Any
    mem_util_pct: Any
    process_list: Any  # the count NVML listed, or Unavailable when the list could not be read
    processes: list[PsProcess] = field(default_factory=list)
    unlisted_bytes: int = 0
    flags: list[str] = field(default_factory=list)

    @property
    def engines(self) -> list[str]:
        found: list[str] = []
        for process in self.processes:
            found += [e for e in process.engines if e not in found]
        return found

    @property
    def shared(self) -> bool:
        return len(self.processes) > 1

    def to_json(self) -> dict[str, Any]:
        return reading_to_json({
            "index": self.index, "name": self.name, "uuid": self.uuid, "total_bytes": self.total_bytes,
            "used_bytes": self.used_bytes, "free_bytes": self.free_bytes,
            "driver_reserved_bytes": self.driver_reserved_bytes, "util_pct": self.util_pct,
            "mem_util_pct": self.mem_util_pct, "process_count": self.process_list, "shared": self.shared,
            "engines": self.engines, "unlisted_bytes": self.unlisted_bytes, "flags": list(self.flags),
            "processes": [p.to_json() for p in self.processes]})


@dataclass
class PsSnapshot:
    driver: Any
    cuda_driver: Any
    devices: list[PsDevice]
    notes: list[str] = field(default_factory=list)
    findings: list[Any] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        from gpuscope.record.run import sorted_findings

        return reading_to_json({"schema": PS_SCHEMA, "driver": self.driver, "cuda_driver": self.cuda_driver,
                                "devices": [d.to_json() for d in self.devices], "notes": list(self.notes),
                                "findings": [f.to_json() for f in sorted_findings(self.findings)]})


def _attempt(fn: Callable[[], Any]) -> Any:
    from gpuscope.probes.nvml import MetricError
    from gpuscope.probes.readings import ERROR

    try:
        return fn()
    except MetricError as exc:
        return Unavailable(exc.reason, exc.detail)
    except Exception as exc:
        return Unavailable(ERROR, f"{type(exc).__name__}: {exc}")


def snapshot_from_readings(devices: list[Any], values: list[tuple[str, str, Any]], processes: dict[int, Any],
                           driver: Any = None, cuda_driver: Any = None) -> PsSnapshot:
    """A snapshot from one GpuProbe tick: `devices` (GpuProbe.devices), its readings, and its described processes."""
    by_scope: dict[str, dict[str, Any]] = {}
    for scope, metric, value in values:
        by_scope.setdefault(scope, {})[metric] = value
    on_device: dict[int, list[tuple[int, dict[str, Any]]]] = {}  # gpu -> [(pid, its readings)], in tick order
    for scope, metrics in by_scope.items():
        parsed = scopes.parse(scope)
        if parsed.is_process_on_device:
            on_device.setdefault(parsed.gpu, []).append((parsed.pid, metrics))
    out: list[PsDevice] = []
    for info in devices:
        index = info.index
        figures = by_scope.get(scopes.device(index), {})
        missing = Unavailable("error", "not read")
        device = PsDevice(index=index, name=info.name, uuid=info.uuid,
                          total_bytes=figures.get("total_bytes", info.total_bytes),
                          used_bytes=figures.get("used_bytes", missing), free_bytes=figures.get("free_bytes", missing),
                          driver_reserved_bytes=figures.get("driver_reserved_bytes", missing),
                          util_pct=figures.get("util_pct", missing), mem_util_pct=figures.get("mem_util_pct", missing),
                          process_list=figures.get("process_count", missing))
        for pid, metrics in on_device.get(index, ()):
            device.processes.append(PsProcess(pid, index, metrics.get("used_bytes"), metrics.get("sm_util_pct"),
                                              processes.get(pid)))
        device.processes.sort(key=lambda p: (-(p.used_bytes if is_available(p.used_bytes) else -1), p.pid))
        out.append(device)
    snapshot = PsSnapshot(driver, cuda_driver, out)
    _flag(snapshot)
    return snapshot


def _flag(snapshot: PsSnapshot) -> None:
    """Device flags (shared, engines, hidden processes) and the notes that explain them."""
    for device in snapshot.devices:
        listed = device.process_list
        used, reserve = device.used_bytes, device.driver_reserved_bytes
        if is_available(listed) and listed == 0 and is_available(used):
            hidden = used - (reserve if is_available(reserve) else 0)
            threshold = UNLISTED_MIN_BYTES if is_available(reserve) else UNLISTED_MIN_BYTES_NO_RESERVE
            if hidden >= threshold:
                device.unlisted_bytes = int(hidden)
                device.flags.append("NO PROCESS ATTRIBUTION")
                snapshot.notes.append(
                    f"{scopes.device(device.index)}: NVML reports {format_bytes(hidden)} in use"
                    + (f" (beyond the driver's {format_bytes(reserve)} reserve)" if is_available(reserve) else "")
                    + " but lists no process. Attribution to processes is impossible here: this looks like a "
                    "container without the host's pid namespace, where NVML hides (or cannot map) the host pids "
                    "that hold the memory. Run with the host pid namespace (docker run --pid=host; hostPID: true "
                    "in Kubernetes) or run gpuscope ps on the host.")
        foreign = [p for p in device.processes if p.info is not None and p.info.exists is False]
        if foreign:
            device.flags.append("PIDS OUTSIDE THIS NAMESPACE")
            snapshot.notes.append(
                f"{scopes.device(device.index)}: NVML lists pid{'s' if len(foreign) != 1 else ''} "
                f"{', '.join(str(p.pid) for p in foreign[:6])} that this pid namespace does not have: NVML reports "
                "host pids, so their user, command line and engines cannot be read here (run with --pid=host).")
        if not is_available(listed):
            snapshot.notes.append(f"{scopes.device(device.index)}: the process list could not be read ({listed}).")
        if device.shared:
            device.flags.append(f"SHARED by {len(device.processes)} processes")
        engines = device.engines
        multi = [p for p in device.processes if len(p.engines) >= 2]
        if len(engines) >= 2 or multi:
            device.flags.append("ENGINES " + "+".join(engines))


def snapshot_record(snapshot: PsSnapshot) -> Any:
    """A RunRecord of one instant with no profiled process, for the process-level and device-level rules."""
    from gpuscope import __version__
    from gpuscope.record.run import RunRecord

    record = RunRecord(tool_version=__version__, started_at="", mode="ps", pid=0)
    record.config = {"device": "none", "gpu_index": None}
    record.devices = [{"index": d.index, "name": d.name, "uuid": d.uuid, "total_bytes": d.total_bytes}
                      for d in snapshot.devices]
    record.processes = []
    for device in snapshot.devices:
        for process in device.processes:
            entry = process.to_json()
            entry.update({"self": False, "child": False, "peak_used_bytes": entry.pop("used_bytes", None),
                          "peak_sm_util_pct": entry.pop("sm_util_pct", None)})
            record.processes.append(entry)
    unlisted = max((d.unlisted_bytes for d in snapshot.devices), default=0)
    record.extra = {"pid_namespace": {"unlisted_used_bytes": unlisted, "self_not_listed": False},
                    "live": {"target_pid": None, "gpu_index": None, "series": {},
                             "devices": [{"index": d.index, "total_bytes": d.total_bytes,
                                          "peak_used_bytes": d.used_bytes, "last_used_bytes": d.used_bytes}
                                         for d in snapshot.devices]}}
    return record


def snapshot_findings(snapshot: PsSnapshot) -> list[Any]:
    """Findings that hold for this instant: engines, preallocation, headroom, hidden processes."""
    from gpuscope.analysis.live_rules import live_findings

    return live_findings(snapshot_record(snapshot))


def collect(backend: Any, describe: Callable[[int, str], Any] | None = None,
            pid_exists: Callable[[int], bool] | None = None) -> PsSnapshot:
    """One reading of every device and process through `backend` (an NvmlBackend), with findings."""
    from gpuscope.probes.gpu import GpuProbe

    probe = GpuProbe(backend, describe=describe, pid_exists=pid_exists)
    values = probe.read()
    probe.drain_events()
    driver = probe.devices[0].driver if probe.devices else _attempt(backend.driver_version)
    snapshot = snapshot_from_readings(probe.devices, values, probe.processes, driver,
                                      _attempt(backend.cuda_driver_version))
    snapshot.findings = snapshot_findings(snapshot)
    return snapshot
