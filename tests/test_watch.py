"""`gpuscope watch --pid`: a live process sampled from outside, against the scripted NVML, the H200 replay,
and real child processes on the CPU.

The scripted scenarios run on a fake clock: `wait()` moves time and the fake NVML one tick forward, so a
ten-second watch takes milliseconds and every tick is the scripted one.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any, Callable

import pytest

from gpuscope.analysis.live_rules import (
    GROWTH_CODE,
    REFERENCE_CONTEXT_BYTES,
    rule_live_low_headroom,
    rule_memory_growth,
)
from gpuscope.measure.live import MAX_DEPARTED_LISTED, BoundedSeries, ForgetDepartedPeaks, LiveTracker
from gpuscope.measure.recording import Progress
from gpuscope.commands.watch import WatchOptions, run_watch
from gpuscope.probes import scopes
from gpuscope.probes.processes import ProcessInfo, describe_process
from gpuscope.probes.samplefile import load_timeline
from gpuscope.probes.sampler import PeakTracker
from gpuscope.record.errors import UsageError
from gpuscope.record.run import Finding, RunRecord, load_run
from gpuscope.reports.text import format_live_summary
from tests.fakes.nvml import (
    H200_DRIVER_RESERVED_BYTES,
    DeviceState,
    FakeDevice,
    FakeProcess,
    GiB,
    MiB,
    ReplayNvml,
    ScriptedNvml,
)
from tests.children import running_python

FOREIGN = FakeProcess(4_000_201, 2566 * MiB, "/opt/torch/.venv/bin/python3", sm_util_pct=5)
OTHER_GPU = FakeProcess(4_000_202, 1 * GiB, "python3")
JAX = 4_000_203


def fake_describe(pid: int, nvml_name: str) -> ProcessInfo:
    """Real /proc for real pids (the watched child), made-up neighbours for the fake ones."""
    if pid == JAX:
        return ProcessInfo(pid, True, nvml_name, "bob", "python3 jax_job.py", ("jax",), {})
    if pid >= 4_000_000:
        return ProcessInfo(pid, True, nvml_name or "?", "carol", "python3 other.py", ("torch",), {})
    return describe_process(pid, nvml_name)


class FakeTime:
    """clock() and wait() for a watch: each wait moves time and the fake NVML one tick forward."""

    def __init__(self, nvml: Any = None, on_wait: Callable[["FakeTime"], None] | None = None) -> None:
        self.t = 10_000.0
        self.nvml = nvml
        self.waits = 0
        self.on_wait = on_wait

    def clock(self) -> float:
        return self.t

    def wait(self, seconds: float) -> None:
        self.t += seconds
        self.waits += 1
        if self.nvml is not None:
            self.nvml.advance()
        if self.on_wait is not None:
            self.on_wait(self)


def watch(pid: int, out, nvml: Any = None, time_: FakeTime | None = None, *, interval: str = "1s",
          duration: str = "10s", report: bool = False, **kwargs: Any):
    time_ = time_ or FakeTime(nvml)
    opener = (lambda: (nvml, None)) if nvml is not None else (lambda: (None, {"reason": "no_device", "detail": "test: no GPU"}))
    kwargs.setdefault("describe", fake_describe)
    kwargs.setdefault("pid_exists", lambda p: True)
    kwargs.setdefault("handle_signals", False)
    kwargs.setdefault("progress", Progress(quiet=True))
    return run_watch(WatchOptions(pid=pid, interval=interval, duration=duration, out=str(out), report=report),
                     nvml_opener=opener, clock=time_.clock, wait=time_.wait, **kwargs)


def codes(record: RunRecord) -> dict[str, Finding]:
    return {f.code: f for f in record.findings}


@pytest.fixture
def sleeper():
    proc = running_python()
    yield proc
    proc.kill()
    proc.wait()


# -- scripted NVML ----------------------------------------------------------------------------------

def test_several_processes_on_shared_devices_and_a_neighbour_exiting_mid_watch(sleeper, tmp_path):
    pid = sleeper.pid

    def script(tick: int):
        gpu0 = [] if tick >= 5 else [FOREIGN]                      # the neighbour exits after tick 4
        if tick >= 2:                                               # the target initialises CUDA at tick 2
            gpu0.append(FakeProcess(pid, (612 + 60 * (tick - 2)) * MiB, "python3", sm_util_pct=40))
        return [DeviceState(tuple(gpu0), gpu_util_pct=50), DeviceState((OTHER_GPU,))]

    nvml = ScriptedNvml([FakeDevice(), FakeDevice(uuid="GPU-2")], script)
    result = watch(pid, tmp_path / "w", nvml)
    record = result.record
    assert result.exit_code == 0 and record.status == "complete" and record.mode == "watch"
    assert record.config["ended_by"] == "duration" and record.config["device"] == "cuda:0"
    assert record.config["gpu_index"] == 0 and record.pid == pid
    live = record.extra["live"]
    assert live["ticks"] == 11 and live["duration_s"] == 10.0

    by_pid = {(p["pid"], p["gpu"]): p for p in record.processes}
    me = by_pid[(pid, 0)]
    assert me["self"] is True and me["peak_used_bytes"] == (612 + 60 * 8) * MiB and me["peak_sm_util_pct"] == 40
    assert me["first_seen_s"] == 2.0 and me["gone"] is False
    gone = by_pid[(FOREIGN.pid, 0)]
    assert gone["self"] is False and gone["gone"] is True and gone["last_seen_s"] == 4.0
    assert gone["peak_used_bytes"] == FOREIGN.used_bytes and gone["engines"] == ["torch"]
    assert by_pid[(OTHER_GPU.pid, 1)]["gone"] is False

    found = codes(record)
    foreign = found["FOREIGN_PROCESS"]
    assert [p["pid"] for p in foreign.evidence["processes"]] == [FOREIGN.pid]  # gpu:1's process is not on its device
    assert foreign.severity == "fail"  # it used the SMs during the watch
    outside = found["OUTSIDE_ALLOCATOR"]
    assert outside.evidence["context_source"] == "observed" and outside.evidence["context_bytes"] == 612 * MiB
    assert "612 MiB when it first appeared" in outside.title
    growth = found[GROWTH_CODE]
    assert growth.severity == "warn" and growth.evidence["figure"] == "process_gpu_bytes"
    assert growth.evidence["still_growing"] is True

    saved = load_run(str(tmp_path / "w" / "run.json"))
    assert saved.mode == "watch" and {f.code for f in saved.findings} == set(found)
    timeline = load_timeline(str(tmp_path / "w" / "samples.jsonl"))
    assert len(timeline.t_s) == 11 and timeline.t_s[-1] == 10.0
    assert timeline.column(f"pid:{pid}/gpu:0", "used_bytes")[:2] == [None, None]
    assert any(e.get("event") == "process" and e.get("pid") == FOREIGN.pid for e in timeline.events)


def test_the_target_exiting_mid_watch_ends_the_watch_and_keeps_the_report(tmp_path):
    child = running_python()
    pid = child.pid
    exited_at = 3

    def script(tick: int):
        procs = [FOREIGN] + ([FakeProcess(pid, 900 * MiB, "python3")] if tick < exited_at else [])
        return DeviceState(tuple(procs))

    nvml = ScriptedNvml(script=script)

    def on_wait(t: FakeTime) -> None:
        if t.waits == exited_at:
            child.kill()
            child.wait()

    try:
        result = watch(pid, tmp_path / "w", nvml, FakeTime(nvml, on_wait), duration="1h")
    finally:
        child.kill()
        child.wait()
    record = result.record
    assert result.exit_code == 0 and record.status == "complete"
    assert record.config["ended_by"] == "process_exit"
    assert record.extra["live"]["duration_s"] == 3.0  # not the hour it was asked for
    me = next(p for p in record.processes if p["pid"] == pid)
    assert me["peak_used_bytes"] == 900 * MiB and me["gone"] is True
    assert "FOREIGN_PROCESS" in codes(record)
    assert load_run(str(tmp_path / "w" / "run.json")).config["ended_by"] == "process_exit"
    assert "ended by process_exit" in format_live_summary(record)


def test_run_json_has_the_watch_so_far_within_seconds_of_the_start(sleeper, tmp_path):
    """What a kill -9 leaves a few seconds in: run.json (status running) already holds the samples' story,
    not the empty record written at the start."""
    seen: dict[float, Any] = {}

    def on_wait(t: FakeTime) -> None:
        path = tmp_path / "w" / "run.json"
        if path.exists():
            record = load_run(str(path))
            seen[round(t.t - 10_000.0, 2)] = ((record.extra or {}).get("live") or {}).get("ticks")

    watch(sleeper.pid, tmp_path / "w", time_=FakeTime(on_wait=on_wait), interval="250ms", duration="10s")
    assert seen[0.75] is None, seen       # only the record of the start so far
    assert seen[1.25] >= 4, seen          # saved at 1 s, with the ticks taken until then
    assert seen[2.5] >= 8, seen


def test_the_container_case_memory_used_but_nobody_listed(sleeper, tmp_path):
    nvml = ScriptedNvml(script=[DeviceState(used_bytes=6 * GiB + H200_DRIVER_RESERVED_BYTES, gpu_util_pct=80)])
    result = watch(sleeper.pid, tmp_path / "w", nvml, duration="3s")
    record = result.record
    assert record.config["device"] == "cpu" and record.config["gpu_index"] is None
    pid_ns = codes(record)["PID_NAMESPACE"]
    assert "while NVML lists no process" in pid_ns.title and pid_ns.evidence["unlisted_used_bytes"] == 6 * GiB
    assert "FOREIGN_PROCESS" not in codes(record)
    assert "the process did not appear on any GPU" in format_live_summary(record)


def test_a_clean_watch_raises_no_warnings(sleeper, tmp_path):
    nvml = ScriptedNvml(script=[DeviceState((FakeProcess(sleeper.pid, 1620 * MiB, "python3", 30),))])
    record = watch(sleeper.pid, tmp_path / "w", nvml).record
    assert [f.severity for f in record.findings] == ["info"]
    outside = codes(record)["OUTSIDE_ALLOCATOR"]  # always said: it answers "where did my memory go"
    # a reference, not this process's measurement: named so in the evidence, with the eager-loading figure beside it
    assert outside.evidence["context_source"] == "reference"
    assert outside.evidence["reference_context_bytes"] == REFERENCE_CONTEXT_BYTES
    assert "context_bytes" not in outside.evidence
    assert "typically" in outside.title and "a reference" in outside.title and "CUDA_MODULE_LOADING=EAGER" in outside.title


def test_replayed_h200_readings_foreign_process_then_a_jax_sibling(sleeper, tmp_path):
    pid = sleeper.pid
    lines = ReplayNvml().lines
    remapped = [{**line, "procs": [{**p, "pid": {474: pid, 527: JAX}.get(p["pid"], p["pid"] + 4_000_000)}
                                   for p in line["procs"]]} for line in lines]
    replay = ReplayNvml(remapped)
    result = watch(pid, tmp_path / "w", replay, interval="50ms", duration=f"{0.05 * (len(lines) - 1):.2f}s",
                   report=True)
    record = result.record
    assert record.extra["live"]["ticks"] == len(lines)
    found = codes(record)
    assert found["FOREIGN_PROCESS"].severity == "fail"  # a 105 GiB sibling holds far more than 10% of the card
    assert {p["pid"] for p in found["FOREIGN_PROCESS"].evidence["processes"]} == {505 + 4_000_000, JAX}
    assert found["ENGINE_PREALLOCATION"].evidence["pid"] == JAX
    me = next(p for p in record.processes if p["pid"] == pid)
    assert me["peak_used_bytes"] == max(p["used"] for line in lines for p in line["procs"] if p["pid"] == 474)
    jax = next(p for p in record.processes if p["pid"] == JAX)
    assert jax["gone"] is True and jax["peak_used_bytes"] == 107_918 * MiB
    assert record.extra["live"]["devices"][0]["peak_used_bytes"] == max(line["dev_used"] for line in lines)
    assert os.path.getsize(result.report_paths["memory_timeline"]) > 10_000
    html = open(result.report_paths["html"], encoding="utf-8").read()
    assert "FOREIGN_PROCESS" in html and "ENGINE_PREALLOCATION" in html


# -- real processes on the CPU --------------------------------------------------------------------

GROWER = """
import sys, time
sys.stdin.readline()                      # start when the watch says so
blocks = []
for _ in range(40):
    blocks.append(bytearray(b"\\x01") * (4 * 2**20))   # 4 MiB, every page touched
    time.sleep(0.05)
print("done", flush=True)                 # all 160 MiB are resident
time.sleep(120)
"""


def test_watching_a_real_child_shows_its_rss_growth_in_the_report(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", GROWER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    stop = threading.Event()
    done = threading.Event()
    threading.Thread(target=lambda: child.stdout.readline() == b"done\n" and done.set(), daemon=True).start()
    # The watch runs on a clock that each wait moves by exactly what was asked, after really waiting that long,
    # so the child grows while it is sampled; the last wait before the 2.6 s end also waits until the child
    # says it has allocated everything, so the final reading sees all of it however slow the machine is.
    duration_s = 2.6
    clock = {"t": 10_000.0}
    end = clock["t"] + duration_s - 1e-6

    def wait(seconds: float) -> None:
        if child.stdin is not None and not child.stdin.closed:
            child.stdin.write(b"go\n")
            child.stdin.close()
        stop.wait(seconds)
        clock["t"] += seconds
        if clock["t"] >= end:
            assert done.wait(120), "the child did not finish allocating 160 MiB within 120 s"

    try:
        result = run_watch(WatchOptions(pid=child.pid, interval="100ms", duration=f"{duration_s}s",
                                        out=str(tmp_path / "w")),
                           nvml_opener=lambda: (None, {"reason": "no_device", "detail": "test: no GPU"}),
                           clock=lambda: clock["t"], wait=wait, stop=stop, handle_signals=False,
                           progress=Progress(quiet=True))
    finally:
        child.kill()
        child.wait()
    assert done.is_set()
    record = result.record
    assert record.config["device"] == "cpu" and record.config["ended_by"] == "duration"
    growth = codes(record)[GROWTH_CODE]
    assert growth.evidence["figure"] == "rss_bytes" and growth.evidence["growth_bytes"] >= 100 * MiB
    assert "resident memory (RSS) grew by" in growth.title
    timeline = load_timeline(os.path.join(result.out_dir, "samples.jsonl"))
    rss = [v for v in timeline.column(f"pid:{child.pid}", "rss_bytes") if isinstance(v, int)]
    assert rss[-1] - rss[0] >= 100 * MiB
    html = open(result.report_paths["html"], encoding="utf-8").read()
    assert GROWTH_CODE in html and f"pid {child.pid}" in html
    assert os.path.getsize(result.report_paths["memory_timeline"]) > 10_000


def test_the_cli_watches_a_real_child_and_prints_a_summary(sleeper, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "gpuscope", "watch", "--pid", str(sleeper.pid), "--interval", "100ms",
                             "--duration", "0.5s", "--out", str(out)], capture_output=True, text=True, cwd=root,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"watched pid {sleeper.pid}" in result.stdout and "ended by duration" in result.stdout
    assert (out / "run.json").exists() and (out / "report.html").exists()
    assert json.loads((out / "run.json").read_text())["mode"] == "watch"
    bad = subprocess.run([sys.executable, "-m", "gpuscope", "watch", "--pid", "4000999"], capture_output=True,
                         text=True, cwd=root, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "gpuscope: error: --pid 4000999: no such process in this pid namespace\n"


# -- endings and bad input ------------------------------------------------------------------------------

def test_ctrl_c_is_an_ordinary_end(sleeper, tmp_path):
    stop = threading.Event()
    nvml = ScriptedNvml(script=[DeviceState((FakeProcess(sleeper.pid, GiB, "python3"),))])
    result = watch(sleeper.pid, tmp_path / "w", nvml, FakeTime(nvml, lambda t: t.waits == 3 and stop.set()),
                   stop=stop, duration="10m")
    assert result.exit_code == 0 and result.record.status == "complete"
    assert result.record.config["ended_by"] == "interrupt" and result.record.extra["live"]["duration_s"] == 3.0


def test_sigterm_writes_the_report_and_exits_143_with_handlers_restored(sleeper, tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    nvml = ScriptedNvml(script=[DeviceState((FakeProcess(sleeper.pid, GiB, "python3"),))])
    result = watch(sleeper.pid, tmp_path / "w", nvml,
                   FakeTime(nvml, lambda t: t.waits == 2 and os.kill(os.getpid(), signal.SIGTERM)),
                   duration="10m", handle_signals=True)
    assert result.exit_code == 143 and result.record.status == "interrupted"
    assert result.record.config["ended_by"] == "sigterm"
    assert load_run(str(tmp_path / "w" / "run.json")).status == "interrupted"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize("options, message", [
    ({"pid": 4_000_999}, "--pid 4000999: no such process in this pid namespace"),
    ({"pid": 0}, "--pid 0: not a process id"),
    ({"interval": "fast"}, "--interval: not a duration: 'fast'"),
    ({"interval": "1ms"}, "--interval: must be at least 0.005 s"),
    ({"duration": "0s"}, "--duration '0s': must be longer than 0 s"),
    ({"prometheus_port": 70000}, "--prometheus-port 70000: not a TCP port"),
])
def test_bad_input_is_one_line_before_anything_is_written(sleeper, tmp_path, options, message):
    out = tmp_path / "never"
    opts = {"pid": sleeper.pid, "out": str(out), **options}
    with pytest.raises(UsageError) as info:
        run_watch(WatchOptions(**opts), nvml_opener=lambda: pytest.fail("NVML opened before input was checked"))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not out.exists()


def test_a_process_that_already_exited_is_refused(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # until it has exited; not reaped: a zombie
        with pytest.raises(UsageError, match="already exited|no such process"):
            run_watch(WatchOptions(pid=child.pid, out=str(tmp_path / "w")))
    finally:
        child.wait()


class Tty(io.StringIO):
    """A stream that says it is a terminal: the status line is refreshed in place."""

    def isatty(self) -> bool:
        return True


def test_the_live_status_line_refreshes_on_a_terminal(sleeper, tmp_path):
    stream = Tty()
    nvml = ScriptedNvml(script=[DeviceState((FakeProcess(sleeper.pid, 1620 * MiB, "python3", 62), FOREIGN))])
    watch(sleeper.pid, tmp_path / "w", nvml, duration="3s", progress=Progress(stream=stream, columns=lambda: 200))
    text = stream.getvalue()
    assert text.count("\r\033[K") >= 4
    status = text.split("\r\033[K")[1]
    assert status.startswith(f"watch pid {sleeper.pid} (python")
    assert "gpu:0 1.58 GiB sm 62%" in status and "RSS " in status and "1 other process on its GPU" in status
    assert text.endswith("\r\033[K")  # the status line is cleared before the summary is printed
    # on an 80-column terminal the line is cut to one row (a wrapped line would leave rows behind)
    narrow = Tty()
    again = ScriptedNvml(script=[DeviceState((FakeProcess(sleeper.pid, 1620 * MiB, "python3", 62), FOREIGN))])
    watch(sleeper.pid, tmp_path / "narrow", again, duration="2s", progress=Progress(stream=narrow, columns=lambda: 80))
    refreshes = [part for part in narrow.getvalue().split("\r\033[K") if part]
    assert refreshes and all(len(part) <= 79 for part in refreshes), [len(p) for p in refreshes]
    assert any(part.endswith("\u2026") for part in refreshes)


def test_at_50ms_the_status_line_keeps_the_threads_read_every_quarter_second(sleeper, tmp_path):
    """At intervals under 125 ms the process's threads (and CPU) are read every 5th tick; the status line shows
    the last reading at every tick, not a gap on four ticks of five (the exporter's view is built from the
    same `_latest` readings; samples.jsonl still holds each only where it was read)."""
    stream = Tty()
    watch(sleeper.pid, tmp_path / "w", interval="50ms", duration="1s",
          progress=Progress(stream=stream, columns=lambda: 300))
    refreshes = [part for part in stream.getvalue().split("\r\033[K") if part.startswith("watch pid")]
    assert len(refreshes) == 21  # the fake clock: ticks at 0, 0.05, ..., 1.0 s
    assert all(" threads" in part for part in refreshes), [part for part in refreshes if " threads" not in part]
    column = load_timeline(str(tmp_path / "w" / "samples.jsonl")).column(f"pid:{sleeper.pid}", "num_threads")
    assert len(column) >= 15 and 0 < sum(value is not None for value in column) <= len(column) // 4 + 1


# -- the live rules and bounded memory ------------------------------------------------------------------

def live_record(series: dict[str, Any] | None = None, devices: list[dict[str, Any]] | None = None) -> RunRecord:
    record = RunRecord(tool_version="t", started_at="", mode="watch", pid=42)
    record.extra["live"] = {"target_pid": 42, "gpu_index": 0, "series": series or {}, "devices": devices or []}
    return record


def series(first: float, mid: float, last: float, span_s: float = 600.0, points: int = 600) -> dict[str, Any]:
    return {"first": first, "mid": mid, "last": last, "peak": max(first, mid, last), "first_t_s": 0.0,
            "last_t_s": span_s, "peak_t_s": span_s, "slope_bytes_per_s": (last - first) / span_s, "points": points}


def test_growth_that_levelled_off_is_info_small_growth_is_silent():
    levelled = rule_memory_growth(live_record({"rss_bytes": series(1 * GiB, 2 * GiB, 2 * GiB + 10 * MiB, span_s=3600)}))
    assert [(f.code, f.severity) for f in levelled] == [(GROWTH_CODE, "info")]
    assert "levelled off" in levelled[0].title and "/min" in levelled[0].title
    assert rule_memory_growth(live_record({"rss_bytes": series(1 * GiB, 1 * GiB, 1 * GiB + 32 * MiB)})) == []
    assert rule_memory_growth(live_record({"rss_bytes": series(10 * GiB, 10 * GiB, 10 * GiB + 200 * MiB)})) == []
    assert rule_memory_growth(live_record({"rss_bytes": series(0, 0, GiB, points=3)})) == []  # too few ticks
    leak = rule_memory_growth(live_record({"process_gpu_bytes": series(1 * GiB, 3 * GiB, 5 * GiB, span_s=7200)}))
    assert leak[0].severity == "warn" and "still growing" in leak[0].title and "34.1 MiB/min" in leak[0].title


def test_a_short_watch_of_a_steady_leak_is_still_growing_and_shows_the_readings_the_summary_shows():
    """5 MiB every 0.1 s for 1.4 s (the process then exits): 70 MiB, half of it in the second half.
    It is still growing (a second, absolute floor on the late growth once called it 'levelled off'),
    and the title's figures are the first and last readings, as the summary prints them."""
    leak = series(40 * MiB, 75 * MiB, 106 * MiB, span_s=1.4, points=15)
    leak.update(first_value=36 * MiB, last_value=111 * MiB)
    found = rule_memory_growth(live_record({"rss_bytes": leak}))
    assert [(f.code, f.severity) for f in found] == [(GROWTH_CODE, "warn")]
    assert "still growing" in found[0].title
    assert "grew by 75.0 MiB" in found[0].title and "(36.0 MiB -> 111 MiB" in found[0].title
    assert found[0].evidence["growth_bytes"] == 66 * MiB  # the decision's medians stay in the evidence
    # a first reading taken in a transient spike: the title falls back to the medians, never "grew by -512 MiB"
    spiky = series(1 * GiB, 1.25 * GiB, 1.5 * GiB, span_s=600)
    spiky.update(first_value=2 * GiB, last_value=1.5 * GiB)
    title = rule_memory_growth(live_record({"rss_bytes": spiky}))[0].title
    assert "grew by 512 MiB over 10 min (1.00 GiB -> 1.50 GiB" in title, title


def test_low_headroom_over_a_watch():
    total = 80 * GiB
    assert rule_live_low_headroom(live_record(devices=[{"index": 0, "total_bytes": total,
                                                        "peak_used_bytes": int(0.80 * total)}])) == []
    warn = rule_live_low_headroom(live_record(devices=[{"index": 0, "total_bytes": total,
                                                        "peak_used_bytes": int(0.90 * total), "peak_t_s": 3.0}]))
    assert warn[0].severity == "warn" and "90% full" in warn[0].title and warn[0].evidence["t_s"] == 3.0
    fail = rule_live_low_headroom(live_record(devices=[{"index": 0, "total_bytes": total,
                                                        "peak_used_bytes": int(0.97 * total)},
                                                       {"index": 1, "total_bytes": total,
                                                        "peak_used_bytes": int(0.99 * total)}]))
    assert [f.severity for f in fail] == ["fail"]  # only the watched process's device


def test_a_day_of_ticks_stays_bounded():
    s = BoundedSeries(max_points=256)
    for i in range(86_400):
        s.append(float(i), float(i % 1000) + (5000 if i == 50_000 else 0))
    assert len(s.points) < 256 and len(s) == 86_400
    summary = s.summary()
    assert summary["peak"] == 5000 + 50_000 % 1000 and summary["peak_t_s"] == 50_000.0
    assert summary["first_value"] == 0.0 and summary["last_value"] == 86_399 % 1000 and summary["last_t_s"] == 86_399.0
    ts = [t for t, _ in s.points]
    assert ts[0] == 0.0 and ts[-1] > 80_000 and ts == sorted(ts)



def test_a_days_watch_does_not_keep_every_process_that_came_and_went(sleeper, tmp_path):
    """24 h on the fake clock (a tick every 5 min), a new foreign process on the GPU every tick, as on a node
    whose jobs come and go: what the watch keeps about its neighbours must not grow with the day. (Its series
    are bounded per tick: test_a_day_of_ticks_stays_bounded; a watch at 1 s of a steady set of processes held
    417 kB of heap after 1 h and 413 kB after 86,400 ticks, docs/performance.md.) The run lists the departed
    neighbours that held the most, and counts the rest."""
    listed_pids: dict[int, float] = {}

    def held_bytes(tick: int) -> float:
        return float(((tick * 37) % 101 + 8) * MiB)  # sizes scrambled over the day, so "the largest" is a choice

    def state(tick: int) -> DeviceState:
        listed_pids[4_100_000 + tick] = held_bytes(tick)  # below pid_max (4,194,304): valid pids
        return DeviceState((FakeProcess(sleeper.pid, 3 * GiB, "python3"),
                            FakeProcess(4_100_000 + tick, held_bytes(tick), "python3")))

    nvml = ScriptedNvml(script=state)
    result = watch(sleeper.pid, tmp_path / "w", nvml, FakeTime(nvml), interval="5m", duration="24h", report=True)
    record = result.record
    assert record.config["ended_by"] == "duration"
    assert len(listed_pids) > LiveTracker.MAX_PIDS + MAX_DEPARTED_LISTED  # the tracker itself had to forget
    present = 4_100_000 + nvml.tick
    departed = {pid: used for pid, used in listed_pids.items() if pid != present}
    expected = sorted(departed, key=lambda pid: (-departed[pid], pid))[:MAX_DEPARTED_LISTED]

    neighbours = [p for p in record.processes if not p["self"]]
    assert {p["pid"] for p in neighbours if not p["gone"]} == {present}
    assert sorted(p["pid"] for p in neighbours if p["gone"]) == sorted(expected)
    assert len(record.processes) == MAX_DEPARTED_LISTED + 2  # the target, the one present now, the largest gone
    summary = record.extra["departed_processes"]
    assert summary["listed"] == MAX_DEPARTED_LISTED
    assert summary["not_listed"] == len(departed) - MAX_DEPARTED_LISTED
    assert summary["largest_not_listed_peak_used_bytes"] == max(
        used for pid, used in departed.items() if pid not in expected)
    saved = json.loads((tmp_path / "w" / "run.json").read_text())
    assert saved["extra"]["departed_processes"] == summary and len(saved["processes"]) == len(record.processes)
    page = (tmp_path / "w" / "report.html").read_text()
    assert (f"{summary['not_listed']} more processes used a GPU and left during the run; the {MAX_DEPARTED_LISTED} "
            "departed ones that held the most are listed; none of the others held more than") in page


def _tracker_of_four() -> tuple[LiveTracker, Callable[[int, dict[int, float]], None]]:
    """A LiveTracker bounded at 4 (pid, device) spans, and `tick(k, {pid: used_bytes})`: tick k, 1 s apart,
    with those pids on GPU 0."""
    tracker = LiveTracker(pid=1, t0_ns=0)
    tracker.MAX_PIDS = 4

    def tick(k: int, rows: dict[int, float]) -> None:
        tracker(k * 1_000_000_000,
                [(scopes.process_on_device(pid, 0), "used_bytes", used) for pid, used in rows.items()])

    return tracker, tick


def test_a_full_tracker_forgets_the_departed_neighbour_that_held_least_never_a_present_one():
    tracker, tick = _tracker_of_four()
    tick(0, {1: 9 * GiB, 10: 5 * MiB, 11: 7 * MiB, 12: 1 * MiB})
    tick(1, {1: 9 * GiB, 11: 7 * MiB})  # 10 and 12 left; 12 held least
    tick(2, {1: 9 * GiB, 11: 7 * MiB, 13: 2 * MiB})
    assert set(tracker.pid_spans()) == {(1, 0), (10, 0), (11, 0), (13, 0)}
    assert tracker.forgotten() == {"count": 1, "largest_peak_used_bytes": 1 * MiB}
    tick(3, {1: 9 * GiB, 11: 7 * MiB, 13: 2 * MiB, 14: 3 * MiB})  # full of present pids but 10: it goes
    assert set(tracker.pid_spans()) == {(1, 0), (11, 0), (13, 0), (14, 0)}
    assert tracker.forgotten() == {"count": 2, "largest_peak_used_bytes": 5 * MiB}
    tick(4, {1: 9 * GiB, 11: 7 * MiB, 13: 2 * MiB, 14: 3 * MiB, 15: 4 * MiB})  # all present: the stalest other
    assert (1, 0) in tracker.pid_spans() and len(tracker.pid_spans()) == 4
    assert tracker.forgotten()["count"] == 3


def test_the_peaks_forget_the_scopes_of_pids_the_tracker_forgot():
    tracker = LiveTracker(pid=1, t0_ns=0)
    tracker.MAX_PIDS = 2
    peaks = PeakTracker()
    forget = ForgetDepartedPeaks(peaks, tracker, every_ticks=2)
    for k, pid in enumerate((20, 21, 22, 23)):
        values = [(scopes.process_on_device(1, 0), "used_bytes", 1 * GiB),
                  (scopes.process_on_device(pid, 0), "used_bytes", (k + 1) * MiB),
                  (scopes.device(0), "used_bytes", 2 * GiB)]
        for listener in (peaks, tracker, forget):
            listener(k * 1_000_000_000, values)
    kept_pids = {pid for pid, _gpu in tracker.pid_spans()}
    assert kept_pids == {1, 23}
    process_scopes = {scopes.parse(scope).pid for scope, _ in peaks.peaks() if scopes.parse(scope).is_process_on_device}
    assert process_scopes == kept_pids  # pruned on the 4th tick, after 23 arrived
    assert peaks.peaks()[(scopes.device(0), "used_bytes")] == 2 * GiB  # device scopes are never pruned


def test_a_full_tracker_never_takes_a_pid_later_in_the_same_tick_for_departed():
    """Four spans kept, and a fifth pid first in the next tick's order: the four still listed after it were
    taken for departed mid-tick and forgotten one after another (5 'forgotten', first-seen times reset).
    The bound is applied after the tick: the one that held least goes, and nothing else moves."""
    tracker, tick = _tracker_of_four()
    tick(0, {10: 4 * MiB, 11: 5 * MiB, 12: 6 * MiB, 13: 7 * MiB})
    tick(1, {14: 1 * MiB, 10: 4 * MiB, 11: 5 * MiB, 12: 6 * MiB, 13: 7 * MiB})
    spans = tracker.pid_spans()
    assert set(spans) == {(10, 0), (11, 0), (12, 0), (13, 0)}  # the newcomer held least: not kept
    assert all(spans[key][0] == 0.0 for key in spans)  # first seen at 0, as they were
    assert tracker.forgotten() == {"count": 0, "largest_peak_used_bytes": None}  # it was never kept
    tick(2, {10: 4 * MiB, 11: 5 * MiB, 12: 6 * MiB, 13: 7 * MiB, 15: 9 * MiB})  # a bigger one: the least goes
    assert set(tracker.pid_spans()) == {(11, 0), (12, 0), (13, 0), (15, 0)}
    assert tracker.forgotten() == {"count": 1, "largest_peak_used_bytes": 4 * MiB}
