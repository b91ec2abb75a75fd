"""`gpuscope check` running its own sweep, end to end on the CPU (a real model, real threads).

What the unit tests of profiler/analysis/gate.py cannot show: the exit code a CI job sees, the JUnit file, and
that report.html, rendered by the same command, carries the gate's outcome.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--predictors", "1", "--duration", "0.6s", "--warmup", "0.1s", "--window", "0.2s", "--quiet"]


def _check(tmp_path: Path, *limits: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "gpuscope", "check", *SHORT, "--out", str(out),
                           "--junit", str(out / "junit.xml"), *limits],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=180)
    return proc, out


def test_a_missed_latency_target_fails_the_gate_and_the_report_shows_it(tmp_path: Path) -> None:
    """No count can meet p99 <= 1 us: the sweep recommends none, and the gate fails (exit 1) at the one
    count measured instead of calling the limit unmeasured (exit 2)."""
    proc, out = _check(tmp_path, "--max-p99-ms", "0.001")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("FAIL") and "max-p99-ms" in lines[0]
    assert lines[-1].endswith("(at 1 predictor, smallest measured) -> exit 1"), lines[-1]
    run = json.loads((out / "run.json").read_text())
    assert run["recommendation"]["predictors"] is None
    assert run["check"]["exit_code"] == 1 and run["check"]["at_predictors"] == 1
    html = (out / "report.html").read_text()
    section = html[html.index('<section id="check">'):]
    section = section[:section.index("</section>")]
    assert "<strong>failed</strong> (exit code 1). Step limits at 1 predictor (smallest measured)." in section
    assert "max_p99_ms" in section and "no predictor count was recommended" in section
    failures = ET.parse(out / "junit.xml").getroot().iter("failure")
    assert any("p99" in (f.get("message") or "") for f in failures)


def test_a_met_target_passes_and_the_report_shows_the_pass(tmp_path: Path) -> None:
    proc, out = _check(tmp_path, "--max-p99-ms", "100000")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].endswith("(at 1 predictor, recommended) -> exit 0")
    html = (out / "report.html").read_text()
    assert '<section id="check">' in html
    assert json.loads((out / "run.json").read_text())["check"]["exit_code"] == 0


def test_at_predictors_is_measured_even_when_the_sweep_would_not_reach_it(tmp_path: Path) -> None:
    """`--at-predictors 2` with `--predictors 1`: the sweep adds 2 (and the p99 limit does not stop it
    below 2), so the gate answers at 2 instead of 'could not measure'."""
    proc, out = _check(tmp_path, "--max-p99-ms", "100000", "--at-predictors", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.loads((out / "run.json").read_text())
    assert [s["predictors"] for s in run["steps"]] == [1, 2]
    assert run["check"]["at_predictors"] == 2 and run["check"]["at_predictors_source"] == "given"


def test_an_interrupted_sweep_replaces_the_last_junit_file_with_its_own(tmp_path: Path) -> None:
    """A reused CI workspace holds the last run's green junit.xml: a check interrupted mid-sweep must not
    leave it there. It writes this run's outcome (an unfinished run cannot pass) and exits 130."""
    (tmp_path / "interrupting_model.py").write_text(
        "import os, signal, threading\n"
        "import torch\n\n"
        "class Interrupting(torch.nn.Module):\n"
        "    example_input_shape = (4, 8)\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.linear = torch.nn.Linear(8, 8)\n"
        "        self.calls = 0\n"
        "        self.lock = threading.Lock()\n"
        "    def forward(self, x):\n"
        "        with self.lock:\n"
        "            self.calls += 1\n"
        "            if self.calls == 200:\n"
        "                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the sweep\n"
        "        return self.linear(x)\n\n"
        "def make():\n"
        "    return Interrupting()\n")
    out = tmp_path / "report"
    out.mkdir()
    (out / "junit.xml").write_text('<testsuites><testsuite name="OLD RUN" tests="1"/></testsuites>')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    proc = subprocess.run([sys.executable, "-m", "gpuscope", "check", "--model", "interrupting_model:make",
                           "--predictors", "1,2", "--duration", "5s", "--warmup", "0s", "--window", "0.2s", "--quiet",
                           "--max-p99-ms", "100000", "--out", str(out), "--junit", str(out / "junit.xml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    junit = (out / "junit.xml").read_text()
    assert "OLD RUN" not in junit
    root = ET.fromstring(junit)
    assert any(True for _ in root.iter("error")) or any(True for _ in root.iter("failure"))
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
