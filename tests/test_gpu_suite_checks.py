"""The GPU suite's own checker (tests/gpu/scenarios.check_gpu_run), run here on the CPU.

The GPU suite runs rarely and once per lent machine, so a checker that rejects a correct run wastes the
only try. These records are built the way a real diagnose builds them (gpuscope.measure.attribution.StepMonitor,
with the weights layer run_sweep sets) from H200-sized figures (612 MiB context, the built-in large MLP),
and the checker must accept the correct ones and reject the broken ones. nvidia-smi's side is scripted: what
it prints for the same pid during each step.

Below them, the independent references' helpers (tests/gpu/references.py) with scripted inputs: nvidia-smi's
CSV, the watcher's polls on an injected clock, step windows from samples.jsonl events and the readings
matched to them, the cuBLAS workspace predicted from CUBLAS_WORKSPACE_CONFIG, the fill sized from NVML's
free memory, the predictor-thread trigger of the planted models, and the driver-API allocation on a fake libcuda.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from gpuscope.measure.attribution import StepMonitor
from tests.gpu import references as ref
from tests.gpu import scenarios as sc

MiB, GiB = sc.MiB, sc.GiB
PID = 4242
CONTEXT_BYTES = 612 * MiB          # gpu-facts: CUDA context and module images on the H200
MODEL_BYTES = 512 * MiB + 128 * 1024  # the built-in large MLP's parameters and buffers
DRIVER_RESERVED_BYTES = 615 * MiB


UUID = "GPU-5d2c7a4e-0000-4000-8000-h200"
STEP_NS = 10_000_000_000  # each scripted step spans 10 s of the monotonic clock


def _step(predictors: int, weights_bytes: int, per_thread_bytes: int = 64 * MiB) -> dict[str, Any]:
    """One step's record from one tick, through the product's StepMonitor."""
    monitor = StepMonitor(PID, 0, MODEL_BYTES)
    monitor.model_bytes = weights_bytes
    allocated = weights_bytes + 4 * MiB * predictors
    reserved = allocated + 2 * MiB
    process = CONTEXT_BYTES + reserved + per_thread_bytes * predictors
    mine = f"pid:{PID}/gpu:0"
    monitor(0, [("gpu:0", "used_bytes", process + DRIVER_RESERVED_BYTES), ("gpu:0", "process_count", 1),
                ("gpu:0", "total_bytes", 140 * GiB), (mine, "used_bytes", process),
                (mine, "torch_allocated_bytes", allocated), (mine, "torch_reserved_bytes", reserved),
                (mine, "torch_peak_allocated_bytes", allocated), (mine, "torch_peak_reserved_bytes", reserved)])
    return {"predictors": predictors, "requests": 100, "errors": 0, "memory": monitor.snapshot()}


def _window(index: int, predictors: int) -> ref.StepWindow:
    return ref.StepWindow(predictors, index * STEP_NS, index * STEP_NS + STEP_NS // 2)


def _smi_for(windows: list[ref.StepWindow], steps: list[dict[str, Any]]) -> list[ref.SmiReading]:
    """What nvidia-smi would print during each step: the process's MiB (floored, as nvidia-smi prints it),
    read 1 s into the step, plus one reading between steps."""
    readings = []
    for window, step in zip(windows, steps):
        mib = step["memory"]["process_gpu_bytes"] // MiB
        t = window.start_ns + 1_000_000_000
        readings.append(ref.SmiReading(t, t + 50_000_000, (ref.AppRow(UUID, PID, mib),),
                                       {UUID: (143_771, 143_771 - mib - 615)}))
        readings.append(ref.SmiReading(window.end_ns + 1, window.end_ns + 2, (ref.AppRow(UUID, PID, 1),), {}))
    return readings


def _run(copy_model: bool) -> sc.DiagnoseRun:
    steps = [_step(n, MODEL_BYTES * (1 + n) if copy_model else MODEL_BYTES) for n in (1, 2, 4)]
    windows = [_window(i, s["predictors"]) for i, s in enumerate(steps)]
    run = {"status": "complete", "config": {"device": "cuda:0", "copy_model": copy_model, "gpu_index": 0},
           "steps": steps, "devices": [{"index": 0, "uuid": UUID}],
           "model": {"model_bytes": MODEL_BYTES}, "baseline": {"context_bytes": CONTEXT_BYTES}, "findings": [],
           "pid": PID, "processes": [{"pid": PID, "self": True, "engines": ["torch"]}]}
    return sc.DiagnoseRun(None, ["python", "-m", "gpuscope", "diagnose"], 0, 1.0, "", "", run,
                          smi=_smi_for(windows, steps), windows=windows)


def test_a_clean_gpu_run_passes_and_its_figures_are_recorded_before_the_checks():
    recorded: dict[str, Any] = {}
    figures = sc.check_gpu_run(_run(copy_model=False), record=recorded.update)
    assert [row["nvidia_smi"]["process_mib"] for row in figures["steps"]] == \
        [row["process_gpu_bytes"] // MiB for row in figures["steps"]]
    assert [row["nvidia_smi"]["readings"] for row in figures["steps"]] == [1, 1, 1]  # the between-steps one is left out
    assert figures["self_engines"] == ["torch"]
    assert recorded["invariants"] is figures


def test_a_copy_model_run_passes_with_one_model_per_predictor_beside_the_original():
    """Scenario 3's run: the weights layer is (1 + predictors) models, which the checker must expect."""
    figures = sc.check_gpu_run(_run(copy_model=True))
    assert [row["predictors"] for row in figures["steps"]] == [1, 2, 4]


def test_a_copy_model_weights_layer_on_a_shared_run_is_rejected():
    result = _run(copy_model=True)
    result.run["config"]["copy_model"] = False
    with pytest.raises(AssertionError, match="weights layer"):
        sc.check_gpu_run(result)


def test_a_process_figure_nvidia_smi_does_not_confirm_is_rejected_and_recorded_first():
    """2% above nvidia-smi's figure for the same pid in the same step: beyond the 1% (or 2 MiB) tolerance."""
    result = _run(copy_model=False)
    result.run["steps"][1]["memory"]["process_gpu_bytes"] = int(result.run["steps"][1]["memory"]["process_gpu_bytes"] * 1.02)
    recorded: dict[str, Any] = {}
    with pytest.raises(AssertionError, match="nvidia-smi"):
        sc.check_gpu_run(result, record=recorded.update)
    assert recorded["invariants"]["steps"][1]["error_vs_smi_bytes"] > 2 * MiB


def test_a_long_step_without_an_nvidia_smi_reading_is_rejected_a_short_one_is_not():
    result = _run(copy_model=False)
    result.smi = [r for r in result.smi if not result.windows[2].start_ns <= r.started_ns <= result.windows[2].end_ns]
    with pytest.raises(AssertionError, match="no nvidia-smi reading inside the step"):
        sc.check_gpu_run(result)
    w = result.windows[2]
    result.windows[2] = ref.StepWindow(w.predictors, w.start_ns, w.start_ns + 400_000_000)  # 0.4 s: no poll due
    sc.check_gpu_run(result)


def test_a_run_without_any_nvidia_smi_reading_is_rejected_with_the_reason():
    result = _run(copy_model=False)
    result.smi = [ref.SmiReading(1, 2, error="RuntimeError: nvidia-smi: FileNotFoundError")]
    with pytest.raises(AssertionError, match="FileNotFoundError"):
        sc.check_gpu_run(result)


def test_torchs_own_figures_at_exit_must_match_the_last_tick():
    result = _run(copy_model=False)
    result.run["baseline"]["end"] = {"torch_allocated_bytes": 100 * MiB, "torch_reserved_bytes": 130 * MiB}
    result.torch_at_exit = {"allocated_bytes": 100 * MiB, "reserved_bytes": 130 * MiB}
    sc.check_gpu_run(result)
    result.torch_at_exit = {"allocated_bytes": 100 * MiB, "reserved_bytes": 130 * MiB + 2 * MiB}
    with pytest.raises(AssertionError, match="torch reserved"):
        sc.check_gpu_run(result)


def test_an_out_of_memory_step_is_accepted_only_where_expected_and_last():
    result = _run(copy_model=False)
    last = result.run["steps"][-1]
    last.update(oom=True, errors=1, requests=0, error_messages=["OutOfMemoryError: CUDA out of memory."])
    with pytest.raises(AssertionError, match="served no request"):
        sc.check_gpu_run(result)
    sc.check_gpu_run(result, oom_at=4)
    with pytest.raises(AssertionError, match="expected the last step"):
        sc.check_gpu_run(result, oom_at=2)


def test_a_run_on_the_cpu_is_rejected():
    result = _run(copy_model=False)
    result.run["config"]["device"] = "cpu"
    with pytest.raises(AssertionError, match="profiled cpu"):
        sc.check_gpu_run(result)


# ---------------------------------------------------------------- the independent references' helpers

SMI_APPS = """GPU-aaaa, 4242, 1862
GPU-aaaa, 5151, [N/A]
GPU-bbbb, 4242, 300

No running processes found
"""


def test_nvidia_smis_compute_apps_are_parsed_with_n_a_as_no_figure():
    rows = ref.parse_compute_apps(SMI_APPS)
    assert rows == [ref.AppRow("GPU-aaaa", 4242, 1862), ref.AppRow("GPU-aaaa", 5151, None), ref.AppRow("GPU-bbbb", 4242, 300)]
    reading = ref.SmiReading(0, 1, tuple(rows))
    assert reading.process_mib(4242, "GPU-aaaa") == 1862
    assert reading.process_mib(4242) == 2162  # both GPUs when none is named
    assert reading.process_mib(5151, "GPU-aaaa") is None  # N/A is no figure, never 0
    assert reading.process_mib(999, "GPU-aaaa") is None
    assert ref.parse_compute_apps("No running processes found\n") == []


def test_nvidia_smis_device_memory_is_parsed_and_used_is_total_minus_free():
    """H200 (gpu-facts raw mem_v1): total 143,771 MiB, free 142,535 MiB: used 1,236 MiB with the driver's reserve."""
    devices = ref.parse_gpu_memory("GPU-aaaa, 143771, 142535\nGPU-bbbb, 81559, [N/A]\n")
    assert devices == {"GPU-aaaa": (143771, 142535), "GPU-bbbb": (81559, None)}
    reading = ref.SmiReading(0, 1, (), devices)
    assert reading.device_mib("GPU-aaaa") == (1236, 143771)
    assert reading.device_mib("GPU-bbbb") is None
    assert reading.device_mib(None) is None  # two GPUs: which one is not guessed
    assert ref.SmiReading(0, 1, (), {"GPU-aaaa": (143771, 142535)}).device_mib(None) == (1236, 143771)


def test_the_watcher_stamps_each_poll_with_the_injected_clock_and_keeps_failures_as_reasons():
    ticks = iter([100, 180, 300, 310])
    outputs = {ref.SMI_APPS_ARGV: SMI_APPS, ref.SMI_GPU_ARGV: "GPU-aaaa, 143771, 142535\n"}
    calls: list[tuple[str, ...]] = []

    def run(argv):
        calls.append(tuple(argv))
        if len(calls) > 2:
            raise RuntimeError("nvidia-smi exited 9: NVML: Driver/library version mismatch")
        return outputs[tuple(argv)]

    watcher = ref.SmiWatcher(run=run, clock_ns=lambda: next(ticks))
    good = watcher.poll_once()
    bad = watcher.poll_once()
    assert (good.started_ns, good.ended_ns, good.error) == (100, 180, None)
    assert good.process_mib(4242, "GPU-aaaa") == 1862 and good.device_mib("GPU-aaaa") == (1236, 143771)
    assert (bad.started_ns, bad.ended_ns, bad.apps, bad.devices) == (300, 310, (), {})
    assert "version mismatch" in bad.error
    assert watcher.readings == [good, bad]
    assert calls[:2] == [ref.SMI_APPS_ARGV, ref.SMI_GPU_ARGV]


def test_the_watcher_thread_polls_before_it_first_waits():
    watcher = ref.SmiWatcher(run=lambda argv: "", interval_s=3600.0).start()
    readings = watcher.stop()
    assert len(readings) == 1 and readings[0].error is None


def test_step_windows_come_from_the_samples_files_events():
    lines = [json.dumps({"schema": "gpuscope.samples/2", "t0_ns": 5}),
             json.dumps({"t_ns": 10, "event": "phase", "name": "sweep"}),
             json.dumps({"t_ns": 11, "event": "step_start", "predictors": 1}),
             json.dumps({"t_ns": 12, "f": 1, "k": [[0, "gpu:0", "used_bytes"]], "v": [1]}),
             json.dumps({"t_ns": 20, "event": "step_end", "predictors": 1}),
             json.dumps({"t_ns": 21, "event": "step_start", "predictors": 2}),
             json.dumps({"t_ns": 40, "event": "step_end", "predictors": 2}),
             json.dumps({"t_ns": 41, "event": "step_start", "predictors": 4}),  # killed: no step_end
             '{"t_ns": 42, "event": "step_e']  # a torn last line
    assert ref.step_windows(lines) == [ref.StepWindow(1, 11, 20), ref.StepWindow(2, 21, 40)]


def test_readings_are_matched_to_the_step_they_lie_wholly_inside():
    windows = [ref.StepWindow(1, 1_000, 3_000), ref.StepWindow(2, 4_000, 6_000)]

    def reading(start, end, mib, uuid="GPU-aaaa"):
        return ref.SmiReading(start, end, (ref.AppRow(uuid, PID, mib),), {uuid: (143771, 143771 - mib - 615)})

    readings = [reading(900, 1_100, 5_000),      # straddles the start: taken partly before the step
                reading(1_200, 1_300, 1_300), reading(2_000, 2_100, 1_310),
                reading(2_900, 3_100, 9_999),    # straddles the end
                reading(4_100, 4_200, 7, uuid="GPU-bbbb"),  # another GPU only
                ref.SmiReading(5_000, 5_100, error="RuntimeError: nvidia-smi timed out")]
    matched = ref.match_steps(windows, readings, PID, "GPU-aaaa")
    assert (matched[1].readings, matched[1].process_mib, matched[1].device_used_mib) == (2, 1310, 1310 + 615)
    assert matched[1].why is None and matched[1].device_total_mib == 143771
    assert matched[2].process_mib is None and f"did not list pid {PID}" in matched[2].why
    assert "no nvidia-smi reading inside the step" in \
        ref.match_steps([ref.StepWindow(8, 7_000, 7_500)], readings, PID, "GPU-aaaa")[8].why


def test_the_cublas_workspace_is_predicted_as_torch_parses_cublas_workspace_config():
    assert ref.cublas_workspace_bytes(":4096:8") == 32 * MiB  # torch's default on Hopper
    assert ref.cublas_workspace_bytes(":4096:2:16:8") == 8 * MiB + 128 * 1024  # its default before Hopper
    assert ref.cublas_workspace_bytes(":0:0") == 0
    assert ref.cublas_workspace_bytes(None) is None and ref.cublas_workspace_bytes("4096") is None


def test_the_fill_is_sized_from_nvmls_free_memory_to_the_target_share():
    """The H200 of gpu-facts at rest: 150,754,820,096 bytes, 149,458,911,232 free (the driver's reserve used)."""
    total, free, own = 150_754_820_096, 149_458_911_232, GiB
    fill = ref.fill_bytes(total, free, 0.90, own)
    assert fill % (2 * MiB) == 0
    share = (total - free + own + fill) / total
    assert 0.90 - 2 * MiB / total < share <= 0.90
    with pytest.raises(ValueError, match="already 95.0% used"):
        ref.fill_bytes(total, int(total * 0.05), 0.90, own)


def test_predictor_threads_are_named_by_index_the_trigger_of_the_planted_models():
    """plants.py keys a plant to a predictor count by acting on predictor thread k only: the pool must name
    a step's threads 0 .. N-1. The step ends when all three were seen (no timing involved)."""
    from torch import nn

    from gpuscope.measure.models import LoadedModel
    from gpuscope.measure.workload import PredictorPool

    seen: set[int | None] = set()
    lock = threading.Lock()
    stop = threading.Event()

    class Recorder(nn.Module):
        def forward(self, x):
            with lock:
                seen.add(ref.predictor_index())
                if seen >= {0, 1, 2}:
                    stop.set()
            return x

    model = LoadedModel(module=Recorder(), source="test", kind="factory", input_shape=(1, 2), dtype="float32",
                        device="cpu")
    PredictorPool(model).run_step(3, max_duration_s=60.0, warmup_s=0.0, window_s=0.05, stop=stop)
    assert seen == {0, 1, 2}
    assert ref.predictor_index("gpuscope-safety-1") is None and ref.predictor_index("MainThread") is None
    assert ref.predictor_index("gpuscope-predictor-7") == 7


class FakeLibcuda:
    """libcuda's calls as DriverMemory makes them, answering through the byref'd out-parameters."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail
        self.calls: list[str] = []
        self.sizes: list[int] = []

    def __getattr__(self, name: str):
        def call(*args):
            self.calls.append(name)
            if name == self.fail:
                return 2  # CUDA_ERROR_OUT_OF_MEMORY
            if name == "cuDeviceGet":
                args[0]._obj.value = args[1]
            elif name == "cuDevicePrimaryCtxRetain":
                args[0]._obj.value = 0xC0FFEE
            elif name == "cuMemAlloc_v2":
                args[0]._obj.value = 0x7F00_0000_0000
                self.sizes.append(args[1].value)
            return 0
        return call


def test_driver_memory_allocates_in_the_primary_context_and_says_which_call_failed():
    lib = FakeLibcuda()
    memory = ref.DriverMemory(lib)
    assert memory.alloc(2 * GiB, 0) == 0x7F00_0000_0000
    assert lib.calls == ["cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxPushCurrent_v2", "cuMemAlloc_v2",
                         "cuCtxPopCurrent_v2"]
    assert lib.sizes == [2 * GiB] and memory.total_bytes == 2 * GiB

    failing = FakeLibcuda(fail="cuMemAlloc_v2")
    with pytest.raises(ref.DriverError, match="cuMemAlloc_v2 returned CUresult 2"):
        ref.DriverMemory(failing).alloc(GiB, 0)
    assert failing.calls[-1] == "cuCtxPopCurrent_v2"  # the context is popped even so


def test_the_built_in_large_mlp_weighs_what_the_copies_scenario_expects():
    """sc.BUILTIN_LARGE_MLP_BYTES is the copies' independent cost: it must be the model diagnose loads."""
    import torch

    from gpuscope.measure.models import _builtin

    with torch.device("meta"):
        module, _ = _builtin("mlp", "large")
    assert sum(p.numel() * p.element_size() for p in module.parameters()) == sc.BUILTIN_LARGE_MLP_BYTES


def test_the_planted_models_import_without_a_gpu():
    from tests.gpu import plants

    assert plants.FRAGMENT_HOLES_BYTES == 144 * MiB
    assert plants.OUTSIDE_STREAMS * ref.cublas_workspace_bytes(plants.OUTSIDE_WORKSPACE_CONFIG) == GiB


def test_the_harness_runs_a_planted_model_and_reads_back_its_steps_polls_and_torchs_figures(tmp_path):
    """scenarios.diagnose end to end on the CPU: the planted model loads in diagnose's process as the
    top-level `plants` module, the step windows come from the run's own samples.jsonl, every poll of the
    (scripted) nvidia-smi lies within the run, and the model's at-exit figures come back (its plant needs
    CUDA, so it counted nothing here)."""
    import time

    polls: list[int] = []

    def smi(argv):
        polls.append(time.monotonic_ns())
        return ""

    before = time.monotonic_ns()
    result = sc.diagnose(tmp_path / "run", "--model", "plants:oom_model", "--device", "cpu", "--predictors", "1,2",
                         "--duration", "0.3s", "--warmup", "0s", watcher=ref.SmiWatcher(run=smi, interval_s=0.05))
    after = time.monotonic_ns()
    assert result.rc == 0, result.explain()
    assert [w.predictors for w in result.windows] == [1, 2]
    assert before < result.windows[0].start_ns < result.windows[0].end_ns <= result.windows[1].start_ns < after
    assert result.smi and all(before <= r.started_ns <= r.ended_ns <= after and r.error is None for r in result.smi)
    assert result.torch_at_exit == {"plant": {"count": 0, "requests": []}}
    assert (tmp_path / "run" / "nvidia-smi-readings.json").exists()
    assert sc.smi_steps(result)[1].process_mib is None  # the scripted nvidia-smi lists nobody


def test_a_planted_model_plants_once_on_its_first_cuda_request_on_the_right_thread_and_never_on_the_cpu():
    """plants_once, on the CPU: tensors that say they are on CUDA stand in for CUDA ones. Eight predictor
    threads race to the first request, and the plant takes 20 ms, so without the lock several would plant:
    it runs exactly once; a model keyed to one thread plants on that thread only; CPU tensors never plant."""
    torch = pytest.importorskip("torch")
    from tests.gpu import plants

    class OnCuda(torch.Tensor):
        @property
        def is_cuda(self) -> bool:  # type: ignore[override]
            return True

    planted: list[Any] = []

    def slow_plant(device: Any) -> None:
        planted.append((device, threading.current_thread().name))
        time.sleep(0.02)  # the racing threads reach the check while this one is still planting

    def race(model: Any) -> None:
        start = threading.Barrier(8)

        def request() -> None:
            start.wait()
            model(torch.Tensor._make_subclass(OnCuda, torch.ones(8, 1024)))

        threads = [threading.Thread(target=request, name=f"predictor-{i}") for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    held_before = list(sc._HELD)
    try:
        model = plants.plants_once("Racing", slow_plant)
        assert type(model).__name__ == "Racing" and model in sc._HELD
        model(torch.ones(8, 1024))
        assert planted == [] and not model.planted  # a CPU request
        race(model)
        assert [device for device, _thread in planted] == [torch.device("cpu")] and model.planted
        keyed = plants.plants_once("Keyed", slow_plant, lambda: threading.current_thread().name == "predictor-5")
        race(keyed)
        assert planted[1:] == [(torch.device("cpu"), "predictor-5")] and keyed.planted
        elsewhere = plants.plants_once("Elsewhere", slow_plant, lambda: False)
        elsewhere(torch.Tensor._make_subclass(OnCuda, torch.ones(8, 1024)))
        assert len(planted) == 2 and not elsewhere.planted
    finally:
        sc._HELD[:] = held_before  # the planted models are not this session's to hold to exit
