"""`gpuscope.profile()`: the in-process API, in a real threaded server loop on the CPU (the example of
docs/live.md, run verbatim) and with the scripted NVML plus a fake allocator for the GPU picture."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import gpuscope
from gpuscope.inprocess import Profile
from gpuscope.probes.samplefile import load_timeline
from gpuscope.record.run import load_run
from tests.fakes.nvml import DeviceState, FakeProcess, GiB, MiB, ScriptedNvml
from tests.fakes.torch_cuda import FakeTorchCuda

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = lambda: (None, {"reason": "no_device", "detail": "test: no GPU"})  # noqa: E731


def docs_example() -> str:
    text = (ROOT / "docs" / "live.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- example: threaded-server -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/live.md lost its threaded-server example"
    return match.group(1)


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gpuscope-sampler"]


def test_the_documented_threaded_server_example_runs_and_writes_the_report(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(tmp_path)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    namespace: dict = {"__name__": "docs_live_example"}
    threads = torch.get_num_threads()  # the example sets torch.set_num_threads(1): not for the tests after it
    try:
        exec(compile(docs_example(), str(ROOT / "docs" / "live.md"), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    prof = namespace["prof"]
    assert len(namespace["answered"]) == 3000  # every request answered by the four predictors
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # no signal handlers installed
    assert sampler_threads() == []  # the sampler thread is gone
    out = tmp_path / "gpuscope-report"
    record = load_run(str(out / "run.json"))
    assert record.mode == "profile" and record.status == "complete" and record.pid == os.getpid()
    assert record.config["ended_by"] == "stop" and record.config["interval_s"] == 0.05
    assert record.environment["torch"] and record.environment["torch_num_threads"] == 1
    live = record.extra["live"]
    assert live["ticks"] >= 3 and live["series"]["rss_bytes"]["peak"] > 50 * MiB
    me = next(p for p in record.processes if p["pid"] == os.getpid())
    assert me["self"] is True and isinstance(me["cmdline"], str)
    with open(f"/proc/{os.getpid()}/maps", encoding="utf-8", errors="replace") as fh:
        cuda_mapped = "libtorch_cuda" in fh.read()
    # the engine is reported exactly when torch's CUDA library is mapped (a CPU build maps none)
    assert ("torch" in (me["engines"] or [])) == cuda_mapped
    timeline = load_timeline(str(out / "samples.jsonl"))
    assert timeline.header["mode"] == "profile" and len(timeline.t_s) == live["ticks"]
    assert all(isinstance(v, int) for v in timeline.column(f"pid:{os.getpid()}", "rss_bytes"))
    for name in ("report.html", "memory_timeline.png", "memory_breakdown.png"):
        assert (out / name).stat().st_size > 1000
    # the folder is resolved when the profile starts: a server that changes directory later still writes there
    assert prof.report_paths["html"] == os.path.realpath(out / "report.html")
    printed = capsys.readouterr().out
    assert "profiled this process" in printed and f"report: {os.path.realpath(out / 'report.html')}" in printed


def test_the_gpu_picture_from_inside_outside_allocator_and_cache_bloat(tmp_path):
    me = os.getpid()
    nvml = ScriptedNvml(script=lambda tick: DeviceState((
        FakeProcess(me, int((2.6 + min(tick, 10) * 0.1) * GiB), "python3", 55),
        FakeProcess(4_000_401, 2 * GiB, "neighbour", 0))))
    torch_cuda = FakeTorchCuda(follow=nvml)
    torch_cuda.set(0, allocated=512 * MiB, reserved=2 * GiB)  # 1.5 GiB cached: freed blocks kept reserved
    prof = Profile(out=str(tmp_path / "p"), interval=0.01, report=False, nvml_opener=lambda: (nvml, None),
                   torch_cuda=torch_cuda, torch_scopes={0: 0},
                   listeners=[lambda t_ns, values: nvml.advance()])
    prof.start()
    assert prof.running and len(sampler_threads()) == 1
    deadline = time.monotonic() + 10
    while nvml.tick < 15 and time.monotonic() < deadline:
        time.sleep(0.01)
    record = prof.stop()
    assert record is not None and not prof.running and sampler_threads() == []
    assert record.mode == "profile" and record.config["device"] == "cuda:0" and nvml.shut_down
    outside = record.extra["live"]["series"]["outside_allocator_bytes"]
    assert outside["first_value"] == pytest.approx(0.6 * GiB, rel=0.01)  # NVML used - torch reserved
    assert outside["last_value"] == pytest.approx(1.6 * GiB, rel=0.01)
    found = {f.code: f for f in record.findings}
    assert found["OUTSIDE_ALLOCATOR"].evidence["context_source"] == "allocator"
    assert "outside PyTorch's allocator" in found["OUTSIDE_ALLOCATOR"].title
    assert found["OUTSIDE_ALLOCATOR"].severity == "warn"  # it grew by ~0.9 GiB while profiling
    assert found["CACHE_BLOAT"].evidence["cached_bytes"] == 1536 * MiB  # from the allocator's end state
    assert found["FOREIGN_PROCESS"].evidence["processes"][0]["pid"] == 4_000_401
    assert ("reset_peak_memory_stats", 0) in torch_cuda.calls
    saved = json.loads((tmp_path / "p" / "run.json").read_text())
    assert saved["baseline"]["end"]["torch_reserved_bytes"] == 2 * GiB


def test_reset_peaks_false_leaves_the_applications_peak_statistics_alone(tmp_path):
    torch_cuda = FakeTorchCuda()
    torch_cuda.set(0, allocated=GiB, reserved=GiB)
    with Profile(out=str(tmp_path / "p"), interval=0.01, report=False, reset_peaks=False, nvml_opener=NO_GPU,
                 torch_cuda=torch_cuda, torch_scopes={0: 0}):
        time.sleep(0.05)
    assert torch_cuda.resets == [] and ("memory_stats", 0) in torch_cuda.calls


def test_as_a_decorator_each_call_is_its_own_profile(tmp_path):
    calls = []

    @gpuscope.profile(out=str(tmp_path / "d"), interval=0.01, report=False, nvml_opener=NO_GPU)
    def handle(n: int) -> int:
        calls.append(n)
        time.sleep(0.03)
        return n * 2

    assert handle(3) == 6 and handle.__name__ == "handle"
    first = load_run(str(tmp_path / "d" / "run.json"))
    assert handle(4) == 8
    second = load_run(str(tmp_path / "d" / "run.json"))
    assert calls == [3, 4] and first.started_at and second.status == "complete"
    assert sampler_threads() == []

    @gpuscope.profile
    def bare() -> str:
        return "ok"

    assert callable(bare)


def test_overlapping_decorated_calls_never_fail_and_the_running_profile_notes_them(tmp_path):
    """Calls of a decorated handler from several threads at once: every call runs and returns; the
    first call's profile (which samples the whole process anyway) notes the overlapping ones, and the
    folder holds one consistent run, not files clobbered by three profiles."""
    out = tmp_path / "overlap"
    started = threading.Barrier(3)

    @gpuscope.profile(out=str(out), interval=0.01, report=False, nvml_opener=NO_GPU)
    def handle(n: int) -> int:
        started.wait(timeout=10)
        time.sleep(0.05)
        return n

    results: dict[int, object] = {}

    def call(n: int) -> None:
        try:
            results[n] = handle(n)
        except BaseException as exc:  # pragma: no cover - what the test is for
            results[n] = exc

    threads = [threading.Thread(target=call, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == {0: 0, 1: 1, 2: 2}
    record = load_run(str(out / "run.json"))
    assert record.status == "complete"
    timeline = load_timeline(str(out / "samples.jsonl"))
    assert len(timeline.t_s) == record.extra["live"]["ticks"]  # the samples are that run's, whole
    overlapping = [e for e in timeline.events if e.get("event") == "overlapping_call"]
    assert len(overlapping) == 2 and all(e["function"].endswith("handle") for e in overlapping)
    assert sampler_threads() == []


def test_a_second_profile_into_a_running_profiles_folder_is_refused_clearly(tmp_path):
    from gpuscope.inprocess import ProfileBusy

    with gpuscope.profile(out=str(tmp_path / "same"), interval=0.01, report=False, nvml_opener=NO_GPU):
        with pytest.raises(ProfileBusy, match="already running in this process"):
            gpuscope.profile(out=str(tmp_path / "same"), interval=0.01, report=False, nvml_opener=NO_GPU).start()
        with gpuscope.profile(out=str(tmp_path / "other"), interval=0.01, report=False, nvml_opener=NO_GPU):
            pass  # another folder: fine
    # once the first has stopped, the folder is free again
    gpuscope.profile(out=str(tmp_path / "same"), interval=0.01, report=False, nvml_opener=NO_GPU).start().stop()


def test_the_folder_stays_claimed_until_the_report_is_written(tmp_path):
    """A profile starting into the folder while the previous one is still writing its record and report
    would delete them: it is refused until stop() has returned, then starts."""
    from gpuscope.inprocess import ProfileBusy

    out = str(tmp_path / "handoff")
    first = gpuscope.profile(out=out, interval=0.01, nvml_opener=NO_GPU).start()  # with the report: slow stop
    time.sleep(0.05)
    stopped_at: list[float] = []
    stopper = threading.Thread(target=lambda: (first.stop(), stopped_at.append(time.monotonic())))
    stopper.start()
    refused = 0
    while True:
        second = gpuscope.profile(out=out, interval=0.01, report=False, nvml_opener=NO_GPU)
        try:
            second.start()
            started_at = time.monotonic()
            break
        except ProfileBusy:
            refused += 1
            time.sleep(0.002)
    stopper.join(timeout=30)
    second.stop()
    assert refused > 0 and stopped_at and started_at >= stopped_at[0]
    assert first.record.status == "complete" and first.report_paths  # written in full before the hand-off


def test_a_server_that_changes_directory_still_writes_its_profile_where_it_started(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prof = gpuscope.profile(out="relative", interval=0.01, report=False, nvml_opener=NO_GPU).start()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    prof.stop()
    assert (tmp_path / "relative" / "run.json").exists() and prof.error is None
    monkeypatch.chdir(tmp_path)  # the folder was released: profiling into it again works
    gpuscope.profile(out="relative", interval=0.01, report=False, nvml_opener=NO_GPU).start().stop()


def test_a_decorated_coroutine_is_profiled_for_as_long_as_it_runs(tmp_path):
    import asyncio

    @gpuscope.profile(out=str(tmp_path / "async"), interval=0.01, report=False, nvml_opener=NO_GPU)
    async def handle() -> str:
        await asyncio.sleep(0.3)
        return "done"

    assert asyncio.run(handle()) == "done"
    record = load_run(str(tmp_path / "async" / "run.json"))
    assert record.status == "complete" and record.extra["live"]["duration_s"] >= 0.25


def test_secrets_in_the_applications_command_line_stay_out_of_the_record(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["serve.py", "--api-key=sk-LIVE-123", "postgres://bob:hunter2@db/x"])
    with gpuscope.profile(out=str(tmp_path / "secret"), interval=0.01, nvml_opener=NO_GPU):
        time.sleep(0.05)
    for name in ("run.json", "report.html"):
        text = (tmp_path / "secret" / name).read_text()
        assert "sk-LIVE-123" not in text and "hunter2" not in text, name
    assert load_run(str(tmp_path / "secret" / "run.json")).config["argv"][0] == "serve.py"


def test_an_exception_inside_is_recorded_then_propagates_unchanged(tmp_path):
    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom, match="request 7 failed"):
        with gpuscope.profile(out=str(tmp_path / "e"), interval=0.01, report=False, nvml_opener=NO_GPU):
            raise Boom("request 7 failed")
    record = load_run(str(tmp_path / "e" / "run.json"))
    assert record.status == "failed" and record.failure == "Boom: request 7 failed"
    assert record.config["ended_by"] == "exception" and sampler_threads() == []


def test_start_stop_rules(tmp_path):
    prof = gpuscope.profile(out=str(tmp_path / "s"), interval=0.01, report=False, nvml_opener=NO_GPU)
    assert isinstance(prof, Profile) and prof.stop() is None  # never started: nothing to stop
    prof.start()
    with pytest.raises(RuntimeError, match="already started"):
        prof.start()
    prof.mark("phase", name="warm-up")
    first = prof.stop()
    assert prof.stop() is first  # stopping twice is harmless
    events = load_timeline(str(tmp_path / "s" / "samples.jsonl")).events
    assert any(e.get("event") == "phase" and e.get("name") == "warm-up" for e in events)
    with pytest.raises(ValueError, match="at least 0.005 s"):
        gpuscope.profile(interval=0.001)


def test_an_application_without_torch_never_gets_it_imported_and_exit_keeps_run_json(tmp_path):
    script = f"""
import sys
import gpuscope
with gpuscope.profile(out={str(tmp_path / 'a')!r}, interval=0.01, report=False):
    sum(range(100000))
assert "torch" not in sys.modules, "profile() imported torch"
prof = gpuscope.profile(out={str(tmp_path / 'b')!r}, interval=0.01).start()
# the interpreter exits without prof.stop()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""  # a guest prints nothing
    assert load_run(str(tmp_path / "a" / "run.json")).status == "complete"
    leftover = load_run(str(tmp_path / "b" / "run.json"))
    assert leftover.status == "interrupted" and "before profile.stop()" in leftover.failure
