"""The sampler: a drift-free interval, one timestamp per tick, probes that fail without stopping it."""
from __future__ import annotations

import errno
import threading
import time

import pytest

from gpuscope.probes.allocator import AllocatorProbe
from gpuscope.probes.gpu import GpuProbe
from gpuscope.probes.readings import ERROR, NO_DEVICE, Unavailable
from gpuscope.probes.samplefile import SampleWriter, load_timeline
from gpuscope.probes.sampler import PeakTracker, Sampler
from tests.fakes.nvml import DeviceState, FakeProcess, MiB, ReplayNvml, ScriptedNvml
from tests.fakes.torch_cuda import FakeTorchCuda


class CountingProbe:
    """Returns an increasing value and records when it was read."""

    def __init__(self, scope: str = "host", metric: str = "n", sleep_s: dict[int, float] | None = None) -> None:
        self.scope, self.metric = scope, metric
        self.reads: list[float] = []
        self._sleep_s = sleep_s or {}
        self._read = threading.Condition()

    def read(self):
        self.reads.append(time.monotonic())
        time.sleep(self._sleep_s.get(len(self.reads), 0.0))
        with self._read:
            self._read.notify_all()
        return [(self.scope, self.metric, len(self.reads))]

    def wait_for_reads(self, n: int, timeout_s: float = 60.0) -> bool:
        """Until `n` reads were taken (an event, not a sleep): True, or False after `timeout_s`."""
        with self._read:
            return self._read.wait_for(lambda: len(self.reads) >= n, timeout_s)


class RaisingProbe:
    def __init__(self) -> None:
        self.calls = 0

    def read(self):
        self.calls += 1
        raise RuntimeError("psutil exploded")


class FakeClockNs:
    def __init__(self) -> None:
        self.now = 5_000_000_000
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        self.now += 1_000  # every call would see a new instant
        return self.now


def describe_stub(pid, name):
    from gpuscope.probes.processes import ProcessInfo

    return ProcessInfo(pid, True, name, "alice", "python serve.py", (), {})


def test_an_interval_under_5_ms_is_refused():
    with pytest.raises(ValueError, match="at least 5 ms"):
        Sampler({}, interval_s=0.001)


class FakeLoopTime:
    """A fake monotonic clock plus a fake stop event for `Sampler._run`: `wait()` moves the clock, nothing sleeps.

    `_run` schedules with the sampler's injected `clock_ns` and waits with `self._stop.wait()`, so the test
    hands the sampler `monotonic_ns` as its clock and swaps its `_stop` for `self.stop_event`. The loop ends
    once the clock has passed `run_for_ns`.
    """

    def __init__(self, run_for_ns: int) -> None:
        self.now = 7_000_000_000
        self.end = self.now + run_for_ns
        self.waits: list[float] = []
        fake = self

        class StopEvent:
            def is_set(self) -> bool:
                return fake.now >= fake.end

            def set(self) -> None:
                fake.end = fake.now

            def wait(self, timeout: float) -> bool:
                assert len(fake.waits) < 1000, "the sampler loop did not end"
                fake.waits.append(timeout)
                fake.now += max(0, round(timeout * 1e9))
                return self.is_set()

        self.stop_event = StopEvent()

    def monotonic_ns(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * 1e9)


class TimedProbe:
    """Records the fake clock at each read, then costs `cost_s` of fake time (`stall_s` on some reads)."""

    def __init__(self, clock: FakeLoopTime, cost_s: float, stall_s: dict[int, float]) -> None:
        self.clock, self.cost_s, self.stall_s = clock, cost_s, stall_s
        self.reads: list[int] = []

    def read(self):
        self.reads.append(self.clock.now)
        self.clock.advance(self.stall_s.get(len(self.reads), self.cost_s))
        return [("host", "n", len(self.reads))]


def test_ticks_keep_to_the_interval_without_drift_or_bunching():
    # Deterministic: the loop runs on a fake clock, injected as the sampler's clock_ns. Every tick costs
    # 3 ms (a sampler that waited a fixed interval after each tick would drift 3 ms per tick) and the 5th
    # stalls 120 ms (2.4 intervals).
    fake = FakeLoopTime(run_for_ns=1_000_000_000)
    probe = TimedProbe(fake, cost_s=0.003, stall_s={5: 0.12})
    sampler = Sampler({"p": probe}, interval_s=0.05, clock_ns=fake.monotonic_ns)
    sampler._stop = fake.stop_event
    sampler._run()
    offsets_ms = [(t - probe.reads[0]) / 1e6 for t in probe.reads]
    # on the grid: every tick starts exactly on a multiple of 50 ms from the first, however late the previous one was
    assert all(o % 50 == 0 for o in offsets_ms), f"ticks off the 50 ms grid: {offsets_ms}"
    # the stall (reads 0..200 ms, then 200 + 120 = 320 ms) made the sampler skip the grid points it missed
    # (250 and 300 ms) instead of catching up in a burst
    assert offsets_ms[:6] == [0, 50, 100, 150, 200, 350], offsets_ms
    assert sampler.missed_ticks == 2
    gaps_ms = [b - a for a, b in zip(offsets_ms, offsets_ms[1:])]
    assert min(gaps_ms) == 50, f"bunched ticks: {gaps_ms}"
    # no drift: the last tick lands on the grid point its index predicts, counting the skipped ones
    assert offsets_ms[-1] == 50 * (len(offsets_ms) - 1 + sampler.missed_ticks)
    assert offsets_ms[-1] == 950 and len(offsets_ms) == 18 and sampler.ticks == 18
    # the waits were the remainder to the next grid point, never a fixed interval
    assert fake.waits[0] == pytest.approx(0.047) and fake.waits[4] == pytest.approx(0.03)
    assert sampler.mean_tick_cost_us > 0


def test_the_sampler_thread_ticks_in_real_time():
    # the real thread and the real clock, loosely: the schedule itself is checked on the fake clock above
    probe = CountingProbe()
    sampler = Sampler({"p": probe}, interval_s=0.05)
    sampler.start()
    probe.wait_for_reads(4, timeout_s=30)
    sampler.stop()
    assert len(probe.reads) >= 5, f"only {len(probe.reads)} ticks (4 from the thread, 1 from stop) in 30 s at 50 ms"
    assert sampler._thread is None  # stop() joined the thread


def test_one_timestamp_is_shared_by_every_probe_in_a_tick(samples_path):
    clock = FakeClockNs()
    seen = []
    writer = SampleWriter(str(samples_path), {"t0_ns": 0})
    sampler = Sampler({"a": CountingProbe("host", "a"), "b": CountingProbe("gpu:0", "b")}, writer=writer,
                      clock_ns=clock, listeners=[lambda t_ns, values: seen.append((t_ns, values))])
    sampler.tick()
    sampler.tick()
    writer.close()
    assert clock.calls == 2  # one clock reading per tick, whatever the number of probes
    assert [t for t, _ in seen] == [5_000_001_000, 5_000_002_000]
    assert {(s, m) for s, m, _ in seen[0][1]} == {("host", "a"), ("gpu:0", "b")}
    lines = [line for line in samples_path.read_text().splitlines()[1:]]
    assert [line.count('"t_ns"') for line in lines] == [1, 1]
    timeline = load_timeline(str(samples_path))
    assert timeline.column("host", "a") == [1, 2] and timeline.column("gpu:0", "b") == [1, 2]


def test_a_raising_probe_does_not_stop_sampling():
    bad, good = RaisingProbe(), CountingProbe()
    sampler = Sampler({"bad": bad, "good": good}, interval_s=0.01)
    values = sampler.tick()
    assert ("host", "n", 1) in values
    assert ("bad", "probe_error", Unavailable(ERROR, "RuntimeError: psutil exploded")) in values
    assert sampler.probe_errors == {"bad": "RuntimeError: psutil exploded"}
    sampler.start()
    assert good.wait_for_reads(3), "the sampler thread stopped ticking after the raising probe"
    sampler.stop()
    assert bad.calls >= 4 and len(good.reads) == bad.calls  # 1 by hand, >= 2 from the thread, 1 from stop


def test_peak_tracker_keeps_max_last_first_and_resets():
    tracker = PeakTracker()
    lost = Unavailable(NO_DEVICE)
    tracker(1, [("gpu:0", "used_bytes", lost), ("host", "rss_bytes", 10)])
    assert tracker.peaks()[("gpu:0", "used_bytes")] == lost  # the reason, until a real value arrives
    tracker(2, [("gpu:0", "used_bytes", 300), ("host", "rss_bytes", 30)])
    tracker(3, [("gpu:0", "used_bytes", lost), ("host", "rss_bytes", 20)])
    assert tracker.peaks() == {("gpu:0", "used_bytes"): 300, ("host", "rss_bytes"): 30}
    assert tracker.last() == {("gpu:0", "used_bytes"): lost, ("host", "rss_bytes"): 20}
    assert tracker.first() == {("gpu:0", "used_bytes"): lost, ("host", "rss_bytes"): 10}
    assert tracker.ticks == 3
    tracker.reset()
    assert tracker.peaks() == {} and tracker.first() == {} and tracker.ticks == 0
    assert tracker.last()[("host", "rss_bytes")] == 20  # the last reading outlives a reset
    tracker(4, [("host", "rss_bytes", 5)])
    assert tracker.peaks() == {("host", "rss_bytes"): 5}


def _expected_peaks(ticks):
    """PeakTracker's rule, one reading at a time: the max of the numbers (bools are not numbers), else the
    first reading's reason; the first and the last reading of each key."""
    peaks, first, last = {}, {}, {}
    for values in ticks:
        for scope, metric, value in values:
            key = (scope, metric)
            last[key] = value
            first.setdefault(key, value)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            held = peaks.get(key)
            held_number = isinstance(held, (int, float)) and not isinstance(held, bool)
            if key not in peaks or (number and (not held_number or value > held)):
                peaks[key] = value
    return peaks, first, last


def _same_readings(a, b):
    return a.keys() == b.keys() and all(type(a[k]) is type(b[k]) and (a[k] == b[k] or a[k] != a[k]) for k in a)


def test_a_peak_tracker_over_steady_and_changing_ticks_keeps_the_rule():
    """Most ticks repeat the layout and most readings (the tracker then looks at what changed only);
    values change type, become reasons, keys come and go, one is given twice, and a reset comes mid-run."""
    import random

    rng = random.Random(5)
    keys = [("host", "a"), ("host", "b"), ("gpu:0", "used_bytes"), ("pid:1/gpu:0", "used_bytes")]
    present, ticks = list(keys), []
    for _ in range(800):
        if rng.random() < 0.05:
            present = [key for key in keys if rng.random() < 0.8] or keys[:1]
        values = [(scope, metric, rng.choice([1, 1.0, True, 3, 2.5, 0, Unavailable(NO_DEVICE, "lost"),
                                              Unavailable(ERROR, "x"), rng.randrange(100)]))
                  for scope, metric in present]
        if rng.random() < 0.02:
            values.append(values[0][:2] + (rng.randrange(200),))
        ticks.append(values)
    ticks[300] = ticks[299]  # the tick after the reset repeats the one before it
    tracker = PeakTracker()
    for values in ticks[:300]:
        tracker(0, values)
    tracker.reset()
    for values in ticks[300:]:
        tracker(0, values)
    peaks, first, _ = _expected_peaks(ticks[300:])
    _, _, last = _expected_peaks(ticks)
    assert _same_readings(tracker.peaks(), peaks)
    assert _same_readings(tracker.first(), first)
    assert _same_readings(tracker.last(), last)
    assert tracker.ticks == 500


def test_a_peak_tracker_listening_to_the_h200_replay_finds_the_peaks():
    replay = ReplayNvml()
    torch_cuda = FakeTorchCuda.from_timeline(replay.lines, follow=replay)
    tracker = PeakTracker()
    sampler = Sampler({"gpu": GpuProbe(replay, describe=describe_stub, pid_exists=lambda pid: True),
                       "alloc": AllocatorProbe(torch_cuda, {0: "pid:474/gpu:0"})}, listeners=[tracker])
    for tick in range(len(replay.lines)):
        replay.goto(tick)
        sampler.tick()
    peaks = tracker.peaks()
    assert peaks[("pid:474/gpu:0", "used_bytes")] == 5716 * MiB
    assert peaks[("pid:527/gpu:0", "used_bytes")] == 107_918 * MiB
    assert peaks[("pid:474/gpu:0", "torch_peak_allocated_bytes")] >= 4773 * MiB
    assert peaks[("gpu:0", "used_bytes")] == max(line["dev_used"] for line in replay.lines)


def test_events_are_drained_into_the_samples_file(samples_path):
    own = FakeProcess(474, 1620 * MiB)
    foreign = FakeProcess(505, 2566 * MiB, "/opt/torch/.venv/bin/python3")
    nvml = ScriptedNvml(script=[DeviceState((own,)), DeviceState((own, foreign))])
    gpu = GpuProbe(nvml, describe=describe_stub, pid_exists=lambda pid: True)
    writer = SampleWriter(str(samples_path), {"t0_ns": 0})
    sampler = Sampler({"gpu": gpu}, writer=writer, event_sources=[gpu])
    sampler.tick()
    nvml.advance()
    sampler.tick()
    sampler.mark("step_start", predictors=4)
    writer.close()
    events = load_timeline(str(samples_path)).events
    assert [(e["event"], e.get("pid")) for e in events] == [("process", 474), ("process", 505), ("step_start", None)]
    assert events[1]["name"] == "/opt/torch/.venv/bin/python3"
    assert gpu.drain_events() == []


def test_stop_takes_a_final_tick(samples_path):
    probe = CountingProbe()
    writer = SampleWriter(str(samples_path), {"t0_ns": 0})
    sampler = Sampler({"p": probe}, interval_s=600.0, writer=writer)
    with sampler:
        # the thread's first tick has been taken; the next is 600 s away, so stop() alone adds one
        assert probe.wait_for_reads(1), "the sampler thread never ticked"
    writer.close()
    column = load_timeline(str(samples_path)).column("host", "n")
    assert column == [1, 2]  # the start tick and the final one
    assert sampler.ticks == 2 and sampler.mean_tick_cost_us > 0


def test_stop_without_start_still_records_the_end_state():
    sampler = Sampler({"p": CountingProbe()})
    sampler.stop()
    assert sampler.ticks == 1


def test_a_writer_error_is_recorded_not_raised():
    writer = SampleWriter("/dev/full", {"t0_ns": 0})  # every write: ENOSPC, as on a full disk
    probe = CountingProbe()
    sampler = Sampler({"p": probe}, interval_s=0.01, writer=writer)
    sampler.tick()
    sampler.start()
    assert probe.wait_for_reads(3), "the sampler thread stopped ticking after the write error"
    sampler.stop()
    assert writer.error is not None and writer.error.errno == errno.ENOSPC
    assert sampler.ticks >= 4  # the sampler went on: 1 by hand, >= 2 from the thread, 1 from stop
    writer.close()


def test_a_key_dropped_by_retain_comes_back_at_the_next_tick_even_unchanged():
    """retain() drops keys off the tick path; a reading that did not change since must still come back
    whole (the tracker compares ticks by position and would otherwise skip it as unchanged)."""
    peaks = PeakTracker()
    tick = [("pid:7/gpu:0", "used_bytes", 5), ("gpu:0", "used_bytes", 9)]
    peaks(0, tick)
    peaks.retain(lambda key: key[0] != "pid:7/gpu:0")
    assert ("pid:7/gpu:0", "used_bytes") not in peaks.peaks()
    peaks(1, list(tick))
    assert peaks.peaks()[("pid:7/gpu:0", "used_bytes")] == 5 and peaks.last()[("pid:7/gpu:0", "used_bytes")] == 5
