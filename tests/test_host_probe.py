"""HostProbe, usable_cores and read_rss_uss_bytes: real /proc readings of this test process (agreeing with psutil), fake /proc and cgroup roots."""
from __future__ import annotations

import os

import psutil
import pytest

from gpuscope.probes.host import (USS_EVERY_S, USS_MAX_TIME_SHARE, HostProbe, cgroup_cpu_quota, host_info,
                                  read_rss_uss_bytes, usable_cores)
from gpuscope.probes.readings import PROCESS_GONE, Unavailable
from tests.children import running_python

MiB = 1024**2
AFFINITY = len(os.sched_getaffinity(0))


def as_dict(values) -> dict[tuple[str, str], object]:
    return {(scope, metric): value for scope, metric, value in values}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the test process itself -----------------------------------------------------------------------

def test_rss_grows_when_a_200_mib_tensor_is_allocated_and_touched():
    torch = pytest.importorskip("torch")
    probe = HostProbe(uss_every_s=None)
    scope = f"pid:{os.getpid()}"
    before = as_dict(probe.read())[(scope, "rss_bytes")]
    tensor = torch.ones(200 * MiB // 4, dtype=torch.float32)  # torch.ones writes every page
    try:
        after = as_dict(probe.read())[(scope, "rss_bytes")]
        assert after - before >= 180 * MiB, f"RSS grew by {(after - before) / MiB:.0f} MiB"
        assert float(tensor[-1]) == 1.0
    finally:
        del tensor


def test_host_and_process_metrics_are_real_numbers():
    probe = HostProbe(uss_every_s=0.0)
    readings = as_dict(probe.read())
    scope = f"pid:{os.getpid()}"
    cores = psutil.cpu_count()
    assert 0 <= readings[("host", "cpu_util_pct")] <= 100
    assert {f"core{i}_util_pct" for i in range(cores)} <= {metric for _, metric in readings}
    assert readings[("host", "mem_used_bytes")] + readings[("host", "mem_available_bytes")] == psutil.virtual_memory().total
    assert readings[(scope, "rss_bytes")] > 10 * MiB
    assert 0 < readings[(scope, "uss_bytes")] <= readings[(scope, "rss_bytes")]
    assert readings[(scope, "num_threads")] >= 1
    assert readings[(scope, "ctx_switches_voluntary")] >= 0
    # the first reading has no window yet: it says so instead of a number from a few microseconds
    first_cpu = readings[(scope, "cpu_util_pct")]
    assert isinstance(first_cpu, Unavailable) and first_cpu.reason == "not_initialized"


def test_process_cpu_is_a_mean_over_a_quarter_second_within_the_cores():
    """Ticks 50 ms apart in a busy process: never the 800% a few ms right after a start can read,
    and a spinning thread reads as about one core."""
    import threading
    import time

    probe = HostProbe(per_core=False, uss_every_s=None)
    scope = f"pid:{os.getpid()}"
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    window = HostProbe.CPU_WINDOW_S
    try:
        # Each read is bracketed by two clock readings: the probe's own `now` lies between them, so how long
        # its window had run is known to lie in [before - first_after, after - first_before], however late a
        # busy machine runs this thread. The test decides from those bounds, never from how long a sleep took.
        first_before = time.monotonic()
        assert isinstance(as_dict(probe.read())[(scope, "cpu_util_pct")], Unavailable)
        first_after = time.monotonic()
        values = []
        for _ in range(15):
            time.sleep(0.05)
            before = time.monotonic()
            value = as_dict(probe.read())[(scope, "cpu_util_pct")]
            after = time.monotonic()
            values.append((before - first_after, after - first_before, value))
    finally:
        stop.set()
        spinner.join()
    measured = [v for _lo, _hi, v in values if not isinstance(v, Unavailable)]
    assert all(isinstance(v, Unavailable) for _lo, hi, v in values if hi < window), values  # no quarter second yet
    assert all(not isinstance(v, Unavailable) for lo, _hi, v in values if lo >= window), values
    assert measured, values  # 15 reads 50 ms apart span more than a quarter second
    assert all(0 <= v <= 100 * psutil.cpu_count() * 1.05 for v in measured), measured
    assert max(measured) > 0, measured  # the spinner is seen (a loaded machine may give it little of a core)


def test_per_core_readings_can_be_turned_off():
    metrics = {metric for _, metric, _ in HostProbe(per_core=False, uss_every_s=None).read()}
    assert not any(metric.startswith("core") for metric in metrics)
    assert "uss_bytes" not in metrics


def test_uss_is_read_at_most_every_uss_every_s():
    clock = FakeClock()
    probe = HostProbe(uss_every_s=1.0, clock_s=clock, cost_clock_s=lambda: 0.0)
    scope = f"pid:{os.getpid()}"
    seen = []
    for step in (0.0, 0.4, 0.5, 0.1, 0.9, 0.1):  # t = 0, .4, .9, 1.0, 1.9, 2.0
        clock.now += step
        seen.append((scope, "uss_bytes") in as_dict(probe.read()))
    assert seen == [True, False, False, True, False, True]


def test_a_requested_uss_reading_comes_at_the_next_read_whatever_the_interval():
    """diagnose asks at each step's last tick: a step shorter than the interval still gets its own USS."""
    clock = FakeClock()
    probe = HostProbe(uss_every_s=2.0, clock_s=clock, cost_clock_s=lambda: 0.0)
    scope = f"pid:{os.getpid()}"
    assert (scope, "uss_bytes") in as_dict(probe.read())       # t = 0: due
    clock.now += 0.5
    assert (scope, "uss_bytes") not in as_dict(probe.read())   # t = 0.5: not due
    probe.request_all()
    clock.now += 0.1
    assert (scope, "uss_bytes") in as_dict(probe.read())       # asked for
    clock.now += 0.1
    assert (scope, "uss_bytes") not in as_dict(probe.read())   # once; the interval counts from there
    clock.now += 2.0
    assert (scope, "uss_bytes") in as_dict(probe.read())
    # without a USS interval (uss_every_s=None) a request still reads it once
    quiet = HostProbe(uss_every_s=None)
    quiet.request_all()
    assert (scope, "uss_bytes") in as_dict(quiet.read()) and (scope, "uss_bytes") not in as_dict(quiet.read())


def test_a_process_that_exits_reads_process_gone():
    child = running_python("import time; time.sleep(30)")  # read between fork and exec, its RSS can be 0
    try:
        probe = HostProbe(pid=child.pid, uss_every_s=None)
        assert as_dict(probe.read())[(f"pid:{child.pid}", "rss_bytes")] > 0
    finally:
        child.kill()
        child.wait()
    readings = as_dict(probe.read())
    gone = readings[(f"pid:{child.pid}", "rss_bytes")]
    assert isinstance(gone, Unavailable) and gone.reason == PROCESS_GONE
    assert isinstance(readings[("host", "cpu_util_pct")], float)  # host readings go on


# -- usable cores from affinity and a fake cgroup root -------------------------------------------

def _cgroup(tmp_path, cpu_max: str | None = None, v1: tuple[str, str] | None = None) -> str:
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return str(tmp_path)


def test_cgroup_v2_quota_of_two_cpus(tmp_path):
    root = _cgroup(tmp_path, "200000 100000")
    assert cgroup_cpu_quota(root) == 2.0
    assert usable_cores(root) == min(2, AFFINITY)


def test_cgroup_v2_unlimited_falls_back_to_affinity(tmp_path):
    root = _cgroup(tmp_path, "max 100000")
    assert cgroup_cpu_quota(root) is None
    assert usable_cores(root) == AFFINITY


def test_a_quota_below_one_cpu_still_gives_one_core(tmp_path):
    assert usable_cores(_cgroup(tmp_path, "50000 100000")) == 1


def test_a_quota_above_affinity_is_capped_by_affinity(tmp_path):
    assert usable_cores(_cgroup(tmp_path, f"{(AFFINITY + 6) * 100000} 100000")) == AFFINITY


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "unlimited").mkdir()
    root = _cgroup(tmp_path / "one", v1=("100000", "100000"))
    assert cgroup_cpu_quota(root) == 1.0
    assert usable_cores(root) == 1
    assert cgroup_cpu_quota(_cgroup(tmp_path / "unlimited", v1=("-1", "100000"))) is None


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(str(tmp_path)) is None
    assert usable_cores(str(tmp_path)) == AFFINITY


def test_a_malformed_cpu_max_is_ignored(tmp_path):
    assert cgroup_cpu_quota(_cgroup(tmp_path, "garbage")) is None


def test_host_info_names_the_usable_cores():
    info = host_info()
    assert 1 <= info["usable_cores"] <= info["logical_cores"]
    assert info["memory_total_bytes"] == psutil.virtual_memory().total


# -- smaps_rollup -------------------------------------------------------------------------------

def test_read_rss_uss_bytes_on_self_agrees_with_psutil():
    rollup = read_rss_uss_bytes(os.getpid())
    if rollup is None:
        pytest.skip("this kernel has no /proc/PID/smaps_rollup")
    rss, uss = rollup
    psutil_rss = psutil.Process().memory_info().rss
    assert 0 < uss <= rss
    assert abs(rss - psutil_rss) < 32 * MiB


def test_read_rss_uss_bytes_from_a_synthetic_rollup(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "smaps_rollup").write_text(
        "55d0c0a00000-7ffd1e9fe000 ---p 00000000 00:00 0                          [rollup]\n"
        "Rss:              235520 kB\nPss:              200000 kB\nShared_Clean:      40960 kB\n"
        "Shared_Dirty:          0 kB\nPrivate_Clean:     10240 kB\nPrivate_Dirty:    184320 kB\n"
        "Private_Hugetlb:       0 kB\nSwap:                  0 kB\n")
    assert read_rss_uss_bytes(42, proc_root=str(tmp_path)) == (235520 * 1024, (10240 + 184320) * 1024)


def test_read_rss_uss_bytes_of_a_missing_process_is_none(tmp_path):
    assert read_rss_uss_bytes(42, proc_root=str(tmp_path)) is None


# -- /proc read directly: the same figures psutil gave -------------------------------------------

def _fake_proc(root, pid: int, state: str = "S") -> str:
    (root / str(pid)).mkdir(parents=True)
    (root / "stat").write_text("cpu  300 0 100 1600 0 0 0 0 0 0\ncpu0 100 0 50 800 0 0 0 0 0 0\n"
                               "cpu1 200 0 50 800 0 0 0 0 0 0\nintr 12 0 0\nctxt 99\n")
    (root / "meminfo").write_text("MemTotal:       2000 kB\nMemFree:         500 kB\nMemAvailable:    800 kB\n"
                                  "Buffers:          10 kB\n")
    (root / str(pid) / "stat").write_text(
        f"{pid} (my (odd) srv) {state} 1 1 1 0 -1 0 0 0 0 0 150 50 0 0 20 0 7 0 100 4096 300 0 0\n")
    (root / str(pid) / "statm").write_text("4096 300 20 1 0 100 0\n")  # resident: the same 300 pages as stat's
    (root / str(pid) / "status").write_text("Name:\tsrv\nState:\tS (sleeping)\nThreads:\t7\n"
                                            "voluntary_ctxt_switches:\t11\nnonvoluntary_ctxt_switches:\t3\n")
    return str(root)


def test_every_reading_from_a_fake_proc_tree(tmp_path):
    """Per-core busy share as psutil computes it (guest in user, iowait idle, 0.1% steps), MemTotal minus
    MemAvailable, RSS in pages, threads and the main thread's context switches, a name with ') ' in it."""
    pid = 77
    root = _fake_proc(tmp_path, pid)
    probe = HostProbe(pid, uss_every_s=None, proc_root=root)
    # core0: +30 user, +10 system, +60 idle -> 40.0%; core1: +1 user +1 iowait + 1 idle, guest +5 in user
    (tmp_path / "stat").write_text("cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 130 0 60 860 0 0 0 0 0 0\n"
                                   "cpu1 206 0 50 801 1 0 0 0 5 0\nintr 12 0 0\n")
    readings = as_dict(probe.read())
    assert readings[("host", "core0_util_pct")] == 40.0
    assert readings[("host", "core1_util_pct")] == round(100 * 6 / 8, 1)  # 6 busy (guest counted once) of 8
    assert readings[("host", "cpu_util_pct")] == (40.0 + 75.0) / 2
    assert readings[("host", "mem_used_bytes")] == 1200 * 1024
    assert readings[("host", "mem_available_bytes")] == 800 * 1024
    scope = f"pid:{pid}"
    assert readings[(scope, "rss_bytes")] == 300 * os.sysconf("SC_PAGE_SIZE")
    assert readings[(scope, "num_threads")] == 7
    assert readings[(scope, "ctx_switches_voluntary")] == 11
    assert readings[(scope, "ctx_switches_involuntary")] == 3
    assert (scope, "uss_bytes") not in readings


def test_a_core_with_no_time_passed_reads_zero_and_backward_counters_count_as_zero(tmp_path):
    from gpuscope.probes.host import core_busy_pct

    assert core_busy_pct((10, 100, 5), (10, 100, 5)) == 0.0
    assert core_busy_pct((10, 100, 5), (20, 110, 2)) == 50.0  # iowait went back: 0, not -3


def test_a_zombie_reads_process_gone(tmp_path):
    root = _fake_proc(tmp_path, 78, state="Z")
    readings = as_dict(HostProbe(78, uss_every_s=None, proc_root=root).read())
    gone = readings[("pid:78", "rss_bytes")]
    assert isinstance(gone, Unavailable) and gone.reason == PROCESS_GONE
    assert {m for (s, m) in readings if s == "pid:78"} == set(HostProbe.PROCESS_METRICS)


def test_a_process_that_exits_between_quarter_second_reads_reads_process_gone_from_statm(tmp_path):
    """At 50 ms the ticks between the quarter-second reads take RSS from /proc/PID/statm alone. A zombie (its
    memory map gone: statm all zeros, stat's state Z) reads PROCESS_GONE there too, never an RSS of 0; a
    kernel thread (no memory map either, but alive) reads its RSS."""
    from gpuscope.probes.host import read_rss_bytes

    root = _fake_proc(tmp_path, 81)
    probe = HostProbe(81, uss_every_s=None, proc_root=root, interval_s=0.05)
    page = os.sysconf("SC_PAGE_SIZE")
    assert as_dict(probe.read())[("pid:81", "num_threads")] == 7  # the whole read: /proc/PID/stat
    (tmp_path / "81" / "statm").write_text("4096 310 20 1 0 100 0\n")
    between = as_dict(probe.read())
    assert between[("pid:81", "rss_bytes")] == 310 * page and ("pid:81", "num_threads") not in between
    (tmp_path / "81" / "statm").write_text("0 0 0 0 0 0 0\n")
    (tmp_path / "81" / "stat").write_text("81 (kworker/0:1) I 2 0 0 0 -1 0 0 0 0 0 5 9 0 0 20 0 1 0 100 0 0 0\n")
    assert as_dict(probe.read())[("pid:81", "rss_bytes")] == 0 and read_rss_bytes(81, root) == 0
    (tmp_path / "81" / "stat").write_text("81 (srv) Z 1 1 1 0 -1 0 0 0 0 0 150 50 0 0 20 0 1 0 100 0 0 0\n")
    gone = as_dict(probe.read())[("pid:81", "rss_bytes")]
    assert isinstance(gone, Unavailable) and gone.reason == PROCESS_GONE
    assert read_rss_bytes(81, root).reason == PROCESS_GONE


def test_no_mem_available_falls_back_to_psutil_s_estimate(tmp_path):
    root = _fake_proc(tmp_path, 79)
    (tmp_path / "meminfo").write_text("MemTotal:       2000 kB\nMemFree:         500 kB\nBuffers: 1 kB\n")
    readings = as_dict(HostProbe(79, uss_every_s=None, proc_root=root).read())
    memory = psutil.virtual_memory()  # the estimate, of this machine (the fallback asks psutil)
    assert readings[("host", "mem_used_bytes")] + readings[("host", "mem_available_bytes")] == memory.total


def test_the_live_process_reads_as_psutil_reads_it():
    pid = os.getpid()
    before = psutil.Process(pid).num_ctx_switches()
    readings = as_dict(HostProbe(pid, uss_every_s=None).read())
    after = psutil.Process(pid).num_ctx_switches()
    scope = f"pid:{pid}"
    assert before.voluntary <= readings[(scope, "ctx_switches_voluntary")] <= after.voluntary
    assert before.involuntary <= readings[(scope, "ctx_switches_involuntary")] <= after.involuntary
    assert readings[(scope, "num_threads")] == psutil.Process(pid).num_threads()
    assert abs(readings[(scope, "rss_bytes")] - psutil.Process(pid).memory_info().rss) < 16 * MiB
    assert len([m for _, m in readings if m.startswith("core")]) == len(psutil.cpu_percent(None, percpu=True))


def test_the_kept_descriptors_are_closed(tmp_path):
    """Every kept /proc descriptor, statm's included (read between the quarter-second reads at 50 ms), is
    given back; checked by the file each number held (another thread may be given a number again at once)."""
    probe = HostProbe(80, uss_every_s=None, proc_root=_fake_proc(tmp_path, 80), interval_s=0.05)
    probe.read()
    probe.read()
    fds = [handle._fd for handle in (probe._stat, probe._meminfo, probe._pid_stat, probe._pid_statm, probe._pid_status)]
    assert all(isinstance(fd, int) for fd in fds)

    def identity(fd: int):
        try:
            status = os.fstat(fd)
        except OSError:
            return None
        return status.st_dev, status.st_ino

    before = [identity(fd) for fd in fds]
    probe.close()
    assert all(identity(fd) != held for fd, held in zip(fds, before))


def test_meminfo_heads_the_kernel_writes_and_those_it_does_not():
    from gpuscope.probes.host import parse_meminfo_bytes

    head = b"MemTotal:       24683664 kB\nMemFree:         1021752 kB\nMemAvailable:   20211892 kB\nBuffers:  1 kB\n"
    assert parse_meminfo_bytes(head) == (24683664 * 1024, 20211892 * 1024)
    assert parse_meminfo_bytes(b"MemTotal:  100 kB\nMemFree:  100 kB\nMemAvailable:  100 kB\n") == (102400, 102400)
    for unusable in (b"MemTotal:  100 kB\nMemFree:  50 kB\nBuffers:  1 kB\n",  # before 3.14: no MemAvailable
                     b"MemTotal:  100 kB\nMemFree:  50 kB\nMemAvailable:  0 kB\n",
                     b"MemTotal:  100 kB\nMemFree:  50 kB\nMemAvailable:  101 kB\n",
                     b"MemTotal:  100 kB\nMemFree:  50 kB\nMemAvailable:  -1 kB\n",
                     b"MemTotal:  1x0 kB\nMemFree:  50 kB\nMemAvailable:  10 kB\n",
                     b"MemFree:  50 kB\nMemTotal:  100 kB\nMemAvailable:  10 kB\n", b""):
        assert parse_meminfo_bytes(unusable) is None, unusable


def _uss_read_seconds(read_cost_s: float, seconds: int) -> list[int]:
    """The seconds (one read a second on an injected clock) at which USS was read, each read seen as
    taking `read_cost_s` of real time."""
    scope = f"pid:{os.getpid()}"
    clock = FakeClock()
    costs = iter([0.0, read_cost_s] * seconds)  # the cost clock before and after each USS read
    probe = HostProbe(uss_every_s=USS_EVERY_S, clock_s=clock, cost_clock_s=lambda: next(costs))
    read_at = []
    for second in range(seconds):
        clock.now = 1000.0 + second
        if (scope, "uss_bytes") in as_dict(probe.read()):
            read_at.append(second)
    return read_at


def test_uss_waits_longer_when_its_read_takes_long_so_a_large_server_does_not_pay_for_it():
    """A read that took 20 ms (a server holding gigabytes: the kernel walks every page) next comes after
    20 ms / USS_MAX_TIME_SHARE = 100 s, not 30 s; a quick one keeps the 30 s."""
    assert (USS_EVERY_S, round(0.020 / USS_MAX_TIME_SHARE)) == (30.0, 100)
    assert _uss_read_seconds(0.020, 250) == [0, 100, 200]
    assert _uss_read_seconds(0.001, 95) == [0, 30, 60, 90]
    assert _uss_read_seconds(0.0061, 95) == [0, 31, 62, 93]  # 6.1 ms / 0.0002 = 30.5 s: just over 30 s
