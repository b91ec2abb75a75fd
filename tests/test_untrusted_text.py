"""Untrusted text: escaped in every HTML output, secrets redacted in every output, never run.

Process names, command lines and environments come from other people's
processes; model paths come from the file system. They reach report.html,
run.json, samples.jsonl, the terminal summary and `--json`. Here real processes
carry the hostile text (a server whose arguments hold the secret, a binary named
like markup), NVML (scripted) lists them on the GPU, and the real probes,
session plumbing, findings and renderers carry it to every output.
"""
from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuscope.measure.attribution import GapTracker, StepMonitor
from gpuscope.probes.gpu import GpuProbe
from gpuscope.probes.samplefile import SampleWriter
from gpuscope.probes.sampler import PeakTracker, Sampler
from gpuscope.record.run import RunRecord, save_run
from tests.fakes.nvml import DeviceState, FakeProcess, GiB, MiB, ScriptedNvml

ROOT = Path(__file__).resolve().parent.parent
HOSTILE_MODEL_NAME = "<img src=x onerror=alert(1)>.pt"
HOSTILE_MODEL_ESCAPED = "&lt;img src=x onerror=alert(1)&gt;.pt"


# ---------------------------------------------------------------- a hostile model path, through diagnose

def test_a_model_path_that_is_markup_is_escaped_in_the_report(tmp_path, capsys, monkeypatch):
    import torch

    model = tmp_path / HOSTILE_MODEL_NAME
    torch.jit.save(torch.jit.script(torch.nn.Linear(8, 4)), str(model))
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    from gpuscope.commands.app import main

    rc = main(["diagnose", "--model", str(model), "--input-shape", "2x8", "--device", "cpu", "--predictors", "1",
               "--duration", "1s", "--warmup", "0.1s", "--window", "0.3s", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<img src=x onerror" not in html, "the model path reached the report as markup"
    assert "onerror=alert(1)>" not in html
    assert HOSTILE_MODEL_ESCAPED in html
    record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert record["model"]["source"] == str(model)  # JSON keeps the real name; JSON encoding is its escaping


# ---------------------------------------------------------------- hostile processes on the GPU

class Neighbour:
    """A real process that is not ours (orphaned, so not our descendant: gpuscope counts it as foreign)."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        launcher = subprocess.run(["/bin/sh", "-c", '"$@" >/dev/null 2>&1 </dev/null & echo $!', "launcher", *command],
                                  env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=10,
                                  check=True)
        self.pid = int(launcher.stdout.strip())

    def __enter__(self) -> "Neighbour":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _server_with_args(args: list[str], env: dict[str, str] | None = None) -> Neighbour:
    """A neighbour `python -c ... serve.py ARGS`: the arguments sit in its command line, unused."""
    return Neighbour([sys.executable, "-c", "import time; time.sleep(30)", "serve.py", *args], env)


def _wait_for_cmdline(pid: int, needle: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    seen = b""
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                seen = fh.read()
            if needle.encode() in seen:
                return
        except OSError as exc:
            seen = f"<{exc}>".encode()
        time.sleep(0.01)
    pytest.fail(f"pid {pid}'s command line never showed {needle!r} within {timeout_s:g} s "
                f"(last read: {seen[:200]!r})")


class Outputs:
    """Every output of a run, as text."""

    def __init__(self, html: str, run_json: str, samples: str, summary: str, summary_json: str) -> None:
        self.html, self.run_json, self.samples, self.summary, self.summary_json = (
            html, run_json, samples, summary, summary_json)

    def items(self) -> list[tuple[str, str]]:
        return [("report.html", self.html), ("run.json", self.run_json), ("samples.jsonl", self.samples),
                ("terminal summary", self.summary), ("--json summary", self.summary_json)]


def _run_with_neighbour(tmp_path: Path, neighbour_pid: int, neighbour_name: str = "") -> tuple[RunRecord, Outputs]:
    """Sample a scripted GPU holding this process and the neighbour; finish, conclude and render the run."""
    from gpuscope.analysis.findings import conclude
    from gpuscope.commands.diagnose import _finish_record
    from gpuscope.reports.html import render_html
    from gpuscope.reports.text import format_summary, summary_json

    pid = os.getpid()
    nvml = ScriptedNvml(script=[DeviceState(processes=(
        FakeProcess(pid, 2 * GiB, "python3", sm_util_pct=50),
        FakeProcess(neighbour_pid, 6 * GiB, neighbour_name or "neighbour", sm_util_pct=30)))])
    probe = GpuProbe(nvml, pid_exists=lambda p: True)  # the real describe_process reads the real /proc
    monitor, peaks, gaps = StepMonitor(pid, 0, 64 * MiB), PeakTracker(), GapTracker(pid, 0)
    samples = tmp_path / "samples.jsonl"
    writer = SampleWriter(str(samples), {"t0_ns": 0})
    sampler = Sampler({"gpu": probe}, 0.05, writer, [monitor, peaks, gaps], event_sources=[probe])
    for _ in range(3):
        sampler.tick()
        nvml.advance()
    writer.close()
    record = RunRecord(tool_version="test", started_at="2026-11-26T00:00:00+00:00", pid=pid)
    record.config = {"device": "cuda:0", "gpu_index": 0, "predictors": [1], "model": "builtin:mlp"}
    record.model = {"source": "builtin:mlp", "model_bytes": 64 * MiB}
    record.devices = [d.to_json() for d in probe.devices]
    _finish_record(record, peaks, gaps, probe, pid, 0, True, sampler)
    conclude(record)
    record.status = "complete"
    save_run(record, str(tmp_path / "run.json"))
    outputs = Outputs(render_html(record, [], notes=[]), (tmp_path / "run.json").read_text(encoding="utf-8"),
                      samples.read_text(encoding="utf-8"), format_summary(record),
                      json.dumps(summary_json(record), default=str))
    return record, outputs


def test_a_neighbours_secret_and_markup_never_reach_an_output(tmp_path):
    with _server_with_args(["--api-key=SECRET123", "<b>html</b>"]) as proc:
        _wait_for_cmdline(proc.pid, "SECRET123")
        record, outputs = _run_with_neighbour(tmp_path, proc.pid)
    neighbour = next(p for p in record.processes if p["pid"] == proc.pid)
    assert "--api-key=***" in neighbour["cmdline"]  # it was read, and redacted at the source
    assert any(f.code == "FOREIGN_PROCESS" for f in record.findings)  # its command line is in the evidence
    for name, text in outputs.items():
        assert "SECRET123" not in text, f"the secret reached {name}"
    assert "<b>html</b>" not in outputs.html
    assert "&lt;b&gt;html&lt;/b&gt;" in outputs.html


def test_a_process_named_like_markup_is_escaped(tmp_path):
    hostile = tmp_path / "<svg onload=1>"
    hostile.symlink_to("/bin/sleep")
    with Neighbour([str(hostile), "30"]) as proc:
        _wait_for_cmdline(proc.pid, "<svg")
        record, outputs = _run_with_neighbour(tmp_path, proc.pid, neighbour_name="<svg onload=1>")
    neighbour = next(p for p in record.processes if p["pid"] == proc.pid)
    assert neighbour["name"].startswith("<svg") and not neighbour["self"]
    assert "<svg onload" not in outputs.html
    assert "&lt;svg onload=1&gt;" in outputs.html


def test_environment_values_are_escaped_and_their_credentials_redacted(tmp_path):
    env = {"PYTORCH_CUDA_ALLOC_CONF": "<script>alert(1)</script>",
           "TF_GPU_ALLOCATOR": "https://svc:ENVSECRET@allocator.internal/cfg"}
    with _server_with_args([], env=env) as proc:
        _wait_for_cmdline(proc.pid, "serve.py")
        record, outputs = _run_with_neighbour(tmp_path, proc.pid)
    neighbour = next(p for p in record.processes if p["pid"] == proc.pid)
    assert neighbour["memory_env"]["PYTORCH_CUDA_ALLOC_CONF"] == "<script>alert(1)</script>"  # read for real
    for name, text in outputs.items():
        assert "ENVSECRET" not in text, f"the credential reached {name}"
    assert "<script>alert(1)" not in outputs.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in outputs.html


# One row per redaction pattern: the arguments a neighbour runs with, and the secret in them.
PATTERNS = [
    ("flag=value", ["--token=S3CR3T-flag-eq"], "S3CR3T-flag-eq"),
    ("flag value", ["--token", "S3CR3T-flag-sp", "--port", "8000"], "S3CR3T-flag-sp"),
    ("hf-token", ["--hf-token", "hf_S3CR3Thf"], "hf_S3CR3Thf"),
    ("password", ["--password", "S3CR3T-pw"], "S3CR3T-pw"),
    ("passwd=", ["--passwd=S3CR3T-passwd"], "S3CR3T-passwd"),
    ("api-key=", ["--api-key=S3CR3T-apikey"], "S3CR3T-apikey"),
    ("api_key", ["--api_key", "S3CR3T-api_key"], "S3CR3T-api_key"),
    ("access-key", ["--access-key=AKIAS3CR3T"], "AKIAS3CR3T"),
    ("private-key", ["--private-key", "S3CR3T-pk"], "S3CR3T-pk"),
    ("client-secret", ["--client-secret", "S3CR3T-cs"], "S3CR3T-cs"),
    ("credential", ["--credentials=S3CR3T-cred"], "S3CR3T-cred"),
    ("auth", ["--auth", "Bearer-S3CR3T-auth"], "Bearer-S3CR3T-auth"),
    ("key", ["--key", "S3CR3T-key"], "S3CR3T-key"),
    ("env assignment", ["AWS_SECRET_ACCESS_KEY=S3CR3T-aws", "python", "x.py"], "S3CR3T-aws"),
    ("env token", ["HF_TOKEN=hf_S3CR3Tenv"], "hf_S3CR3Tenv"),
    ("url credentials", ["postgres://svc:S3CR3T-pg@db:5432/app"], "S3CR3T-pg"),
    ("url in flag", ["--broker=redis://:S3CR3T-redis@cache:6379/0"], "S3CR3T-redis"),
    ("url with @ in password", ["--db", "https://user:p@S3CR3T-at@host/x"], "S3CR3T-at"),
]


@pytest.mark.parametrize("args, secret", [(a, s) for _, a, s in PATTERNS], ids=[n for n, _, _ in PATTERNS])
def test_each_secret_pattern_is_redacted_in_every_output(tmp_path, args, secret):
    with _server_with_args(args) as proc:
        _wait_for_cmdline(proc.pid, secret)
        record, outputs = _run_with_neighbour(tmp_path, proc.pid)
    neighbour = next(p for p in record.processes if p["pid"] == proc.pid)
    assert "serve.py" in neighbour["cmdline"] and "***" in neighbour["cmdline"]
    assert any(f.code == "FOREIGN_PROCESS" for f in record.findings)  # the command line is in its evidence too
    for name, text in outputs.items():
        assert secret not in text, f"{secret!r} reached {name}"


def test_a_record_holding_a_raw_secret_is_still_redacted_and_escaped_in_html():
    """Defence in depth: a run.json from elsewhere (or hand-edited) whose command line was never redacted."""
    from gpuscope.reports.html import render_html

    record = RunRecord(tool_version="test", started_at="2026-11-26T00:00:00+00:00", pid=1)
    record.config = {"device": "cuda:0", "gpu_index": 0}
    record.processes = [{"pid": 1, "self": True, "name": "python3", "cmdline": "python serve.py", "gpu": 0},
                        {"pid": 2, "self": False, "name": "<b>evil</b>", "gpu": 0, "peak_used_bytes": GiB,
                         "cmdline": "python serve.py --api-key=SECRET123 <b>html</b> postgres://u:PGSECRET@db/x",
                         "memory_env": {"TF_GPU_ALLOCATOR": "https://u:ENVSECRET@h/", "HF_TOKEN": "ENVTOKEN"}}]
    html = render_html(record, [], notes=[])
    for secret in ("SECRET123", "PGSECRET", "ENVSECRET", "ENVTOKEN"):
        assert secret not in html
    assert "<b>" not in html
    assert "&lt;b&gt;html&lt;/b&gt;" in html and "&lt;b&gt;evil&lt;/b&gt;" in html


def test_a_command_line_held_as_an_argv_list_in_a_findings_evidence_is_redacted_whole():
    """A flag and its value are two items of an argv list: redacted one item at a time, `--password`
    and `pw123` each looked harmless and the secret reached the page."""
    from gpuscope.record.run import Finding
    from gpuscope.reports.html import render_html

    record = RunRecord(tool_version="test", started_at="2026-11-26T00:00:00+00:00", pid=1)
    record.config = {"device": "cuda:0", "gpu_index": 0}
    record.findings = [Finding("FOREIGN_PROCESS", "warn", "another process holds memory",
                               {"processes": [{"pid": 2, "cmdline": ["python", "serve.py", "--password", "pw123",
                                                                     "--token", "open sesame"]}]},
                               "move it", None)]
    html = render_html(record, [], notes=[])
    assert "pw123" not in html and "--password" in html
    assert "sesame" not in html and "--token" in html  # a secret with a space in it stays one argv item


# ---------------------------------------------------------------- nothing reaches a shell or eval

_FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
_FORBIDDEN_ATTRS = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execlp"), ("os", "execvp"),
                    ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"), ("pickle", "loads"),
                    ("pickle", "load"), ("marshal", "loads"), ("yaml", "load")}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in _FORBIDDEN_CALLS:
            found.append(f"{path.name}:{node.lineno} {func.id}()")
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                and (func.value.id, func.attr) in _FORBIDDEN_ATTRS:
            found.append(f"{path.name}:{node.lineno} {func.value.id}.{func.attr}()")
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                found.append(f"{path.name}:{node.lineno} shell=...")
    return found


def test_nothing_from_outside_reaches_a_shell_or_eval():
    files = [p for pkg in ("profiler", "probes", "reports") for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 20
    problems = [v for path in files for v in _violations(path)]
    assert problems == [], "a shell, eval or unpickling call in gpuscope's own code: " + ", ".join(problems)


def test_the_terminal_summary_shows_control_characters_in_findings_escaped():
    # a foreign process named with an escape sequence must not drive the user's terminal
    from gpuscope.record.run import Finding
    from gpuscope.reports.text import format_findings

    hostile = Finding("FOREIGN_PROCESS", "warn", "pid 7 (\x1b[2J\x1b]0;owned\x07evil) holds 2 GiB", {},
                      "kill \x1b[31mit")
    text = "\n".join(format_findings([hostile]))
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b[2J" in text and "\\x1b[31mit" in text
