"""Run records and samples files from a newer (or foreign) schema: one clear line, exit 2, nothing rendered.

`gpuscope report` and `gpuscope check --run` run for real in subprocesses.
Keys added within the same schema version are read (keys are added freely,
never renamed without a new schema), so a newer gpuscope's extra keys are fine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_RUN = ROOT / "tests" / "fixtures" / "runs" / "cpu" / "run.json"


def _gpuscope(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "gpuscope", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _one_line_exit_2(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    where = f"\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"
    assert proc.returncode == 2, where
    assert "Traceback" not in proc.stderr + proc.stdout, where
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip() and proc.stderr.endswith("\n"), where
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} missing{where}"
    return lines[0]


def _run_dir(tmp_path: Path, schema: str | None = None, samples_schema: str | None = None,
             edit=None) -> Path:
    """A run folder: the CPU fixture's run.json (schema replaced) and a small samples.jsonl."""
    folder = tmp_path / "run"
    folder.mkdir()
    data = json.loads(FIXTURE_RUN.read_text(encoding="utf-8"))
    if schema is not None:
        data["schema"] = schema
    if edit is not None:
        edit(data)
    data["samples"] = "samples.jsonl"
    (folder / "run.json").write_text(json.dumps(data), encoding="utf-8")
    header = {"schema": samples_schema or "gpuscope.samples/1", "t0_ns": 0, "interval_s": 0.05, "pid": 1}
    ticks = [{"t_ns": i * 50_000_000, "v": {"pid:1": {"rss_bytes": 100_000_000 + i}}} for i in range(5)]
    (folder / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [header, *ticks]), encoding="utf-8")
    return folder


@pytest.mark.parametrize("command", ["report", "check"])
def test_a_run_from_a_newer_schema_is_refused(tmp_path, command):
    folder = _run_dir(tmp_path, schema="gpuscope.run/2")
    args = ["report", str(folder / "run.json")] if command == "report" else ["check", "--run", str(folder / "run.json")]
    line = _one_line_exit_2(_gpuscope(*args, cwd=tmp_path), "gpuscope.run/2", "newer", "upgrade gpuscope")
    assert "run.json" in line
    assert not (folder / "report.html").exists()


@pytest.mark.parametrize("command", ["report", "check"])
@pytest.mark.parametrize("schema, says", [("someone-else.run/1", "not a gpuscope run record"),
                                          (None, "not a gpuscope run record")], ids=["foreign", "no-schema"])
def test_a_foreign_run_record_is_refused(tmp_path, command, schema, says):
    def drop_schema(data):
        if schema is None:
            del data["schema"]

    folder = _run_dir(tmp_path, schema=schema, edit=drop_schema)
    args = ["report", str(folder / "run.json")] if command == "report" else ["check", "--run", str(folder / "run.json")]
    _one_line_exit_2(_gpuscope(*args, cwd=tmp_path), says)
    assert not (folder / "report.html").exists()


@pytest.mark.parametrize("content", ["{ not json", "[1, 2, 3]", ""], ids=["torn", "a-list", "empty"])
def test_a_run_json_that_is_not_a_record_is_refused(tmp_path, content):
    folder = _run_dir(tmp_path)
    (folder / "run.json").write_text(content, encoding="utf-8")
    _one_line_exit_2(_gpuscope("report", str(folder / "run.json"), cwd=tmp_path), "run.json")
    _one_line_exit_2(_gpuscope("check", "--run", str(folder / "run.json"), cwd=tmp_path), "run.json")


@pytest.mark.parametrize("constant", ["Infinity", "NaN"])
def test_a_run_json_with_non_finite_numbers_is_refused(tmp_path, constant):
    folder = _run_dir(tmp_path)
    text = (folder / "run.json").read_text(encoding="utf-8")
    text = text.replace('"throughput_rps": ', f'"throughput_rps": {constant}, "was": ', 1)
    (folder / "run.json").write_text(text, encoding="utf-8")
    _one_line_exit_2(_gpuscope("report", str(folder / "run.json"), cwd=tmp_path), constant)
    _one_line_exit_2(_gpuscope("check", "--run", str(folder / "run.json"), cwd=tmp_path), constant)


def test_a_samples_file_from_a_newer_schema_is_refused(tmp_path):
    folder = _run_dir(tmp_path, samples_schema="gpuscope.samples/3")
    _one_line_exit_2(_gpuscope("report", str(folder / "run.json"), cwd=tmp_path),
                     "samples.jsonl", "gpuscope.samples/3", "upgrade gpuscope")
    assert not (folder / "report.html").exists()


def test_a_missing_run_json_is_one_line(tmp_path):
    _one_line_exit_2(_gpuscope("report", str(tmp_path / "nowhere" / "run.json"), cwd=tmp_path), "no such file")
    _one_line_exit_2(_gpuscope("check", "--run", str(tmp_path / "nowhere" / "run.json"), cwd=tmp_path),
                     "no such file")


def test_keys_added_within_the_schema_are_read(tmp_path):
    """A same-schema record with keys this version does not know (a newer gpuscope's additions) still renders."""
    def add_keys(data):
        data["from_the_future"] = {"anything": [1, 2, 3]}
        for step in data["steps"]:
            step["new_metric_ms"] = 1.5
        for finding in data.get("findings", []):
            finding["new_field"] = "x"

    folder = _run_dir(tmp_path, edit=add_keys)
    proc = _gpuscope("report", str(folder / "run.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (folder / "report.html").exists()


def test_the_fixture_is_the_current_schema():
    from gpuscope.record.run import SCHEMA

    assert json.loads(FIXTURE_RUN.read_text(encoding="utf-8"))["schema"] == SCHEMA
