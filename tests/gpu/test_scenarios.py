"""Planted scenarios on a real GPU (issue 10): each plants one cause beside or inside a fresh
`python -m gpuscope diagnose` process, then asserts that the right finding fires with the right
magnitude, measured independently (torch's own figures, nvidia-smi, the model's bytes, the steps),
and that nothing else planted fires. The clean run fires none of the planted findings.

Every figure goes to gpu-results.json before the assertions, so a failing scenario still says what
it measured; each run's report folder is kept under the reports root (see conftest.py).
Short sweeps (2 s per step) keep the whole file within about 3 minutes on an H100.
"""
from __future__ import annotations

import importlib.util
import json

import pytest

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


def _within(value: float, truth: float, share: float) -> bool:
    return abs(value - truth) <= share * abs(truth)


# ---------------------------------------------------------------- 1. clean

@pytest.mark.scenario("clean")
def test_clean_default_sweep_shares_one_model_and_fires_no_planted_finding(scenario):
    """The built-in model on the GPU, the default predictor counts: sharing verified, and no duplicate,
    foreign-process or engine finding (nor any finding a healthy run never shows)."""
    from gpuscope.measure.sweep import default_predictor_counts

    result = sc.diagnose(scenario.dir, *SHORT)
    run = result.run
    scenario.record(run=sc.run_figures(result))
    scenario.record(invariants=sc.check_gpu_run(result))
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
    stats_path = scenario.dir / "torch-at-exit.json"
    result = sc.diagnose(scenario.dir, "--model", "scenarios:cache_bloat_model", "--predictors", "1,2", *SHORT,
                         env={sc.TORCH_STATS_ENV: str(stats_path)})
    run = result.run
    scenario.record(run=sc.run_figures(result))
    sc.check_gpu_run(result)
    assert stats_path.exists(), f"the factory wrote no torch figures at exit ({stats_path})"
    torch_exit = json.loads(stats_path.read_text())
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
    assert _within(cached, torch_cached, 0.01), f"CACHE_BLOAT says {cached}, torch says {torch_cached}"
    assert evidence["reserved_bytes"] >= cached
    assert abs(evidence["cached_share"] - cached / evidence["reserved_bytes"]) < 1e-9
    assert not _fired(run, {"CACHE_BLOAT"}), sc.finding_summary(run)


# ---------------------------------------------------------------- 3. copies

@pytest.mark.scenario("copies")
def test_copy_model_fires_duplicate_model_at_one_model_per_predictor(scenario):
    """--copy-model (a copy per predictor): DUPLICATE_MODEL with 4 distinct weight sets at 4 predictors and
    memory per extra predictor within 5% of the model's bytes.

    CUBLAS_WORKSPACE_CONFIG=:0:0 removes the per-thread cuBLAS workspace (64-104 MiB per thread on an H200,
    gpu-facts remedies), which PER_PREDICTOR_GROWTH measures on its own: here the slope is the copies alone.
    """
    result = sc.diagnose(scenario.dir, "--copy-model", "--predictors", "1,2,4", *SHORT,
                         env={"CUBLAS_WORKSPACE_CONFIG": ":0:0"})
    run = result.run
    scenario.record(run=sc.run_figures(result))
    sc.check_gpu_run(result)
    model_bytes = int(run["model"]["model_bytes"])
    measured = sc.slope(sc.step_points(run, "process_gpu_bytes"))
    fired = sc.findings(run, "DUPLICATE_MODEL")
    scenario.record(model_bytes=model_bytes, measured_bytes_per_predictor=measured, finding=fired,
                    per_predictor_vs_model=(measured / model_bytes) if measured and model_bytes else None)

    assert len(fired) == 1, f"DUPLICATE_MODEL did not fire: {sc.finding_summary(run)}"
    evidence = fired[0]["evidence"]
    assert fired[0]["severity"] == "fail"
    assert evidence["distinct_weight_sets"] == 4, evidence
    assert evidence["model_bytes"] == model_bytes
    assert evidence["memory_figure"] == "process_gpu_bytes"
    per = evidence["bytes_per_extra_predictor"]
    assert measured is not None and abs(per - measured) <= 1, f"evidence {per} != slope of the steps {measured}"
    assert _within(per, model_bytes, 0.05), \
        f"{per / MiB:.1f} MiB per extra predictor vs a {model_bytes / MiB:.1f} MiB model"
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
    sc.check_gpu_run(result)
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
    assert _within(used, smi_mib * MiB, 0.01), f"gpuscope {used / MiB:.1f} MiB, nvidia-smi {smi_mib} MiB"
    assert used >= sc.FOREIGN_GIB * GiB
    assert evidence["held_bytes"] == used
    assert "torch" in (entry.get("engines") or []), entry
    assert fired[0]["severity"] in ("warn", "fail")
    others = [(s["predictors"], s["memory"]["layers"].get("other_processes_bytes")) for s in run["steps"]]
    scenario.record(other_processes_layer=others)
    assert all(o is not None and _within(o, used, 0.01) for _, o in others), others
    assert not _fired(run, {"FOREIGN_PROCESS"}), sc.finding_summary(run)


# ---------------------------------------------------------------- 5. a second engine in the process

@pytest.mark.scenario("second-engine-cupy")
def test_cupy_beside_torch_in_the_process_fires_multiple_engines(scenario):
    """The factory imports CuPy and allocates 256 MiB with it: MULTIPLE_ENGINES names torch and CuPy for
    this process, and CuPy's pool lies outside torch's allocator (outside layer >= context + ~256 MiB)."""
    _need("cupy", "the second-engine scenario plants CuPy beside torch")
    stats_path = scenario.dir / "torch-at-exit.json"
    result = sc.diagnose(scenario.dir, "--model", "scenarios:cupy_torch_model", "--predictors", "1,2", *SHORT,
                         env={sc.TORCH_STATS_ENV: str(stats_path)})
    run = result.run
    scenario.record(run=sc.run_figures(result))
    sc.check_gpu_run(result)
    mine = [f for f in sc.findings(run, "MULTIPLE_ENGINES") if f["evidence"].get("pid") == run["pid"]]
    context = run["baseline"]["context_bytes"]
    outside = [s["memory"]["layers"]["outside_allocator_bytes"] for s in run["steps"]]
    at_exit = json.loads(stats_path.read_text()) if stats_path.exists() else None
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
    sc.check_gpu_run(result)
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
    assert _within(held, smi_mib * MiB, 0.01), f"gpuscope {held / MiB:.0f} MiB, nvidia-smi {smi_mib} MiB"
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
    assert _within(held, smi_mib * MiB, 0.01), f"gpuscope {held / MiB:.0f} MiB, nvidia-smi {smi_mib} MiB"
    assert total and held < 0.10 * total, f"JAX holds {held / MiB:.0f} MiB with preallocation off"
    assert len(foreign) == 1 and f"pid {child.pid}" in foreign[0]["title"], sc.finding_summary(run)
    assert not _fired(run, {"FOREIGN_PROCESS"}), sc.finding_summary(run)


# ---------------------------------------------------------------- 7. growth and the default stream

def _plateau_pairs(run: dict) -> list[dict]:
    """(N, 2N) step pairs where throughput grows < 5% while p50 grows >= 1.7x, from the steps alone."""
    from gpuscope.analysis.findings import DEFAULT_THRESHOLDS as T

    steps = {s["predictors"]: s for s in run["steps"] if s.get("requests", 0) > 0 and not s.get("oom")}
    pairs = []
    for n in sorted(steps):
        double = steps.get(2 * n)
        p50 = steps[n].get("latency_ms", {}).get("p50")
        if double is None or not steps[n]["throughput_rps"] or not p50:
            continue
        gain = double["throughput_rps"] / steps[n]["throughput_rps"] - 1
        ratio = double["latency_ms"]["p50"] / p50
        pairs.append({"from": n, "to": 2 * n, "gain": gain, "p50_ratio": ratio,
                      "plateau": gain < T.stream_gain and ratio >= T.stream_latency_ratio})
    return pairs


@pytest.mark.scenario("per-predictor-growth")
def test_per_predictor_growth_on_both_and_the_plateau_only_on_the_default_stream(scenario, nvml):
    """The same sweep (1, 2, 4, 8 predictors) on the default stream and with --streams:
    PER_PREDICTOR_GROWTH on both with the slope the steps show (NVML and torch reserved), and
    DEFAULT_STREAM_SERIALIZATION only on the default stream, at the first plateau pair the steps show."""
    counts = ("--predictors", "1,2,4,8")
    default = sc.diagnose(scenario.sub("default-stream"), *counts, *SHORT)
    left = sc.wait_for_quiet_gpu(nvml)  # the first run's pid must be gone, or it is a foreign process
    assert not left, f"still on the GPU after the default-stream run: {left}"
    streams = sc.diagnose(scenario.sub("streams"), *counts, "--streams", *SHORT)
    scenario.record(default_stream=sc.run_figures(default), streams=sc.run_figures(streams))
    sc.check_gpu_run(default)
    sc.check_gpu_run(streams)

    for label, result, on_streams in (("default_stream", default, False), ("streams", streams, True)):
        run = result.run
        measured = sc.slope(sc.step_points(run, "process_gpu_bytes"))
        reserved = sc.slope(sc.step_points(run, "torch_reserved_bytes"))
        growth = sc.findings(run, "PER_PREDICTOR_GROWTH")
        scenario.record(**{f"{label}_growth": {
            "finding": growth, "measured_nvml_bytes_per_predictor": measured,
            "measured_reserved_bytes_per_predictor": reserved,
            "measured_nvml_mib_per_predictor": round(measured / MiB, 1) if measured is not None else None}})
        assert len(growth) == 1, f"{label}: PER_PREDICTOR_GROWTH did not fire: {sc.finding_summary(run)}"
        evidence = growth[0]["evidence"]
        assert abs(evidence["nvml_bytes_per_predictor"] - measured) <= 1, (label, evidence, measured)
        assert abs(evidence["reserved_bytes_per_predictor"] - reserved) <= 1, (label, evidence, reserved)
        assert evidence["streams"] is on_streams
        assert 4 * MiB <= measured <= 1 * GiB, f"{label}: {measured / MiB:.1f} MiB per predictor is implausible"
        assert not _fired(run), f"{label}: {sc.finding_summary(run)}"

    pairs = _plateau_pairs(default.run)
    serialization = sc.findings(default.run, "DEFAULT_STREAM_SERIALIZATION")
    top = max(s["predictors"] for s in default.run["steps"])
    by_n = {label: {s["predictors"]: s["throughput_rps"] for s in r.run["steps"]}
            for label, r in (("default_stream", default), ("streams", streams))}
    scenario.record(plateau_pairs=pairs, serialization=serialization, throughput_rps=by_n,
                    streams_gain_at_top=by_n["streams"][top] / by_n["default_stream"][top] - 1)
    plateaus = [p for p in pairs if p["plateau"]]
    assert plateaus, f"the default stream did not plateau on this GPU (no N->2N with < 5% gain and p50 x1.7): {pairs}"
    assert len(serialization) == 1, f"the steps plateau ({plateaus[0]}) but DEFAULT_STREAM_SERIALIZATION did not fire"
    evidence = serialization[0]["evidence"]
    assert (evidence["from_predictors"], evidence["to_predictors"]) == (plateaus[0]["from"], plateaus[0]["to"])
    assert abs(evidence["throughput_gain"] - plateaus[0]["gain"]) < 1e-9
    assert abs(evidence["p50_ratio"] - plateaus[0]["p50_ratio"]) < 1e-9
    assert not sc.findings(streams.run, "DEFAULT_STREAM_SERIALIZATION"), sc.finding_summary(streams.run)
