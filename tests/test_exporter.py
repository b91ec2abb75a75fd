"""The Prometheus endpoint of `gpuscope export` and `gpuscope watch --prometheus-port`: scraped over
loopback and parsed with prometheus-client's own parser."""
from __future__ import annotations

import io
import ipaddress
import socket
import threading
import time
import urllib.request
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuscope.analysis.live_rules import GROWTH_CODE
from gpuscope.commands.export import run_export
from gpuscope.measure.exporter import LiveView, NodeSource, start_exporter
from gpuscope.measure.recording import Progress
from gpuscope.commands.watch import WatchOptions, run_watch
from gpuscope.probes.nvml import DeviceUnavailable
from gpuscope.probes.processes import ProcessInfo
from gpuscope.probes.readings import NO_DEVICE, NOT_SUPPORTED
from gpuscope.record.catalogue import KNOWN_CODES
from gpuscope.record.errors import UsageError
from gpuscope.record.run import Finding
from tests.fakes.nvml import H200_TOTAL_BYTES, DeviceState, FakeDevice, FakeProcess, GiB, MiB, ScriptedNvml
from tests.children import running_python

SERVER = FakeProcess(4_000_301, 1620 * MiB, "python3", sm_util_pct=62)
JAX = FakeProcess(4_000_302, 100 * GiB, 'job "x"\nnext', sm_util_pct=3)


def describer(pid: int, nvml_name: str) -> ProcessInfo:
    engines = ("torch", "jax") if pid == JAX.pid else ("torch",)
    return ProcessInfo(pid, True, nvml_name or "?", "alice", "python3 serve.py", engines, {})


def scrape(url: str) -> dict[str, list[Any]]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode("utf-8")
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: list[Any], **labels: str) -> float:
    matching = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (labels, samples)
    return matching[0]


@pytest.fixture
def node():
    """`gpuscope export` on a scripted two-GPU node, in a thread; yields (exporter, nvml)."""
    nvml = ScriptedNvml([FakeDevice(), FakeDevice(name="NVIDIA H100", uuid="GPU-h100", total_bytes=80 * GiB)],
                        [[DeviceState((SERVER, JAX), gpu_util_pct=71, mem_util_pct=20), DeviceState()]])
    ready: list[Any] = []
    stop = threading.Event()
    err = io.StringIO()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(run_export(
        0, opener=lambda: nvml, stop=stop, describe=describer, pid_exists=lambda p: True, err=err,
        handle_signals=False, on_ready=ready.append)))
    thread.start()
    deadline = time.monotonic() + 10
    while not ready and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready, err.getvalue()
    yield ready[0], nvml, err
    stop.set()
    thread.join(10)
    assert codes == [0] and nvml.shut_down


def test_export_serves_devices_processes_and_findings_over_loopback(node):
    exporter, nvml, err = node
    assert exporter.bind == "127.0.0.1" and exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"
    assert err.getvalue() == f"gpuscope export: serving Prometheus metrics on {exporter.url} (Ctrl-C stops)\n"
    metrics = scrape(exporter.url)
    assert value(metrics["gpuscope_nvml_available"]) == 1
    assert value(metrics["gpuscope_device_info"], gpu="1", name="NVIDIA H100", uuid="GPU-h100") == 1
    assert value(metrics["gpuscope_device_memory_total_bytes"], gpu="0") == H200_TOTAL_BYTES
    used0 = value(metrics["gpuscope_device_memory_used_bytes"], gpu="0")
    assert used0 == nvml.memory_info(0).used_bytes
    assert value(metrics["gpuscope_device_memory_free_bytes"], gpu="0") == H200_TOTAL_BYTES - used0
    assert value(metrics["gpuscope_device_utilization_ratio"], gpu="0") == pytest.approx(0.71)
    assert value(metrics["gpuscope_device_memory_utilization_ratio"], gpu="0") == pytest.approx(0.20)
    assert value(metrics["gpuscope_device_processes"], gpu="0") == 2
    assert value(metrics["gpuscope_device_processes"], gpu="1") == 0
    memory = metrics["gpuscope_process_gpu_memory_bytes"]
    assert value(memory, pid=str(SERVER.pid), gpu="0", name="python3", engine="torch", role="process") == SERVER.used_bytes
    assert value(memory, pid=str(JAX.pid), engine="torch,jax", name='job "x" next') == JAX.used_bytes  # quotes escaped, newline gone
    assert value(metrics["gpuscope_process_sm_utilization_ratio"], pid=str(SERVER.pid)) == pytest.approx(0.62)
    findings = metrics["gpuscope_findings_active"]
    assert {s.labels["code"] for s in findings} >= set(KNOWN_CODES) | {GROWTH_CODE}
    assert value(findings, code="MULTIPLE_ENGINES") == 1 and value(findings, code="ENGINE_PREALLOCATION") == 1
    assert value(findings, code="FOREIGN_PROCESS") == 0 and value(findings, code="LOW_HEADROOM") == 0
    assert value(metrics["gpuscope_finding_severity"], code="MULTIPLE_ENGINES") == 2
    assert not any(name.startswith(("python_", "process_")) for name in metrics)  # our own registry only
    assert "gpuscope_target_resident_memory_bytes" not in metrics  # no target without --pid


def test_the_endpoint_is_not_reachable_on_other_addresses_by_default(node):
    exporter, _, _ = node
    assert exporter._server.server_address[0] == "127.0.0.1"
    # this machine's own non-loopback IPv4 addresses (the hostname often resolves to 127.0.x.1 only)
    addresses = sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                        if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback})
    if not addresses:
        pytest.skip(f"no non-loopback IPv4 address on this machine to try (interfaces: {sorted(psutil.net_if_addrs())})")
    for address in addresses:
        with pytest.raises(OSError):
            socket.create_connection((address, exporter.port), timeout=1).close()


def test_scrapes_follow_the_node_and_a_burst_reads_nvml_once():
    nvml = ScriptedNvml(script=lambda tick: DeviceState((SERVER,) if tick == 0 else (SERVER, JAX)))
    clock = [0.0]
    source = NodeSource(nvml, describe=describer, pid_exists=lambda p: True, min_interval_s=1.0, clock=lambda: clock[0])
    exporter = start_exporter(source, 0)
    try:
        first = scrape(exporter.url)
        nvml.advance()
        again = scrape(exporter.url)  # within a second: the cached reading
        assert source.reads == 1
        assert len(first["gpuscope_process_gpu_memory_bytes"]) == len(again["gpuscope_process_gpu_memory_bytes"]) == 1
        clock[0] = 1.5
        later = scrape(exporter.url)
        assert source.reads == 2 and len(later["gpuscope_process_gpu_memory_bytes"]) == 2
        nvml.goto(0)
        clock[0] = 3.0
        gone = scrape(exporter.url)  # the JAX job exited: its series is gone, and so is its description
        assert {s.labels["pid"] for s in gone["gpuscope_process_gpu_memory_bytes"]} == {str(SERVER.pid)}
        assert value(gone["gpuscope_findings_active"], code="MULTIPLE_ENGINES") == 0
    finally:
        exporter.close()


def test_readings_that_could_not_be_taken_are_left_out_not_zero():
    nvml = ScriptedNvml(script=[DeviceState((SERVER, FakeProcess(4_000_303, None, "python3")))])
    nvml.fail("utilization_pct", NOT_SUPPORTED).fail("process_utilization_pct", NOT_SUPPORTED)
    exporter = start_exporter(NodeSource(nvml, describe=describer, pid_exists=lambda p: True), 0)
    try:
        metrics = scrape(exporter.url)
    finally:
        exporter.close()
    assert metrics["gpuscope_device_utilization_ratio"] == []
    assert metrics["gpuscope_process_sm_utilization_ratio"] == []
    assert {s.labels["pid"] for s in metrics["gpuscope_process_gpu_memory_bytes"]} == {str(SERVER.pid)}
    assert value(metrics["gpuscope_device_memory_used_bytes"], gpu="0") > 0


def test_a_gpu_lost_after_start_reads_nvml_unavailable_not_an_idle_node():
    """NVML opened, then the GPU fell off the bus: every call fails. The alert on
    gpuscope_nvml_available == 0 must fire; before, the series just vanished and the gauge stayed 1."""
    nvml = ScriptedNvml(script=[DeviceState((SERVER,))])
    clock = [0.0]
    exporter = start_exporter(NodeSource(nvml, describe=describer, pid_exists=lambda p: True, clock=lambda: clock[0]), 0)
    try:
        assert value(scrape(exporter.url)["gpuscope_nvml_available"]) == 1
        nvml.lose_gpu()
        clock[0] = 5.0
        lost = scrape(exporter.url)
    finally:
        exporter.close()
    assert value(lost["gpuscope_nvml_available"]) == 0
    assert lost["gpuscope_process_gpu_memory_bytes"] == []  # nothing invented


def test_a_view_with_nothing_yet_still_answers():
    exporter = start_exporter(lambda: None, 0)
    try:
        metrics = scrape(exporter.url)
    finally:
        exporter.close()
    assert value(metrics["gpuscope_nvml_available"]) == 0
    assert all(s.value == 0 for s in metrics["gpuscope_findings_active"])


def test_findings_are_counted_by_code_with_their_worst_severity():
    view = LiveView(devices=[], values=[], findings=[
        Finding("FOREIGN_PROCESS", "warn", "a"), Finding("MULTIPLE_ENGINES", "warn", "b"),
        Finding("MULTIPLE_ENGINES", "fail", "c"), Finding("NEW_CODE", "info", "d")])
    exporter = start_exporter(lambda: view, 0)
    try:
        metrics = scrape(exporter.url)
    finally:
        exporter.close()
    assert value(metrics["gpuscope_findings_active"], code="MULTIPLE_ENGINES") == 2
    assert value(metrics["gpuscope_finding_severity"], code="MULTIPLE_ENGINES") == 3
    assert value(metrics["gpuscope_findings_active"], code="NEW_CODE") == 1


def test_a_taken_port_is_one_line_and_exit_2():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        with pytest.raises(UsageError, match=f"cannot serve metrics on 127.0.0.1:{port}: "):
            start_exporter(lambda: None, port)
        nvml = ScriptedNvml()
        with pytest.raises(UsageError):
            run_export(port, opener=lambda: nvml, handle_signals=False, err=io.StringIO())
        assert nvml.shut_down
    finally:
        busy.close()
    with pytest.raises(UsageError, match="--port 70000: not a TCP port"):
        run_export(70000, opener=lambda: pytest.fail("NVML opened before the port was checked"))


# Without a GPU, export keeps serving gpuscope_nvml_available 0 (tests/test_export_resilience.py).


def test_watch_serves_the_target_its_neighbours_and_active_findings(tmp_path):
    child = running_python()
    nvml = ScriptedNvml(script=[DeviceState((FakeProcess(child.pid, 1620 * MiB, "python3", 40),
                                             FakeProcess(4_000_304, 3 * GiB, "intruder", 7)))])
    clock = [500.0]
    scraped: dict[int, dict[str, list[Any]]] = {}
    session: list[Any] = []

    def wait(seconds: float) -> None:
        clock[0] += seconds
        nvml.advance()
        tick = int(round(clock[0] - 500.0))
        if tick in (1, 7):  # findings are re-evaluated every 5 s of the watch
            scraped[tick] = scrape(f"http://127.0.0.1:{port_of(session)}/metrics")

    def port_of(progress_lines: list[Any]) -> int:
        line = next(line for line in progress_lines if "serving Prometheus metrics on" in line)
        return int(line.rsplit(":", 1)[1].split("/")[0])

    class Lines(Progress):
        def line(self, text: str) -> None:
            session.append(text)

    try:
        result = run_watch(WatchOptions(pid=child.pid, interval="1s", duration="8s", out=str(tmp_path / "w"),
                                        report=False, prometheus_port=0),
                           nvml_opener=lambda: (nvml, None), describe=describer, pid_exists=lambda p: True,
                           clock=lambda: clock[0], wait=wait, handle_signals=False, progress=Lines(quiet=True))
    finally:
        child.kill()
        child.wait()
    assert result.exit_code == 0
    early, late = scraped[1], scraped[7]
    memory = early["gpuscope_process_gpu_memory_bytes"]
    assert value(memory, pid=str(child.pid), role="target") == 1620 * MiB
    assert value(memory, pid="4000304", role="other", name="intruder") == 3 * GiB
    assert value(early["gpuscope_target_resident_memory_bytes"], pid=str(child.pid)) > 1 * MiB
    assert value(early["gpuscope_target_threads"], pid=str(child.pid)) >= 1
    assert value(late["gpuscope_findings_active"], code="FOREIGN_PROCESS") == 1
    assert value(late["gpuscope_finding_severity"], code="FOREIGN_PROCESS") == 3  # it used the SMs
    with pytest.raises(OSError):  # the endpoint closes with the watch
        urllib.request.urlopen(f"http://127.0.0.1:{port_of(session)}/metrics", timeout=2)
