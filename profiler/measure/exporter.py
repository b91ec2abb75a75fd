"""Prometheus metrics for `gpuscope watch --prometheus-port` and `gpuscope export --port`.

A custom prometheus-client Collector over a registry of our own (never the
library's global one, which would also publish this process's Python/GC
metrics and clash with a host application's): at each scrape it turns the
latest tick (a `LiveView`) into gauges. `watch` hands it the view its loop
just produced; `export` reads NVML at scrape time (cached for `min_interval_s`
so a burst of scrapers cannot hammer the driver).

The endpoint binds to 127.0.0.1 unless `--bind` says otherwise: process names
and command-line-derived labels are information about the node.

`export` never exits because NVML is missing or failing (profiler/nvml_retry.py): it
serves `gpuscope_nvml_available 0` with the reason, retries with backoff, and
recovers. Every endpoint also answers /healthz (profiler/http_endpoint.py).
The default port, 9840, is not the default of any exporter commonly run on a GPU
node (node-exporter 9100, dcgm-exporter 9400, nvidia_gpu_exporter 9835,
process-exporter 9256, kube-state-metrics and cAdvisor 8080, kubelet 10250/10255).

Metrics (bytes and ratios in 0..1, Prometheus naming):
  gpuscope_nvml_available                          1 when NVML answered the last reading (0: not started,
                                                   or every device reading failed, as when a GPU is lost)
  gpuscope_nvml_info{reason,detail}                1; reason "ok" while available, else why not (a
                                                   probes.readings reason) and the driver's words
  gpuscope_device_info{gpu,name,uuid}              1
  gpuscope_device_memory_{total,used,free}_bytes{gpu}
  gpuscope_device_driver_reserved_bytes{gpu}
  gpuscope_device_utilization_ratio{gpu}           SM busy share (NVML utilization.gpu / 100)
  gpuscope_device_memory_utilization_ratio{gpu}    memory controller busy share
  gpuscope_device_processes{gpu}                   processes NVML lists on the device
  gpuscope_process_gpu_memory_bytes{gpu,pid,name,engine,role,pod_uid,container_id}
  gpuscope_process_sm_utilization_ratio{gpu,pid,name,role,pod_uid,container_id}
                                                   pod_uid/container_id from /proc/PID/cgroup, '' when none
  gpuscope_target_resident_memory_bytes{pid,name}  (watch only) RSS of the watched process
  gpuscope_target_cpu_utilization_ratio{pid,name}  (watch only) CPU time share, 1.0 = one core
  gpuscope_target_threads{pid,name}                (watch only)
  gpuscope_findings_active{code}                   active findings by code (0 for every known code)
  gpuscope_finding_severity{code}                  worst severity: 0 none, 1 info, 2 warn, 3 fail
Readings that could not be taken are left out, never exported as 0.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from gpuscope.probes import scopes
from gpuscope.probes.readings import NOT_INITIALIZED, Unavailable, is_available
from gpuscope.record.catalogue import KNOWN_CODES, SEVERITY_LEVEL
from gpuscope.record.errors import UsageError

DEFAULT_PORT = 9840
MAX_LABEL_CHARS = 120


@dataclass
class LiveView:
    """One tick as the exporter sees it."""

    devices: list[dict[str, Any]]                # DeviceInfo.to_json() per device
    values: list[tuple[str, str, Any]]           # the tick's readings (scope, metric, value)
    processes: dict[int, Any] = field(default_factory=dict)  # pid -> probes.processes.ProcessInfo
    findings: list[Any] = field(default_factory=list)         # gpuscope.record.run.Finding
    target_pid: int | None = None
    nvml_available: bool = True
    device_unavailable: dict[str, str] | None = None
    children: set[int] = field(default_factory=set)


def nvml_answered(values: list[tuple[str, str, Any]]) -> bool:
    """Whether NVML gave this tick any device reading: a GPU that fell off the bus leaves NVML open
    but every call failing, which must read as gpuscope_nvml_available 0, not as an idle node."""
    return any(scopes.parse(scope).is_device and metric == "used_bytes" and is_available(value)
               for scope, metric, value in values)


def _label(value: Any) -> str:
    text = "" if value is None else str(value) if not isinstance(value, dict) else ""
    if not text.isprintable():  # the usual label is printable: no step per character for it
        text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text[:MAX_LABEL_CHARS]


def _engine_label(info: Any) -> str:
    engines = getattr(info, "engines", None)
    if isinstance(engines, tuple):
        return ",".join(engines) if engines else "none"
    return "unknown"


def lost_reason(values: list[tuple[str, str, Any]]) -> dict[str, str]:
    """Why a tick has no device reading: the first device's Unavailable, as {reason, detail}."""
    for scope, metric, value in values:
        if scopes.parse(scope).is_device and metric == "used_bytes" and isinstance(value, Unavailable):
            return {"reason": value.reason, "detail": value.detail}
    return {"reason": NOT_INITIALIZED, "detail": "NVML gave no device reading"}


def _container_label(info: Any, key: str) -> str:
    """pod_uid/container_id from /proc/PID/cgroup; '' (no label, to Prometheus) in none or unread."""
    value = getattr(info, key, None)
    return _label(value) if isinstance(value, str) else ""


def _nvml_status(view: LiveView | None) -> list[str]:
    """[reason, detail] for gpuscope_nvml_info."""
    if view is None:
        return ["not_initialized", "no reading yet"]
    if view.nvml_available:
        return ["ok", ""]
    why = view.device_unavailable
    if not why:
        why = lost_reason(view.values)
    return [_label(why.get("reason")) or "error", _label(why.get("detail"))]


class GpuscopeCollector:
    """prometheus-client collector: `collect()` yields metric families from `source()` (a LiveView or None)."""

    def __init__(self, source: Callable[[], LiveView | None]) -> None:
        self._source = source
        # The families of the last view served: `export` serves one view for min_interval_s and a
        # view is never changed once made (watch and the sources make a new one for each reading), so
        # the scrapes in between (several Prometheus servers, a dashboard) reuse them.
        self._served: tuple[LiveView | None, list[Any]] | None = None

    def describe(self) -> list[Any]:
        return []  # unchecked collector: families depend on what the node has

    def collect(self) -> Iterator[Any]:
        view = self._source()
        served = self._served
        if served is None or served[0] is not view or view is None:
            served = self._served = (view, list(self._families(view)))
        yield from served[1]

    def _families(self, view: LiveView | None) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("gpuscope_nvml_available", "1 when NVML could be read on this node")
        up.add_metric([], 1.0 if view is not None and view.nvml_available else 0.0)
        yield up
        status = GaugeMetricFamily("gpuscope_nvml_info", "NVML's state: reason ok, or why it cannot be read (value 1)",
                                   labels=["reason", "detail"])
        status.add_metric(_nvml_status(view), 1.0)
        yield status
        findings_active = GaugeMetricFamily("gpuscope_findings_active", "Active gpuscope findings by code",
                                            labels=["code"])
        severity = GaugeMetricFamily("gpuscope_finding_severity",
                                     "Worst severity of the active findings of a code: 0 none, 1 info, 2 warn, 3 fail",
                                     labels=["code"])
        counts: dict[str, int] = {code: 0 for code in KNOWN_CODES}
        worst: dict[str, int] = {code: 0 for code in counts}
        for finding in (view.findings if view is not None else []):
            counts[finding.code] = counts.get(finding.code, 0) + 1
            worst[finding.code] = max(worst.get(finding.code, 0), SEVERITY_LEVEL.get(finding.severity, 0))
        for code in sorted(counts):
            findings_active.add_metric([code], float(counts[code]))
            severity.add_metric([code], float(worst[code]))
        yield findings_active
        yield severity
        if view is None:
            return
        yield from self._device_families(view)
        yield from self._process_families(view)

    def _device_families(self, view: LiveView) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        info = GaugeMetricFamily("gpuscope_device_info", "A GPU on this node (value 1)", labels=["gpu", "name", "uuid"])
        for device in view.devices:
            info.add_metric([str(device.get("index")), _label(device.get("name")), _label(device.get("uuid"))], 1.0)
        yield info
        specs = {
            "total_bytes": ("gpuscope_device_memory_total_bytes", "Device memory", 1.0),
            "used_bytes": ("gpuscope_device_memory_used_bytes", "Device memory in use (NVML v1 used: includes the driver reserve)", 1.0),
            "free_bytes": ("gpuscope_device_memory_free_bytes", "Device memory free", 1.0),
            "driver_reserved_bytes": ("gpuscope_device_driver_reserved_bytes", "Memory the driver reserves (NVML memory info v2)", 1.0),
            "util_pct": ("gpuscope_device_utilization_ratio", "Share of time a kernel ran on the device (0..1)", 0.01),
            "mem_util_pct": ("gpuscope_device_memory_utilization_ratio", "Share of time device memory was read or written (0..1)", 0.01),
            "process_count": ("gpuscope_device_processes", "Processes NVML lists on the device", 1.0),
        }
        families = {m: GaugeMetricFamily(name, doc, labels=["gpu"]) for m, (name, doc, _) in specs.items()}
        for scope, metric, value in view.values:
            parsed = scopes.parse(scope)
            if metric in families and parsed.is_device and is_available(value):
                families[metric].add_metric([str(parsed.gpu)], float(value) * specs[metric][2])
        yield from families.values()

    def _process_families(self, view: LiveView) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        memory = GaugeMetricFamily("gpuscope_process_gpu_memory_bytes", "GPU memory NVML attributes to a process",
                                   labels=["gpu", "pid", "name", "engine", "role", "pod_uid", "container_id"])
        sm = GaugeMetricFamily("gpuscope_process_sm_utilization_ratio", "A process's SM utilisation (0..1)",
                               labels=["gpu", "pid", "name", "role", "pod_uid", "container_id"])
        rss = GaugeMetricFamily("gpuscope_target_resident_memory_bytes", "Resident memory of the watched process",
                                labels=["pid", "name"])
        cpu = GaugeMetricFamily("gpuscope_target_cpu_utilization_ratio",
                                "CPU time share of the watched process (1.0 = one core busy)", labels=["pid", "name"])
        threads = GaugeMetricFamily("gpuscope_target_threads", "Threads of the watched process", labels=["pid", "name"])

        def role(pid: int) -> str:
            if view.target_pid is None:
                return "process"
            if pid == view.target_pid:
                return "target"
            return "child" if pid in view.children else "other"

        labels: dict[int, tuple[str, str, str, list[str]]] = {}  # pid -> (pid, name, role, pod labels)

        def labels_of(pid: int) -> tuple[str, str, str, list[str]]:
            """A process's labels, built once per view (each pid has a memory and an SM sample per device)."""
            found = labels.get(pid)
            if found is None:
                info = view.processes.get(pid)
                found = labels[pid] = (str(pid), _label(getattr(info, "name", "") or ""), role(pid),
                                       [_container_label(info, "pod_uid"), _container_label(info, "container_id")])
            return found

        for scope, metric, value in view.values:
            parsed = scopes.parse(scope)
            if parsed.pid is None or not is_available(value):
                continue
            pid = parsed.pid
            if parsed.gpu is not None:
                if metric == "used_bytes":
                    pid_text, name, who, pod = labels_of(pid)
                    memory.add_metric([str(parsed.gpu), pid_text, name, _engine_label(view.processes.get(pid)), who]
                                      + pod, float(value))
                elif metric == "sm_util_pct":
                    pid_text, name, who, pod = labels_of(pid)
                    sm.add_metric([str(parsed.gpu), pid_text, name, who] + pod, float(value) / 100.0)
            elif pid == view.target_pid:
                pid_text, name, _who, _pod = labels_of(pid)
                if metric == "rss_bytes":
                    rss.add_metric([pid_text, name], float(value))
                elif metric == "cpu_util_pct":
                    cpu.add_metric([pid_text, name], float(value) / 100.0)
                elif metric == "num_threads":
                    threads.add_metric([pid_text, name], float(value))
        yield memory
        yield sm
        if view.target_pid is not None:
            yield rss
            yield cpu
            yield threads


class Exporter:
    """A running HTTP endpoint; `close()` stops it."""

    def __init__(self, server: Any, thread: threading.Thread, registry: Any, bind: str) -> None:
        self._server = server
        self._thread = thread
        self.registry = registry
        self.bind = bind
        self.port = int(server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        try:
            self._server.shutdown()
            self._server.server_close()
        except Exception:
            pass
        self._thread.join(timeout=5)


def validate_port(port: int | None, option: str = "--prometheus-port") -> int | None:
    """A port for an endpoint: None (no endpoint), or 0-65535 (0: any free port); else one clear UsageError."""
    if port is None:
        return None
    if not 0 <= int(port) <= 65535:
        raise UsageError(f"{option} {port}: not a TCP port (0-65535)")
    return int(port)


def start_exporter(source: Callable[[], LiveView | None], port: int, bind: str = "127.0.0.1",
                   health: Callable[[], str] | None = None) -> Exporter:
    """Serve `source`'s views on http://BIND:PORT/metrics (port 0: any free port). UsageError if it cannot listen."""
    return serve_collector(GpuscopeCollector(source), port, bind, health)


def serve_collector(collector: Any, port: int, bind: str = "127.0.0.1",
                    health: Callable[[], str] | None = None) -> Exporter:
    """Serve one collector from a registry of its own on /metrics, with /healthz. UsageError if it cannot listen."""
    from prometheus_client import CollectorRegistry

    from gpuscope.measure.http_endpoint import serve

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, thread = serve(registry, int(port), bind, health)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {bind}:{port}: {exc.strerror or exc}") from None
    except ValueError as exc:  # not an address
        raise UsageError(f"cannot serve metrics on {bind}:{port}: {exc}") from None
    return Exporter(server, thread, registry, bind)


class NodeSource:
    """`export`'s source: every device and process, read from NVML at scrape time (at most every min_interval_s)."""

    def __init__(self, backend: Any, describe: Callable[[int, str], Any] | None = None,
                 pid_exists: Callable[[int], bool] | None = None, min_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from gpuscope.probes.gpu import GpuProbe

        self._backend = backend
        self._probe = GpuProbe(backend, describe=describe, pid_exists=pid_exists)
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._view: LiveView | None = None
        self._read_at = float("-inf")
        self.reads = 0

    @property
    def devices(self) -> list[Any]:
        """The GPUs NVML listed when this source opened (probes.gpu.DeviceInfo)."""
        return self._probe.devices

    def __call__(self) -> LiveView:
        from gpuscope.measure.snapshot import snapshot_findings, snapshot_from_readings

        with self._lock:
            now = self._clock()
            if self._view is not None and now - self._read_at < self._min_interval_s:
                return self._view
            values = self._probe.read()
            self._probe.drain_events()
            listed = {scopes.parse(s).pid for s, m, _ in values if scopes.parse(s).pid is not None and m == "used_bytes"}
            for pid in [p for p in self._probe.processes if p not in listed]:
                del self._probe.processes[pid]  # pids come and go for weeks: keep only the listed ones
            snapshot = snapshot_from_readings(self._probe.devices, values, self._probe.processes)
            self._view = LiveView(devices=[d.to_json() for d in self._probe.devices], values=values,
                                  processes=dict(self._probe.processes), findings=snapshot_findings(snapshot),
                                  nvml_available=nvml_answered(values))
            self._read_at = now
            self.reads += 1
            return self._view
