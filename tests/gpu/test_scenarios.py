"""Planted scenarios on a real GPU (issue 10): each plants one cause beside or inside a fresh
`python -m gpuscope diagnose` process, then asserts that the right finding fires with the right
magnitude, measured independently (torch's own figures, nvidia-smi read by this process during each
step, the model's known bytes, a second run with --streams), and that nothing else planted fires.
The clean run fires none of the planted findings.

Every figure goes to gpu-results.json before the assertions, so a failing scenario still says what
it measured; each run's report folder is kept under the reports root (see conftest.py).
Short sweeps (2 s per step) keep the whole file within about 3 minutes on an H100.
"""
from __future__ import annotations

import importlib.util

import pytest

from . import references as ref
from . import scenarios as sc

pytestmark = pytest.mark.gpu

SHORT = ("--duration", "2s")
MiB, GiB = sc.MiB, sc.GiB


def _fired(run: dict, allowed: set[str] = frozenset()) -> set[str]:
    """Planted findings present in `run` beyond the `allowed` ones."""
    return (sc.codes(run) & set(sc.PLANTED)) - set(allowed)


def _need(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed in this Python ({why})")


def _device(run: dict) -> dict:
    index = run.get("config", {}).get("gpu_index")
    return next((d for d in run.get("devices", []) if d.get("index") == index), {})


# ---------------------------------------------------------------- 1. clean

@pytest.mark.scenario("clean")
def test_clean_default_sweep_shares_one_model_and_fires_no_planted_finding(scenario):
    """The built-in model on the GPU, the default predictor counts: sharing verified, and no duplicate,
    foreign-process or engine finding (nor any finding a healthy run never shows)."""
    from gpuscope.measure.sweep import default_predictor_counts

    result = sc.diagnose(scenario.dir, *SHORT)
    run = result.run
    scenario.record(run=sc.run_figures(result))
    scenario.record(invariants=sc.check_gpu_run(result, record=scenario.record))
    expected_counts = list(default_predictor_counts(int(run["host"]["usable_cores"]), True))
    others = [p for p in run["processes"] if not p.get("self") and (sc.number(p.get("peak_used_bytes")) or 0) > 0]
    scenario.record(default_predictor_counts=expected_counts, wall_s=round(result.wall_s, 2),
                    fired=sorted(sc.codes(run)), other_gpu_processes=others)

    assert run["config"]["predictors"] == expected_counts
    assert run["config"]["model"] == "builtin:mlp" and run["config"]["model_size"] == "large"
    assert run["sharing"]["verified"] is True and run["sharing"]["distinct_weight_sets"] == 1, run["sharing"]
    assert not _fired(run), f"planted findings on a clean run: {sc.finding_summary(run)}"
    healthy = set(sc.NEVER_HEALTHY) | {"FRAGMENTATION", "LOW_HEADROOM"}  # a few GiB of a big card, one model
    assert not sc.codes(run) & healthy, sc.finding_summary(run)
    assert not others, f"other processes on the GPU during a clean run: {others}"
    assert scenario.figures["invariants"]["self_engines"] == ["torch"]


# ---------------------------------------------------------------- 2. cached memory

@pytest.mark.scenario("cache-bloat")
def test_a_freed_tensor_left_in_the_cache_fires_cache_bloat_with_torchs_figure(scenario):
    """scenarios.cache_bloat_model frees 2 GiB without empty_cache(): CACHE_BLOAT's cached bytes are
    within 1% of torch's own reserved - allocated (written by the profiled process at exit)."""
    result = sc.diagnose(scenario.dir, "--model", "scenarios:cache_bloat_model", "--predictors", "1,2", *SHORT)
    run = result.run
    scenario.record(run=sc.run_figures(result))
    sc.check_gpu_run(result, record=scenario.record)
    torch_exit = result.torch_at_exit
    assert torch_exit is not None, f"the factory wrote no torch figures at exit ({scenario.dir})"
    torch_cached = torch_exit["reserved_bytes"] - torch_exit["allocated_bytes"]
    fired = sc.findings(run, "CACHE_BLOAT")
    scenario.record(torch_at_exit=torch_exit, torch_cached_bytes=torch_cached, finding=fired,
                    end_of_run=run["baseline"].get("end"))

    assert len(fired) == 1, f"CACHE_BLOAT did not fire: {sc.finding_summary(run)}"
    evidence = fired[0]["evidence"]
    cached = evidence["cached_bytes"]
    scenario.record(cached_bytes=cached, cached_mib=round(cached / MiB, 1), when=evidence.get("when"),
                    error_vs_torch=(cached - torch_cached) / torch_cached if torch_cached else None)
    assert fired[0]["severity"] == "warn"
    assert cached >= sc.CACHE_BLOAT_BYTES, f"cached {cached} < the planted {sc.CACHE_BLOAT_BYTES}"
    assert ref.within(cached, torch_cached, 0.01), f"CACHE_BLOAT says {cached}, torch says {torch_cached}"
    assert evidence["reserved_bytes"] >= cached
    assert abs(evidence["cached_share"] - cached / evidence["reserved_bytes"]) < 1e-9
    assert not _fired(run, {"CACHE_BLOAT"}), sc.finding_summary(run)


# ---------------------------------------------------------------- 3. copies

@pytest.mark.scenario("copies")
def test_copy_model_fires_duplicate_model_at_one_model_per_predictor(scenario):
    """--copy-model (a copy per predictor beside the original), predictors 1,2,4: DUPLICATE_MODEL with 4
    distinct weight sets at 4 predictors.

    References, neither of them gpuscope's: the planted copies' known cost, one built-in large MLP each
    (sc.BUILTIN_LARGE_MLP_BYTES, 8 x Linear(4096, 4096) in float32: 512 MiB + 128 KiB), and nvidia-smi's
    figure for the run's pid in each step (read by the test process while the step runs).
    Tolerances: the finding's memory per extra predictor within 3% (or 2 MiB) of the slope of nvidia-smi's
    per-step figures; that slope, and nvidia-smi's growth from 1 to 4 predictors, within 5% of one model per
    predictor (activations of batch 8 are KiB; nothing else grows with CUBLAS_WORKSPACE_CONFIG=:0:0).

    CUBLAS_WORKSPACE_CONFIG=:0:0 removes the per-thread cuBLAS workspace (64-104 MiB per thread on an H200,
    gpu-facts remedies), which PER_PREDICTOR_GROWTH measures on its own: here the slope is the copies alone.
    """
    result = sc.diagnose(scenario.dir, "--copy-model", "--predictors", "1,2,4", *SHORT,
                         env={"CUBLAS_WORKSPACE_CONFIG": ":0:0"})
    run = result.run
    scenario.record(run=sc.run_figures(result))
    sc.check_gpu_run(result, record=scenario.record)
    known = sc.BUILTIN_LARGE_MLP_BYTES
    smi = dict(sc.smi_step_points(result))
    smi_slope = sc.slope(sorted(smi.items()))
    fired = sc.findings(run, "DUPLICATE_MODEL")
    per = fired[0]["evidence"].get("bytes_per_extra_predictor") if fired else None
    scenario.record(model_bytes=run["model"]["model_bytes"], known_model_bytes=known, finding=fired,
                    nvidia_smi_bytes_by_predictors=smi, nvidia_smi_bytes_per_predictor=smi_slope,
                    measured_bytes_per_predictor=per,
                    per_predictor_vs_model=(per / known) if per else None,
                    smi_per_predictor_vs_model=(smi_slope / known) if smi_slope else None)

    assert len(fired) == 1, f"DUPLICATE_MODEL did not fire: {sc.finding_summary(run)}"
    evidence = fired[0]["evidence"]
    assert fired[0]["severity"] == "fail"
    assert evidence["distinct_weight_sets"] == 4, evidence
    assert evidence["model_bytes"] == known, f"gpuscope weighs the model {evidence['model_bytes']}, it is {known}"
    assert evidence["memory_figure"] == "process_gpu_bytes"
    assert set(smi) == {1, 2, 4} and smi_slope is not None, f"nvidia-smi figures per step: {smi}"
    assert ref.within(per, smi_slope, 0.03, 2 * MiB), \
        f"gpuscope {per / MiB:.1f} MiB per extra predictor, nvidia-smi {smi_slope / MiB:.1f} MiB"
    assert ref.within(smi_slope, known, 0.05), \
        f"nvidia-smi: {smi_slope / MiB:.1f} MiB per extra predictor vs one {known / MiB:.1f} MiB copy each"
    assert ref.within(smi[4] - smi[1], 3 * known, 0.05), \
        f"nvidia-smi: {(smi[4] - smi[1]) / MiB:.1f} MiB from 1 to 4 predictors vs 3 copies ({3 * known / MiB:.1f} MiB)"
    assert run["sharing"]["verified"] is False
    assert not _fired(run, {"DUPLICATE_MODEL"}), sc.finding_summary(run)


# ---------------------------------------------------------------- 4. a foreign process

@pytest.mark.scenario("foreign-process")
def test_a_foreign_process_is_named_with_its_pid_and_nvidia_smis_memory(scenario, nvml):
    """A second process holds 2 GiB through torch during the run: FOREIGN_PROCESS names its pid and its
    memory within 1% of nvidia-smi's figure, and the other-processes layer is that process."""
    with sc.foreign_process(sc.FOREIGN_GIB) as child:
        scenario.record(child=child.info, nvml_before=sc.wait_listed(nvml, child.pid, sc.FOREIGN_GIB * GiB))
        result = sc.diagnose(scenario.dir, "--predictors", "1,2", *SHORT)
        smi_mib = sc.stable_smi_figure(child.pid, _device(result.run).get("uuid"))
    run = result.run
    scenario.record(run=sc.run_figures(result), child_pid=child.pid, nvidia_smi_mib=smi_mib)
    sc.check_gpu_run(result, record=scenario.record)
    fired = sc.findings(run, "FOREIGN_PROCESS")
    scenario.record(finding=fired)

    assert len(fired) == 1, f"FOREIGN_PROCESS did not fire: {sc.finding_summary(run)}"
    evidence = fired[0]["evidence"]
    assert [p["pid"] for p in evidence["processes"]] == [child.pid], evidence["processes"]
    assert f"pid {child.pid}" in fired[0]["title"]
    entry = evidence["processes"][0]
    used = entry["peak_used_bytes"]
    scenario.record(reported_bytes=used, reported_mib=round(used / MiB, 1),
                    error_vs_smi=(used - smi_mib * MiB) / (smi_mib * MiB))
    assert ref.within(used, smi_mib * MiB, 0.01), f"gpuscope {used / MiB:.1f} MiB, nvidia-smi {smi_mib} MiB"
    assert used >= sc.FOREIGN_GIB * GiB
    assert evidence["held_bytes"] == used
    assert "torch" in (entry.get("engines") or []), entry
    assert fired[0]["severity"] in ("warn", "fail")
    others = [(s["predictors"], s["memory"]["layers"].get("other_processes_bytes")) for s in run["steps"]]
    scenario.record(other_processes_layer=others)
    assert all(o is not None and ref.within(o, used, 0.01) for _, o in others), others
    assert not _fired(run, {"FOREIGN_PROCESS"}), sc.finding_summary(run)


# ---------------------------------------------------------------- 5. a second engine in the process

@pytest.mark.scenario("second-engine-cupy")
def test_cupy_beside_torch_in_the_process_fires_multiple_engines(scenario):
    """The factory imports CuPy and allocates 256 MiB with it: MULTIPLE_ENGINES names torch and CuPy for
    this process, and CuPy's pool lies outside torch's allocator (outside layer >= context + ~256 MiB)."""
    _need("cupy", "the second-engine scenario plants CuPy beside torch")
    result = sc.diagnose(scenario.dir, "--model", "scenarios:cupy_torch_model", "--predictors", "1,2", *SHORT)
    run = result.run
    scenario.record(run=sc.run_figures(result))
    sc.check_gpu_run(result, record=scenario.record)
    mine = [f for f in sc.findings(run, "MULTIPLE_ENGINES") if f["evidence"].get("pid") == run["pid"]]
    context = run["baseline"]["context_bytes"]
    outside = [s["memory"]["layers"]["outside_allocator_bytes"] for s in run["steps"]]
    at_exit = result.torch_at_exit
    scenario.record(finding=mine, context_bytes=context, outside_allocator_bytes=outside, at_exit=at_exit)

    assert len(mine) == 1, f"MULTIPLE_ENGINES did not fire for this process: {sc.finding_summary(run)}"
    engines = mine[0]["evidence"]["engines"]
    assert {"torch", "cupy"} <= set(engines), engines
    title = mine[0]["title"].lower()
    assert "torch" in title and "cupy" in title
    assert mine[0]["severity"] == "warn"
    # the context baseline also holds torch's first 2 MiB block; lazily loaded kernels only add to outside
    assert min(outside) - context >= 0.97 * sc.CUPY_BYTES, \
        f"outside the allocator {min(outside) / MiB:.0f} MiB, context {context / MiB:.0f} MiB: CuPy's pool missing?"
    if at_exit is not None and "cupy_pool_total_bytes" in at_exit:
        assert at_exit["cupy_pool_total_bytes"] >= sc.CUPY_BYTES
    assert not _fired(run, {"MULTIPLE_ENGINES"}), sc.finding_summary(run)


# ---------------------------------------------------------------- 6. preallocation

def _jax_run(scenario, nvml, preallocate: bool):
    _need("jax", "the preallocation scenario starts a JAX sibling")
    try:
        child = sc.jax_sibling(preallocate).start()
    except sc.ChildUnsupported as exc:
        pytest.skip(str(exc))
    try:
        scenario.record(child=child.info, nvml_before=sc.wait_listed(nvml, child.pid))
        result = sc.diagnose(scenario.dir, "--predictors", "1,2", *SHORT)
        smi_mib = sc.stable_smi_figure(child.pid, _device(result.run).get("uuid"))
    finally:
        child.__exit__(None, None, None)
    run = result.run
    scenario.record(run=sc.run_figures(result), child_pid=child.pid, nvidia_smi_mib=smi_mib)
    sc.check_gpu_run(result, record=scenario.record)
    return child, run, smi_mib


@pytest.mark.scenario("jax-preallocation")
def test_a_jax_sibling_at_default_settings_fires_engine_preallocation_and_foreign_process(scenario, nvml):
    """A sibling process imports JAX with default settings and runs one operation: it takes ~75% of the
    card. ENGINE_PREALLOCATION names it (memory within 1% of nvidia-smi), FOREIGN_PROCESS fails."""
    child, run, smi_mib = _jax_run(scenario, nvml, preallocate=True)
    total = _device(run).get("total_bytes")
    pre = sc.findings(run, "ENGINE_PREALLOCATION")
    foreign = sc.findings(run, "FOREIGN_PROCESS")
    scenario.record(engine_preallocation=pre, foreign_process=foreign, device_total_bytes=total)

    assert [f["evidence"].get("pid") for f in pre] == [child.pid], f"ENGINE_PREALLOCATION: {sc.finding_summary(run)}"
    evidence = pre[0]["evidence"]
    held = evidence["held_bytes"]
    scenario.record(held_bytes=held, held_share_of_card=held / total if total else None,
                    error_vs_smi=(held - smi_mib * MiB) / (smi_mib * MiB))
    assert evidence["engine"] == "jax" and evidence["env_readable"] is True, evidence
    assert ref.within(held, smi_mib * MiB, 0.01), f"gpuscope {held / MiB:.0f} MiB, nvidia-smi {smi_mib} MiB"
    assert total and 0.5 <= held / total <= 0.95, f"JAX holds {held / total:.0%} of the card (expected ~75%)"
    assert len(foreign) == 1 and f"pid {child.pid}" in foreign[0]["title"], sc.finding_summary(run)
    assert foreign[0]["severity"] == "fail", "a sibling holding most of the card fails FOREIGN_PROCESS"
    assert not _fired(run, {"ENGINE_PREALLOCATION", "FOREIGN_PROCESS"}), sc.finding_summary(run)


@pytest.mark.scenario("jax-no-preallocation")
def test_a_jax_sibling_with_preallocation_off_fires_no_preallocation_finding(scenario, nvml):
    """The same sibling with XLA_PYTHON_CLIENT_PREALLOCATE=false: no ENGINE_PREALLOCATION; it is still a
    foreign process, holding only what it uses, and its environment shows the setting."""
    child, run, smi_mib = _jax_run(scenario, nvml, preallocate=False)
    total = _device(run).get("total_bytes")
    entry = sc.process_entry(run, child.pid)
    foreign = sc.findings(run, "FOREIGN_PROCESS")
    scenario.record(foreign_process=foreign, sibling=entry, device_total_bytes=total)

    assert not sc.findings(run, "ENGINE_PREALLOCATION"), sc.finding_summary(run)
    assert entry is not None, f"the JAX sibling {child.pid} is not among the processes"
    assert "jax" in (entry.get("engines") or []), entry
    assert (entry.get("memory_env") or {}).get("XLA_PYTHON_CLIENT_PREALLOCATE") == "false", entry.get("memory_env")
    held = entry["peak_used_bytes"]
    scenario.record(held_bytes=held, held_share_of_card=held / total if total else None)
    assert ref.within(held, smi_mib * MiB, 0.01), f"gpuscope {held / MiB:.0f} MiB, nvidia-smi {smi_mib} MiB"
    assert total and held < 0.10 * total, f"JAX holds {held / MiB:.0f} MiB with preallocation off"
    assert len(foreign) == 1 and f"pid {child.pid}" in foreign[0]["title"], sc.finding_summary(run)
    assert not _fired(run, {"FOREIGN_PROCESS"}), sc.finding_summary(run)


# ---------------------------------------------------------------- 7. growth and the default stream

STREAMS_MIN_GAIN = 0.10  # per-thread streams must serve at least this much more where the default stream plateaus


def _rps(step: dict) -> float:
    """A step's throughput from its raw counts: requests completed in the measured window / its seconds."""
    return step["requests"] / step["duration_s"]


@pytest.mark.scenario("per-predictor-growth")
def test_per_predictor_growth_on_both_and_the_plateau_only_on_the_default_stream(scenario, nvml):
    """The same sweep (1, 2, 4, 8 predictors) on the default stream and with --streams.

    Growth: PER_PREDICTOR_GROWTH on both, its NVML memory per predictor within 3% (or 2 MiB) of the slope of
    nvidia-smi's figures for the run's pid, one per step, read by the test process while each step ran.

    Streams: DEFAULT_STREAM_SERIALIZATION only on the default stream. At the pair it names (N -> 2N), its
    throughput gain is the steps' own (requests / seconds, to 1e-9), and the --streams run, same model and
    counts, serves at least STREAMS_MIN_GAIN (+10%) more at 2N than the default stream did: the plateau is
    the default stream's, since streams lift it. Reference: on an H200 with this model per-thread streams
    served +24% at 2, +28% at 4 and +31% at 8 threads (gpu-facts threads_shared_model).
    """
    counts = ("--predictors", "1,2,4,8")
    default = sc.diagnose(scenario.sub("default-stream"), *counts, *SHORT)
    left = sc.wait_for_quiet_gpu(nvml)  # the first run's pid must be gone, or it is a foreign process
    assert not left, f"still on the GPU after the default-stream run: {left}"
    streams = sc.diagnose(scenario.sub("streams"), *counts, "--streams", *SHORT)
    scenario.record(default_stream=sc.run_figures(default), streams=sc.run_figures(streams))
    sc.check_gpu_run(default, record=scenario.recorder("default_stream"))
    sc.check_gpu_run(streams, record=scenario.recorder("streams"))

    for label, result, on_streams in (("default_stream", default, False), ("streams", streams, True)):
        run = result.run
        smi = sc.smi_step_points(result)
        smi_slope = sc.slope(smi)
        growth = sc.findings(run, "PER_PREDICTOR_GROWTH")
        per = growth[0]["evidence"].get("nvml_bytes_per_predictor") if growth else None
        scenario.record(**{f"{label}_growth": {
            "finding": growth, "measured_nvml_bytes_per_predictor": per,
            "nvidia_smi_bytes_by_predictors": dict(smi), "nvidia_smi_bytes_per_predictor": smi_slope,
            "nvidia_smi_mib_per_predictor": round(smi_slope / MiB, 1) if smi_slope is not None else None}})
        assert len(growth) == 1, f"{label}: PER_PREDICTOR_GROWTH did not fire: {sc.finding_summary(run)}"
        assert [n for n, _ in smi] == [1, 2, 4, 8], f"{label}: nvidia-smi figures per step: {smi}"
        assert ref.within(per, smi_slope, 0.03, 2 * MiB), \
            f"{label}: gpuscope {per / MiB:.1f} MiB per predictor, nvidia-smi {smi_slope / MiB:.1f} MiB"
        assert growth[0]["evidence"]["streams"] is on_streams
        assert not _fired(run), f"{label}: {sc.finding_summary(run)}"

    serialization = sc.findings(default.run, "DEFAULT_STREAM_SERIALIZATION")
    by_n = {label: {s["predictors"]: s for s in r.run["steps"]} for label, r in (("default_stream", default),
                                                                                  ("streams", streams))}
    rps = {label: {n: _rps(s) for n, s in steps.items()} for label, steps in by_n.items()}
    scenario.record(serialization=serialization, throughput_rps=rps,
                    streams_gain_by_predictors={n: rps["streams"][n] / rps["default_stream"][n] - 1
                                                for n in rps["default_stream"] if n in rps["streams"]})
    assert len(serialization) == 1, f"DEFAULT_STREAM_SERIALIZATION did not fire: {sc.finding_summary(default.run)}"
    evidence = serialization[0]["evidence"]
    low, high = evidence["from_predictors"], evidence["to_predictors"]
    gain = rps["default_stream"][high] / rps["default_stream"][low] - 1
    streams_gain = rps["streams"][high] / rps["default_stream"][high] - 1
    scenario.record(plateau={"from": low, "to": high, "gain_from_counts": gain, "evidence_gain": evidence["throughput_gain"],
                             "streams_gain_at_to": streams_gain})
    assert high == 2 * low, evidence
    assert abs(evidence["throughput_gain"] - gain) < 1e-9, f"evidence {evidence['throughput_gain']}, the counts {gain}"
    assert streams_gain >= STREAMS_MIN_GAIN, \
        (f"at {high} predictors --streams served {rps['streams'][high]:.0f} req/s, the default stream "
         f"{rps['default_stream'][high]:.0f} ({streams_gain:+.1%}): streams did not lift the plateau")
    assert not sc.findings(streams.run, "DEFAULT_STREAM_SERIALIZATION"), sc.finding_summary(streams.run)
