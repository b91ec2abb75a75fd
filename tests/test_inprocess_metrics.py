"""`profile(..., prometheus_port=N)`: the allocator's split of this process's memory, per device, on a
/metrics endpoint while the profile runs; fed by the replayed H200 timeline (NVML and torch together)."""
from __future__ import annotations

import os
import socket
import time
from typing import Any

import pytest

from gpuscope.inprocess import Profile
from gpuscope.record.errors import UsageError
from tests.fakes.nvml import ReplayNvml, load_timeline_h200
from tests.fakes.torch_cuda import FakeTorchCuda
from tests.test_exporter import scrape, value

TARGET_PHASE = "4GiB-freed-cached"  # 4 GiB was held, then freed: the cache keeps it, the peak remembers it


def _replay_as_this_process() -> ReplayNvml:
    """The H200 timeline with its profiled pid (474 on that machine) renamed to this process."""
    me = os.getpid()
    lines = load_timeline_h200()
    for line in lines:
        line["procs"] = [dict(p, pid=me) if int(p["pid"]) == 474 else p for p in line["procs"]]
    return ReplayNvml(lines=lines)


def _poll(url: str, done: Any, seconds: float = 30.0) -> dict[str, list[Any]]:
    deadline = time.monotonic() + seconds
    while True:
        metrics = scrape(url)
        if done(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.02)


def _one(metrics: dict[str, list[Any]], name: str) -> float | None:
    samples = [s for s in metrics.get(name, []) if s.name == name]
    return samples[0].value if len(samples) == 1 else None


def test_allocator_gauges_follow_the_replayed_h200(tmp_path):
    replay = _replay_as_this_process()
    torch_cuda = FakeTorchCuda.from_timeline(replay.lines, follow=replay)
    target = replay.first_tick_of(TARGET_PHASE) + 2
    line = replay.lines[target]

    def advance(t_ns: int, values: list[Any]) -> None:
        if replay.tick < target:
            replay.advance()

    prof = Profile(out=str(tmp_path / "p"), interval=0.005, report=False, nvml_opener=lambda: (replay, None),
                   torch_cuda=torch_cuda, torch_scopes={0: 0}, listeners=[advance], prometheus_port=0)
    prof.start()
    try:
        url = prof.metrics.url
        assert url.startswith("http://127.0.0.1:")
        metrics = _poll(url, lambda m: _one(m, "gpuscope_allocator_allocated_bytes") == line["alloc"]
                        and replay.tick == target)
        # the settled tick, read again now that the replay no longer moves
        metrics = _poll(url, lambda m: _one(m, "gpuscope_allocator_reserved_bytes") == line["reserved"])
        labels = {"gpu": "0", "pid": str(os.getpid())}
        assert value(metrics["gpuscope_allocator_allocated_bytes"], **labels) == line["alloc"] == 710_017_024
        assert value(metrics["gpuscope_allocator_reserved_bytes"], **labels) == line["reserved"] == 5_010_096_128
        assert value(metrics["gpuscope_allocator_cached_bytes"], **labels) == line["reserved"] - line["alloc"]
        used = next(p["used"] for p in line["procs"] if int(p["pid"]) == os.getpid())
        assert value(metrics["gpuscope_outside_allocator_bytes"], **labels) == used - line["reserved"]
        seen = replay.lines[: target + 1]
        peak = max(max(int(x["alloc"]), int(x["peak_alloc"])) for x in seen)
        assert value(metrics["gpuscope_allocator_peak_allocated_bytes"], **labels) == peak > 4 * 1024**3
        assert value(metrics["gpuscope_allocator_oom"], **labels) == 0  # parsed family name; sample is _total
        assert [s.name for s in metrics["gpuscope_allocator_oom"]] == ["gpuscope_allocator_oom_total"]
        torch_cuda.set(0, ooms=2)  # two allocations failed
        after = _poll(url, lambda m: value(m["gpuscope_allocator_oom"], **labels) == 2)
        assert value(after["gpuscope_allocator_oom"], **labels) == 2
        status = __import__("urllib.request").request.urlopen(url.replace("/metrics", "/healthz"), timeout=10).status
        assert status == 200
    finally:
        prof.stop()
    assert prof.metrics is None
    with pytest.raises(OSError):  # the endpoint closes with the profile
        scrape(url)


def test_nothing_is_exported_as_zero_before_cuda_is_initialised(tmp_path):
    torch_cuda = FakeTorchCuda(initialized=False)
    ticks: list[int] = []
    with Profile(out=str(tmp_path / "p"), interval=0.005, report=False, nvml_opener=lambda: (None, None),
                 torch_cuda=torch_cuda, torch_scopes={0: 0}, listeners=[lambda t, v: ticks.append(t)],
                 prometheus_port=0) as prof:
        deadline = time.monotonic() + 10
        while len(ticks) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        metrics = scrape(prof.metrics.url)
    assert len(ticks) >= 3
    for name in ("gpuscope_allocator_allocated_bytes", "gpuscope_allocator_cached_bytes",
                 "gpuscope_outside_allocator_bytes", "gpuscope_allocator_oom"):
        assert metrics[name] == [], name


def test_a_taken_port_fails_start_and_leaves_nothing_running(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        prof = Profile(out=str(tmp_path / "p"), interval=0.01, report=False, nvml_opener=lambda: (None, None),
                       prometheus_port=busy.getsockname()[1])
        with pytest.raises(UsageError, match="cannot serve metrics"):
            prof.start()
        assert not prof.running and prof.metrics is None
        Profile(out=str(tmp_path / "p"), interval=0.01, report=False, nvml_opener=lambda: (None, None)).start().stop()
    finally:
        busy.close()
    with pytest.raises(UsageError, match="not a TCP port"):
        Profile(out=str(tmp_path / "q"), prometheus_port=70000)
