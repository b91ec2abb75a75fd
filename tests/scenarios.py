"""Run records for the diagnose rules, built from what a real H200 reported.

Each builder returns a `RunRecord` shaped like the ones `gpuscope diagnose`
writes (steps with peak `memory` and `layers`, processes as `_finish_record`
lists them, `extra` with the GapTracker's evidence), with the magnitudes of
tests/fixtures/gpu-facts (a copy of shared/gpu-facts):

* h200-2026-11-26.json `threads_shared_model`: a shared 512 MiB model at 1..32
  threads, on the default stream (plateau at 2 threads, p50 doubling) and on
  per-thread streams (+30%); NVML grows ~97 MiB per thread of which ~64 MiB
  lies outside torch's reserved pool.
* `threads_copied_model`: three deep copies of a 256 MiB model: 4 distinct
  weight sets, +768 MiB.
* `second_process`: another python3 holding 2 GiB (2,566 MiB in NVML) beside
  ours (6,006 MiB), per-process SM utilisation 1% vs 62%.
* `engines_in_one_process`: torch 612 -> + CuPy 868 MiB; a JAX sibling at its
  defaults holds 107,918 MiB (timeline).
* `alloc_ladder`: after `del` of a 1 GiB tensor 1,090 MiB stays cached; the
  CUDA context alone is 612 MiB.

Some scenarios are not hand-written figures but come out of the real
listeners: `DrivenSession` ticks GpuProbe + AllocatorProbe over a ScriptedNvml
or the replayed H200 timeline through a Sampler, into StepMonitor, PeakTracker
and GapTracker, built by the functions a diagnose run builds them with
(`device_probes`, `workload_listeners`), and reads the baseline, the processes
and the end figures with diagnose's own functions. How run_diagnose wires them
to a device (NVML's index, the scopes, when the baseline is read) is tested on
the real session in test_diagnose_gpu_wiring.py.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Iterable, Sequence

from gpuscope.commands.diagnose import process_entries
from gpuscope.measure.attribution import end_figures
from gpuscope.measure.recording import device_probes, process_gpu_bytes, workload_listeners
from gpuscope.measure.sweep import step_from_run
from gpuscope.measure.workload import PredictorResult, StepRun
from gpuscope.probes.gpu import GpuProbe
from gpuscope.probes.processes import ProcessInfo
from gpuscope.probes.readings import NO_DEVICE, Unavailable, reading_to_json
from gpuscope.probes.sampler import Sampler
from gpuscope.probes.units import GiB, MiB
from gpuscope.record.layers import cpu_layers, gpu_layers
from gpuscope.record.run import STATUS_COMPLETE, RunRecord, Step
from tests.fakes.nvml import (
    FACTS_H200,
    H200_DRIVER_RESERVED_BYTES,
    H200_TOTAL_BYTES,
    DeviceState,
    FakeProcess,
    ReplayNvml,
    ScriptedNvml,
)
from tests.fakes.torch_cuda import FakeTorchCuda, TorchFigures

TOTAL = H200_TOTAL_BYTES                    # 143,771 MiB
DRIVER = H200_DRIVER_RESERVED_BYTES         # 615 MiB, memory info v2 `reserved`
CONTEXT = 612 * MiB                         # CUDA context + module images, lazy loading
SELF_PID = 415                              # capture.py's pid on the H200
FOREIGN_PID = 576                           # second_process: the child holding 2 GiB
JAX_PID = 527                               # the JAX sibling of the timeline
TIMELINE_PID = 474                          # the profiled process of the timeline
WEIGHTS_ID = frozenset({0x7F00_0000_0000})  # one shared weight set, as weight_pointers() gives it


def facts() -> dict[str, Any]:
    return json.loads(FACTS_H200.read_text())


def mib(value: float) -> int:
    return int(round(value * MiB))


# ---------------------------------------------------------------- records and steps

def latency(p50: float, p99: float | None = None) -> dict[str, float]:
    p99 = p50 * 1.3 if p99 is None else p99
    return {"p50": p50, "p90": (p50 + p99) / 2, "p99": p99, "max": p99 * 1.2, "mean": p50 * 1.05}


def gpu_step(n: int, rps: float, p50: float, p99: float | None = None, *, process: int, allocated: int,
             reserved: int, model_bytes: int, other: int = 0, total: int = TOTAL, driver: int = DRIVER,
             device_used: int | None = None, duration_s: float = 1.5, distinct: int = 1, errors: int = 0,
             oom: bool = False, cpu_util: float | None = None, intra_op_threads: int | None = 16,
             retries: int = 0, inactive_split: int = 0, error_messages: Sequence[str] = (),
             grad: bool = False, outputs_with_grad: int = 0, dead: int = 0) -> Step:
    """One measured step on a GPU: peak figures plus the layers at the peak tick, as StepMonitor gives them."""
    used = device_used if device_used is not None else process + other + driver
    memory: dict[str, Any] = {
        "model_bytes": model_bytes,
        "process_gpu_bytes": process,
        "device_used_bytes": used,
        "device_total_bytes": total,
        "device_free_bytes": total - used,
        "driver_reserved_bytes": driver,
        "torch_allocated_bytes": allocated,
        "torch_reserved_bytes": reserved,
        "torch_allocated_now_bytes": allocated,
        "torch_reserved_now_bytes": reserved,
        "torch_inactive_split_bytes": inactive_split,
        "torch_alloc_retries": retries,
        "torch_ooms": 1 if oom else 0,
        "other_processes_bytes": other,
        "rss_bytes": 3 * GiB + n * 8 * MiB,
        "uss_bytes": 2 * GiB + n * 8 * MiB,
        "layers": gpu_layers(process, allocated, reserved, model_bytes, other, driver),
    }
    requests = 0 if oom else int(rps * duration_s)
    return Step(predictors=n, requests=requests, errors=errors, duration_s=duration_s,
                throughput_rps=0.0 if oom else rps, latency_ms={} if oom else latency(p50, p99), memory=memory,
                cpu_util_pct=cpu_util, windows_rps=[rps] * 3, stable=True, oom=oom,
                error_messages=list(error_messages), distinct_weight_sets=distinct, grad_enabled_in_workers=grad,
                outputs_with_grad=outputs_with_grad, intra_op_threads=intra_op_threads, dead_predictors=dead)


def cpu_step(n: int, rps: float, p50: float, p99: float | None = None, *, rss: int, model_bytes: int,
             intra_op_threads: int = 1, duration_s: float = 2.0, distinct: int = 1, errors: int = 0,
             cpu_util: float | None = None, grad: bool = False, outputs_with_grad: int = 0, dead: int = 0,
             error_messages: Sequence[str] = (), oom: bool = False) -> Step:
    no_gpu = Unavailable(NO_DEVICE, "profiling on the CPU")
    memory: dict[str, Any] = {"model_bytes": model_bytes, "rss_bytes": rss, "uss_bytes": rss - 40 * MiB,
                              "process_gpu_bytes": no_gpu, "device_used_bytes": no_gpu,
                              "layers": cpu_layers(rss, model_bytes)}
    requests = 0 if oom else int(rps * duration_s)
    return Step(predictors=n, requests=requests, errors=errors, duration_s=duration_s,
                throughput_rps=0.0 if oom else rps, latency_ms={} if oom else latency(p50, p99), memory=memory,
                cpu_util_pct=cpu_util if cpu_util is not None else min(100.0 * n * intra_op_threads, 200.0),
                windows_rps=[rps] * 3, stable=True, oom=oom, error_messages=list(error_messages),
                distinct_weight_sets=distinct, grad_enabled_in_workers=grad, outputs_with_grad=outputs_with_grad,
                intra_op_threads=intra_op_threads, dead_predictors=dead, ctx_switches_involuntary=100 * n)


def process_entry(pid: int, used: int | None, *, name: str = "python3", is_self: bool = False, gpu: int = 0,
                  sm: int | None = 0, engines: Sequence[str] | None = ("torch",),
                  memory_env: dict[str, str] | None = None, exists: bool = True,
                  cmdline: str = "python3 serve.py") -> dict[str, Any]:
    """A `record.processes` entry as `_finish_record` writes it (ProcessInfo.to_json + peaks)."""
    return reading_to_json({"pid": pid, "exists": exists, "name": name, "user": "root", "cmdline": cmdline,
                            "engines": list(engines) if engines is not None else Unavailable("no_permission", "maps"),
                            "memory_env": dict(memory_env or {}), "self": is_self, "child": False, "gpu": gpu,
                            "peak_used_bytes": used, "peak_sm_util_pct": sm})


def gpu_record(steps: Iterable[Step], *, model_bytes: int, streams: bool = False, processes: list | None = None,
               total: int = TOTAL, cores: int = 16, max_p99_ms: float | None = None, copy_model: bool = False,
               context: Any = CONTEXT, end: dict[str, Any] | None = None, memory_env: dict[str, str] | None = None,
               extra: dict[str, Any] | None = None, model: str = "builtin:mlp", device_name: str = "NVIDIA H200",
               self_engines: Sequence[str] = ("torch",), self_env: dict[str, str] | None = None) -> RunRecord:
    steps = list(steps)
    peak = max((s.memory.get("process_gpu_bytes") or 0 for s in steps), default=0)
    if processes is None:
        processes = [process_entry(SELF_PID, peak, is_self=True, sm=62, engines=self_engines, memory_env=self_env)]
    last = steps[-1] if steps else None
    end = end if end is not None else ({
        "process_gpu_bytes": last.memory["process_gpu_bytes"],
        "torch_allocated_bytes": model_bytes + 16 * MiB,
        "torch_reserved_bytes": model_bytes + 18 * MiB,
        "device_used_bytes": last.memory["device_used_bytes"]} if last is not None else {})
    record = RunRecord(
        tool_version="0.1.0", started_at="2026-11-26T05:00:00+00:00", status=STATUS_COMPLETE,
        host={"hostname": "vm", "logical_cores": cores, "usable_cores": cores, "cgroup_cpu_quota": None},
        devices=[{"index": 0, "name": device_name, "uuid": "GPU-c353c96e", "total_bytes": total,
                  "driver": "580.159.04"}],
        config={"device": "cuda:0", "gpu_index": 0, "model": model, "predictors": [s.predictors for s in steps],
                "streams": streams, "copy_model": copy_model, "inference_mode": True, "intra_op_threads": None,
                "max_p99_ms": max_p99_ms, "rate_rps": None},
        model={"source": model, "kind": "builtin", "param_bytes": model_bytes, "buffer_bytes": 0,
               "model_bytes": model_bytes, "unique_storages": 16},
        environment={"torch": "2.11.0+cu130", "cuda": "13.0", "memory_env": dict(memory_env or {})},
        baseline={"context_bytes": context, "end": end},
        steps=steps, processes=processes, pid=SELF_PID,
        extra=extra if extra is not None else {"measurement_gaps": {},
                                               "pid_namespace": {"unlisted_used_bytes": 0, "self_not_listed": False,
                                                                 "self_not_listed_ticks": 0}})
    return record


def cpu_record(steps: Iterable[Step], *, model_bytes: int, cores: int = 2, max_p99_ms: float | None = None,
               copy_model: bool = False) -> RunRecord:
    steps = list(steps)
    no_gpu = {"reason": "no_device", "detail": "profiling on the CPU"}
    return RunRecord(
        tool_version="0.1.0", started_at="2026-11-26T05:10:00+00:00", status=STATUS_COMPLETE,
        host={"hostname": "ci", "logical_cores": cores, "usable_cores": cores, "cgroup_cpu_quota": None},
        device_unavailable=no_gpu,
        config={"device": "cpu", "gpu_index": None, "model": "builtin:mlp", "predictors": [s.predictors for s in steps],
                "streams": False, "copy_model": copy_model, "inference_mode": True, "max_p99_ms": max_p99_ms},
        model={"source": "builtin:mlp", "kind": "builtin", "param_bytes": model_bytes, "buffer_bytes": 0,
               "model_bytes": model_bytes, "unique_storages": 8},
        environment={"torch": "2.13.0+cpu", "memory_env": {}},
        baseline={"rss_before_model_bytes": 300 * MiB},
        steps=steps, processes=[process_entry(4242, None, is_self=True, gpu=None, sm=None)], pid=4242,
        extra={"measurement_gaps": {}, "pid_namespace": {"unlisted_used_bytes": 0, "self_not_listed": False}})


# ---------------------------------------------------------------- clean runs

CLEAN_MODEL = mib(512.125)  # the 8 x Linear(4096, 4096) of threads_shared_model


def clean_gpu_run() -> RunRecord:
    """A healthy deployment: per-thread streams, CUBLAS_WORKSPACE_CONFIG=:0:0 (remedies file: 0 MiB per extra
    thread), two counts that still scale (the H200's per-thread-stream 1 -> 2 threads), nobody else on the card."""
    steps = []
    for n, rps, p50, p99 in ((1, 2356.3, 0.422, 0.451), (2, 3164.9, 0.63, 0.692)):
        allocated = CLEAN_MODEL + n * MiB  # activations of one batch per predictor; no cuBLAS workspace
        reserved = allocated + 2 * MiB
        steps.append(gpu_step(n, rps, p50, p99, process=CONTEXT + reserved + 18 * MiB, allocated=allocated,
                              reserved=reserved, model_bytes=CLEAN_MODEL))
    return gpu_record(steps, model_bytes=CLEAN_MODEL, streams=True,
                      memory_env={"CUBLAS_WORKSPACE_CONFIG": ":0:0", "CUDA_MODULE_LOADING": "LAZY"})


CPU_MODEL = 64 * MiB + 32 * 1024  # builtin:mlp small: 4 x Linear(2048, 2048), float32


def clean_cpu_run() -> RunRecord:
    """builtin:mlp on 2 cores: 1 and 2 predictors at 1 intra-op thread each, throughput still scaling."""
    return cpu_record([cpu_step(1, 31.0, 32.0, 36.0, rss=700 * MiB, model_bytes=CPU_MODEL),
                       cpu_step(2, 58.5, 34.0, 41.0, rss=701 * MiB + 512 * 1024, model_bytes=CPU_MODEL)],
                      model_bytes=CPU_MODEL)


# ---------------------------------------------------------------- the H200's thread sweeps

def h200_thread_runs(streams: bool) -> list[dict[str, Any]]:
    return [r for r in facts()["threads_shared_model"]["runs"] if r["streams"] == streams]


H200_MODEL = mib(facts()["threads_shared_model"]["params_mib"])


def h200_shared_model_run(streams: bool = False, *, record_streams: bool | None = None, total: int = TOTAL,
                          max_p99_ms: float | None = None, counts: Sequence[int] | None = None) -> RunRecord:
    """threads_shared_model as a sweep: one shared 512 MiB model, 1..32 predictors.

    `streams` picks the measured numbers; `record_streams` (default: the same) is what the record says the
    predictors used, so a test can put the default-stream shape under a --streams config.
    """
    steps = []
    for r in h200_thread_runs(streams):
        if counts is not None and r["threads"] not in counts:
            continue
        steps.append(gpu_step(r["threads"], r["inf_per_s"], r["p50_ms"], r["p99_ms"], process=mib(r["nvml_self_mib"]),
                              allocated=mib(r["peak_alloc_mib"]), reserved=mib(r["reserved_mib"]),
                              model_bytes=H200_MODEL, distinct=r["distinct_weight_ptrs"], total=total))
    return gpu_record(steps, model_bytes=H200_MODEL, streams=streams if record_streams is None else record_streams,
                      total=total, max_p99_ms=max_p99_ms)


# ---------------------------------------------------------------- a copy of the model per predictor

COPIED_MODEL = 256 * MiB


def copied_model_run() -> RunRecord:
    """Three deep copies of a 256 MiB model beside the original (threads_copied_model): 4 distinct weight
    sets and +768 MiB of torch allocated and NVML between 1 and 4 predictors."""
    f = facts()["threads_copied_model"]
    before, after = f["before"], f["after"]
    steps = [gpu_step(1, 800.0, 1.2, process=mib(before["nvml_self_mib"]), allocated=mib(before["alloc_mib"]),
                      reserved=mib(before["reserved_mib"]), model_bytes=COPIED_MODEL, distinct=1),
             gpu_step(4, 2900.0, 1.3, process=mib(after["nvml_self_mib"]), allocated=mib(after["alloc_mib"]),
                      reserved=mib(after["reserved_mib"]), model_bytes=COPIED_MODEL, distinct=f["distinct_ptrs"])]
    return gpu_record(steps, model_bytes=COPIED_MODEL, copy_model=True)


def duplicate_by_growth_run() -> RunRecord:
    """The same +768 MiB for 3 extra predictors, but no predictor could read its weight pointers
    (distinct_weight_sets 0, as step_from_run records it then): only the growth shows the copies."""
    record = copied_model_run()
    record.steps = [replace(s, distinct_weight_sets=0) for s in record.steps]
    record.config["copy_model"] = False
    return record


REMEDIES_MODEL = 2048 * 2048 * 4 + 2048 * 4  # remedies-h200-2026-11-26.json: one Linear(2048, 2048)


def remedies() -> dict[str, Any]:
    return json.loads((FACTS_H200.parent / "remedies-h200-2026-11-26.json").read_text())


def remedies_run(cublas_workspace_off: bool = False) -> RunRecord:
    """remedies-h200-2026-11-26.json: a shared 16 MiB Linear(2048) at 1 and 16 threads. At defaults NVML goes
    726 -> 2,282 MiB (104 MiB per extra thread, reserved 580 MiB at 16); with CUBLAS_WORKSPACE_CONFIG=:0:0 it
    stays at 630 MiB (reserved 18 MiB). The capture recorded memory only: throughput and latency here are
    placeholders the memory rules do not read, and the reserved figure at 1 thread (not captured) is the
    context's 2 MiB plus one 32 MiB cuBLAS workspace and the model."""
    figures = remedies()["cublas_ws_off" if cublas_workspace_off else "default"]
    at_one_reserved = figures["reserved_mib"] if cublas_workspace_off else 2 + 32 + 16
    steps = []
    for n, rps, p50 in ((1, 9000.0, 0.11), (16, 21000.0, 0.76)):
        process_mib = figures["after_first_matmul_mib"] if n == 1 else figures["with_16_threads_mib"]
        reserved_mib = at_one_reserved if n == 1 else figures["reserved_mib"]
        steps.append(gpu_step(n, rps, p50, process=int(process_mib * MiB), allocated=int((reserved_mib - 2) * MiB),
                              reserved=int(reserved_mib * MiB), model_bytes=REMEDIES_MODEL))
    env = {"CUBLAS_WORKSPACE_CONFIG": ":0:0"} if cublas_workspace_off else {}
    return gpu_record(steps, model_bytes=REMEDIES_MODEL, memory_env=env)


# ---------------------------------------------------------------- other processes and engines

def foreign_process_run(sm_util: bool = True) -> RunRecord:
    """second_process: our process at 6,006 MiB (sm 62%) and another python3 holding a 2 GiB tensor
    (2,566 MiB in NVML, sm 1%; with sm_util=False, 0%)."""
    f = facts()["second_process"]
    rows = {p["pid"]: p for p in f["nvml_procs"]}
    util = {u["pid"]: u["sm"] for u in f["proc_util"]}
    ours, theirs = mib(rows[SELF_PID]["used_mib"]), mib(rows[FOREIGN_PID]["used_mib"])
    steps = [gpu_step(1, 2385.0, 0.41, process=ours - 96 * MiB, allocated=4 * GiB, reserved=4 * GiB + 64 * MiB,
                      model_bytes=H200_MODEL, other=theirs),
             gpu_step(2, 2551.0, 0.78, process=ours, allocated=4 * GiB + 33 * MiB, reserved=4 * GiB + 98 * MiB,
                      model_bytes=H200_MODEL, other=theirs)]
    processes = [process_entry(SELF_PID, ours, is_self=True, sm=util[SELF_PID]),
                 process_entry(FOREIGN_PID, theirs, name=rows[FOREIGN_PID]["name"],
                               sm=util[FOREIGN_PID] if sm_util else 0, cmdline=" ".join(f["child_cmdline"][:2]))]
    return gpu_record(steps, model_bytes=H200_MODEL, processes=processes)


JAX_HELD = 107_918 * MiB


def jax_sibling_run(preallocate: str | None = None) -> RunRecord:
    """A JAX process beside ours at default settings: 107,918 MiB (~75% of the card) from its first operation.
    With XLA_PYTHON_CLIENT_PREALLOCATE set, its environment says so (and it holds only what it uses)."""
    env = {} if preallocate is None else {"XLA_PYTHON_CLIENT_PREALLOCATE": preallocate}
    held = JAX_HELD if preallocate is None else 1_130 * MiB
    ours = 1620 * MiB
    steps = [gpu_step(1, 2356.0, 0.42, process=1222 * MiB, allocated=545 * MiB, reserved=546 * MiB,
                      model_bytes=H200_MODEL, other=held),
             gpu_step(4, 3249.0, 1.18, process=ours, allocated=678 * MiB, reserved=682 * MiB,
                      model_bytes=H200_MODEL, other=held)]
    processes = [process_entry(TIMELINE_PID, ours, is_self=True, sm=40),
                 process_entry(JAX_PID, held, name="/opt/torch/.venv/bin/python3", sm=0, engines=("jax",),
                               memory_env=env, cmdline="python3 jax_sibling.py")]
    record = gpu_record(steps, model_bytes=H200_MODEL, processes=processes, streams=True)
    record.pid = TIMELINE_PID
    return record


def engines_in_one_process_run() -> RunRecord:
    """CuPy beside torch in our own process: torch's context 612 MiB + CuPy's 256 MiB pool = 868 MiB."""
    f = facts()["engines_in_one_process"]
    process = mib(f["plus_cupy_256MiB_mib"])
    steps = [gpu_step(1, 900.0, 1.1, process=process, allocated=0, reserved=2 * MiB, model_bytes=0)]
    return gpu_record(steps, model_bytes=0, self_engines=("torch", "cupy"))


# ---------------------------------------------------------------- memory inside this process

def cache_bloat_run() -> RunRecord:
    """alloc_ladder: a 1 GiB tensor deleted after a matmul: torch allocated 96 MiB, reserved 1,186 MiB,
    NVML 1,862 MiB: 1,090 MiB cached at the end of the run."""
    ladder = {row["tag"]: row for row in facts()["alloc_ladder"] if "tag" in row}
    peak, after = ladder["+matmul (cublas ws)"], ladder["del 1GiB (cached)"]
    steps = [gpu_step(1, 1000.0, 1.0, process=mib(peak["nvml_self_mib"]), allocated=mib(peak["alloc_mib"]),
                      reserved=mib(peak["reserved_mib"]), model_bytes=1024 * MiB)]
    end = {"process_gpu_bytes": mib(after["nvml_self_mib"]), "torch_allocated_bytes": mib(after["alloc_mib"]),
           "torch_reserved_bytes": mib(after["reserved_mib"]), "device_used_bytes": mib(after["device_used_mib"])}
    return gpu_record(steps, model_bytes=1024 * MiB, end=end)


def context_only_run() -> RunRecord:
    """CUDA initialised with one element: torch reserved 2 MiB, NVML 612 MiB: the context is all there is."""
    ladder = {row["tag"]: row for row in facts()["alloc_ladder"] if "tag" in row}
    ctx = ladder["ctx+1 elem"]
    steps = [gpu_step(1, 5000.0, 0.05, process=mib(ctx["nvml_self_mib"]), allocated=mib(ctx["alloc_mib"]),
                      reserved=mib(ctx["reserved_mib"]), model_bytes=0)]
    return gpu_record(steps, model_bytes=0, context=mib(ctx["nvml_self_mib"]),
                      end={"torch_allocated_bytes": 0, "torch_reserved_bytes": 2 * MiB})


def fragmentation_run(retries: int = 3, split_share: float = 0.0) -> RunRecord:
    """Varying input shapes at 4 predictors: the allocator retried (freed its cache and tried again)."""
    steps = []
    for n in (1, 2, 4):
        reserved = H200_MODEL + n * 100 * MiB
        steps.append(gpu_step(n, 1000.0 * n, 1.0, process=CONTEXT + reserved + n * 64 * MiB,
                              allocated=H200_MODEL + n * 60 * MiB, reserved=reserved, model_bytes=H200_MODEL,
                              retries=retries if n == 4 else 0,
                              inactive_split=int(reserved * split_share) if n == 4 else 0))
    return gpu_record(steps, model_bytes=H200_MODEL)


def oom_run() -> RunRecord:
    """A 30 GiB model on a 40 GiB card: 1 and 2 predictors fit, 4 run out of memory."""
    total = 40 * GiB
    model = 30 * GiB
    steps = [gpu_step(n, 100.0 * n, 10.0, process=CONTEXT + model + n * 2 * GiB, allocated=model + n * 2 * GiB - 64 * MiB,
                      reserved=model + n * 2 * GiB, model_bytes=model, total=total) for n in (1, 2)]
    steps.append(gpu_step(4, 0.0, 0.0, process=total - DRIVER - 100 * MiB, allocated=model + 7 * GiB,
                          reserved=model + 7 * GiB + 512 * MiB, model_bytes=model, total=total, oom=True, errors=1,
                          error_messages=["OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"]))
    return gpu_record(steps, model_bytes=model, total=total)


def headroom_run(used_share: float, total: int = TOTAL) -> RunRecord:
    """The JAX sibling's 107,918 MiB plus our process, sized so the device is `used_share` full at the
    recommended count (2 predictors: within 5% of 4's throughput)."""
    # floor: 95% of the H200 is no whole byte, so "0.95" is the last byte at or below it (the exact edges are
    # pinned on a 100 GiB device in test_rule_edges.py)
    target_used = int(total * used_share)
    steps = []
    for n, rps in ((1, 1000.0), (2, 1900.0), (4, 1950.0)):
        used = target_used if n == 2 else target_used + (n - 2) * 64 * MiB
        process = used - JAX_HELD - DRIVER
        steps.append(gpu_step(n, rps, 1.0 * n, process=process, allocated=process - CONTEXT - 64 * MiB,
                              reserved=process - CONTEXT, model_bytes=4 * GiB, other=JAX_HELD, total=total,
                              device_used=used))
    processes = [process_entry(SELF_PID, steps[-1].memory["process_gpu_bytes"], is_self=True, sm=60),
                 process_entry(JAX_PID, JAX_HELD, engines=("jax",), memory_env={"XLA_PYTHON_CLIENT_MEM_FRACTION": ".75"})]
    record = gpu_record(steps, model_bytes=4 * GiB, processes=processes, total=total)
    record.recommendation = {"predictors": 2}
    return record


# ---------------------------------------------------------------- the predictors themselves

def predictor_errors_run(failing: int, of: int, dead: int = 0, gpu: bool = False) -> RunRecord:
    """A model that raises on `failing` of every `of` requests at 2 predictors (and maybe a dead thread)."""
    if gpu:
        steps = [gpu_step(1, 1000.0, 1.0, process=2 * GiB, allocated=GiB, reserved=GiB, model_bytes=GiB),
                 gpu_step(2, 1900.0, 1.1, process=2 * GiB, allocated=GiB, reserved=GiB, model_bytes=GiB)]
    else:
        steps = [cpu_step(1, 30.0, 33.0, rss=700 * MiB, model_bytes=CPU_MODEL),
                 cpu_step(2, 55.0, 36.0, rss=701 * MiB, model_bytes=CPU_MODEL)]
    bad = steps[1]
    bad.requests = 900 * (of - failing)  # so that errors / (requests + errors) is exactly failing / of
    bad.errors = 900 * failing
    bad.throughput_rps = bad.requests / bad.duration_s
    bad.dead_predictors = dead
    bad.error_messages = ["ValueError: request 7 has a NaN"] + (["predictor died: RuntimeError: boom"] if dead else [])
    return gpu_record(steps, model_bytes=GiB) if gpu else cpu_record(steps, model_bytes=CPU_MODEL)


def grad_enabled_run() -> RunRecord:
    """--no-inference-mode: every predictor's outputs carry grad_fn."""
    return cpu_record([cpu_step(1, 28.0, 35.0, rss=720 * MiB, model_bytes=CPU_MODEL, grad=True, outputs_with_grad=1),
                       cpu_step(2, 50.0, 39.0, rss=721 * MiB, model_bytes=CPU_MODEL, grad=True, outputs_with_grad=2)],
                      model_bytes=CPU_MODEL)


def overloaded_run() -> RunRecord:
    """--rate 500 on a model that serves ~110 req/s: the bounded backlog drops what it cannot hold."""
    steps = [cpu_step(1, 80.0, 900.0, rss=700 * MiB, model_bytes=CPU_MODEL),
             cpu_step(2, 110.0, 600.0, rss=702 * MiB, model_bytes=CPU_MODEL)]
    for step, dropped in zip(steps, (840, 780)):
        step.offered_rps, step.dropped_arrivals = 500.0, dropped
    record = cpu_record(steps, model_bytes=CPU_MODEL)
    record.config["rate_rps"] = 500.0
    return record


def rate_kept_up_run(served: tuple[float, float] = (49.6, 49.8)) -> RunRecord:
    """--rate 50 on a model that keeps up: served within 1% of the offered rate, nothing dropped.
    With `served` below the rate (e.g. (20, 40): a 50 ms model) the backlog queues what it cannot serve."""
    steps = [cpu_step(1, served[0], 60.0, rss=700 * MiB, model_bytes=CPU_MODEL),
             cpu_step(2, served[1], 55.0, rss=702 * MiB, model_bytes=CPU_MODEL)]
    for step in steps:
        step.offered_rps, step.dropped_arrivals = 50.0, 0
    record = cpu_record(steps, model_bytes=CPU_MODEL)
    record.config["rate_rps"] = 50.0
    return record


def leaking_cpu_run(late_growth: int = 425 * MiB) -> RunRecord:
    """A model that keeps 4 MiB per request (a per-request cache): RSS still climbs in the second half of
    every step, by `late_growth` over 0.5 s (2 MiB: a steady process's noise)."""
    steps = [cpu_step(1, 110.0, 9.0, rss=900 * MiB, model_bytes=CPU_MODEL),
             cpu_step(2, 120.0, 17.0, rss=1750 * MiB, model_bytes=CPU_MODEL)]
    for step in steps:
        step.memory.update(late_growth_bytes=late_growth * step.predictors, late_growth_s=0.5)
    return cpu_record(steps, model_bytes=CPU_MODEL)


def oversubscribed_cpu_run() -> RunRecord:
    """4 predictors x 2 intra-op threads (torch's default on 2 cores) = 8 busy threads on 2 cores:
    throughput falls from 1 predictor's."""
    return cpu_record([cpu_step(1, 40.0, 25.0, rss=700 * MiB, model_bytes=CPU_MODEL, intra_op_threads=2),
                       cpu_step(4, 31.0, 128.0, rss=702 * MiB, model_bytes=CPU_MODEL, intra_op_threads=2,
                                cpu_util=199.0)],
                      model_bytes=CPU_MODEL)


def fitting_cpu_run() -> RunRecord:
    """2 predictors x 1 intra-op thread on 2 cores."""
    return cpu_record([cpu_step(1, 31.0, 32.0, rss=700 * MiB, model_bytes=CPU_MODEL, intra_op_threads=1),
                       cpu_step(2, 58.0, 34.0, rss=701 * MiB, model_bytes=CPU_MODEL, intra_op_threads=1)],
                      model_bytes=CPU_MODEL)


def gpu_oversubscribed_run(cpu_util: float) -> RunRecord:
    """The H200 default-stream sweep at 16 intra-op threads on 16 cores with the given process CPU use."""
    record = h200_shared_model_run(False, counts=(1, 2, 4))
    for step in record.steps:
        step.cpu_util_pct = cpu_util
    return record


# ---------------------------------------------------------------- driving the real listeners

def describer(engines: dict[int, tuple[str, ...]] | None = None, env: dict[int, dict[str, str]] | None = None,
              missing: Iterable[int] = ()):
    """Stands in for describe_process (which reads /proc): names, engines and memory variables per pid."""
    engines, env, missing = engines or {}, env or {}, set(missing)

    def describe(pid: int, nvml_name: str) -> ProcessInfo:
        if pid in missing:
            return ProcessInfo(pid, False, nvml_name or "?", Unavailable("process_gone", "no such pid"),
                               Unavailable("process_gone", "no such pid"), Unavailable("process_gone", "no such pid"),
                               Unavailable("process_gone", "no such pid"))
        return ProcessInfo(pid, True, nvml_name or "python3", "root", f"python3 app_{pid}.py",
                           engines.get(pid, ("torch",)), dict(env.get(pid, {})))
    return describe


class DrivenSession:
    """GpuProbe + AllocatorProbe over a fake NVML and a fake torch.cuda (one device: NVML's and torch's 0), ticked
    through a Sampler into StepMonitor, PeakTracker and GapTracker, one tick per call, on a clock the ticks set."""

    def __init__(self, backend: ScriptedNvml, torch_cuda: FakeTorchCuda, pid: int, model_bytes: int,
                 describe: Any = None, missing_pids: Iterable[int] = (), writer: Any = None) -> None:
        self.backend = backend
        self.torch = torch_cuda
        self.pid = pid
        missing = set(missing_pids)
        self.gpu_probe = GpuProbe(backend, describe=describe or describer(missing=missing),
                                  pid_exists=lambda p: p not in missing)
        probes = device_probes(pid, "cuda:0", 0, self.gpu_probe, lambda: torch_cuda)
        self.allocator = probes["allocator"]
        self.monitor, self.peaks, self.gaps = workload_listeners(pid, 0, model_bytes, nvml_open=True)
        self.t_ns = 0
        self.sampler = Sampler(probes, 0.05, writer, [self.monitor, self.peaks, self.gaps],
                               clock_ns=lambda: self.t_ns)
        self.ticks_seen: list[list[tuple[str, str, Any]]] = []
        self.values_at: dict[int, list[tuple[str, str, Any]]] = {}

    def tick(self, tick: int) -> list[tuple[str, str, Any]]:
        self.backend.goto(tick)
        self.t_ns = tick * 50_000_000
        values = self.sampler.tick()
        self.values_at[tick] = values
        return values

    def context_bytes(self, tick: int = 0) -> Any:
        """What NVML shows for this process before the model loads (session: baseline context_bytes)."""
        self.backend.goto(tick)
        return process_gpu_bytes(self.gpu_probe, self.pid, 0)

    def measure_step(self, predictors: int, ticks: Iterable[int], rps: float, p50_ms: float,
                     distinct: int = 1, intra_op_threads: int = 16) -> Step:
        """One sweep step over these ticks: reset, tick, snapshot, and sweep.step_from_run's assembly."""
        ticks = list(ticks)
        self.monitor.reset()
        started_ns = ticks[0] * 50_000_000
        for tick in ticks:
            self.tick(tick)
        ended_ns = ticks[-1] * 50_000_000
        run = synthetic_step_run(predictors, started_ns, max(ended_ns, started_ns + 1), rps, p50_ms, distinct)
        return step_from_run(run, self.monitor.snapshot(), intra_op_threads, 0, started_ns, ended_ns)

    def processes(self) -> list[dict[str, Any]]:
        """record.processes as _finish_record lists them, from GpuProbe's descriptions and the run's peaks
        (the describer stands in for reading /proc; no children)."""
        return process_entries(dict(self.gpu_probe.processes), self.pid, set(), 0, self.peaks.peaks())

    def end_figures(self) -> dict[str, Any]:
        return end_figures(self.peaks.last(), self.pid, 0)

    def extra(self) -> dict[str, Any]:
        return {"measurement_gaps": self.gaps.gaps, "pid_namespace": self.gaps.evidence()}


def synthetic_step_run(predictors: int, start_ns: int, end_ns: int, rps: float, p50_ms: float,
                       distinct: int = 1) -> StepRun:
    """A StepRun whose requests arrive evenly at `rps` with latencies around `p50_ms` (1% at 1.5x)."""
    duration_s = (end_ns - start_ns) / 1e9
    total = max(1, int(rps * duration_s))
    results = [PredictorResult(weights=WEIGHTS_ID if distinct <= 1 else
                               frozenset({0x7E00_0000_0000 + min(i, distinct - 1)})) for i in range(predictors)]
    for k in range(total):
        r = results[k % predictors]
        lat_ms = p50_ms * (1.5 if k % 100 == 99 else 1.0)
        r.latencies_ns.append(int(lat_ms * 1e6))
        r.end_times_ns.append(start_ns + int((k + 1) * (end_ns - start_ns) / total))
        r.completed += 1
    return StepRun(predictors, results, start_ns, end_ns, [rps] * 3, True, False)


def replayed_h200_run() -> tuple[RunRecord, DrivenSession]:
    """The H200 timeline (timeline-h200-2026-11-26.jsonl) replayed through the session's listeners:
    the "1-predictor" ticks as a 1-predictor step, the "4-predictors-streams" ticks as a 4-predictor step
    (per-thread streams: 2,356 and 3,249 req/s), then the rest of the run (a foreign python3 holding 2 GiB,
    4 GiB held and cached, a JAX sibling at defaults) sampled into the run-wide peaks."""
    replay = ReplayNvml()
    torch_cuda = FakeTorchCuda.from_timeline(replay.lines, follow=replay)
    model_bytes = 512 * MiB + 32 * 1024  # the timeline's model: torch allocated 512 MiB once loaded
    session = DrivenSession(replay, torch_cuda, TIMELINE_PID, model_bytes,
                            describe=describer(engines={TIMELINE_PID: ("torch",), 505: ("torch",), 527: ("jax",)}))
    context = session.context_bytes(0)
    phases = phase_ticks(replay)
    for tick in range(phases["4-predictors-streams"][0]):
        if tick not in phases.get("1-predictor", []):
            session.tick(tick)
    step1 = session.measure_step(1, phases["1-predictor"], 2356.3, 0.422)
    step4 = session.measure_step(4, phases["4-predictors-streams"], 3249.4, 1.177)
    for tick in range(phases["4-predictors-streams"][-1] + 1, len(replay.lines)):
        session.tick(tick)
    record = gpu_record([step1, step4], model_bytes=model_bytes, streams=True, processes=session.processes(),
                        total=int(replay.lines[0]["dev_total"]), context=context, end=session.end_figures(),
                        extra=session.extra())
    record.pid = TIMELINE_PID
    return record, session


def phase_ticks(replay: ReplayNvml) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for tick, line in enumerate(replay.lines):
        out.setdefault(str(line["phase"]), []).append(tick)
    return out


def replayed_cached_step() -> tuple[Step, DrivenSession]:
    """The timeline's "4GiB-freed-cached" phase as one step: a 4 GiB tensor freed but still reserved."""
    replay = ReplayNvml()
    torch_cuda = FakeTorchCuda.from_timeline(replay.lines, follow=replay)
    session = DrivenSession(replay, torch_cuda, TIMELINE_PID, 512 * MiB)
    ticks = phase_ticks(replay)["4GiB-freed-cached"]
    return session.measure_step(4, ticks, 3249.4, 1.177), session


CONTAINER_PID = 31  # the profiled process as the container sees it; NVML knows only host pids


def container_run(ticks: int = 10) -> tuple[RunRecord, DrivenSession]:
    """A container without the host pid namespace: NVML lists no process at all while the device holds
    1,636 MiB beyond the driver's reserve and torch in this process has 1,026 MiB reserved (alloc_ladder's
    "+1GiB tensor": 1,024 allocated, 1,026 reserved, 1,636 in NVML)."""
    state = DeviceState(processes=(), gpu_util_pct=55, used_bytes=DRIVER + 1636 * MiB)
    backend = ScriptedNvml(script=[state])
    torch_cuda = FakeTorchCuda([TorchFigures(1024 * MiB, 1026 * MiB)], follow=backend)
    session = DrivenSession(backend, torch_cuda, CONTAINER_PID, 1024 * MiB)
    step1 = session.measure_step(1, range(0, ticks // 2), 1500.0, 0.6)
    step2 = session.measure_step(2, range(ticks // 2, ticks), 1700.0, 1.1)
    record = gpu_record([step1, step2], model_bytes=1024 * MiB, processes=session.processes(),
                        context=session.context_bytes(0), end=session.end_figures(), extra=session.extra())
    record.pid = CONTAINER_PID
    return record, session


def nvml_lost_run(lost_at: int = 6, ticks: int = 10, writer: Any = None) -> tuple[RunRecord, DrivenSession]:
    """The GPU falls off the bus mid-run: every NVML call fails with no_device from tick `lost_at` on
    (the timeline's "1-predictor" figures before that). `writer`: a SampleWriter for its samples file."""
    state = DeviceState(processes=(FakeProcess(SELF_PID, 1222 * MiB, "python3", sm_util_pct=60),), gpu_util_pct=80)
    backend = ScriptedNvml(script=[state])
    backend.lose_gpu(from_tick=lost_at)
    torch_cuda = FakeTorchCuda([TorchFigures(545 * MiB, 546 * MiB)], follow=backend)
    session = DrivenSession(backend, torch_cuda, SELF_PID, H200_MODEL, writer=writer)
    step1 = session.measure_step(1, range(0, lost_at // 2), 2385.0, 0.41)
    step2 = session.measure_step(2, range(lost_at // 2, ticks), 2552.0, 0.78)
    record = gpu_record([step1, step2], model_bytes=H200_MODEL, processes=session.processes(),
                        context=CONTEXT, end=session.end_figures(), extra=session.extra())
    return record, session


def host_pid_listed_run() -> tuple[RunRecord, DrivenSession]:
    """NVML lists a pid this pid namespace does not have (a host pid), beside our own row."""
    host_pid = 4_000_123
    state = DeviceState(processes=(FakeProcess(SELF_PID, 1222 * MiB), FakeProcess(host_pid, 900 * MiB)))
    backend = ScriptedNvml(script=[state])
    torch_cuda = FakeTorchCuda([TorchFigures(545 * MiB, 546 * MiB)], follow=backend)
    session = DrivenSession(backend, torch_cuda, SELF_PID, H200_MODEL, missing_pids=[host_pid])
    steps = [session.measure_step(1, range(0, 3), 2385.0, 0.41), session.measure_step(2, range(3, 6), 2552.0, 0.78)]
    record = gpu_record(steps, model_bytes=H200_MODEL, processes=session.processes(), end=session.end_figures(),
                        extra=session.extra())
    return record, session


# ---------------------------------------------------------------- translators: the GIL and thread safety
# Figures measured on the 2-core development machine (load average 6-7 from other sessions), 2026-12-04:
# tests.predictor_models:pure_python at 1 and 2 predictors, --intra-op-threads 1, 2 s steps.

PURE_PYTHON_STAGES = {"preprocess": 3.2, "model": 0.082, "postprocess": 0.07}  # mean ms at 1 predictor


def stages(means: dict[str, float]) -> dict[str, dict[str, float]]:
    return {stage: {"p50": mean * 0.95, "p99": mean * 1.6, "mean": mean} for stage, mean in means.items()}


def thread_times(wall: float, on_cpu: float, runqueue: float) -> dict[str, float]:
    return {"wall": wall, "on_cpu": on_cpu, "runqueue": runqueue, "blocked": max(0.0, wall - on_cpu - runqueue)}


def translator_step(n: int, rps: float, means: dict[str, float], times: dict[str, float] | None, *,
                    cpu_util: float, intra_op_threads: int = 1) -> Step:
    step = cpu_step(n, rps, sum(means.values()), rss=720 * MiB, model_bytes=mib(0.001),
                    intra_op_threads=intra_op_threads, cpu_util=cpu_util)
    step.stages_ms = stages(means)
    step.thread_times_s = times
    return step


def gil_contention_run(blocked_at_2: float = 0.2, runqueue_at_2: float = 2.81, cpu_at_2: float = 50.0,
                       rps_at_2: float = 301.0, means_at_2: dict[str, float] | None = None,
                       intra_op_threads: int = 1, cores: int = 2) -> RunRecord:
    """pure_python as measured: 2 predictors blocked 0.2 s of their 4 s (0.98 s on a CPU, 2.81 s in the run
    queue: a busy machine), throughput 298 -> 301 req/s. `blocked_at_2` etc. move it across the thresholds."""
    at_2 = means_at_2 or {"preprocess": 6.187, "model": 0.186, "postprocess": 0.253}
    steps = [translator_step(1, 298.0, PURE_PYTHON_STAGES, thread_times(2.0, 0.98, 1.02), cpu_util=49.5,
                             intra_op_threads=intra_op_threads),
             translator_step(2, rps_at_2, at_2, thread_times(4.0, 4.0 - runqueue_at_2 - blocked_at_2, runqueue_at_2),
                             cpu_util=cpu_at_2, intra_op_threads=intra_op_threads)]
    record = cpu_record(steps, model_bytes=mib(0.001), cores=cores)
    record.model.update({"source": "tests.predictor_models:pure_python", "kind": "factory",
                         "translator": {"type": "PurePythonTranslator", "preprocess": True, "postprocess": True}})
    return record


def gil_on_free_cores_run(cpu_at_2: float = 104.0, runqueue_at_2: float = 0.2, rps_at_2: float = 310.0) -> RunRecord:
    """The same translator on an idle machine: one core busy, the threads barely queue for a core, and
    throughput stays flat (signal B); nothing blocked shows, so signal A alone would miss it."""
    steps = [translator_step(1, 300.0, PURE_PYTHON_STAGES, thread_times(2.0, 1.98, 0.02), cpu_util=99.0),
             translator_step(2, rps_at_2, {"preprocess": 6.2, "model": 0.1, "postprocess": 0.07},
                             thread_times(4.0, 4.0 - runqueue_at_2, runqueue_at_2), cpu_util=cpu_at_2)]
    return cpu_record(steps, model_bytes=mib(0.001))


def thread_check(writes: Sequence[dict[str, Any]] = (), sequential: Sequence[dict[str, Any]] = (),
                 concurrent: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """record.thread_safety as measure/thread_safety.py writes it."""
    return {"checked": True, "requests": 8, "concurrent_predictors": 4, "rounds": 0 if sequential else 3,
            "tolerance": 0.0, "duration_s": 0.3, "writes": list(writes), "write_count": len(writes),
            "sequential_mismatches": list(sequential), "sequential_mismatch_count": len(sequential),
            "concurrent_judged": not sequential, "concurrent_mismatches": list(concurrent),
            "concurrent_mismatch_count": len(concurrent), "concurrent_requests": 0 if sequential else 96}


STATEFUL_WRITE = {"attribute": "Stateful.last", "path": "model", "kind": "rebound", "owner": "model", "requests": 8}


def thread_unsafe_run(writes: Sequence[dict[str, Any]] = (STATEFUL_WRITE,),
                      sequential: Sequence[dict[str, Any]] = ({"request": 0, "max_abs_diff": 1.86},),
                      concurrent: Sequence[dict[str, Any]] = ()) -> RunRecord:
    """tests.predictor_models:stateful: `self.last = h` on every request (so even two passes one at a time differ)."""
    record = clean_cpu_run()
    record.thread_safety = thread_check(writes, sequential, concurrent)
    return record


def nondeterministic_run() -> RunRecord:
    """tests.predictor_models:dropout: dropout on in eval; no write, outputs differ one at a time."""
    record = clean_cpu_run()
    record.thread_safety = thread_check(sequential=[{"request": i, "max_abs_diff": 3.04 - i * 0.2} for i in range(8)])
    return record
