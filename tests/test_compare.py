"""`gpuscope compare`: N threads sharing one model versus N spawned worker processes each loading it.

The CPU path is real: real spawned workers, the built-in 64 MiB MLP, real USS
from smaps_rollup. The memory claim is the point (processes grow by a model
and an interpreter each, threads stay flat); speed is never asserted (2 shared
cores). Every test that starts workers proves that none of them survives.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gpuscope.analysis.verdict import PROCESSES, THREADS, build_comparison, comparison_findings
from gpuscope.commands.compare import CompareOptions, compare_environment, run_compare
from gpuscope.measure.participants import ParticipantsProbe
from gpuscope.measure.recording import Progress
from gpuscope.measure.workers import spawned_pids
from gpuscope.probes.readings import Unavailable, is_available
from gpuscope.record.errors import UsageError
from gpuscope.reports.text import format_comparison
from tests.fakes.nvml import DeviceState, FakeProcess, ScriptedNvml

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024**2

MODELS = '''
import os
from torch import nn


class Crashing(nn.Module):
    """Loads and answers the validation request, then kills its own process on the third call."""

    example_input_shape = (2, 8)

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 2:
            os._exit(7)
        return self.lin(x)


def crashing():
    return Crashing()


def broken():
    raise RuntimeError("factory exploded in the worker")


class Failing(nn.Module):
    """Answers the validation request, then raises on every request after it."""

    example_input_shape = (2, 8)

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("boom in forward")
        return self.lin(x)


def failing():
    return Failing()
'''


def _gone(pids: list[int], within_s: float = 5.0) -> list[int]:
    """The pids still running after up to `within_s` (zombies count as running: nobody reaped them)."""
    deadline = time.monotonic() + within_s
    while True:
        alive = [p for p in pids if psutil.pid_exists(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


@pytest.fixture
def models_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package of test factories in the working folder (spawned workers find it there, like a user's own)."""
    (tmp_path / "gpuscope_compare_models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "gpuscope_compare_models"


def _row(comparison: dict, mode: str, n: int) -> dict:
    return next(r for r in comparison["rows"] if r["mode"] == mode and r["predictors"] == n)


# ---------------------------------------------------------------- the real comparison on this CPU

def test_builtin_mlp_processes_pay_a_model_and_an_interpreter_each_threads_stay_flat(tmp_path: Path) -> None:
    before = set(spawned_pids())
    out = tmp_path / "cmp"
    result = run_compare(CompareOptions(model="builtin:mlp", device="cpu", predictors="1,2", duration="1.5s",
                                        warmup="0.5s", interval="100ms", out=str(out)),
                         progress=Progress(quiet=True))
    record = result.record
    print("\n" + format_comparison(record))  # the measured table, visible with -s
    assert result.exit_code == 0 and record.status == "complete" and record.mode == "compare"

    # every worker was reaped: one for threads, two for processes (the first reused at N=2)
    mine = [p for p in spawned_pids() if p not in before]
    assert len(mine) == 3 and sorted(mine) == sorted(record.extra["worker_pids"])
    assert _gone(mine, 0.0) == []

    comparison = record.extra["comparison"]
    model_bytes = record.model["model_bytes"]
    assert 60 * MiB < model_bytes < 70 * MiB  # builtin:mlp small: 4 x Linear(2048, 2048)
    for mode in (THREADS, PROCESSES):
        for n in (1, 2):
            row = _row(comparison, mode, n)
            assert row["requests"] > 0 and row["throughput_rps"] > 0 and row["errors"] == 0
            assert {"p50", "p99"} <= set(row["latency_ms"])
            assert row["memory_samples"] >= 2  # sampled through the window, not read once
            assert row["device_bytes"]["unavailable"] == "no_device"  # the CPU: unavailable, never 0
    assert _row(comparison, THREADS, 2)["processes"] == 1 and _row(comparison, PROCESSES, 2)["processes"] == 2
    assert _row(comparison, THREADS, 2)["model_copies"] == 1 and _row(comparison, PROCESSES, 2)["model_copies"] == 2

    uss = {(m, n): _row(comparison, m, n)["host_uss_bytes"] for m in (THREADS, PROCESSES) for n in (1, 2)}
    thread_growth = uss[THREADS, 2] - uss[THREADS, 1]
    process_growth = uss[PROCESSES, 2] - uss[PROCESSES, 1]
    # a second process pays the model again plus an interpreter with torch (~100-200 MiB private here)
    assert model_bytes + 20 * MiB <= process_growth <= model_bytes + 1024 * MiB, process_growth / MiB
    # a second thread pays a stack and its activations: nearly flat against a 64 MiB model
    assert abs(thread_growth) <= 0.4 * model_bytes, thread_growth / MiB
    # one predictor is the same deployment either way: one process, one model
    assert abs(uss[PROCESSES, 1] - uss[THREADS, 1]) <= 0.5 * model_bytes
    per_extra = comparison["per_extra_predictor"]
    assert per_extra[PROCESSES]["host_uss_bytes"] == process_growth
    assert per_extra[THREADS]["host_uss_bytes"] == thread_growth
    assert per_extra[PROCESSES]["device_bytes"]["unavailable"] == "no_device"

    finding = next(f for f in record.findings if f.code == "PROCESSES_VS_THREADS")
    assert finding.title.startswith("2 processes use ") and "more host memory than 2 threads" in finding.title
    assert "interpreters" in finding.title and comparison["verdict"]
    assert record.recommendation["reason"] == comparison["verdict"]

    # run.json: mode compare, the comparison as plain JSON
    data = json.loads((out / "run.json").read_text())
    assert data["mode"] == "compare" and data["status"] == "complete"
    assert data["extra"]["comparison"]["rows"] == json.loads(json.dumps(comparison["rows"]))
    for key in ("predictors", "mode", "throughput_rps", "latency_ms", "host_uss_bytes", "device_bytes"):
        assert key in data["extra"]["comparison"]["rows"][0]
    assert (out / "samples.jsonl").stat().st_size > 0
    png = out / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert '<section id="comparison">' in html and 'id="plot-comparison"' in html
    assert {"gpuscope", "torch", "python"} <= set(data["environment"])  # not "not recorded" in the report
    assert 'id="plots"' not in html and 'id="steps"' not in html and "0 steps" not in html
    table = format_comparison(record)
    assert "threads (1 process)" in table and "processes (1 predictor each)" in table and "verdict:" in table


def test_the_environment_of_a_compare_comes_without_cuda_in_the_parent() -> None:
    import torch

    initialised = torch.cuda.is_initialized()
    devices = [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15"},
               {"index": 1, "name": "NVIDIA H200", "driver": "550.54.15"}]
    env = compare_environment("cuda:0", devices, 1, {"torch_num_threads": 3})
    assert env["torch"] == torch.__version__ and env["gpuscope"] and env["python"]
    assert env["device_name"] == "NVIDIA H200" and env["driver"] == "550.54.15"  # NVML's, at the workers' index
    assert env["torch_num_threads"] == 3  # the worker's, not the parent's
    assert torch.cuda.is_initialized() == initialised
    assert "device_name" not in compare_environment("cpu", [], None, None)


# ---------------------------------------------------------------- no worker survives

def test_a_model_that_fails_to_load_in_the_worker_is_one_line_and_leaves_no_worker(tmp_path: Path,
                                                                                models_module: str) -> None:
    before = set(spawned_pids())
    out = tmp_path / "never"
    with pytest.raises(UsageError, match="factory exploded in the worker"):
        run_compare(CompareOptions(model=f"{models_module}:broken", device="cpu", predictors="1,2", out=str(out)),
                    progress=Progress(quiet=True))
    mine = [p for p in spawned_pids() if p not in before]
    assert len(mine) == 1 and _gone(mine, 0.0) == []
    assert not out.exists()  # bad input: nothing written


def test_a_worker_that_dies_mid_run_is_reported_and_every_worker_is_reaped(tmp_path: Path,
                                                                           models_module: str) -> None:
    before = set(spawned_pids())
    out = tmp_path / "crash"
    result = run_compare(CompareOptions(model=f"{models_module}:crashing", device="cpu", predictors="1,2",
                                        duration="1s", warmup="0.3s", out=str(out), report=False),
                         progress=Progress(quiet=True))
    mine = [p for p in spawned_pids() if p not in before]
    assert len(mine) == 2 and _gone(mine, 0.0) == []  # the thread-mode worker, then the first process worker
    record = result.record
    assert result.exit_code == 2 and record.status == "failed"
    errors = [r for r in record.extra["comparison"]["rows"] if r.get("error")]
    assert {r["mode"] for r in errors} == {THREADS, PROCESSES}
    assert all("exited with code 7" in r["error"] for r in errors)
    assert "exited with code 7" in record.failure
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert any(f.code == "PROCESSES_VS_THREADS" and "could not run" in f.title for f in record.findings)


def _marks(samples: Path) -> list[dict]:
    """The event lines samples.jsonl holds so far (a line being written is skipped)."""
    if not samples.exists():
        return []
    out = []
    for raw in samples.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and "event" in line:
            out.append(line)
    return out


def test_sigint_stops_and_reaps_every_worker_then_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "gpuscope", "compare", "--model", "builtin:mlp", "--device", "cpu",
                             "--predictors", "2", "--duration", "4s", "--warmup", "0.3s", "--out", str(out)],
                            cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: set[int] = set()
    step: dict | None = None
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        # wait for the event, not for time: the 2-process step's step_start mark in samples.jsonl, written once
        # both of its workers are up and before it measures (which takes --duration 4 s: the signal lands in it)
        while time.monotonic() < deadline and proc.poll() is None:
            workers |= {c.pid for c in parent.children() if "spawn_main" in " ".join(_cmdline(c))}
            step = next((m for m in _marks(out / "samples.jsonl")
                         if m.get("event") == "step_start" and m.get("mode") == PROCESSES), None)
            if step is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None and step is not None, "the process-mode step never started"
        assert len(step["pids"]) == 2, step
        workers |= set(step["pids"])
        assert len(workers) >= 3, workers  # the thread-mode worker seen earlier, and the two process workers
        descendants = {c.pid for c in parent.children(recursive=True)}
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert _gone(sorted(workers | descendants)) == []
    data = json.loads((out / "run.json").read_text())
    assert data["status"] == "interrupted" and data["mode"] == "compare"
    assert [r["mode"] for r in data["extra"]["comparison"]["rows"]] == [THREADS]  # the step measured before Ctrl-C


def test_a_killed_parent_takes_its_workers_with_it(tmp_path: Path) -> None:
    """SIGKILL runs no cleanup in the parent: the workers' parent-death signal and closed pipe end them."""
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "gpuscope", "compare", "--model", "builtin:mlp", "--device", "cpu",
                             "--predictors", "1", "--duration", "30s", "--out", str(out), "-q"],
                            cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:  # the thread-mode worker has loaded the model
            workers |= {c.pid for c in parent.children() if "spawn_main" in " ".join(_cmdline(c))}
            if workers and (out / "samples.jsonl").exists():
                break
            time.sleep(0.1)
        assert proc.poll() is None and workers, "the worker never started"
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _gone(sorted(workers)) == []


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


# ---------------------------------------------------------------- attribution and phrasing, without processes

def test_participants_are_summed_once_and_nvml_rows_are_attributed_by_pid() -> None:
    me = os.getpid()
    fake = {101: {"rss_bytes": 300, "pss_bytes": 200, "uss_bytes": 100},
            102: {"rss_bytes": 30, "pss_bytes": 20, "uss_bytes": 10}}
    nvml = ScriptedNvml(script=[DeviceState(processes=(FakeProcess(101, 5 * MiB), FakeProcess(102, 7 * MiB),
                                                       FakeProcess(999, 900 * MiB)))])
    probe = ParticipantsProbe(nvml, 0, children_every_s=float("inf"),  # fake pids: no /proc scan
                              read_memory=lambda pid: fake.get(pid, Unavailable("process_gone")))
    probe.set_pids([101, 102, 101])  # named twice: counted once
    values = {(s, m): v for s, m, v in probe.read()}
    assert values[("compare", "host_uss_bytes")] == 110 and values[("compare", "host_pss_bytes")] == 220
    assert values[("compare", "device_bytes")] == 12 * MiB  # the foreign pid 999 is not ours
    assert values[("compare", "processes")] == 2
    assert ("pid:999/gpu:0", "used_bytes") not in values

    probe.set_pids([101, 103])  # a worker that vanished makes the total unavailable, not smaller
    values = {(s, m): v for s, m, v in probe.read()}
    assert isinstance(values[("compare", "host_uss_bytes")], Unavailable)

    # another pid namespace: NVML lists host pids, none of them ours
    other_ns = ScriptedNvml(script=[DeviceState(processes=(FakeProcess(999, MiB),), used_bytes=1024 * MiB),
                                    DeviceState(processes=(FakeProcess(4001, 700 * MiB),), used_bytes=1724 * MiB)])
    no_rows = ParticipantsProbe(other_ns, 0, children_every_s=float("inf"), read_memory=lambda pid: fake[101])
    no_rows.set_pids([101])
    values = {(s, m): v for s, m, v in no_rows.read()}
    assert values[("compare", "device_bytes")].reason == "not_supported"  # no baseline: say so, never 0
    no_rows.mark_device_baseline()  # before the mode's workers start: the device holds 1 GiB of others' memory
    other_ns.advance()
    values = {(s, m): v for s, m, v in no_rows.read()}
    assert values[("compare", "device_bytes")] == 700 * MiB and no_rows.sources == {"device_delta"}

    cpu = ParticipantsProbe(None, None)
    cpu.set_pids([me])
    values = {(s, m): v for s, m, v in cpu.read()}
    assert values[("compare", "device_bytes")].reason == "no_device"
    assert is_available(values[("compare", "host_uss_bytes")]) and values[("compare", "host_uss_bytes")] > 0


def _synthetic(mode: str, n: int, rps: float, uss: int, device: object, p99: float = 10.0) -> dict:
    return {"predictors": n, "mode": mode, "processes": 1 if mode == THREADS else n, "requests": int(rps * 2),
            "errors": 0, "throughput_rps": rps, "latency_ms": {"p50": p99 / 2, "p99": p99},
            "host_uss_bytes": uss, "device_bytes": device}


def test_a_model_failing_every_request_is_a_failed_row_not_a_clean_run(tmp_path: Path, models_module: str) -> None:
    """Every request raises: no row may read as a measurement of 0 req/s; the run fails (exit 2) with the
    model's error in the rows and a finding, and the error count is the window's, not the whole step's."""
    out = tmp_path / "failing"
    result = run_compare(CompareOptions(model=f"{models_module}:failing", device="cpu", predictors="1",
                                        duration="0.5s", warmup="0.3s", out=str(out), report=False),
                         progress=Progress(quiet=True))
    record = result.record
    assert result.exit_code == 2 and record.status == "failed" and "boom in forward" in record.failure
    rows = record.extra["comparison"]["rows"]
    assert {r["mode"] for r in rows} == {THREADS, PROCESSES}
    for row in rows:
        assert row["requests"] == 0 and row["errors"] > 0 and "every request in the window failed" in row["error"]
        assert "boom in forward" in row["error"]
    assert any(f.code == "PROCESSES_VS_THREADS" and "could not run" in f.title for f in record.findings)


def test_verdict_and_finding_are_phrased_from_the_numbers_on_a_gpu() -> None:
    GiB = 1024**3
    rows = [_synthetic(THREADS, 1, 100, 2 * GiB, 2 * GiB), _synthetic(PROCESSES, 1, 101, 2 * GiB, 2 * GiB),
            _synthetic(THREADS, 4, 380, 2 * GiB + 20 * MiB, 2 * GiB + 64 * MiB),
            _synthetic(PROCESSES, 4, 390, 8 * GiB, 5 * GiB + 200 * MiB)]
    comparison = build_comparison(rows, gpu=True, model_bytes=600 * MiB)
    assert comparison["recommended_predictors"] == 4
    assert comparison["winner"] == THREADS
    assert comparison["verdict"].startswith("threads win at 4 predictors: the same throughput within 10%")
    assert "3.13 GiB less device memory" in comparison["verdict"]
    assert comparison["per_extra_predictor"][PROCESSES]["device_bytes"] > 1000 * MiB
    finding = comparison_findings(comparison, gpu=True, model_bytes=600 * MiB)[0]
    assert finding.title == ("4 processes use 3.13 GiB more device memory than 4 threads: "
                             "4 CUDA contexts and 4 model copies instead of one")
    assert finding.severity == "info" and finding.at_predictors == 4


def test_processes_winning_on_throughput_is_a_warning_with_its_memory_price() -> None:
    rows = [_synthetic(THREADS, 1, 100, 300 * MiB, Unavailable("no_device")),
            _synthetic(PROCESSES, 1, 102, 300 * MiB, Unavailable("no_device")),
            _synthetic(THREADS, 2, 105, 305 * MiB, Unavailable("no_device")),
            _synthetic(PROCESSES, 2, 198, 520 * MiB, Unavailable("no_device"))]
    comparison = build_comparison(rows, gpu=False, model_bytes=64 * MiB)
    assert comparison["winner"] == PROCESSES
    assert comparison["verdict"].startswith("processes win at 2 predictors: 1.89x the throughput of threads")
    assert "for 215 MiB more host memory" in comparison["verdict"]
    finding = comparison_findings(comparison, gpu=False, model_bytes=64 * MiB)[0]
    assert finding.severity == "warn"
    assert finding.title.startswith("2 processes use 215 MiB more host memory than 2 threads: 2 interpreters")


def test_the_finding_follows_the_verdict_when_processes_win_only_on_memory() -> None:
    """Throughput tied and the processes measured less memory: the verdict says processes; the finding
    must not then advise 'serve from threads' (its remedy once assumed threads had won), and it speaks
    of the verdict's predictor count, not the largest one measured."""
    rows = [_synthetic(THREADS, 1, 100, 300 * MiB, Unavailable("no_device")),
            _synthetic(PROCESSES, 1, 100, 300 * MiB, Unavailable("no_device")),
            _synthetic(THREADS, 2, 190, 400 * MiB, Unavailable("no_device")),
            _synthetic(PROCESSES, 2, 191, 350 * MiB, Unavailable("no_device")),
            _synthetic(THREADS, 4, 180, 420 * MiB, Unavailable("no_device")),
            _synthetic(PROCESSES, 4, 185, 380 * MiB, Unavailable("no_device"))]
    comparison = build_comparison(rows, gpu=False, model_bytes=64 * MiB)
    assert comparison["winner"] == PROCESSES and comparison["recommended_predictors"] == 2
    finding = comparison_findings(comparison, gpu=False, model_bytes=64 * MiB)[0]
    assert finding.at_predictors == 2 and finding.severity == "info"
    assert "serve from threads sharing one model" not in finding.remedy
    assert "measure again" in finding.remedy


def test_uss_is_read_at_most_every_second_and_at_a_windows_edges() -> None:
    """smaps_rollup costs milliseconds per process: the probe reads it for all participants at most every
    full_every_s (and when asked, at a window's start and end); RSS comes every tick."""
    clock = [0.0]
    full_reads: list[int] = []

    def read_memory(pid: int) -> dict:
        full_reads.append(pid)
        return {"rss_bytes": 300, "pss_bytes": 200, "uss_bytes": 100}

    probe = ParticipantsProbe(None, None, children_every_s=float("inf"), read_memory=read_memory,
                              read_rss=lambda pid: 310, clock_s=lambda: clock[0])
    probe.set_pids([101, 102])
    seen = []
    for step in range(12):  # 0.0 .. 1.1 s at 0.1 s
        clock[0] = step * 0.1
        values = {(s, m): v for s, m, v in probe.read()}
        seen.append(("compare", "host_uss_bytes") in values)
        assert values[("compare", "host_rss_bytes")] in (600, 620)  # every tick
    assert seen == [True] + [False] * 9 + [True, False]
    assert full_reads == [101, 102, 101, 102]
    probe.request_full()
    assert ("compare", "host_uss_bytes") in {(s, m) for s, m, _ in probe.read()}


def test_noise_at_one_predictor_widens_the_tie_and_is_said() -> None:
    rows = [_synthetic(THREADS, 1, 60, 300 * MiB, Unavailable("no_device")),
            _synthetic(PROCESSES, 1, 100, 300 * MiB, Unavailable("no_device")),
            _synthetic(THREADS, 2, 100, 305 * MiB, Unavailable("no_device")),
            _synthetic(PROCESSES, 2, 125, 520 * MiB, Unavailable("no_device"))]
    comparison = build_comparison(rows, gpu=False, model_bytes=64 * MiB)
    assert comparison["winner"] == THREADS  # 25% apart, but identical deployments differed by 40%
    assert comparison["verdict"].startswith("threads win at 2 predictors: throughput within this machine's noise "
                                            "(100.0 vs 125.0 req/s) with 215 MiB less host memory")
    assert "differed by 40%" in comparison["verdict"]


def test_one_predictor_alone_compares_nothing() -> None:
    rows = [_synthetic(THREADS, 1, 60, 300 * MiB, Unavailable("no_device")),
            _synthetic(PROCESSES, 1, 100, 301 * MiB, Unavailable("no_device"))]
    comparison = build_comparison(rows, gpu=False, model_bytes=64 * MiB)
    assert comparison["winner"] is None and "same deployment" in comparison["verdict"]
    assert comparison_findings(comparison, gpu=False, model_bytes=64 * MiB) == []
    assert comparison["per_extra_predictor"][THREADS]["host_uss_bytes"]["unavailable"] == "not_supported"


def test_compare_plot_draws_both_modes() -> None:
    pytest.importorskip("matplotlib")
    from gpuscope.reports.compare_plot import compare_png, series

    rows = [_synthetic(THREADS, 1, 100, 300 * MiB, Unavailable("no_device")),
            _synthetic(PROCESSES, 1, 102, 300 * MiB, Unavailable("no_device")),
            _synthetic(THREADS, 2, 105, 305 * MiB, Unavailable("no_device")),
            _synthetic(PROCESSES, 2, 198, 520 * MiB, Unavailable("no_device"))]
    comparison = build_comparison(rows, gpu=False, model_bytes=64 * MiB)
    assert series(comparison, "host_uss_bytes", MiB)[PROCESSES] == ([1, 2], [300.0, 520.0])
    assert series(comparison, "device_bytes") == {}  # not measured: no device panel
    assert compare_png(comparison)[:8] == b"\x89PNG\r\n\x1a\n"
