"""`gpuscope ps [--json]`: every GPU, its memory and utilisation, and every process on it, on one screen.

Like nvidia-smi's process table, plus what it leaves out: who owns each
process, its command line (secrets redacted), which GPU engines it has
loaded (from /proc/PID/maps where readable) and their memory variables, and
flags for devices shared by several processes or engines. Where NVML shows
memory in use but no process (a container without the host pid namespace),
it says attribution is impossible here, and why, instead of showing an empty
table that looks like an idle card.

`collect(backend)` takes any NvmlBackend (tests pass ScriptedNvml/ReplayNvml);
`snapshot_from_readings()` turns one GpuProbe tick into the same snapshot, which
the Prometheus exporter reuses at every scrape.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from probes.redact import printable
from probes.readings import Unavailable, is_available, reading_to_json
from probes.units import MiB, format_bytes
from profiler.errors import EXIT_OK, EXIT_USAGE

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
        return reading_to_json({**base, "gpu": self.gpu, "used_bytes": self.used_bytes,
                                "sm_util_pct": self.sm_util_pct})


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
        from profiler.run import sorted_findings

        return reading_to_json({"schema": PS_SCHEMA, "driver": self.driver, "cuda_driver": self.cuda_driver,
                                "devices": [d.to_json() for d in self.devices], "notes": list(self.notes),
                                "findings": [f.to_json() for f in sorted_findings(self.findings)]})


def _attempt(fn: Callable[[], Any]) -> Any:
    from probes.nvml import MetricError
    from probes.readings import ERROR

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
    out: list[PsDevice] = []
    for info in devices:
        index = info.index
        figures = by_scope.get(f"gpu:{index}", {})
        missing = Unavailable("error", "not read")
        device = PsDevice(index=index, name=info.name, uuid=info.uuid,
                          total_bytes=figures.get("total_bytes", info.total_bytes),
                          used_bytes=figures.get("used_bytes", missing), free_bytes=figures.get("free_bytes", missing),
                          driver_reserved_bytes=figures.get("driver_reserved_bytes", missing),
                          util_pct=figures.get("util_pct", missing), mem_util_pct=figures.get("mem_util_pct", missing),
                          process_list=figures.get("process_count", missing))
        suffix = f"/gpu:{index}"
        for scope, metrics in by_scope.items():
            if not (scope.startswith("pid:") and scope.endswith(suffix)):
                continue
            try:
                pid = int(scope[4:-len(suffix)])
            except ValueError:
                continue
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
                    f"gpu:{device.index}: NVML reports {format_bytes(hidden)} in use"
                    + (f" (beyond the driver's {format_bytes(reserve)} reserve)" if is_available(reserve) else "")
                    + " but lists no process. Attribution to processes is impossible here: this looks like a "
                    "container without the host's pid namespace, where NVML hides (or cannot map) the host pids "
                    "that hold the memory. Run with the host pid namespace (docker run --pid=host; hostPID: true "
                    "in Kubernetes) or run gpuscope ps on the host.")
        foreign = [p for p in device.processes if p.info is not None and p.info.exists is False]
        if foreign:
            device.flags.append("PIDS OUTSIDE THIS NAMESPACE")
            snapshot.notes.append(
                f"gpu:{device.index}: NVML lists pid{'s' if len(foreign) != 1 else ''} "
                f"{', '.join(str(p.pid) for p in foreign[:6])} that this pid namespace does not have: NVML reports "
                "host pids, so their user, command line and engines cannot be read here (run with --pid=host).")
        if not is_available(listed):
            snapshot.notes.append(f"gpu:{device.index}: the process list could not be read ({listed}).")
        if device.shared:
            device.flags.append(f"SHARED by {len(device.processes)} processes")
        engines = device.engines
        multi = [p for p in device.processes if len(p.engines) >= 2]
        if len(engines) >= 2 or multi:
            device.flags.append("ENGINES " + "+".join(engines))


def snapshot_record(snapshot: PsSnapshot) -> Any:
    """A RunRecord of one instant with no profiled process, for the process-level and device-level rules."""
    from profiler import __version__
    from profiler.run import RunRecord

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
    from profiler.watch_findings import live_findings

    return live_findings(snapshot_record(snapshot))


def collect(backend: Any, describe: Callable[[int, str], Any] | None = None,
            pid_exists: Callable[[int], bool] | None = None) -> PsSnapshot:
    """One reading of every device and process through `backend` (an NvmlBackend), with findings."""
    from probes.gpu import GpuProbe

    probe = GpuProbe(backend, describe=describe, pid_exists=pid_exists)
    values = probe.read()
    probe.drain_events()
    driver = probe.devices[0].driver if probe.devices else _attempt(backend.driver_version)
    snapshot = snapshot_from_readings(probe.devices, values, probe.processes, driver,
                                      _attempt(backend.cuda_driver_version))
    snapshot.findings = snapshot_findings(snapshot)
    return snapshot


# ---------------------------------------------------------------- the table

def _na(value: Any, kind: str = "bytes") -> str:
    if not is_available(value):
        return "n/a"
    if kind == "bytes":
        return format_bytes(value)
    return f"{value:.0f}%"


def _engines_text(info: Any) -> str:
    engines = getattr(info, "engines", None)
    if isinstance(engines, tuple):
        return ",".join(engines) if engines else "-"
    if isinstance(engines, Unavailable):
        return {"no_permission": "(no access)", "process_gone": "(not here)"}.get(engines.reason, "n/a")
    return "n/a"


def _clip(text: str, width: int | None) -> str:
    if width is None or len(text) <= width:
        return text
    return text[: max(0, width - 3)] + "..."


def format_table(snapshot: PsSnapshot, width: int | None = None) -> str:
    """The one-screen table. `width` clips command lines to a terminal's width (None: never clip)."""
    from profiler.run import sorted_findings
    from profiler.summary import _MARK

    count = len(snapshot.devices)
    lines = [f"gpuscope ps: {count} GPU{'s' if count != 1 else ''}, driver {printable(_text(snapshot.driver))}, "
             f"CUDA {printable(_text(snapshot.cuda_driver))}"]
    for device in snapshot.devices:
        total, used, free = device.total_bytes, device.used_bytes, device.free_bytes
        share = f" ({used / total:.0%})" if is_available(used) and is_available(total) and total else ""
        head = (f"GPU {device.index}  {printable(_text(device.name))}  memory {_na(used)} used{share} of {_na(total)}, "
                f"{_na(free)} free")
        if is_available(device.driver_reserved_bytes):
            head += f" (driver reserve {format_bytes(device.driver_reserved_bytes)})"
        head += f"  util {_na(device.util_pct, 'pct')}  mem util {_na(device.mem_util_pct, 'pct')}"
        lines += ["", head]
        if device.flags:
            lines.append("  ! " + "; ".join(device.flags))
        if not device.processes:
            if device.unlisted_bytes:
                lines.append(f"  no process listed, yet {format_bytes(device.unlisted_bytes)} is in use (see below)")
            elif is_available(device.process_list):
                lines.append("  no processes")
            else:
                missing = device.process_list
                why = f"{missing.reason}: {missing.detail}" if isinstance(missing, Unavailable) and missing.detail \
                    else getattr(missing, "reason", str(missing))
                lines.append(f"  process list unavailable ({printable(why)})")
            continue
        pods = any(isinstance(getattr(q.info, k, None), str) for q in device.processes
                   for k in ("pod_uid", "container_id"))  # pod columns only on a node that has pods
        lines.append(f"  {'PID':>8} {'USER':<10} {'NAME':<20} {'GPU MEM':>10} {'SM':>4}  {'ENGINES':<16} "
                     + (f"{'POD':<36} {'CONTAINER':<12} " if pods else "") + "COMMAND")
        for p in device.processes:
            info = p.info
            user = getattr(info, "user", None)
            user_text = user if isinstance(user, str) else "?"
            cmd = getattr(info, "cmdline", None)
            cmd_text = cmd if isinstance(cmd, str) else (f"({cmd.reason})" if isinstance(cmd, Unavailable) else "?")
            name = getattr(info, "name", "?") or "?"
            engines = _engines_text(info)
            if len(p.engines) >= 2:
                engines += " !"
            row = (f"  {p.pid:>8} {_clip(printable(user_text), 10):<10} {_clip(printable(name), 20):<20} "
                   f"{_na(p.used_bytes):>10} {_na(p.sm_util_pct, 'pct'):>4}  {_clip(engines, 16):<16} ")
            if pods:
                row += f"{_container_text(info, 'pod_uid', 36):<36} {_container_text(info, 'container_id', 12):<12} "
            lines.append(row + _clip(printable(cmd_text), None if width is None else max(20, width - len(row))))
    for note in snapshot.notes:
        lines += ["", "note: " + printable(note)]
    findings = [f for f in sorted_findings(snapshot.findings) if f.severity in ("warn", "fail")]
    if findings:
        lines += ["", f"findings ({len(findings)}):"]
        for finding in findings:
            lines.append(f"  {_MARK.get(finding.severity, finding.severity):<4} {finding.code}: {printable(finding.title)}")
    return "\n".join(lines)


def _container_text(info: Any, key: str, width: int) -> str:
    """A pod uid or a container id (short, as `docker ps` and `crictl ps` show it); '-' in none, '?' unread."""
    value = getattr(info, key, None)
    if isinstance(value, str):
        return printable(value)[:width]
    return "?" if isinstance(value, Unavailable) else "-"


def _text(value: Any) -> str:
    return str(value) if not isinstance(value, Unavailable) else "n/a"


# ---------------------------------------------------------------- the command

def run_ps(json_output: bool = False, opener: Callable[[], Any] | None = None,
           describe: Callable[[int, str], Any] | None = None, pid_exists: Callable[[int], bool] | None = None,
           out: TextIO | None = None, err: TextIO | None = None, width: int | None = None) -> int:
    """`gpuscope ps`: print the table (or JSON); without a GPU, one line on stderr and exit code 2.

    `opener` returns an NvmlBackend or raises probes.nvml.DeviceUnavailable (default: the real NVML).
    """
    from probes.nvml import DeviceUnavailable, MetricError, open_backend

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        backend = (opener or open_backend)()
    except DeviceUnavailable as exc:
        err.write(f"gpuscope ps: no GPU here: {exc.detail}\n")
        return EXIT_USAGE
    try:
        snapshot = collect(backend, describe=describe, pid_exists=pid_exists)
    except MetricError as exc:  # NVML started but cannot even count its devices
        err.write(f"gpuscope ps: NVML failed: {exc} ({exc.reason})\n")
        return EXIT_USAGE
    finally:
        try:
            backend.shutdown()
        except Exception:
            pass
    if not snapshot.devices:  # a driver without a visible GPU (CUDA_VISIBLE_DEVICES="", a container without one)
        err.write("gpuscope ps: no GPU here: NVML started but sees no device\n")
        return EXIT_USAGE
    if json_output:
        out.write(json.dumps(snapshot.to_json(), indent=2, default=str) + "\n")
    else:
        if width is None and getattr(out, "isatty", lambda: False)():
            import shutil

            width = shutil.get_terminal_size((160, 24)).columns
        out.write(format_table(snapshot, width) + "\n")
    return EXIT_OK
