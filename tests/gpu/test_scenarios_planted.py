"""The scenarios issue 20 plants that were only ever asserted absent: OUTSIDE_ALLOCATOR, FRAGMENTATION,
LOW_HEADROOM and OOM, each caused by a planted model (tests/gpu/plants.py) whose figure is known beforehand
or read by torch itself in the profiled process, and compared with gpuscope's finding.

Each test states its reference and tolerance in its docstring, records every figure (gpu-results.json)
before asserting, and runs a fresh `python -m gpuscope diagnose` on a quiet GPU (conftest.py), with
nvidia-smi polled beside it (scenarios.diagnose) for the checks every run passes (scenarios.check_gpu_run).
"""
from __future__ import annotations

import pytest

from . import plants
from . import references as ref
from . import scenarios as sc

pytestmark = pytest.mark.gpu

SHORT = ("--duration", "2s")
MiB, GiB = sc.MiB, sc.GiB


PLANTED_HERE = set(sc.PLANTED) | {"FRAGMENTATION", "LOW_HEADROOM", "OOM"}


def _fired(run: dict, allowed: set[str] = frozenset()) -> set[str]:
    """Planted findings present in `run` beyond the `allowed` ones: those of every scenario, this file's, and
    OUTSIDE_ALLOCATOR at warn (at info it fires on every GPU run: the CUDA context is outside the allocator)."""
    fired = {f.get("code") for f in sc.findings(run) if f.get("code") in PLANTED_HERE
             or (f.get("code") == "OUTSIDE_ALLOCATOR" and f.get("severity") == "warn")}
    return fired - set(allowed)


def _plant(result: sc.DiagnoseRun) -> dict:
    """What the planted model recorded in the profiled process (torch-at-exit.json's `plant`)."""
    at_exit = result.torch_at_exit
    assert at_exit is not None and "plant" in at_exit, \
        f"the planted model wrote nothing at exit ({result.out_dir}); did it plant? {result.explain()}"
    return at_exit["plant"]


def _layer(step: dict, name: str) -> int:
    return int((step["memory"].get("layers") or {}).get(name, 0))


def _reserved_at_peak(step: dict) -> int:
    """torch's reserved pool at the step's peak tick: weights + activations + cache, as the layers split it."""
    return sum(_layer(step, k) for k in ("model_weights_bytes", "activations_bytes", "allocator_cache_bytes"))


def _second_difference(values: dict[int, int], a: int, b: int, c: int) -> int:
    """(v[c] - v[b]) - (v[b] - v[a]): growth at the last step beyond the step before's, so a cost that
    grows by one per predictor (cuBLAS handles) cancels and a plant at the last step stands alone."""
    return (values[c] - values[b]) - (values[b] - values[a])


# ---------------------------------------------------------------- OUTSIDE_ALLOCATOR

PLANT_SHARE, PLANT_FLOOR_BYTES = 0.05, 32 * MiB


@pytest.mark.scenario("outside-allocator")
def test_memory_outside_torchs_allocator_fires_outside_allocator_and_workspaces_stay_in_torchs_pool(scenario):
    """plants.outside_allocator_model, predictors 1,2,3,4, CUBLAS_WORKSPACE_CONFIG=:4096:8. At 4 predictors
    it takes 2 GiB with the CUDA driver API (outside every allocator) and runs a matmul on 32 new streams,
    each of which gets a cuBLAS workspace from torch's caching allocator.

    References: the 2 GiB planted; the workspaces torch's own memory_snapshot() shows on the 32 planted
    streams (read in the profiled process); the figure predicted from CUBLAS_WORKSPACE_CONFIG (32 x 32 MiB);
    nvidia-smi's per-step figure for the run's pid.
    Isolation: the second difference from 2 over 3 to 4 predictors (a per-predictor cost cancels; at these
    counts the thread-safety check's 4 threads have already made every cuBLAS handle the sweep needs).
    Tolerance: 5% of the plant + 32 MiB, for
    - the outside-the-allocator layer: the 2 GiB, and not the workspaces (they are torch's);
    - torch's reserved pool (weights + activations + cache): the workspaces torch shows;
    - nvidia-smi: both;
    and OUTSIDE_ALLOCATOR warns (growth the predictor count does not explain). Last, the premise: torch's
    workspaces on the planted streams are the predicted 32 x 32 MiB (within 5%).
    """
    workspace_config = plants.OUTSIDE_WORKSPACE_CONFIG
    result = sc.diagnose(scenario.dir, "--model", "plants:outside_allocator_model", "--predictors", "1,2,3,4", *SHORT,
                         env={"CUBLAS_WORKSPACE_CONFIG": workspace_config})
    run = result.run
    scenario.record(run=sc.run_figures(result))
    sc.check_gpu_run(result, record=scenario.record)
    plant = _plant(result)
    steps = {s["predictors"]: s for s in run["steps"]}
    outside = {n: _layer(s, "outside_allocator_bytes") for n, s in steps.items()}
    reserved = {n: _reserved_at_peak(s) for n, s in steps.items()}
    smi = dict(sc.smi_step_points(result))
    driver = plant["driver_bytes"]
    workspaces = plant["torch_workspace_bytes_on_planted_streams"]
    predicted = plants.OUTSIDE_STREAMS * (ref.cublas_workspace_bytes(workspace_config) or 0)
    fired = sc.findings(run, "OUTSIDE_ALLOCATOR")
    figures = {"outside_by_predictors": outside, "reserved_by_predictors": reserved, "nvidia_smi_by_predictors": smi,
               "driver_bytes": driver, "torch_workspace_bytes": workspaces, "predicted_workspace_bytes": predicted,
               "finding": fired}
    if {2, 3, 4} <= set(outside) and {2, 3, 4} <= set(smi):
        figures.update(outside_second_difference=_second_difference(outside, 2, 3, 4),
                       reserved_second_difference=_second_difference(reserved, 2, 3, 4),
                       nvidia_smi_second_difference=_second_difference(smi, 2, 3, 4))
    scenario.record(**figures)

    assert len(fired) == 1 and fired[0]["severity"] == "warn", \
        f"OUTSIDE_ALLOCATOR did not warn: {sc.finding_summary(run)}"
    assert sorted(steps) == [1, 2, 3, 4] and sorted(smi) == [1, 2, 3, 4], (sorted(steps), smi)
    assert driver == plants.OUTSIDE_DRIVER_BYTES, plant
    tolerance = {"share": PLANT_SHARE, "floor": PLANT_FLOOR_BYTES}
    out2 = figures["outside_second_difference"]
    assert ref.within(out2, driver, **tolerance), \
        (f"outside the allocator grew {out2 / MiB:.0f} MiB at 4 predictors beyond the step before's; "
         f"the driver API took {driver / MiB:.0f} MiB (and torch holds the {workspaces / MiB:.0f} MiB of workspaces)")
    res2 = figures["reserved_second_difference"]
    assert ref.within(res2, workspaces, **tolerance), \
        f"torch's pool grew {res2 / MiB:.0f} MiB at 4 predictors; torch shows {workspaces / MiB:.0f} MiB of workspaces"
    smi2 = figures["nvidia_smi_second_difference"]
    assert ref.within(smi2, driver + workspaces, **tolerance), \
        f"nvidia-smi: {smi2 / MiB:.0f} MiB at 4 predictors; planted {driver / MiB:.0f} + {workspaces / MiB:.0f} MiB"
    evidence = fired[0]["evidence"]
    assert {int(k): v for k, v in evidence["outside_bytes_by_predictors"].items()} == outside
    assert not _fired(run, {"OUTSIDE_ALLOCATOR"}), sc.finding_summary(run)
    assert ref.within(workspaces, predicted, 0.05), \
        (f"premise: torch holds {workspaces / MiB:.0f} MiB on the {plants.OUTSIDE_STREAMS} planted streams "
         f"({plant['torch_workspace_segments_on_planted_streams']} segments), CUBLAS_WORKSPACE_CONFIG={workspace_config} "
         f"predicts {predicted / MiB:.0f} MiB")


# ---------------------------------------------------------------- FRAGMENTATION

SPLIT_SLACK_BYTES = 8 * MiB  # the predictors' own small blocks split and merge around the plant


@pytest.mark.scenario("fragmentation")
def test_blocks_freed_alternately_fire_fragmentation_with_torchs_inactive_split(scenario):
    """plants.fragmentation_model, predictors 1,2, the allocator pinned to fixed segments
    (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False): at its first request, 96 blocks of 3 MiB on a side
    stream, every other one then freed: 48 holes of 3 MiB (144 MiB) inside split 20 MiB segments, which no
    later request fills (blocks are reused on their own stream only).

    Reference: torch.cuda.memory_stats() in the profiled process right after the plant
    (inactive_split_bytes.all.current, num_alloc_retries).
    Tolerance: FRAGMENTATION's inactive split bytes within 8 MiB of torch's (the predictors' small blocks);
    its retries equal to torch's; torch's figure at least the 144 MiB of holes (the pattern's premise).
    The holes stay under CACHE_BLOAT's 256 MiB floor, so FRAGMENTATION is the only planted finding.
    """
    result = sc.diagnose(scenario.dir, "--model", "plants:fragmentation_model", "--predictors", "1,2", *SHORT,
                         env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"})
    run = result.run
    scenario.record(run=sc.run_figures(result))
    sc.check_gpu_run(result, record=scenario.record)
    plant = _plant(result)
    torch_after = plant["torch_after"]
    fired = sc.findings(run, "FRAGMENTATION")
    evidence = fired[0]["evidence"] if fired else {}
    scenario.record(finding=fired, torch_after_plant=torch_after, holes_bytes=plant["holes_bytes"],
                    error_vs_torch_bytes=(evidence["inactive_split_bytes"] - torch_after["inactive_split_bytes"]
                                          if evidence else None))

    assert len(fired) == 1 and fired[0]["severity"] == "warn", f"FRAGMENTATION did not fire: {sc.finding_summary(run)}"
    assert abs(evidence["inactive_split_bytes"] - torch_after["inactive_split_bytes"]) <= SPLIT_SLACK_BYTES, \
        (f"gpuscope: {evidence['inactive_split_bytes'] / MiB:.1f} MiB in inactive split blocks, torch after the "
         f"plant: {torch_after['inactive_split_bytes'] / MiB:.1f} MiB")
    assert evidence["alloc_retries"] == torch_after["num_alloc_retries"], (evidence, torch_after)
    assert not _fired(run, {"FRAGMENTATION"}), sc.finding_summary(run)
    assert torch_after["inactive_split_bytes"] >= plants.FRAGMENT_HOLES_BYTES, \
        (f"premise: torch shows {torch_after['inactive_split_bytes'] / MiB:.1f} MiB in inactive split blocks after "
         f"freeing {plants.FRAGMENT_HOLES_BYTES / MiB:.0f} MiB of holes")


# ---------------------------------------------------------------- LOW_HEADROOM

HEADROOM_TARGET = 0.90           # between LOW_HEADROOM's warn (0.85) and fail (0.95) edges
HEADROOM_OWN_BYTES = 1 * GiB     # the run besides its fill: context 612 MiB, 16 MiB model, 2 threads' cuBLAS
SHARE_VS_SMI = 0.005             # half a percentage point of the card
SHARE_VS_TARGET = 0.025          # the run's own memory, estimated, never run on a GPU: 2 GiB of an 80 GiB H100


@pytest.mark.scenario("low-headroom")
def test_a_card_filled_to_ninety_percent_fires_low_headroom_with_nvidia_smis_share(scenario, nvml):
    """The test reads NVML's free memory on device 0 before the run and sizes a fill that brings the card
    to 90% (references.fill_bytes: 90% of total - used now - about 1 GiB for the run itself);
    plants.headroom_model allocates it with torch beside its 16 MiB model, predictors 1,2.

    References: nvidia-smi's device memory (total - free) in the step LOW_HEADROOM names, read by the test
    process; the 90% the fill was sized for.
    Tolerance: used share within 0.5 percentage points of nvidia-smi's, total to the MiB; within 2.5 points
    of 90%; severity warn (between 85% and 95%).
    """
    memory = nvml.memory_info(0)
    fill = ref.fill_bytes(memory.total_bytes, memory.free_bytes, HEADROOM_TARGET, HEADROOM_OWN_BYTES)
    scenario.record(nvml_before={"total_bytes": memory.total_bytes, "free_bytes": memory.free_bytes,
                                 "used_bytes": memory.used_bytes}, fill_bytes=fill)
    result = sc.diagnose(scenario.dir, "--model", "plants:headroom_model", "--device", "cuda:0", "--predictors", "1,2",
                         *SHORT, env={plants.FILL_ENV: str(fill)})
    run = result.run
    scenario.record(run=sc.run_figures(result))
    sc.check_gpu_run(result, record=scenario.record)
    fired = sc.findings(run, "LOW_HEADROOM")
    evidence = fired[0]["evidence"] if fired else {}
    smi = sc.smi_steps(result).get(evidence.get("predictors")) if evidence else None
    smi_share = (smi.device_used_mib / smi.device_total_mib
                 if smi and smi.device_used_mib is not None and smi.device_total_mib else None)
    scenario.record(finding=fired, plant=_plant(result), nvidia_smi=smi.to_json() if smi else None,
                    used_share=evidence.get("used_share"), nvidia_smi_share=smi_share)

    assert run["config"]["gpu_index"] == 0, f"the fill was sized for NVML device 0, the run is on {run['config']}"
    assert len(fired) == 1 and fired[0]["severity"] == "warn", f"LOW_HEADROOM did not warn: {sc.finding_summary(run)}"
    assert smi_share is not None, f"no nvidia-smi device figure in the step at {evidence['predictors']}: {smi}"
    assert abs(evidence["device_total_bytes"] / MiB - smi.device_total_mib) < 1, (evidence, smi)
    assert abs(evidence["used_share"] - smi_share) <= SHARE_VS_SMI, \
        f"gpuscope: {evidence['used_share']:.2%} of the card used, nvidia-smi: {smi_share:.2%}"
    assert abs(evidence["used_share"] - HEADROOM_TARGET) <= SHARE_VS_TARGET, \
        f"filled to {evidence['used_share']:.2%}, sized for {HEADROOM_TARGET:.0%}"
    assert not _fired(run, {"LOW_HEADROOM"}), sc.finding_summary(run)


# ---------------------------------------------------------------- OOM

@pytest.mark.scenario("oom")
def test_asking_for_more_than_is_free_fires_oom_with_torchs_count(scenario):
    """plants.oom_model, predictors 1,2, --warmup 0s (the window is open before the first request, so
    every error is counted): every request of the second predictor asks torch for the device's free memory
    + 1 GiB; the first OutOfMemoryError ends the step, and the sweep.

    References: torch's num_ooms at exit, and the plant's own count of the OutOfMemoryErrors it raised.
    Tolerance: exact. The step at 2 predictors has that many errors and is marked out of memory; OOM (fail)
    names 2 as where it happened and 1 as the ceiling. The allocator retried before failing where torch's
    num_alloc_retries says so, and then FRAGMENTATION reports exactly those retries.
    """
    result = sc.diagnose(scenario.dir, "--model", "plants:oom_model", "--predictors", "1,2", "--warmup", "0s", *SHORT)
    run = result.run
    scenario.record(run=sc.run_figures(result))
    sc.check_gpu_run(result, record=scenario.record, oom_at=2)
    plant = _plant(result)
    at_exit = result.torch_at_exit or {}
    step = next((s for s in run["steps"] if s["predictors"] == 2), {})
    fired = sc.findings(run, "OOM")
    fragmentation = sc.findings(run, "FRAGMENTATION")
    scenario.record(finding=fired, fragmentation=fragmentation, raised=plant.get("count"),
                    torch_num_ooms=at_exit.get("num_ooms"), torch_num_alloc_retries=at_exit.get("num_alloc_retries"),
                    step_errors=step.get("errors"), step_messages=step.get("error_messages"))

    assert step.get("oom") is True, f"the step at 2 predictors is not marked out of memory: {step}"
    assert plant["count"] >= 1, plant
    assert step["errors"] == plant["count"] == at_exit["num_ooms"], \
        f"errors counted {step['errors']}, OutOfMemoryError raised {plant['count']}, torch's num_ooms {at_exit['num_ooms']}"
    assert any("OutOfMemoryError" in m for m in step["error_messages"]), step["error_messages"]
    assert len(fired) == 1 and fired[0]["severity"] == "fail", f"OOM did not fire: {sc.finding_summary(run)}"
    evidence = fired[0]["evidence"]
    assert (evidence["oom_predictors"], evidence["last_good_predictors"]) == (2, 1), evidence
    retries = at_exit["num_alloc_retries"]
    if retries:
        assert [f["evidence"]["alloc_retries"] for f in fragmentation] == [retries], (fragmentation, retries)
    assert not _fired(run, {"OOM", "FRAGMENTATION"}), sc.finding_summary(run)
