"""`gpuscope tune` end to end on the CPU (a real search of builtin:mlp in a short budget), its bad input,
its gate, its interruption, and the child-process path for environment settings.

Nothing here decides from how fast the machine is: assertions are about what was recorded (statuses,
reasons, the block's shape, the gate's verdict against limits no machine can miss), never about which
configuration won.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest
import torch

from gpuscope.commands.app import main
from gpuscope.commands.tune import TuneOptions, paste_block, run_tune
from gpuscope.measure.recording import Progress

pytestmark = pytest.mark.slow

STATUSES = {"measured", "skipped", "failed", "over_limit"}


def tune(out: Path, progress: Progress | None = None, **kwargs):
    options = dict(model="builtin:mlp", device="cpu", predictors="1,2", threads="1,2", duration="1s",
                   warmup="0.1s", window="0.25s", budget="60s", out=str(out), quiet=True)
    options.update(kwargs)
    threads = torch.get_num_threads()
    try:
        return run_tune(TuneOptions(**options), progress=progress)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "report"
    return tune(out), out


def test_the_run_json_tuning_block_has_the_issues_shape(tuned):
    result, out = tuned
    assert result.exit_code == 0
    data = json.loads((out / "run.json").read_text())
    assert data["mode"] == "tune" and data["status"] == "complete"
    tuning = data["tuning"]
    assert set(tuning) >= {"configurations", "best", "default", "budget_s", "elapsed_s"}
    assert tuning["budget_s"] == 60 and 0 < tuning["elapsed_s"] <= 60
    assert len(tuning["configurations"]) == 4  # 2 counts x 2 thread settings, each with a status
    for row in tuning["configurations"]:
        assert set(row["settings"]) == {"predictors", "intra_op_threads", "streams", "env"}
        assert row["status"] in STATUSES
        if row["status"] == "measured":
            assert row["throughput_rps"] > 0 and 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
            assert row["memory"]["host_bytes"] > 0 and row["memory"]["device_bytes"] is None  # a CPU run
        else:
            assert row["reason"]
    best, default = tuning["best"], tuning["default"]
    assert best["throughput_rps"] > 0 and best["gain_vs_default"] == pytest.approx(
        best["throughput_rps"] / default["throughput_rps"], rel=1e-3)
    assert default["settings"]["intra_op_threads"] == data["config"]["torch_default_threads"]
    assert data["recommendation"]["predictors"] == best["settings"]["predictors"]
    assert data["recommendation"]["intra_op_threads"] == best["settings"]["intra_op_threads"]
    # the default sweep is the run's steps, so findings read as diagnose's would
    assert {s["intra_op_threads"] for s in data["steps"]} == {default["settings"]["intra_op_threads"]}


def test_the_report_has_a_tuning_section_and_tuning_png(tuned):
    result, out = tuned
    html = (out / "report.html").read_text()
    assert 'id="tuning"' in html and "torch.set_num_threads(" in html
    png = (out / "tuning.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_gates_the_best_configuration_of_a_tune_run(tuned, capsys):
    result, out = tuned
    assert main(["check", "--run", str(out / "run.json"), "--min-throughput", "0.001"]) == 0
    text = capsys.readouterr()
    assert main(["check", "--run", str(out / "run.json"), "--min-throughput", "1e12"]) == 1
    capsys.readouterr()
    from gpuscope.analysis.gate import evaluate
    from gpuscope.analysis.limits import Limits
    from gpuscope.record.run import load_run

    record = load_run(str(out / "run.json"))
    outcome = evaluate(record, Limits(min_throughput=0.001))
    best = record.tuning["best"]
    assert outcome.results[0].measured_raw == pytest.approx(best["throughput_rps"])
    assert any("best configuration" in n for n in outcome.notes), (outcome.notes, text)


def test_a_constraint_nothing_meets_exits_1_with_the_closest(tmp_path):
    result = tune(tmp_path / "r", predictors="1", threads="1", max_p99_ms=0.0001)
    assert result.exit_code == 1
    tuning = result.record.tuning
    assert tuning["best"] is None and tuning["closest"]["status"] == "over_limit"
    assert "exceeded --max-p99-ms 0.0001" in tuning["closest"]["reason"]
    assert "passed" not in tuning["closest"]["reason"]
    assert result.record.recommendation["predictors"] is None
    assert 'id="tuning"' in (tmp_path / "r" / "report.html").read_text()


class _InterruptAfterFirst(Progress):
    """Ctrl-C as soon as the first configuration's line is printed: deterministic, whatever the machine's speed."""

    def __init__(self) -> None:
        super().__init__(quiet=False, stream=open(os.devnull, "w"))
        self.sent = False

    def line(self, text: str) -> None:
        if "req/s" in text and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_keeps_what_was_measured(tmp_path):
    result = tune(tmp_path / "r", progress=_InterruptAfterFirst())
    assert result.exit_code == 130
    data = json.loads((tmp_path / "r" / "run.json").read_text())
    assert data["status"] == "interrupted"
    rows = data["tuning"]["configurations"]
    assert sum(r["status"] == "measured" for r in rows) == 1
    assert {r["reason"] for r in rows if r["status"] == "skipped"} == {"interrupted"}
    assert (tmp_path / "r" / "report.html").exists()


def test_an_environment_setting_runs_in_a_spawned_worker_that_is_reaped(tmp_path):
    result = tune(tmp_path / "r", predictors="1", threads="1", env=("GPUSCOPE_TUNE_PROBE=1",), budget="120s")
    tuning = result.record.tuning
    child_rows = [r for r in tuning["configurations"] if r["settings"]["env"]]
    assert [r["settings"]["env"] for r in child_rows] == [{"GPUSCOPE_TUNE_PROBE": "1"}]
    row = child_rows[0]
    assert row["status"] in ("measured", "skipped"), row  # skipped only if dominated/plateaued: a stated reason
    if row["status"] == "measured":
        assert row["throughput_rps"] > 0 and row["memory"]["host_bytes"] > 0
    pids = result.record.extra["worker_pids"]
    assert pids and "GPUSCOPE_TUNE_PROBE" not in os.environ  # the parent's environment is untouched
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_paste_block_names_every_setting():
    text = paste_block({"predictors": 3, "intra_op_threads": 1, "streams": True,
                        "env": {"CUBLAS_WORKSPACE_CONFIG": ":0:0"}})
    assert text.splitlines()[:3] == ["export CUBLAS_WORKSPACE_CONFIG=:0:0", "torch.set_num_threads(1)",
                                     "predictors = 3  # the pool size: threads serving one shared model"]
    assert "Stream" in text


@pytest.mark.parametrize("argv, message", [
    (["--intra-op-threads", ""], "--intra-op-threads is empty"),
    (["--intra-op-threads", "1,x"], "'x' is not a whole number"),
    (["--intra-op-threads", "0"], "must be 1 to"),
    (["--budget", "0s"], "--budget 0s: must be more than 0 s"),
    (["--budget", "fast"], "--budget: not a duration: 'fast'"),
    (["--budget", "1s"], "shorter than one measured step"),
    (["--max-device-memory", "1GiB", "--device", "cpu"], "--max-device-memory cannot be measured on the CPU"),
    (["--max-host-memory", "lots"], "--max-host-memory: not a size"),
    (["--env", "NOEQUALS"], "expected NAME=VALUE"),
    (["--predictors", ""], "--predictors is empty"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_2(argv, message, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["tune", "--device", "cpu", "--out", str(out), "-q", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()  # nothing written before the input was accepted
