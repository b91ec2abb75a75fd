"""The GPU suite's own checker (tests/gpu/scenarios.check_gpu_run), run here on the CPU.

The GPU suite runs rarely and once per lent machine, so a checker that rejects a correct run wastes the
only try. These records are built the way a real diagnose builds them (gpuscope.measure.attribution.StepMonitor,
with the weights layer run_sweep sets) from H200-sized figures (612 MiB context, the built-in large MLP),
and the checker must accept the correct ones and reject the broken ones.
"""
from __future__ import annotations

from typing import Any

import pytest

from gpuscope.measure.attribution import StepMonitor
from tests.gpu import scenarios as sc

MiB, GiB = sc.MiB, sc.GiB
PID = 4242
CONTEXT_BYTES = 612 * MiB          # gpu-facts: CUDA context and module images on the H200
MODEL_BYTES = 512 * MiB + 128 * 1024  # the built-in large MLP's parameters and buffers
DRIVER_RESERVED_BYTES = 615 * MiB


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


def _run(copy_model: bool) -> sc.DiagnoseRun:
    steps = [_step(n, MODEL_BYTES * (1 + n) if copy_model else MODEL_BYTES) for n in (1, 2, 4)]
    run = {"status": "complete", "config": {"device": "cuda:0", "copy_model": copy_model}, "steps": steps,
           "model": {"model_bytes": MODEL_BYTES}, "baseline": {"context_bytes": CONTEXT_BYTES}, "findings": [],
           "pid": PID, "processes": [{"pid": PID, "self": True, "engines": ["torch"]}]}
    return sc.DiagnoseRun(None, ["python", "-m", "gpuscope", "diagnose"], 0, 1.0, "", "", run)


def test_a_clean_gpu_run_passes_and_its_layers_add_up_to_nvml():
    figures = sc.check_gpu_run(_run(copy_model=False))
    assert [row["layers_sum"] == row["process_gpu_bytes"] for row in figures["layers_add_up"]] == [True] * 3
    assert figures["self_engines"] == ["torch"]


def test_a_copy_model_run_passes_with_one_model_per_predictor_beside_the_original():
    """Scenario 3's run: the weights layer is (1 + predictors) models, which the checker must expect."""
    figures = sc.check_gpu_run(_run(copy_model=True))
    assert [row["predictors"] for row in figures["layers_add_up"]] == [1, 2, 4]


def test_a_copy_model_weights_layer_on_a_shared_run_is_rejected():
    result = _run(copy_model=True)
    result.run["config"]["copy_model"] = False
    with pytest.raises(AssertionError, match="weights layer"):
        sc.check_gpu_run(result)


def test_layers_that_do_not_add_up_to_nvml_are_rejected():
    result = _run(copy_model=False)
    result.run["steps"][1]["memory"]["process_gpu_bytes"] += MiB
    with pytest.raises(AssertionError, match="add up to"):
        sc.check_gpu_run(result)


def test_a_run_on_the_cpu_is_rejected():
    result = _run(copy_model=False)
    result.run["config"]["device"] = "cpu"
    with pytest.raises(AssertionError, match="profiled cpu"):
        sc.check_gpu_run(result)
