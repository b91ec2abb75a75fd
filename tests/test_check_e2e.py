"""`gpuscope check` running its own sweep, end to end on the CPU (a real model, real threads).

What the unit tests of profiler/check.py cannot show: the exit code a CI job sees, the JUnit file, and
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
    proc = subprocess.run([sys.executable, "-m", "profiler", "check", *SHORT, "--out", str(out),
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
