"""What gpuscope prints and records says what was measured (issue #20's product defects): no "p50 0.00 ms" for
a step that completed no request, a reference figure named as one, the NVML index fallback said aloud, and
the pid-namespace tracker recording every unlisted byte for the rule's own threshold to judge."""
from __future__ import annotations

import types

import pytest

from gpuscope.probes.readings import Unavailable
from gpuscope.probes.units import MiB
from gpuscope.measure.attribution import GapTracker
from gpuscope.analysis.verdict import PROCESSES, THREADS
from gpuscope.commands.compare import _row_line
from gpuscope.reports.text import format_comparison
from gpuscope.measure.devices import nvml_index_for
from gpuscope.analysis.findings import DEFAULT_THRESHOLDS, rule_pid_namespace
from gpuscope.record.run import Step
from gpuscope.commands.diagnose import _step_line
from tests import scenarios as S

T = DEFAULT_THRESHOLDS


# ---------------------------------------------------------------- no request completed: no latency figure

def test_a_step_without_a_completed_request_says_so_instead_of_p50_0_ms():
    empty = Step(predictors=2, requests=0, errors=40, memory={"rss_bytes": 700 * MiB})
    line = _step_line(empty)
    assert "no request completed" in line and "p50" not in line and "0.00 ms" not in line
    served = Step(predictors=2, requests=100, throughput_rps=50.0, latency_ms={"p50": 3.5, "p99": 9.25},
                  memory={"rss_bytes": 700 * MiB})
    line = _step_line(served)
    assert "p50    3.50 ms  p99    9.25 ms" in line and "no request completed" not in line


def compare_row(mode: str, latency: dict) -> dict:
    return {"mode": mode, "predictors": 2, "throughput_rps": 0.0 if not latency else 80.0, "latency_ms": latency,
            "host_uss_bytes": 900 * MiB, "device_bytes": Unavailable("no_device", "cpu"), "errors": 0}


def test_a_compare_row_without_a_completed_request_says_so():
    line = _row_line(compare_row(PROCESSES, {}))
    assert "no request completed" in line and "p50" not in line and "0.00" not in line
    assert "p50    1.50 ms  p99    4.00 ms" in _row_line(compare_row(THREADS, {"p50": 1.5, "p99": 4.0}))


def test_the_comparison_table_leaves_no_0_ms_for_a_row_without_requests():
    record = S.clean_cpu_run()
    record.config.update(model="builtin:mlp", max_step_s=2.0)
    record.extra["comparison"] = {"rows": [compare_row(THREADS, {"p50": 1.5, "p99": 4.0}),
                                           compare_row(PROCESSES, {})]}
    table = format_comparison(record)
    [row] = [line for line in table.splitlines() if line.strip().startswith("2 ")]
    threads_cell, processes_cell = row.split("|")
    assert "1.50" in threads_cell and "4.00" in threads_cell
    assert "none done" in processes_cell and "0.00" not in processes_cell
    # the columns stay aligned: "   2  <threads cell>  | <processes cell>", both cells as wide
    assert len(threads_cell) - len("   2  ") - len("  ") == len(processes_cell) - len(" ")


# ---------------------------------------------------------------- nvml_index_for: matched by UUID, or says why not

def props(uuid: str):
    return lambda index: types.SimpleNamespace(uuid=uuid)


def test_nvml_index_matches_torchs_device_by_uuid_under_cuda_visible_devices():
    """CUDA_VISIBLE_DEVICES=3: torch's cuda:0 is NVML's device 3."""
    said = []
    uuids = [f"GPU-0000000{i}-aaaa" for i in range(4)]
    assert nvml_index_for(0, uuids, properties=props("00000003-aaaa"), on_fallback=said.append) == 3
    assert said == []


def test_nvml_index_falls_back_to_the_same_index_and_says_why_when_no_uuid_matches():
    said = []
    assert nvml_index_for(1, ["GPU-a", "GPU-b"], properties=props("ffff"), on_fallback=said.append) == 1
    assert len(said) == 1 and "no NVML device has the UUID of torch's cuda:1 (ffff)" in said[0]
    assert "assuming NVML device 1" in said[0] and "CUDA_VISIBLE_DEVICES" in said[0]


def test_nvml_index_falls_back_and_says_why_when_torch_cannot_read_the_uuid():
    def broken(index):
        raise RuntimeError("CUDA driver too old")

    said = []
    assert nvml_index_for(0, ["GPU-a"], properties=broken, on_fallback=said.append) == 0
    assert said and "could not read the UUID of cuda:0 (RuntimeError: CUDA driver too old)" in said[0]
    assert nvml_index_for(0, ["GPU-a"], properties=broken) == 0  # without a listener: the same answer, quietly


def test_compares_worker_uuid_match_says_why_when_it_falls_back():
    from gpuscope.measure.devices import nvml_index_for_uuid

    said: list[str] = []
    assert nvml_index_for_uuid("GPU-0000-b", ["GPU-0000-a", "GPU-0000-B"], 0, on_fallback=said.append) == 1
    assert said == []
    assert nvml_index_for_uuid("GPU-ffff", ["GPU-0000-a"], 0, on_fallback=said.append) == 0
    assert nvml_index_for_uuid(None, ["GPU-0000-a"], 2, on_fallback=said.append) == 2
    assert "no NVML device has the UUID of the worker's cuda:0 (GPU-ffff)" in said[0]
    assert "could not read the UUID of cuda:2" in said[1] and "assuming NVML device 2" in said[1]


# ---------------------------------------------------------------- GapTracker records; PID_NAMESPACE's threshold judges

def unlisted_tick(used: int, driver: int) -> list:
    return [("gpu:0", "process_count", 0), ("gpu:0", "used_bytes", used), ("gpu:0", "driver_reserved_bytes", driver)]


@pytest.mark.parametrize("unlisted, fires", [(T.pid_namespace_min_bytes - 1, False), (T.pid_namespace_min_bytes, True)])
def test_the_gap_tracker_records_every_unlisted_byte_and_the_rule_judges(unlisted, fires):
    tracker = GapTracker(4242, 0)
    driver = 615 * MiB
    tracker(1, unlisted_tick(driver + 10 * MiB, driver))
    tracker(2, unlisted_tick(driver + unlisted, driver))
    tracker(3, unlisted_tick(driver + 20 * MiB, driver))
    evidence = tracker.evidence()
    assert evidence["unlisted_used_bytes"] == unlisted  # the peak, below the floor too
    record = S.clean_gpu_run()
    record.extra["pid_namespace"] = evidence
    assert bool(rule_pid_namespace(record, T)) is fires


def test_the_gap_tracker_has_no_threshold_of_its_own():
    with pytest.raises(TypeError):
        GapTracker(4242, 0, unlisted_min_bytes=64 * MiB)  # it was accepted and never used
