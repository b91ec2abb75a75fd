"""`gpuscope export` never crash-loops: without NVML it serves `gpuscope_nvml_available 0` with the
reason, answers /healthz, retries with backoff and recovers; only bad input exits 2. Time is an
injected clock; waits poll with deadlines."""
from __future__ import annotations

import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import pytest

from gpuscope.commands.export import run_export
from gpuscope.measure.exporter import DEFAULT_PORT, start_exporter
from gpuscope.measure.nvml_retry import Backoff, RetryingNodeSource
from gpuscope.probes.nvml import DeviceUnavailable
from gpuscope.probes.readings import NO_DEVICE, NOT_INITIALIZED
from tests.fakes.nvml import DeviceState, FakeProcess, MiB, ScriptedNvml
from tests.test_exporter import scrape, value

SERVER = FakeProcess(4_200_001, 1620 * MiB, "python3", sm_util_pct=30)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def no_driver() -> Any:
    raise DeviceUnavailable(NO_DEVICE, "NVML could not start: NVML Shared Library Not Found")


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode("utf-8")


class Opener:
    """Fails while `down` is set, then hands out a fresh healthy ScriptedNvml per call."""

    def __init__(self, down: bool = True) -> None:
        self.down = down
        self.calls = 0
        self.opened: list[ScriptedNvml] = []

    def __call__(self) -> ScriptedNvml:
        self.calls += 1
        if self.down:
            raise DeviceUnavailable(NO_DEVICE, "NVML could not start: Driver Not Loaded")
        nvml = ScriptedNvml(script=[DeviceState((SERVER,), gpu_util_pct=30)])
        self.opened.append(nvml)
        return nvml


def test_backoff_doubles_up_to_its_ceiling_and_resets():
    backoff = Backoff(first_s=1.0, max_s=60.0)
    assert [backoff.next_delay_s() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    backoff.reset()
    assert backoff.next_delay_s() == 1


def test_retries_follow_the_backoff_and_recover_when_the_driver_comes_back():
    opener, clock, log = Opener(), [100.0], io.StringIO()
    source = RetryingNodeSource(opener, pid_exists=lambda p: True, clock=lambda: clock[0], log=log)
    view = source()
    assert not view.nvml_available and view.device_unavailable["reason"] == NO_DEVICE
    assert opener.calls == 1
    for now, calls in ((100.5, 1), (101.0, 2), (102.9, 2), (103.0, 3), (106.9, 3), (107.0, 4)):
        clock[0] = now
        source()  # a scrape attempts only when the next attempt is due
        assert opener.calls == calls, now
    assert log.getvalue().count("NVML unavailable") == 1  # one line per change of state, not per retry
    opener.down = False
    clock[0] = 114.9
    assert not source().nvml_available  # the next attempt is at 115 (delay 8)
    clock[0] = 115.0
    back = source()
    assert back.nvml_available and source.unavailable is None and source.recoveries == 1
    assert "NVML is back (1 GPU)" in log.getvalue()
    source.close()
    assert opener.opened[-1].shut_down


def test_a_gpu_lost_while_open_is_closed_and_reopened_fresh():
    opener, clock = Opener(down=False), [0.0]
    source = RetryingNodeSource(opener, pid_exists=lambda p: True, clock=lambda: clock[0])
    assert source().nvml_available
    first = opener.opened[0]
    first.lose_gpu()
    clock[0] = 2.0  # past the 1 s reading cache
    lost = source()
    assert not lost.nvml_available and lost.device_unavailable["reason"] == NO_DEVICE
    assert first.shut_down and source.backend is None  # an old handle never recovers: dropped
    clock[0] = 3.0
    assert source().nvml_available and len(opener.opened) == 2 and opener.opened[1] is not first


@pytest.fixture
def exporter_without_nvml():
    """run_export in a thread with an opener that always fails; yields (exporter, err)."""
    ready: list[Any] = []
    stop = threading.Event()
    err = io.StringIO()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(run_export(
        0, opener=no_driver, stop=stop, err=err, handle_signals=False, on_ready=ready.append, poll_s=0.05)))
    thread.start()
    deadline = time.monotonic() + 10
    while not ready and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready, (codes, err.getvalue())
    yield ready[0], err
    stop.set()
    thread.join(10)
    assert codes == [0]


def test_export_without_nvml_stays_up_and_says_why(exporter_without_nvml):
    exporter, err = exporter_without_nvml
    metrics = scrape(exporter.url)
    assert value(metrics["gpuscope_nvml_available"]) == 0
    info = metrics["gpuscope_nvml_info"]
    assert value(info, reason=NO_DEVICE, detail="NVML could not start: NVML Shared Library Not Found") == 1
    assert metrics["gpuscope_device_memory_used_bytes"] == []  # nothing invented
    status, body = get(exporter.url.replace("/metrics", "/healthz"))
    assert status == 200 and body.startswith("ok\n") and "nvml: unavailable (no_device" in body
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("gpuscope export: NVML unavailable (no_device: NVML could not start")
    assert lines[1] == f"gpuscope export: serving Prometheus metrics on {exporter.url} (Ctrl-C stops)"


def test_healthz_and_nvml_info_on_a_healthy_node():
    nvml = ScriptedNvml(script=[DeviceState((SERVER,))])
    source = RetryingNodeSource(lambda: nvml, pid_exists=lambda p: True)
    assert source.ensure()  # as run_export does before it listens
    exporter = start_exporter(source, 0, health=source.health)
    try:
        status, body = get(exporter.url.replace("/metrics", "/healthz"))
        metrics = scrape(exporter.url)
    finally:
        exporter.close()
        source.close()
    assert (status, body) == (200, "ok\nnvml: available\n")
    assert value(metrics["gpuscope_nvml_info"], reason="ok") == 1
    assert value(metrics["gpuscope_nvml_available"]) == 1


def test_nothing_read_yet_is_not_initialized():
    exporter = start_exporter(lambda: None, 0)
    try:
        metrics = scrape(exporter.url)
        status, body = get(exporter.url.replace("/metrics", "/healthz"))
    finally:
        exporter.close()
    assert value(metrics["gpuscope_nvml_info"], reason=NOT_INITIALIZED) == 1
    assert status == 200 and body == "ok\n"


def test_the_default_port_is_no_common_exporters():
    import typer.main

    from gpuscope.commands.app import app

    command = typer.main.get_command(app).commands["export"]  # type: ignore[attr-defined]
    port = next(p for p in command.params if p.name == "port")
    assert port.default == DEFAULT_PORT == 9840
    # node-exporter, dcgm-exporter, nvidia_gpu_exporter, process-exporter, Prometheus, Pushgateway,
    # Alertmanager, kube-state-metrics/cAdvisor, kubelet, kube-proxy
    assert DEFAULT_PORT not in {9100, 9400, 9835, 9256, 9090, 9091, 9093, 8080, 8081, 10250, 10255, 10249}


def _nvml_opens_here() -> bool:
    from gpuscope.probes.nvml import open_backend

    try:
        open_backend().shutdown()
        return True
    except DeviceUnavailable:
        return False


@pytest.mark.slow
def test_the_real_command_without_a_driver_serves_zero_and_healthz():
    """`gpuscope export` as a user runs it, on this machine's real (absent) NVML."""
    if _nvml_opens_here():
        pytest.skip("NVML opens on this machine: the no-driver case cannot be run for real here")
    proc = subprocess.Popen([sys.executable, "-m", "gpuscope", "export", "--port", "0"], cwd=REPO,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
    try:
        url, seen, deadline = None, [], time.monotonic() + 60
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.append(line)
            if "serving Prometheus metrics on " in line:
                url = line.split("serving Prometheus metrics on ", 1)[1].split(" ", 1)[0]
        assert url is not None, (proc.poll(), seen)
        assert value(scrape(url)["gpuscope_nvml_available"]) == 0
        assert get(url.replace("/metrics", "/healthz"))[0] == 200
        assert proc.poll() is None  # still up
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0
    assert any("NVML unavailable" in line for line in seen)


@pytest.mark.slow
def test_bad_input_still_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "gpuscope", "export", "--port", "70000"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--port 70000: not a TCP port" in proc.stderr
