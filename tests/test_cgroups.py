"""Pods and containers from /proc/PID/cgroup: each layout of tests/fixtures/cgroup, a process in no
container, a file that cannot be read, and the fields as they reach `ps --json`, the `ps` table and
the per-process Prometheus metrics."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest

from gpuscope.commands.ps import run_ps
from gpuscope.measure.exporter import NodeSource, start_exporter
from gpuscope.measure.snapshot import collect
from gpuscope.probes.cgroups import ContainerIds, parse_cgroup, read_container_ids
from gpuscope.probes.processes import ProcessInfo, describe_process
from gpuscope.probes.readings import ERROR, PROCESS_GONE, Unavailable
from gpuscope.reports.text import format_table
from tests.fakes.nvml import DeviceState, FakeProcess, MiB, ScriptedNvml
from tests.test_exporter import scrape, value

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cgroup"

# file -> (pod uid as the API server shows it, container id)
EXPECTED = {
    "k8s-v2-systemd-containerd-burstable.cgroup":
        ("1f2a3b4c-5d6e-4f70-8192-a3b4c5d6e7f8", "3c1e8f2a9b7d4c6e5f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6a"),
    "k8s-v2-systemd-crio-guaranteed.cgroup":
        ("9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d", "7e6d5c4b3a2910f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928170"),
    "k8s-v2-kubelet-slice-besteffort.cgroup":
        ("0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9", "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"),
    "k8s-v1-cgroupfs-containerd-besteffort.cgroup":
        ("d0544205-72df-11e8-b691-080027c5d95e", "84ad0790d137467a41a21d7fb29b4973f68d4d00e67390454d587da8e5cc292b"),
    "k8s-v1-systemd-docker-guaranteed.cgroup":
        ("5c6d7e8f-9a0b-4c1d-8e2f-3a4b5c6d7e8f", "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"),
    "k8s-v1-cgroupfs-crio-burstable.cgroup":
        ("2a3b4c5d-6e7f-4081-92a3-b4c5d6e7f809", "5f4e3d2c1b0a99887766554433221100ffeeddccbbaa99887766554433221100"),
    "k8s-v2-static-pod.cgroup":
        ("8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a", "aa11bb22cc33dd44ee55ff6600112233445566778899aabbccddeeff00112233"),
    "k8s-v2-crio-conmon.cgroup": ("3b4c5d6e-7f80-4192-a3b4-c5d6e7f8091a", None),  # the monitor, not the container
    "docker-v2-systemd.cgroup": (None, "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"),
    "docker-v1-cgroupfs.cgroup": (None, "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"),
    "host-v1-hybrid-no-container.cgroup": (None, None),
    "host-v2-root-no-container.cgroup": (None, None),
    "host-v2-ssh-session-no-container.cgroup": (None, None),
}


def test_every_fixture_has_an_expectation():
    assert sorted(p.name for p in FIXTURES.glob("*.cgroup")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_layout_names_its_pod_and_container(name):
    pod, container = EXPECTED[name]
    assert parse_cgroup((FIXTURES / name).read_text()) == ContainerIds(pod, container)


def test_a_systemd_slice_uid_comes_back_with_dashes():
    ids = parse_cgroup("0::/kubepods.slice/kubepods-burstable.slice/"
                       "kubepods-burstable-pod12345678_9abc_def0_1234_56789abcdef0.slice\n")
    assert ids == ContainerIds("12345678-9abc-def0-1234-56789abcdef0", None)


def test_lines_that_are_not_cgroup_lines_are_ignored():
    assert parse_cgroup("") == ContainerIds()
    assert parse_cgroup("garbage\n\n::\n12:memory\n") == ContainerIds()
    # a 32-hex leaf that is not a container id (some sandboxes name their cgroups so)
    assert parse_cgroup("4:memory:/sandbox/7c3785bdbfaffad46b297e2bf9dc687a\n") == ContainerIds()


def _proc_tree(tmp_path: Path, pid: int, fixture: str) -> str:
    root = tmp_path / "proc"
    (root / str(pid)).mkdir(parents=True)
    shutil.copy(FIXTURES / fixture, root / str(pid) / "cgroup")
    return str(root)


def test_reading_a_file_from_a_proc_tree(tmp_path):
    root = _proc_tree(tmp_path, 4242, "k8s-v2-systemd-crio-guaranteed.cgroup")
    assert read_container_ids(4242, root) == ContainerIds(*EXPECTED["k8s-v2-systemd-crio-guaranteed.cgroup"])


def test_a_file_that_cannot_be_read_is_unavailable_not_no_container(tmp_path):
    root = tmp_path / "proc"
    (root / "7").mkdir(parents=True)
    gone = read_container_ids(8, str(root))
    assert isinstance(gone, Unavailable) and gone.reason == PROCESS_GONE
    (root / "7" / "cgroup").mkdir()  # a read that fails (EISDIR): not "in no container"
    broken = read_container_ids(7, str(root))
    assert isinstance(broken, Unavailable) and broken.reason == ERROR


def test_describe_process_carries_pod_and_container(tmp_path):
    pid = os.getpid()  # a real process, its cgroup file from a fixture
    info = describe_process(pid, proc_root=_proc_tree(tmp_path, pid, "k8s-v1-cgroupfs-containerd-besteffort.cgroup"))
    pod, container = EXPECTED["k8s-v1-cgroupfs-containerd-besteffort.cgroup"]
    assert (info.pod_uid, info.container_id) == (pod, container)
    assert info.to_json()["pod_uid"] == pod and info.to_json()["container_id"] == container


def test_a_process_in_no_container_has_neither_key(tmp_path):
    pid = os.getpid()
    info = describe_process(pid, proc_root=_proc_tree(tmp_path, pid, "host-v2-root-no-container.cgroup"))
    assert info.pod_uid is None and info.container_id is None
    assert "pod_uid" not in info.to_json() and "container_id" not in info.to_json()
    unreadable = describe_process(pid, proc_root=str(tmp_path / "nowhere"))
    assert unreadable.to_json()["pod_uid"] == {"unavailable": PROCESS_GONE,
                                               "detail": unreadable.pod_uid.detail}  # type: ignore[union-attr]


def test_this_machine_reads_the_same_as_the_parser():
    with open("/proc/self/cgroup", encoding="utf-8") as fh:
        expected = parse_cgroup(fh.read())
    info = describe_process(os.getpid())
    assert (info.pod_uid, info.container_id) == (expected.pod_uid, expected.container_id)


# --------------------------------------------------------------- where the fields show

POD_A = "1f2a3b4c-5d6e-4f70-8192-a3b4c5d6e7f8"
CONTAINER_A = EXPECTED["k8s-v2-systemd-containerd-burstable.cgroup"][1]
IN_POD = FakeProcess(4_100_001, 1620 * MiB, "python3", sm_util_pct=40)
ON_HOST = FakeProcess(4_100_002, 900 * MiB, "python3", sm_util_pct=5)


def _describer(pid: int, nvml_name: str) -> ProcessInfo:
    if pid == IN_POD.pid:
        return ProcessInfo(pid, True, "python3", "root", "python3 serve.py", ("torch",), {},
                           POD_A, CONTAINER_A)
    return ProcessInfo(pid, True, "python3", "alice", "python3 notebook.py", ("torch",), {})


def _nvml() -> ScriptedNvml:
    return ScriptedNvml(script=[DeviceState((IN_POD, ON_HOST), gpu_util_pct=50)])


def test_ps_json_and_table_show_pod_and_container():
    out, err = io.StringIO(), io.StringIO()
    assert run_ps(True, opener=_nvml, describe=_describer, pid_exists=lambda p: True, out=out, err=err) == 0
    processes = {p["pid"]: p for p in json.loads(out.getvalue())["devices"][0]["processes"]}
    assert processes[IN_POD.pid]["pod_uid"] == POD_A and processes[IN_POD.pid]["container_id"] == CONTAINER_A
    assert "pod_uid" not in processes[ON_HOST.pid] and "container_id" not in processes[ON_HOST.pid]
    table = format_table(collect(_nvml(), describe=_describer, pid_exists=lambda p: True))
    assert "POD" in table and "CONTAINER" in table
    row = next(line for line in table.splitlines() if str(IN_POD.pid) in line)
    assert POD_A in row and CONTAINER_A[:12] in row
    host_row = next(line for line in table.splitlines() if str(ON_HOST.pid) in line)
    assert POD_A not in host_row


def test_the_ps_table_has_no_pod_columns_on_a_node_without_pods():
    table = format_table(collect(ScriptedNvml(script=[DeviceState((ON_HOST,))]), describe=_describer,
                                 pid_exists=lambda p: True))
    assert "POD" not in table and "CONTAINER" not in table


def test_per_process_metrics_carry_pod_and_container_labels():
    exporter = start_exporter(NodeSource(_nvml(), describe=_describer, pid_exists=lambda p: True), 0)
    try:
        metrics = scrape(exporter.url)
    finally:
        exporter.close()
    memory = metrics["gpuscope_process_gpu_memory_bytes"]
    assert value(memory, pid=str(IN_POD.pid), pod_uid=POD_A, container_id=CONTAINER_A) == IN_POD.used_bytes
    assert value(metrics["gpuscope_process_sm_utilization_ratio"], pod_uid=POD_A) == pytest.approx(0.40)
    host = [s for s in memory if s.labels["pid"] == str(ON_HOST.pid)]
    assert len(host) == 1 and host[0].labels["pod_uid"] == "" and host[0].labels["container_id"] == ""


def test_the_report_process_table_names_the_pod():
    from types import SimpleNamespace

    from gpuscope.reports.html_machine import _processes

    record = SimpleNamespace(gpu=None, device_unavailable=None, devices=[{"index": 0, "name": "NVIDIA H200"}],
                             processes=[{"pid": IN_POD.pid, "gpu": 0, "name": "python3", "pod_uid": POD_A,
                                         "container_id": CONTAINER_A, "peak_used_bytes": IN_POD.used_bytes},
                                        {"pid": ON_HOST.pid, "gpu": 0, "name": "python3",
                                         "peak_used_bytes": ON_HOST.used_bytes},
                                        {"pid": 77, "gpu": 0, "name": "x", "pod_uid": "<b>evil</b>"}])
    html = _processes(record)  # type: ignore[arg-type]
    assert f"pod {POD_A}, container {CONTAINER_A[:12]}" in html
    assert CONTAINER_A not in html  # the short id, as docker ps and crictl ps show it
    assert html.count("pod ") == 2 and "&lt;b&gt;evil&lt;/b&gt;" in html and "<b>evil" not in html
