"""`gpuscope diagnose` end to end on the CPU: a real sweep of builtin:mlp, the files it leaves, and the
findings a shared model, a copied model and an oversubscribed CPU produce. A few seconds each."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpuscope.analysis.findings import DEFAULT_THRESHOLDS, rule_cpu_oversubscription
from gpuscope.commands.diagnose import run_diagnose
from gpuscope.measure.options import DiagnoseOptions
from gpuscope.probes.host import usable_cores
from gpuscope.probes.samplefile import load_timeline
from gpuscope.record.run import SCHEMA, load_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def diagnose(out: Path, **kwargs):
    options = dict(model="builtin:mlp", device="cpu", predictors="1,2", duration="2s", warmup="0.2s",
                   window="0.5s", out=str(out), quiet=True, report=False)
    options.update(kwargs)
    threads = torch.get_num_threads()
    try:
        return run_diagnose(DiagnoseOptions(**options))
    finally:
        torch.set_num_threads(threads)  # never leak a setting into the rest of the test process


def codes(record) -> dict[str, str]:
    return {f.code: f.severity for f in record.findings}


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("diagnose") / "report"
    before = os.times()
    result = diagnose(out)
    after = os.times()
    cpu_s = (after.user + after.system) - (before.user + before.system)  # this process, every thread, the whole run
    return result, out, cpu_s


def test_run_json_has_two_measured_steps(shared_run):
    result, out, cpu_s = shared_run
    assert result.exit_code == 0
    data = json.loads((out / "run.json").read_text())
    assert data["schema"] == SCHEMA == "gpuscope.run/1"
    assert data["status"] == "complete"
    assert data["config"]["device"] == "cpu" and data["config"]["predictors"] == [1, 2]
    assert [s["predictors"] for s in data["steps"]] == [1, 2]
    for step in data["steps"]:
        assert step["requests"] > 0 and step["throughput_rps"] > 0
        assert 0 < step["latency_ms"]["p50"] <= step["latency_ms"]["p99"]
        assert step["memory"]["rss_bytes"] > 0
        assert step["memory"]["layers"]["model_weights_bytes"] == data["model"]["model_bytes"]
        assert step["error_rate"] == 0.0 and step["dead_predictors"] == 0
        # the process's mean CPU over the window (100 = one core): measured, no more than every usable core. How
        # busy it reads depends on what else runs on the cores, so no floor above 0 is asserted.
        assert 0 < step["cpu_util_pct"] <= 100 * usable_cores() * 1.05, step["cpu_util_pct"]
    # and the windows' CPU is part of the CPU this process spent on the whole run, measured independently
    # (os.times counts in 10 ms clock ticks: one tick of slack per step)
    windows_cpu_s = sum(s["cpu_util_pct"] / 100 * s["duration_s"] for s in data["steps"])
    assert windows_cpu_s <= cpu_s + 0.01 * len(data["steps"]), (windows_cpu_s, cpu_s)
    for step in data["steps"]:
        assert 0 < step["memory"]["uss_bytes"] <= step["memory"]["rss_bytes"]  # each step reads its own USS
    assert data["model"]["model_bytes"] == 4 * (2048 * 2048 + 2048) * 4


def test_sharing_is_verified_with_one_weight_set(shared_run):
    result, out, cpu_s = shared_run
    record = load_run(str(out / "run.json"))
    assert record.sharing["verified"] is True
    assert record.sharing["distinct_weight_sets"] == 1
    assert record.sharing["memory_figure"] == "rss_bytes"
    assert all(s.distinct_weight_sets == 1 for s in record.steps)
    assert "DUPLICATE_MODEL" not in codes(record)
    assert "GRAD_ENABLED" not in codes(record)
    assert "PREDICTOR_ERRORS" not in codes(record)


def test_a_recommendation_is_made(shared_run):
    result, out, cpu_s = shared_run
    record = load_run(str(out / "run.json"))
    assert record.recommendation["predictors"] in (1, 2)
    reason = record.recommendation["reason"]
    assert "within 5% of the best" in reason or "the best throughput measured" in reason
    assert record.recommendation["p99_ms"] == record.step_at(record.recommendation["predictors"]).latency_ms["p99"]


def test_samples_file_parses(shared_run):
    result, out, cpu_s = shared_run
    timeline = load_timeline(str(out / "samples.jsonl"))
    assert timeline.header["mode"] == "diagnose" and timeline.header["device"] == "cpu"
    assert timeline.torn_lines == 0
    assert len(timeline.t_s) >= 10  # 50 ms ticks over a few seconds
    marks = [(e["event"], e.get("predictors")) for e in timeline.events if e["event"] in ("step_start", "step_end")]
    assert marks == [("step_start", 1), ("step_end", 1), ("step_start", 2), ("step_end", 2)]
    pid = timeline.header["pid"]
    rss = [v for v in timeline.column(f"pid:{pid}", "rss_bytes") if v is not None]
    assert rss and min(rss) > 0


def test_copy_model_is_a_duplicate_model_failure(tmp_path):
    result = diagnose(tmp_path / "copies", copy_model=True, duration="0.5s", window="0.2s")
    record = load_run(str(tmp_path / "copies" / "run.json"))
    assert [s.distinct_weight_sets for s in record.steps] == [1, 2]
    # steps shorter than USS's 2 s interval still read USS of their own, after their copies exist:
    # the original and one private copy per predictor are all in this process's unique memory
    for step in record.steps:
        assert step.memory["uss_bytes"] >= (1 + step.predictors) * record.model["model_bytes"], step.memory
    assert record.sharing["verified"] is False
    duplicate = next(f for f in record.findings if f.code == "DUPLICATE_MODEL")
    assert duplicate.severity == "fail"
    assert "2 distinct copies" in duplicate.title
    assert result.exit_code == 0


def test_four_predictors_at_default_threads_oversubscribe_this_machine(tmp_path):
    cores, threads = usable_cores(), torch.get_num_threads()
    if 4 * threads <= cores:
        pytest.skip(f"4 x {threads} intra-op threads fit in {cores} cores here")
    result = diagnose(tmp_path / "four", predictors="4", duration="1s")
    record = result.record
    step = record.steps[0]
    # the command measured what the rule reads: the pool's threads, the usable cores, the window's CPU
    assert step.intra_op_threads == threads
    assert record.host["usable_cores"] == cores
    assert isinstance(step.cpu_util_pct, float) and step.cpu_util_pct > 0, step.cpu_util_pct
    # The rule stays quiet when the measured CPU shows the threads were not busy, which another process on
    # the cores can make so: the test decides from the CPU this run measured, not from how busy the machine is.
    busy = step.cpu_util_pct >= DEFAULT_THRESHOLDS.oversubscription_busy_share * 100.0 * cores
    title = f"4 predictors x {threads} intra-op threads = {4 * threads} busy threads on {cores} usable core"
    found = [f for f in record.findings if f.code == "CPU_OVERSUBSCRIPTION"]
    if busy:
        assert len(found) == 1 and title in found[0].title, (step.cpu_util_pct, found)
    else:
        assert found == [], (step.cpu_util_pct, found)
    # and this run's record, its window's CPU read as busy, is oversubscribed whatever the machine did
    step.cpu_util_pct = 100.0 * cores
    [finding] = rule_cpu_oversubscription(record, DEFAULT_THRESHOLDS)
    assert title in finding.title


def test_one_intra_op_thread_per_predictor_does_not_oversubscribe(tmp_path):
    """Through the real command in a child process, so torch.set_num_threads(1) stays there."""
    if usable_cores() < 2:
        pytest.skip("needs 2 usable cores")
    out = tmp_path / "fits"
    threads_here = torch.get_num_threads()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "gpuscope", "diagnose", "--device", "cpu", "--predictors", "2",
                           "--intra-op-threads", "1", "--duration", "1s", "--warmup", "0.2s", "--window", "0.5s",
                           "--out", str(out), "--quiet", "--json"],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = load_run(str(out / "run.json"))
    assert record.config["intra_op_threads"] == 1
    assert [(s.predictors, s.intra_op_threads) for s in record.steps] == [(2, 1)]
    assert "CPU_OVERSUBSCRIPTION" not in codes(record)
    assert record.environment["torch_num_threads"] == 1
    assert torch.get_num_threads() == threads_here  # this process was not touched


def test_a_model_failing_every_request_exits_2_with_its_error_on_one_line(tmp_path):
    """It answers the validation request, then raises: no step completes a request. The cause is said on
    stderr and the exit code is 2 (not 0 with steps of 0 req/s); run.json and the report keep what was seen."""
    (tmp_path / "failing_after_one.py").write_text(
        "import torch\n\nclass Failing(torch.nn.Module):\n    example_input_shape = (2, 8)\n"
        "    def __init__(self):\n        super().__init__()\n        self.lin = torch.nn.Linear(8, 8)\n"
        "        self.calls = 0\n"
        "    def forward(self, x):\n        self.calls += 1\n"
        "        if self.calls > 1:\n            raise RuntimeError('feature store unreachable')\n"
        "        return self.lin(x)\n\ndef make():\n    return Failing()\n")
    out = tmp_path / "report"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    proc = subprocess.run([sys.executable, "-m", "gpuscope", "diagnose", "--model", "failing_after_one:make",
                           "--device", "cpu", "--predictors", "1,2", "--duration", "0.5s", "--warmup", "0.1s",
                           "--window", "0.2s", "--quiet", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gpuscope:")]
    assert lines == ["gpuscope: no request completed at any predictor count: RuntimeError: feature store unreachable "
                     "(run.json and the report keep what was seen)"], proc.stderr
    record = load_run(str(out / "run.json"))
    assert record.status == "complete" and all(s.requests == 0 for s in record.steps)
    assert record.sharing["bytes_per_extra_predictor"].detail == "fewer than two predictor counts completed requests"
    assert (out / "report.html").exists()


def test_a_model_that_keeps_memory_per_request_is_a_leak_not_a_per_predictor_cost(tmp_path, monkeypatch):
    """4 MiB kept per request: RSS climbs inside every step. MEMORY_GROWTH says so, where before the sweep
    only reported hundreds of MiB 'per extra predictor'; the built-in model's steps stay quiet."""
    (tmp_path / "leaky_model.py").write_text(
        "import torch\n\nclass Leaky(torch.nn.Module):\n    example_input_shape = (8, 256)\n"
        "    def __init__(self):\n        super().__init__()\n        self.lin = torch.nn.Linear(256, 256)\n"
        "        self.cache = []\n"
        "    def forward(self, x):\n        self.cache.append(torch.ones(1024 * 1024))\n        return self.lin(x)\n\n"
        "def make():\n    return Leaky()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    diagnose(tmp_path / "leak", model="leaky_model:make", duration="1s")
    record = load_run(str(tmp_path / "leak" / "run.json"))
    growth = [f for f in record.findings if f.code == "MEMORY_GROWTH"]
    late = [s.memory.get("late_growth_bytes") for s in record.steps]
    every_step_grew = all(isinstance(g, int) and g >= DEFAULT_THRESHOLDS.step_growth_min_bytes for g in late)
    # The rule is held to what the run measured: it fires exactly when every step grew past its threshold.
    assert bool(growth) == every_step_grew, (late, [f.code for f in record.findings])
    # With requests to spare (each keeps 4 MiB; a step's late half then keeps 12 x 4 MiB = 48 MiB, well past
    # the 32 MiB threshold), every step must have grown, so the finding fires; a machine so busy that a step
    # served fewer is held to the rule's own inputs above.
    if all(s.requests >= 24 for s in record.steps):
        assert every_step_grew, late
        assert len(growth) == 1 and growth[0].severity == "warn"
    # keeping a tensor per request on the module is also state shared between threads
    assert "Leaky.cache" in next(f.title for f in record.findings if f.code == "THREAD_UNSAFE")


def test_the_builtin_model_does_not_grow_inside_its_steps(shared_run):
    result, out, cpu_s = shared_run
    record = load_run(str(out / "run.json"))
    assert "MEMORY_GROWTH" not in codes(record)
    assert all(s.memory["late_growth_bytes"] < 32 * 1024**2 for s in record.steps)
