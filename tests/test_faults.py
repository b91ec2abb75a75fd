"""Faults during a run: the run goes on, or ends honestly, and says what happened.

The model faults run through the real session (gpuscope.commands.diagnose.run_diagnose)
on the CPU with a factory model written to tmp_path. NVML faults and processes
vanishing between ticks cannot happen on the CPU path (it never opens NVML), so
they run the real probes, sampler, attribution and findings against the
scripted NVML fake. Disk full is the real ENOSPC of /dev/full.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import tracemalloc
import uuid
from pathlib import Path

import pytest

from gpuscope.measure.attribution import GapTracker, StepMonitor
from gpuscope.measure.options import DiagnoseOptions
from gpuscope.probes.gpu import GpuProbe
from gpuscope.probes.processes import ProcessInfo, describe_process
from gpuscope.probes.readings import NO_DEVICE, PROCESS_GONE, Unavailable, is_available
from gpuscope.probes.samplefile import SampleWriter, load_timeline
from gpuscope.probes.sampler import PeakTracker, Sampler
from gpuscope.record.run import RunRecord, load_run
from tests.fakes.nvml import DeviceState, FakeProcess, GiB, MiB, ScriptedNvml

FAST = dict(device="cpu", duration="1s", warmup="0.1s", window="0.3s", interval="50ms", quiet=True)


def _factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> str:
    """Write a model factory module into tmp_path; its `package.module:factory` spec."""
    name = f"gpuscope_fault_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:make"


def _diagnose(spec: str, out: Path, predictors: str, report: bool = False):
    from gpuscope.commands.diagnose import run_diagnose

    return run_diagnose(DiagnoseOptions(model=spec, predictors=predictors, out=str(out), report=report, **FAST))


def _codes(record: RunRecord) -> dict[str, object]:
    return {f.code: f for f in record.findings}


# ---------------------------------------------------------------- the model misbehaves

FLAKY = """
    import itertools, time
    import torch
    from torch import nn

    class Flaky(nn.Module):
        example_input_shape = (4, 16)

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)
            self.calls = itertools.count()

        def forward(self, x):
            time.sleep(0.002)
            if next(self.calls) % 4 == 3:
                raise ValueError("request 3 of 4 is malformed")
            return self.lin(x)

    def make():
        return Flaky()
"""


def test_a_model_raising_on_some_requests_is_counted_not_a_crash(tmp_path, monkeypatch):
    result = _diagnose(_factory(tmp_path, monkeypatch, FLAKY), tmp_path / "out", "1,2", report=True)
    record = result.record
    assert result.exit_code == 0
    assert record.status == "complete"
    assert [s.predictors for s in record.steps] == [1, 2]
    for step in record.steps:
        assert step.requests > 0 and step.errors > 0
        assert 0.1 < step.error_rate < 0.45, step.error_rate  # one in four, counted per step
        assert "ValueError: request 3 of 4 is malformed" in step.error_messages
        assert not step.oom and step.dead_predictors == 0
    finding = _codes(record)["PREDICTOR_ERRORS"]
    assert set(finding.evidence["error_rate_by_predictors"]) == {"1", "2"}

    saved = load_run(str(tmp_path / "out" / "run.json"))
    assert saved.to_json()["steps"][0]["error_rate"] == pytest.approx(record.steps[0].error_rate)
    report = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "PREDICTOR_ERRORS" in report
    assert f"({record.steps[0].error_rate:.1%})" in report  # the step's error rate in the steps table


DYING = """
    import threading, time
    from torch import nn

    class PredictorKilled(BaseException):
        \"\"\"Not an Exception: nothing in the request loop catches it, so the thread dies.\"\"\"

    class Dying(nn.Module):
        example_input_shape = (4, 16)

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            time.sleep(0.002)
            if threading.current_thread().name.endswith("-1"):
                raise PredictorKilled("predictor 1 hit a fatal bug")
            return self.lin(x)

    def make():
        return Dying()
"""


def test_a_predictor_thread_dying_is_reported_and_the_run_finishes(tmp_path, monkeypatch):
    result = _diagnose(_factory(tmp_path, monkeypatch, DYING), tmp_path / "out", "1,2")
    record = result.record
    assert result.exit_code == 0 and record.status == "complete"
    one, two = record.steps
    assert one.dead_predictors == 0 and one.requests > 0
    assert two.dead_predictors == 1
    assert two.requests > 0  # the surviving predictor kept serving
    assert any("predictor died" in m and "PredictorKilled" in m for m in two.error_messages)
    finding = _codes(record)["PREDICTOR_ERRORS"]
    assert finding.severity == "fail"
    assert "died" in finding.title


OOM = """
    import threading, time
    import torch
    from torch import nn

    class OutOfMemoryAtTwo(nn.Module):
        example_input_shape = (4, 16)

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            time.sleep(0.002)
            if threading.current_thread().name.endswith("-1"):  # only exists from 2 predictors on
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.lin(x)

    def make():
        return OutOfMemoryAtTwo()
"""


def test_oom_at_a_step_ends_the_sweep_and_keeps_the_last_good_step(tmp_path, monkeypatch):
    result = _diagnose(_factory(tmp_path, monkeypatch, OOM), tmp_path / "out", "1,2,4")
    record = result.record
    assert result.exit_code == 0
    assert [s.predictors for s in record.steps] == [1, 2]  # 4 never ran
    assert not record.steps[0].oom and record.steps[1].oom
    assert "OOM" in _codes(record)
    assert "PREDICTOR_ERRORS" not in _codes(record)  # the OOM is the finding, not a flood of errors
    assert record.recommendation.get("predictors") == 1  # the last good step

    from gpuscope.reports.text import format_summary

    summary = format_summary(record)
    assert "OOM" in summary
    assert "recommendation: 1 predictor" in summary


# ---------------------------------------------------------------- NVML fails, the GPU is lost

def _gpu_record(pid: int) -> RunRecord:
    record = RunRecord(tool_version="test", started_at="2026-11-26T00:00:00+00:00", pid=pid)
    record.config = {"device": "cuda:0", "gpu_index": 0, "predictors": [1]}
    record.model = {"model_bytes": 64 * MiB}
    return record


def _finish(record, peaks, gaps, probe, pid, sampler) -> None:
    from gpuscope.analysis.findings import conclude
    from gpuscope.commands.diagnose import _finish_record

    _finish_record(record, peaks, gaps, probe, pid, 0, True, sampler)
    conclude(record)


def _describe_fake(pid: int, name: str) -> ProcessInfo:
    return ProcessInfo(pid, True, name or "?", "alice", "python serve.py", ("torch",), {})


@pytest.mark.parametrize("fault", ["memory_info_fails", "gpu_lost"])
def test_nvml_failing_mid_run_makes_readings_unavailable_and_says_so(tmp_path, fault):
    pid = os.getpid()
    nvml = ScriptedNvml(script=[DeviceState(processes=(FakeProcess(pid, 2 * GiB, "python3"),), gpu_util_pct=80)])
    probe = GpuProbe(nvml, describe=_describe_fake, pid_exists=lambda p: True)
    monitor, peaks, gaps = StepMonitor(pid, 0, 64 * MiB), PeakTracker(), GapTracker(pid, 0)
    writer = SampleWriter(str(tmp_path / "samples.jsonl"), {"t0_ns": 0})
    sampler = Sampler({"gpu": probe}, 0.05, writer, [monitor, peaks, gaps], event_sources=[probe])
    for _ in range(3):
        sampler.tick()
        nvml.advance()
    if fault == "gpu_lost":
        nvml.lose_gpu()
    else:
        nvml.fail("memory_info", NO_DEVICE, detail="NVML_ERROR_UNKNOWN")
        nvml.fail("running_processes", NO_DEVICE, detail="NVML_ERROR_UNKNOWN")
    for _ in range(4):
        values = sampler.tick()  # never raises
        nvml.advance()
    writer.close()
    after = {(s, m): v for s, m, v in values}
    assert isinstance(after[("gpu:0", "used_bytes")], Unavailable)
    assert isinstance(after[("gpu:0", "process_count")], Unavailable)

    # the peak from before the gap stands; nothing after it reads as 0
    assert monitor.snapshot()["process_gpu_bytes"] == 2 * GiB
    timeline = load_timeline(str(tmp_path / "samples.jsonl"))
    used = timeline.column("gpu:0", "used_bytes")
    assert all(is_available(v) for v in used[:3])
    assert all(isinstance(v, Unavailable) for v in used[3:]) and 0 not in used[3:]

    record = _gpu_record(pid)
    _finish(record, peaks, gaps, probe, pid, sampler)
    gap_keys = set(record.extra["measurement_gaps"])
    assert {"gpu:0 used_bytes", "gpu:0 process_count"} <= gap_keys
    assert all(g["ticks"] == 4 for g in record.extra["measurement_gaps"].values() if g)
    finding = next(f for f in record.findings if f.code == "MEASUREMENT_GAP")
    assert "readings stopped" in finding.title
    assert isinstance(record.baseline["end"]["device_used_bytes"], Unavailable)


def test_a_probe_that_raises_does_not_stop_the_sampler(tmp_path):
    class Broken:
        def read(self):
            raise RuntimeError("driver went away")

    class Fine:
        def read(self):
            return [("host", "cpu_util_pct", 12.5)]

    writer = SampleWriter(str(tmp_path / "samples.jsonl"), {"t0_ns": 0})
    sampler = Sampler({"broken": Broken(), "fine": Fine()}, 0.05, writer)
    for _ in range(3):
        sampler.tick()
    writer.close()
    assert sampler.ticks == 3
    assert "driver went away" in sampler.probe_errors["broken"]
    timeline = load_timeline(str(tmp_path / "samples.jsonl"))
    assert timeline.column("host", "cpu_util_pct") == [12.5, 12.5, 12.5]
    assert all(isinstance(v, Unavailable) for v in timeline.column("broken", "probe_error"))


# ---------------------------------------------------------------- processes exit between ticks

def _exited_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_profiled_and_a_foreign_process_exiting_between_ticks(tmp_path):
    pid = os.getpid()
    foreign = subprocess.Popen(["sleep", "30"])
    try:
        me = FakeProcess(pid, 2 * GiB, "python3")
        other = FakeProcess(foreign.pid, 3 * GiB, "sleep")
        ghost = FakeProcess(_exited_pid(), 1 * GiB, "gone-before-described")
        nvml = ScriptedNvml(script=[
            DeviceState(processes=(me, other)),
            DeviceState(processes=(me,)),          # the foreign process exited
            DeviceState(processes=(me, ghost)),    # listed by NVML, but already gone from /proc
            DeviceState(processes=()),             # the profiled process is no longer listed
        ])
        probe = GpuProbe(nvml, pid_exists=lambda p: True)  # the real describe_process, on real pids
        monitor, peaks, gaps = StepMonitor(pid, 0, 64 * MiB), PeakTracker(), GapTracker(pid, 0)
        sampler = Sampler({"gpu": probe}, 0.05, None, [monitor, peaks, gaps], event_sources=[probe])
        sampler.tick()
        foreign.kill()
        foreign.wait()
        for _ in range(3):
            nvml.advance()
            values = sampler.tick()
    finally:
        if foreign.poll() is None:
            foreign.kill()
            foreign.wait()
    last = monitor.snapshot()
    assert last["process_gpu_bytes"] == 2 * GiB  # the peak before it vanished
    figures, _ = monitor._figures(values)
    assert isinstance(figures["process_gpu_bytes"], Unavailable)
    assert figures["process_gpu_bytes"].reason == PROCESS_GONE
    assert monitor.other_pids_seen[foreign.pid] == 3 * GiB

    ghost_info = probe.processes[ghost.pid]
    assert ghost_info.exists is False
    assert isinstance(ghost_info.cmdline, Unavailable) and ghost_info.cmdline.reason == PROCESS_GONE

    record = _gpu_record(pid)
    _finish(record, peaks, gaps, probe, pid, sampler)
    listed = {p["pid"]: p for p in record.processes}
    assert listed[foreign.pid]["peak_used_bytes"] == 3 * GiB
    assert listed[ghost.pid]["exists"] is False
    assert "FOREIGN_PROCESS" in _codes(record)


def test_describing_a_pid_that_has_exited_says_so():
    info = describe_process(_exited_pid(), "nvml-name")
    assert info.exists is False and info.name == "nvml-name"
    assert isinstance(info.user, Unavailable) and info.user.reason == PROCESS_GONE


# ---------------------------------------------------------------- the disk fills up

class _FillsUp(SampleWriter):
    """A samples writer whose disk fills after `room` lines: later writes hit /dev/full's real ENOSPC."""

    room = 8

    full = False

    def write(self, obj):
        if self.lines_written == self.room and self._fd is not None and not self.full:
            disk = os.open("/dev/full", os.O_WRONLY)
            os.dup2(disk, self._fd)  # the writer's own descriptor now writes to a full device
            os.close(disk)
            self.full = True
        super().write(obj)


def test_sample_writer_on_a_full_disk_keeps_the_error_and_stops_writing():
    writer = SampleWriter("/dev/full", {"t0_ns": 0})
    for t in range(3):
        writer.write({"t_ns": t, "v": {"host": {"x": t}}})
    writer.close()
    assert isinstance(writer.error, OSError) and writer.error.errno == errno.ENOSPC
    assert writer.lines_written == 0


def test_disk_full_during_the_run_is_exit_2_and_keeps_what_was_written(tmp_path, monkeypatch):
    import gpuscope.measure.recording as recording_module

    monkeypatch.setattr(recording_module, "SampleWriter", _FillsUp)
    result = _diagnose("builtin:mlp", tmp_path / "out", "1")
    assert result.exit_code == 2
    record = load_run(str(tmp_path / "out" / "run.json"))
    assert "No space left on device" in (record.failure or "")
    timeline = load_timeline(str(tmp_path / "out" / "samples.jsonl"))  # the lines before the disk filled
    lines = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == _FillsUp.room
    assert timeline.torn_lines == 0


def _main(argv: list[str]) -> int:
    from gpuscope.commands.app import main

    return main(argv)


def test_disk_full_on_the_command_line_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import gpuscope.measure.recording as recording_module

    monkeypatch.setattr(recording_module, "SampleWriter", _FillsUp)
    rc = _main(["diagnose", "--out", str(tmp_path / "out"), "--predictors", "1", "--device", "cpu", "--duration", "1s",
                "--warmup", "0.1s", "--window", "0.3s", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], err
    assert (tmp_path / "out" / "samples.jsonl").exists()


def test_run_json_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import gpuscope.measure.recording as recording_module

    real_save = recording_module.save_run
    calls = []

    def save_run(record, path):
        calls.append(record.status)
        if record.status != "running":  # the progress saves went through; the final one finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real_save(record, path)

    monkeypatch.setattr(recording_module, "save_run", save_run)
    rc = _main(["diagnose", "--out", str(tmp_path / "out"), "--predictors", "1", "--device", "cpu", "--duration", "1s",
                "--warmup", "0.1s", "--window", "0.3s", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "run.json" in lines[0], err
    assert load_run(str(tmp_path / "out" / "run.json")).status == "running"  # the last good save, honest
    assert load_timeline(str(tmp_path / "out" / "samples.jsonl")).t_s


# ---------------------------------------------------------------- long runs

def test_the_sampler_keeps_bounded_memory(tmp_path):
    """Thousands of ticks through every listener: memory does not grow with the number of ticks."""
    pid = os.getpid()
    procs = tuple(FakeProcess(1000 + i, (i + 1) * MiB, f"p{i}") for i in range(20))
    nvml = ScriptedNvml(script=lambda tick: DeviceState(processes=(FakeProcess(pid, (tick % 97) * MiB),) + procs,
                                                       gpu_util_pct=tick % 100))
    probe = GpuProbe(nvml, describe=_describe_fake, pid_exists=lambda p: True)
    monitor, peaks, gaps = StepMonitor(pid, 0, 64 * MiB), PeakTracker(), GapTracker(pid, 0)
    writer = SampleWriter(str(tmp_path / "samples.jsonl"), {"t0_ns": 0})
    sampler = Sampler({"gpu": probe}, 0.05, writer, [monitor, peaks, gaps], event_sources=[probe])

    def run(ticks: int) -> None:
        for _ in range(ticks):
            sampler.tick()
            nvml.advance()

    run(200)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        run(2000)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    writer.close()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 256 * 1024, f"grew {grown} bytes over 2000 ticks"
    assert len(load_timeline(str(tmp_path / "samples.jsonl")).t_s) == 2200  # every tick went to disk instead
