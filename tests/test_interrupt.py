"""Interrupting a real `gpuscope diagnose`: SIGINT, SIGTERM and kill -9 on a subprocess mid-sweep.

SIGINT/SIGTERM: the signal ends the step early (the sweep's `step_end` mark in
samples.jsonl is stamped with the same CLOCK_MONOTONIC as this test: after the
signal, before the step's own end; the step is `partial`), samples.jsonl stays, run.json says `interrupted`, report.html shows
what was measured, and the exit code is 130 or 143.

kill -9: nothing can run, so what is left is what was written as the run went:
samples.jsonl readable up to the last interval (a torn last line skipped),
run.json with status `running`, and `gpuscope report` renders both.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# --duration: the longest one step may run. Its windows are a third of it, so the step cannot go stable (3
# windows agreeing) and end by itself before STEP_S: only the signal can end it early, however slow the machine.
STEP_S = 30


def _start(out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gpuscope", "diagnose", "--model", "builtin:mlp", "--device", "cpu",
           "--duration", f"{STEP_S}s", "--predictors", "1,2", "--warmup", "0.1s", "--window", f"{STEP_S // 3}s", "--interval", "50ms",
           "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _lines(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(raw))
        except json.JSONDecodeError:
            pass
    return out


def _wait_for_measuring(proc: subprocess.Popen, samples: Path, ticks_after_start: int = 10,
                        timeout_s: float = 60.0) -> None:
    """Until the first step has started and the sampler has written `ticks_after_start` ticks since."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"diagnose exited early ({proc.returncode}):\n{out}\n{err}")
        lines = _lines(samples)
        start = next((i for i, line in enumerate(lines) if line.get("event") == "step_start"), None)
        if start is not None and sum(1 for line in lines[start:] if "v" in line) >= ticks_after_start:
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail("samples.jsonl never showed a running step")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_sweep_and_keeps_what_was_measured(tmp_path: Path, signum: int, code: int) -> None:
    out = tmp_path / "report"
    samples = out / "samples.jsonl"
    proc = _start(out)
    try:
        _wait_for_measuring(proc, samples)
        signalled_ns = time.monotonic_ns()
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    exited_s = (time.monotonic_ns() - signalled_ns) / 1e9
    where = f"\nstdout:\n{stdout}\nstderr:\n{stderr}"

    assert proc.returncode == code, where
    assert "Traceback" not in stderr, where
    # Before the sweep could have ended by itself: its first step alone runs up to STEP_S. How busy the machine
    # is decides how fast a stop goes, so the test holds the stop to what it controls, the step's length.
    assert exited_s < STEP_S, f"took {exited_s:.1f} s to exit after the signal{where}"

    # the signal ended the step (threads joined, step_end stamped) after it came and before the step's own end
    lines = _lines(samples)
    starts = [line for line in lines if line.get("event") == "step_start"]
    ends = [line for line in lines if line.get("event") == "step_end"]
    assert ends, "no step_end mark after the signal"
    stopped_s = (ends[-1]["t_ns"] - signalled_ns) / 1e9
    assert ends[-1]["t_ns"] >= signalled_ns, f"the step had ended {-stopped_s:.2f} s before the signal"
    assert ends[-1]["t_ns"] - starts[0]["t_ns"] < STEP_S * 1e9, f"predictors took {stopped_s:.2f} s to stop"
    assert [line.get("predictors") for line in lines if line.get("event") == "step_start"] == [1], \
        "the sweep went on to the next step after the signal"

    # samples.jsonl kept, every line whole, ticks up to the end
    from gpuscope.probes.samplefile import load_timeline

    timeline = load_timeline(str(samples))
    assert timeline.torn_lines == 0
    assert len(timeline.t_s) >= 10
    assert timeline.t_s[-1] >= (ends[-1]["t_ns"] - timeline.header["t0_ns"]) / 1e9  # the final tick after the stop

    # run.json: interrupted, with the step that was measured
    from gpuscope.record.run import load_run

    record = load_run(str(out / "run.json"))
    assert record.status == "interrupted"
    assert [s.predictors for s in record.steps] == [1]
    assert record.steps[0].requests > 0
    assert record.steps[0].partial is True  # cut short: kept and shown, but never the basis of a recommendation
    assert record.recommendation["predictors"] is None
    assert "interrupted" in record.recommendation["reason"]
    assert record.ended_at

    report = (out / "report.html").read_text(encoding="utf-8")
    assert "Interrupted run" in report
    assert "[interrupted]" in stdout


def test_kill_9_leaves_samples_and_a_record_that_report_renders(tmp_path: Path) -> None:
    out = tmp_path / "report"
    samples = out / "samples.jsonl"
    # the folder holds an earlier run's report: it must not pass for this run's once this one is killed
    out.mkdir()
    (out / "report.html").write_text("<p>an earlier run: healthy, recommended 4 predictors</p>")
    (out / "throughput_latency.png").write_bytes(b"an earlier run's plot")
    (out / "notes.txt").write_text("the user's own file")
    proc = _start(out)
    try:
        _wait_for_measuring(proc, samples, ticks_after_start=6)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    from gpuscope.probes.samplefile import load_timeline
    from gpuscope.record.run import load_run

    timeline = load_timeline(str(samples))
    ticks = len(timeline.t_s)
    assert ticks >= 6
    assert any(e.get("event") == "step_start" for e in timeline.events)

    # a write cut short by the kill: the torn last line is skipped, every whole tick is still read
    with open(samples, "a", encoding="utf-8") as fh:
        fh.write('{"t_ns": 12345, "v": {"host": {"cpu_u')
    torn = load_timeline(str(samples))
    assert torn.torn_lines == 1
    assert len(torn.t_s) == ticks

    record = load_run(str(out / "run.json"))
    assert record.status == "running"  # never passed off as complete
    assert not (out / "report.html").exists() and not (out / "throughput_latency.png").exists()
    assert (out / "notes.txt").read_text() == "the user's own file"

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rendered = subprocess.run([sys.executable, "-m", "gpuscope", "report", str(out / "run.json")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    assert "Traceback" not in rendered.stderr
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "never finished" in report
    assert "unreadable line" in report  # the torn line is mentioned, not hidden


def test_ctrl_c_while_the_model_loads_says_interrupted_and_leaves_nothing(tmp_path: Path) -> None:
    """Ctrl-C before the sweep (a slow model load): exit 130 with one line saying so, not a silent exit,
    and no run.json or samples from a run that never measured."""
    (tmp_path / "slow_loading_model.py").write_text(
        "import os, signal, time\n\n"
        "def make():\n"
        "    # the user presses Ctrl-C while the weights load (raise_signal: the handler runs before it returns)\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "    time.sleep(30)\n")
    out = tmp_path / "report"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    # The child starts with SIGINT's default disposition, as under a terminal, whatever this process inherited: a
    # test run started in the background of a non-interactive shell (a CI job, a load test) ignores SIGINT, and
    # its child would inherit that, sleep through the Ctrl-C and fail for a reason that is not gpuscope's.
    proc = subprocess.run([sys.executable, "-m", "gpuscope", "diagnose", "--model", "slow_loading_model:make",
                           "--device", "cpu", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60, preexec_fn=_default_sigint)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "gpuscope: interrupted\n"
    assert not (out / "run.json").exists() and not (out / "samples.jsonl").exists()
