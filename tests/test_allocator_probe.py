"""AllocatorProbe with an injected TorchCudaBackend: FakeTorchCuda, and the H200's real memory_stats dicts."""
from __future__ import annotations

from gpuscope.probes.allocator import METRICS, STAT_KEYS, AllocatorProbe
from gpuscope.probes.readings import ERROR, NO_DEVICE, NOT_INITIALIZED, Unavailable
from tests.fakes.nvml import GiB, MiB, ReplayNvml
from tests.fakes.torch_cuda import FakeTorchCuda, TorchFigures

SCOPE = "pid:474/gpu:0"


def as_dict(values) -> dict[tuple[str, str], object]:
    return {(scope, metric): value for scope, metric, value in values}


def test_before_cuda_is_initialised_every_metric_is_not_initialized_never_zero():
    torch_cuda = FakeTorchCuda([TorchFigures(0, 2 * MiB)], initialized=False)
    readings = as_dict(AllocatorProbe(torch_cuda, {0: SCOPE}).read())
    assert set(readings) == {(SCOPE, metric) for metric in METRICS}
    for value in readings.values():
        assert isinstance(value, Unavailable) and value.reason == NOT_INITIALIZED
        assert value != 0 and not value
    # the probe must not touch the allocator: a reset would create a CUDA context (612 MiB on the H200)
    assert torch_cuda.calls == []


def test_after_initialisation_the_figures_are_read():
    torch_cuda = FakeTorchCuda([TorchFigures(0, 2 * MiB)], initialized=False)
    probe = AllocatorProbe(torch_cuda, {0: SCOPE})
    probe.read()
    torch_cuda.initialize()
    readings = as_dict(probe.read())
    assert readings[(SCOPE, "torch_reserved_bytes")] == 2 * MiB
    assert readings[(SCOPE, "torch_allocated_bytes")] == 0


def test_without_a_cuda_device_every_metric_is_no_device():
    torch_cuda = FakeTorchCuda(available=False)
    readings = as_dict(AllocatorProbe(torch_cuda, {0: SCOPE}).read())
    assert {value.reason for value in readings.values()} == {NO_DEVICE}
    assert torch_cuda.calls == []


def test_an_allocator_that_never_allocated_reads_true_zeros():
    readings = as_dict(AllocatorProbe(FakeTorchCuda(), {0: SCOPE}).read())
    assert all(value == 0 for value in readings.values())


def test_peaks_are_read_then_reset_every_tick():
    torch_cuda = FakeTorchCuda([TorchFigures(512 * MiB, 514 * MiB)])
    probe = AllocatorProbe(torch_cuda, {0: SCOPE})
    for _ in range(3):
        probe.read()
        torch_cuda.advance()
    assert torch_cuda.calls == [("memory_stats", 0), ("reset_peak_memory_stats", 0)] * 3
    assert torch_cuda.resets == [(0, 0), (1, 0), (2, 0)]


def test_a_spike_between_ticks_is_caught_and_then_forgotten():
    torch_cuda = FakeTorchCuda().set(allocated=512 * MiB, reserved=514 * MiB)
    probe = AllocatorProbe(torch_cuda, {0: SCOPE})
    probe.read()
    torch_cuda.set(allocated=4608 * MiB, reserved=4610 * MiB)  # a 4 GiB batch, freed before the next tick
    torch_cuda.set(allocated=512 * MiB)
    spike = as_dict(probe.read())
    assert spike[(SCOPE, "torch_allocated_bytes")] == 512 * MiB
    assert spike[(SCOPE, "torch_peak_allocated_bytes")] == 4608 * MiB
    assert spike[(SCOPE, "torch_reserved_bytes")] == 4610 * MiB  # cached, not returned
    after = as_dict(probe.read())
    assert after[(SCOPE, "torch_peak_allocated_bytes")] == 512 * MiB  # reset at the previous tick


def test_without_resets_peaks_are_all_time():
    torch_cuda = FakeTorchCuda().set(allocated=GiB, reserved=GiB)
    probe = AllocatorProbe(torch_cuda, {0: SCOPE}, reset_peaks=False)
    torch_cuda.set(allocated=0)
    probe.read()
    readings = as_dict(probe.read())
    assert readings[(SCOPE, "torch_peak_allocated_bytes")] == GiB
    assert torch_cuda.resets == []


def test_the_replayed_h200_figures_including_a_freed_4_gib_spike():
    replay = ReplayNvml()
    torch_cuda = FakeTorchCuda.from_timeline(replay.lines, follow=replay)
    probe = AllocatorProbe(torch_cuda, {0: SCOPE})
    for tick, line in enumerate(replay.lines):
        replay.goto(tick)
        readings = as_dict(probe.read())
        assert readings[(SCOPE, "torch_allocated_bytes")] == line["alloc"]
        assert readings[(SCOPE, "torch_reserved_bytes")] == line["reserved"]
        assert readings[(SCOPE, "torch_peak_allocated_bytes")] >= line["peak_alloc"]
        assert readings[(SCOPE, "torch_peak_reserved_bytes")] >= line["peak_reserved"]
    assert len(torch_cuda.resets) == len(replay.lines)
    # the 4 GiB tensor was freed between two ticks: allocated never shows it, the peak does
    freed = replay.first_tick_of("4GiB-freed-cached")
    replay.goto(freed - 1)
    probe.read()
    replay.goto(freed)
    readings = as_dict(probe.read())
    assert readings[(SCOPE, "torch_peak_allocated_bytes")] - readings[(SCOPE, "torch_allocated_bytes")] == 4096 * MiB
    replay.advance()
    assert as_dict(probe.read())[(SCOPE, "torch_peak_allocated_bytes")] == replay.line["alloc"]


def test_the_probe_reads_keys_that_real_torch_reports(h200_raw):
    real_keys = set(h200_raw["memory_stats_ctx"])
    assert set(STAT_KEYS.values()) <= real_keys
    assert set(FakeTorchCuda().set(allocated=1).memory_stats(0)) == real_keys


def test_the_real_memory_stats_of_four_streams_are_read_verbatim(h200_raw):
    class RealStats:  # a TorchCudaBackend returning what torch returned after 4 predictors on 4 streams
        def available(self):
            return True

        def is_initialized(self):
            return True

        def memory_stats(self, device):
            return dict(h200_raw["memory_stats_after_4"])

        def reset_peak_memory_stats(self, device):
            pass

    readings = as_dict(AllocatorProbe(RealStats(), {0: SCOPE}).read())
    stats = h200_raw["memory_stats_after_4"]
    assert readings == {(SCOPE, metric): stats[key] for metric, key in STAT_KEYS.items()}
    assert readings[(SCOPE, "torch_reserved_bytes")] - readings[(SCOPE, "torch_allocated_bytes")] == 5_111_808
    assert readings[(SCOPE, "torch_inactive_split_bytes")] == 5_111_808


def test_fragmentation_counters_are_read():
    torch_cuda = FakeTorchCuda([TorchFigures(GiB, 2 * GiB, inactive_split=300 * MiB, alloc_retries=3, ooms=1)])
    readings = as_dict(AllocatorProbe(torch_cuda, {0: SCOPE}).read())
    assert readings[(SCOPE, "torch_inactive_split_bytes")] == 300 * MiB
    assert readings[(SCOPE, "torch_alloc_retries")] == 3
    assert readings[(SCOPE, "torch_ooms")] == 1
    assert readings[(SCOPE, "torch_active_bytes")] == GiB


def test_a_failing_allocator_read_is_an_error_reading_and_no_reset():
    torch_cuda = FakeTorchCuda([TorchFigures(GiB, GiB)])
    torch_cuda.error = RuntimeError("CUDA error: an illegal memory access was encountered")
    readings = as_dict(AllocatorProbe(torch_cuda, {0: SCOPE}).read())
    assert {value for value in readings.values()} == {
        Unavailable(ERROR, "RuntimeError: CUDA error: an illegal memory access was encountered")}
    assert torch_cuda.resets == []


def test_each_torch_device_goes_to_its_nvml_scope():
    # CUDA_VISIBLE_DEVICES=1,0: torch device 0 is NVML device 1
    torch_cuda = FakeTorchCuda([[TorchFigures(GiB, GiB), TorchFigures(2 * GiB, 2 * GiB)]], devices=2)
    readings = as_dict(AllocatorProbe(torch_cuda, {0: "pid:9/gpu:1", 1: "pid:9/gpu:0"}).read())
    assert readings[("pid:9/gpu:1", "torch_allocated_bytes")] == GiB
    assert readings[("pid:9/gpu:0", "torch_allocated_bytes")] == 2 * GiB
    assert torch_cuda.resets == [(0, 0), (0, 1)]


def _nested(flat: dict) -> dict:
    """torch.cuda.memory_stats_as_nested_dict() of a device whose memory_stats() gave `flat` (memory_stats
    joins the nested keys with ".")."""
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


class _NestedOnlyCuda:
    """A torch.cuda stand-in answering only as the H200 did, in torch's nested form (no flat memory_stats)."""

    def __init__(self, flat: dict) -> None:
        self.flat = flat

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def memory_stats_as_nested_dict(self, device):
        return _nested(self.flat)

    def reset_peak_memory_stats(self, device):
        pass


def test_the_real_backend_reads_the_counters_from_torch_s_nested_statistics(h200_raw):
    from gpuscope.probes.allocator import RealTorchCuda

    flat = h200_raw["memory_stats_after_4"]
    backend = RealTorchCuda(cuda=_NestedOnlyCuda(flat))
    assert backend.memory_stats(0) == {key: flat[key] for key in STAT_KEYS.values()}
    readings = as_dict(AllocatorProbe(backend, {0: SCOPE}).read())
    assert readings == {(SCOPE, metric): flat[key] for metric, key in STAT_KEYS.items()}


def test_counters_torch_does_not_report_are_left_out_as_memory_stats_leaves_them_out():
    from gpuscope.probes.allocator import RealTorchCuda

    backend = RealTorchCuda(cuda=_NestedOnlyCuda({"allocated_bytes.all.current": 5, "num_ooms": 1}))
    assert backend.memory_stats(0) == {"allocated_bytes.all.current": 5, "num_ooms": 1}
    assert RealTorchCuda(cuda=_NestedOnlyCuda({})).memory_stats(0) == {}  # before CUDA allocated anything
