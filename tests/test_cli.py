"""The command line starts fast: `gpuscope --help` must not import torch, matplotlib or the reports."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Every subprocess runs from the repo root and imports this checkout, whatever the caller's cwd
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

PROBE = """
import sys
from gpuscope.commands.app import main
code = main(["--help"])
heavy = sorted(m for m in ("torch", "matplotlib", "gpuscope.reports.html", "gpuscope.reports.plots", "pynvml") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
sys.exit(code)
"""


def test_help_is_fast_and_imports_nothing_heavy():
    # CPU seconds of the child, not wall time: other processes on the cores cannot make it look slow
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=ENV)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    elapsed = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert done.returncode == 0, done.stderr
    assert "diagnose" in done.stdout and "check" in done.stdout and "report" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "HEAVY:", done.stdout.splitlines()[-1]
    # a generous bound against a pathological start-up; the HEAVY: line above is the real check
    assert elapsed < 10.0, f"gpuscope --help took {elapsed:.2f} s of CPU"


def test_every_command_has_help():
    for command in ("diagnose", "check", "report", "ps", "watch", "export", "compare", "version"):
        done = subprocess.run([sys.executable, "-m", "gpuscope", command, "--help"], capture_output=True, text=True,
                              timeout=60, cwd=ROOT, env=ENV)
        assert done.returncode == 0, (command, done.stderr)
        assert "Usage" in done.stdout, command


def test_unknown_command_and_option_are_one_line_exit_2():
    for argv in (["frobnicate"], ["diagnose", "--no-such-option"], ["check", "--at-predictors", "abc"]):
        done = subprocess.run([sys.executable, "-m", "gpuscope", *argv], capture_output=True, text=True, timeout=60,
                              cwd=ROOT, env=ENV)
        assert done.returncode == 2, (argv, done.stderr)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("gpuscope: error:"), (argv, done.stderr)
        assert "Traceback" not in done.stderr


def test_check_help_shows_the_bracketed_table_name():
    # Rich reads `[check]` as markup and swallows it unless escaped
    done = subprocess.run([sys.executable, "-m", "gpuscope", "check", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**ENV, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "a gpuscope.toml with a [check] table" in done.stdout
