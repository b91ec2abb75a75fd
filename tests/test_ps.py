"""`gpuscope ps`: every GPU and process on one screen, against the scripted NVML and the H200 replay.

Scenarios: several processes on two devices (shared, two engines), a real child process whose
command line carries a secret, the container without the host pid namespace (memory used, nobody
listed; pids listed that this namespace lacks), a process list NVML refuses, and no GPU at all.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest

from gpuscope.commands.ps import run_ps
from gpuscope.measure.snapshot import PS_SCHEMA, collect
from gpuscope.probes.nvml import DeviceUnavailable, ProcessRow
from gpuscope.probes.processes import ProcessInfo, describe_process
from gpuscope.probes.readings import NO_DEVICE, NO_PERMISSION, NOT_SUPPORTED
from gpuscope.probes.redact import printable
from gpuscope.reports.text import format_table
from tests.fakes.nvml import (
    H200_DRIVER_RESERVED_BYTES,
    DeviceState,
    FakeDevice,
    FakeProcess,
    GiB,
    MiB,
    ReplayNvml,
    ScriptedNvml,
)

SERVER = FakeProcess(4_000_101, 1620 * MiB, "python3", sm_util_pct=62)
JAX = FakeProcess(4_000_102, 100 * GiB, "python3", sm_util_pct=3)
SECOND = FakeProcess(4_000_103, 2566 * MiB, "/opt/torch/.venv/bin/python3", sm_util_pct=1)

INFO = {
    SERVER.pid: ("alice", "python3 serve.py --port 8080", ("torch",), {"CUDA_MODULE_LOADING": "LAZY"}),
    JAX.pid: ("bob", "python3 sweep.py --api-key=***", ("torch", "jax"), {}),
    SECOND.pid: ("carol", "python3 other.py", ("torch",), {}),
}


def describer(pid: int, nvml_name: str) -> ProcessInfo:
    """describe_process for the fake pids (they are above pid_max, so /proc cannot know them)."""
    if pid in INFO:
        user, cmd, engines, env = INFO[pid]
        return ProcessInfo(pid, True, nvml_name or "?", user, cmd, engines, env)
    return describe_process(pid, nvml_name)


def ps(nvml, **kwargs) -> tuple[int, str, str]:
    """Run `ps` on a backend, or on a fresh one from a factory (ps shuts its backend down after reading)."""
    out, err = io.StringIO(), io.StringIO()
    kwargs.setdefault("describe", describer)
    kwargs.setdefault("pid_exists", lambda pid: True)
    code = run_ps(opener=nvml if callable(nvml) else lambda: nvml, out=out, err=err, **kwargs)
    return code, out.getvalue(), err.getvalue()


def two_gpus() -> ScriptedNvml:
    return ScriptedNvml([FakeDevice(), FakeDevice(name="NVIDIA H100", uuid="GPU-h100", total_bytes=80 * GiB,
                                                  driver_reserved_bytes=None)],
                        [[DeviceState((SERVER, JAX), gpu_util_pct=71, mem_util_pct=20), DeviceState((SECOND,))]])


def test_every_gpu_and_process_with_flags_for_shared_devices_and_engines():
    code, out, err = ps(two_gpus())
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "gpuscope ps: 2 GPUs, driver 580.159.04, CUDA 13.0"
    gpu0 = next(line for line in lines if line.startswith("GPU 0"))
    assert "NVIDIA H200" in gpu0 and "util 71%" in gpu0 and "mem util 20%" in gpu0 and "driver reserve 615 MiB" in gpu0
    assert "  ! SHARED by 2 processes; ENGINES torch+jax" in lines
    server = next(line for line in lines if line.strip().startswith(str(SERVER.pid)))
    assert "alice" in server and "1.58 GiB" in server and "62%" in server and "python3 serve.py --port 8080" in server
    jax = next(line for line in lines if line.strip().startswith(str(JAX.pid)))
    assert "torch,jax !" in jax and "--api-key=***" in jax
    assert lines.index(jax) < lines.index(server)  # biggest holder first
    gpu1 = next(line for line in lines if line.startswith("GPU 1"))
    assert "NVIDIA H100" in gpu1 and "80.00 GiB" in gpu1 and "driver reserve" not in gpu1  # v1-only driver
    assert "SHARED" not in out.split("GPU 1", 1)[1]  # one process on GPU 1: not flagged
    assert "WARN MULTIPLE_ENGINES" in out and "WARN ENGINE_PREALLOCATION" in out


def test_json_has_every_field_and_flags():
    code, out, _ = ps(two_gpus(), json_output=True)
    assert code == 0
    data = json.loads(out)
    assert data["schema"] == PS_SCHEMA and data["driver"] == "580.159.04" and data["cuda_driver"] == "13.0"
    gpu0, gpu1 = data["devices"]
    assert gpu0["shared"] is True and gpu0["engines"] == ["torch", "jax"]
    assert gpu0["flags"] == ["SHARED by 2 processes", "ENGINES torch+jax"]
    assert gpu0["used_bytes"] == SERVER.used_bytes + JAX.used_bytes + H200_DRIVER_RESERVED_BYTES  # v1-style used
    assert gpu0["driver_reserved_bytes"] == H200_DRIVER_RESERVED_BYTES
    assert gpu0["util_pct"] == 71 and gpu0["process_count"] == 2
    procs = {p["pid"]: p for p in gpu0["processes"]}
    assert procs[SERVER.pid] == {"pid": SERVER.pid, "exists": True, "name": "python3", "user": "alice",
                                 "cmdline": "python3 serve.py --port 8080", "engines": ["torch"],
                                 "memory_env": {"CUDA_MODULE_LOADING": "LAZY"}, "gpu": 0,
                                 "used_bytes": SERVER.used_bytes, "sm_util_pct": 62}
    assert gpu1["shared"] is False and gpu1["driver_reserved_bytes"] == {"unavailable": NOT_SUPPORTED,
                                                                         "detail": "memory info v2 not available"}
    codes = {f["code"] for f in data["findings"]}
    assert {"MULTIPLE_ENGINES", "ENGINE_PREALLOCATION"} <= codes
    assert "FOREIGN_PROCESS" not in codes  # nobody is "this" process in ps: no one is foreign


@pytest.fixture
def child_with_secret():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "--api-key=SECRET123", "postgres://app:hunter2@db/x"])
    try:
        deadline = time.monotonic() + 30
        seen: object = None
        while time.monotonic() < deadline:  # wait until exec has replaced the forked image
            try:
                seen = __import__("psutil").Process(proc.pid).cmdline()
                if "--api-key=SECRET123" in " ".join(seen):
                    break
            except Exception as exc:
                seen = exc
            time.sleep(0.02)
        else:
            pytest.fail(f"the child's command line never showed --api-key=SECRET123 within 30 s (last: {seen!r})")
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_real_process_is_described_from_proc_with_its_secrets_redacted(child_with_secret):
    pid = child_with_secret.pid
    nvml = lambda: ScriptedNvml(script=[DeviceState((FakeProcess(pid, 700 * MiB, "python3", 5), SECOND))])  # noqa: E731
    code, out, _ = ps(nvml, describe=None, pid_exists=None)  # the real describe_process, the real /proc
    assert code == 0
    row = next(line for line in out.splitlines() if line.strip().startswith(str(pid)))
    assert "--api-key=***" in row and "postgres://app:***@db/x" in row
    assert "SECRET123" not in out and "hunter2" not in out
    assert os.path.basename(sys.executable)[:6] in row or "python" in row
    code, out, _ = ps(nvml, describe=None, pid_exists=None, json_output=True)
    assert "SECRET123" not in out and "hunter2" not in out
    entry = next(p for p in json.loads(out)["devices"][0]["processes"] if p["pid"] == pid)
    assert entry["exists"] is True and entry["engines"] == [] and isinstance(entry["user"], str)


def test_command_lines_are_clipped_to_the_terminal_width_but_never_in_json():
    long = FakeProcess(4_000_104, 10 * MiB, "python3")
    INFO[long.pid] = ("dave", "python3 " + "x" * 300, (), {})
    try:
        snapshot = collect(ScriptedNvml(script=[DeviceState((long,))]), describe=describer, pid_exists=lambda p: True)
        clipped = format_table(snapshot, width=120)
        row = next(line for line in clipped.splitlines() if line.strip().startswith(str(long.pid)))
        assert len(row) <= 120 and row.endswith("...")
        assert "x" * 300 in format_table(snapshot, width=None)
        assert "x" * 300 in json.dumps(snapshot.to_json())
    finally:
        del INFO[long.pid]


def test_terminal_escape_sequences_in_names_are_shown_not_obeyed():
    evil = FakeProcess(4_000_105, 10 * MiB, "py\x1b[2J\x1b]0;pwned\x07")
    INFO[evil.pid] = ("eve", "run \x1b[31mred\x1b[0m", (), {})
    try:
        code, out, _ = ps(ScriptedNvml(script=[DeviceState((evil,))]))
        assert code == 0 and "\x1b" not in out and "\x07" not in out
        assert "py\\x1b[2J\\x1b]0;p..." in out and "run \\x1b[31mred\\x1b[0m" in out  # names clip at 20
    finally:
        del INFO[evil.pid]
    assert printable("a\tb\nc") == "a\\tb\\nc"


# -- the container case --------------------------------------------------------------------------------

def test_memory_used_but_no_process_listed_says_attribution_is_impossible_and_why():
    nvml = lambda: ScriptedNvml(script=[DeviceState(used_bytes=6 * GiB + H200_DRIVER_RESERVED_BYTES, gpu_util_pct=88)])  # noqa: E731
    code, out, _ = ps(nvml)
    assert code == 0
    assert "! NO PROCESS ATTRIBUTION" in out
    assert "no process listed, yet 6.00 GiB is in use" in out
    note = next(line for line in out.splitlines() if line.startswith("note: gpu:0"))
    assert "lists no process" in note and "Attribution to processes is impossible here" in note
    assert "pid namespace" in note and "--pid=host" in note
    assert "PID_NAMESPACE" in out
    data = json.loads(ps(nvml, json_output=True)[1])
    assert data["devices"][0]["unlisted_bytes"] == 6 * GiB and data["devices"][0]["processes"] == []
    assert any("pid namespace" in n for n in data["notes"])
    assert [f["code"] for f in data["findings"]] == ["PID_NAMESPACE"]


def test_an_idle_card_is_not_mistaken_for_hidden_processes():
    # memory info v2: the 615 MiB driver reserve is nobody's; v1 only: an idle card still shows it as used
    for device in (FakeDevice(), FakeDevice(driver_reserved_bytes=None)):
        nvml = ScriptedNvml([device], [DeviceState(used_bytes=615 * MiB)])
        code, out, _ = ps(nvml)
        assert code == 0 and "NO PROCESS ATTRIBUTION" not in out and "  no processes" in out and "note:" not in out


def test_listed_pids_outside_this_pid_namespace_are_flagged():
    nvml = ScriptedNvml(script=[DeviceState((FakeProcess(4_000_123, 3 * GiB, "python3"),))])
    code, out, _ = ps(nvml, describe=None, pid_exists=None)  # real /proc: the pid is not here
    assert code == 0
    assert "PIDS OUTSIDE THIS NAMESPACE" in out and "4000123" in out
    assert "(not here)" in out  # engines cannot be read for a pid we do not have
    assert "PID_NAMESPACE" in out


def test_the_h200_replay_with_a_jax_sibling():
    lines = ReplayNvml().lines

    def replay_at_jax() -> ReplayNvml:
        replay = ReplayNvml(lines)
        return replay.goto(replay.first_tick_of("jax-sibling-default") + 20)

    replay = replay_at_jax()
    assert {p.pid for p in replay.state().processes} == {474, 527}

    def describe(pid: int, name: str) -> ProcessInfo:
        engines = ("jax",) if pid == 527 else ("torch",)
        return ProcessInfo(pid, True, name, "root", f"python3 job-{pid}.py", engines, {})

    code, out, _ = ps(replay_at_jax, describe=describe)
    assert code == 0
    assert "SHARED by 2 processes; ENGINES jax+torch" in out  # engines in the order of their holders' memory
    assert "105.39 GiB" in out  # the JAX sibling's 107,918 MiB, as NVML reported it
    assert "ENGINE_PREALLOCATION: pid 527" in out
    data = json.loads(ps(replay_at_jax, describe=describe, json_output=True)[1])
    device = data["devices"][0]
    assert device["used_bytes"] == replay.line["dev_used"] and device["total_bytes"] == replay.line["dev_total"]


# -- failures ------------------------------------------------------------------------------------------

def test_a_refused_process_list_and_missing_utilisation_are_said_not_zeroed():
    def nvml() -> ScriptedNvml:
        return two_gpus().fail("running_processes", NO_PERMISSION, index=0).fail("utilization_pct", NOT_SUPPORTED)

    code, out, _ = ps(nvml)
    assert code == 0
    assert "process list unavailable (no_permission" in out
    assert "util n/a" in out and "util 0%" not in out
    data = json.loads(ps(nvml, json_output=True)[1])
    assert data["devices"][0]["process_count"]["unavailable"] == NO_PERMISSION
    assert data["devices"][0]["util_pct"]["unavailable"] == NOT_SUPPORTED
    assert data["devices"][1]["processes"][0]["pid"] == SECOND.pid  # the other device is unaffected


def test_swapped_pid_and_memory_fields_are_repaired_before_display():
    swapped = ProcessRow(pid=1620 * MiB, used_bytes=SERVER.pid)
    nvml = ScriptedNvml(script=[DeviceState((SERVER,), raw_rows=(swapped,))])
    code, out, _ = ps(nvml)
    row = next(line for line in out.splitlines() if line.strip().startswith(str(SERVER.pid)))
    assert "1.58 GiB" in row


def test_without_a_gpu_one_line_and_exit_2():
    def opener():
        raise DeviceUnavailable(NO_DEVICE, "NVML could not start: NVML Shared Library Not Found (no NVIDIA driver or GPU here)")

    for json_output in (False, True):
        out, err = io.StringIO(), io.StringIO()
        assert run_ps(json_output, opener=opener, out=out, err=err) == 2
        assert out.getvalue() == ""
        assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("gpuscope ps: no GPU here: NVML could not start")


def test_nvml_without_a_visible_device_is_one_line_and_exit_2():
    """A driver but no GPU this process may see (CUDA_VISIBLE_DEVICES="", a container without one):
    'no GPU here', not a table of 0 GPUs and exit 0."""
    for json_output in (False, True):
        out, err = io.StringIO(), io.StringIO()
        assert run_ps(json_output, opener=lambda: ScriptedNvml(devices=[]), out=out, err=err) == 2
        assert out.getvalue() == "" and err.getvalue() == "gpuscope ps: no GPU here: NVML started but sees no device\n"


def test_the_backend_is_shut_down_after_reading():
    nvml = two_gpus()
    ps(nvml)
    assert nvml.shut_down


def test_gpuscope_ps_on_this_machine_without_a_gpu():
    try:
        from gpuscope.probes.nvml import open_backend

        open_backend().shutdown()
        pytest.skip("NVML works here: this test is for machines without a GPU")
    except DeviceUnavailable:
        pass
    result = subprocess.run([sys.executable, "-m", "gpuscope", "ps"], capture_output=True, text=True, timeout=60,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("gpuscope ps: no GPU here")


def test_unavailable_is_never_printed_as_zero_bytes():
    nvml = ScriptedNvml(script=[DeviceState((FakeProcess(SERVER.pid, None, "python3"),))])
    code, out, _ = ps(nvml)
    row = next(line for line in out.splitlines() if line.strip().startswith(str(SERVER.pid)))
    assert " n/a " in row and "0 B" not in row
