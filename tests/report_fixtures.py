"""Builders of synthetic runs (run.json + samples.jsonl) for the report tests.

The shapes follow what the sweep writes: `Step.memory` holds peak figures plus
`layers` (the decomposition at the tick where this process peaked in the step),
and the samples file holds one line per tick with the `host`, `pid:P`, `gpu:0`,
`pid:P/gpu:0` and `pid:Q/gpu:0` scopes, plus step_start/step_end events.
"""
from __future__ import annotations

import json
import os
from typing import Any

from gpuscope.probes.readings import ERROR, NO_DEVICE, NO_PERMISSION, NOT_SUPPORTED, Unavailable, reading_to_json
from gpuscope.probes.samplefile import SAMPLES_SCHEMA, SampleWriter
from gpuscope.probes.units import GiB, MiB
from gpuscope.record.layers import cpu_layers, gpu_layers
from gpuscope.record.run import STATUS_COMPLETE, STATUS_INTERRUPTED, Finding, RunRecord, Step, save_run

PID = 4242
OTHER_PID = 777
T0_NS = 5_000_000_000_000
GPU_TOTAL = 81559 * MiB  # an H100 80GB as NVML reports it
DRIVER_RESERVED = 615 * MiB
MODEL_BYTES = 520 * MiB
CONTEXT_BYTES = 612 * MiB
PER_PREDICTOR_OUTSIDE = 64 * MiB
OTHER_PROCESS_BYTES = 2 * GiB
CPU_RSS_BASE = 420 * MiB
EVIL_NAME = "<img src=x onerror=alert(1)>.pt"

GPU_COUNTS = (1, 2, 4, 8)
CPU_COUNTS = (1, 2, 4)


def _latency(n: int, base_ms: float) -> dict[str, float]:
    p50 = base_ms * (1 + 0.15 * (n - 1))
    return {"p50": p50, "p90": p50 * 1.4, "p99": p50 * 2.1, "max": p50 * 3.0, "mean": p50 * 1.1}


def _throughput(n: int, knee: int, best: float) -> float:
    return best * min(n, knee) / knee * (1.0 - 0.01 * max(0, n - knee))


def _gpu_figures(n: int, wobble: float = 0.0) -> dict[str, int]:
    allocated = MODEL_BYTES + int(n * 180 * MiB * (1 + wobble))
    reserved = allocated + int(n * 160 * MiB) + 256 * MiB
    process = reserved + CONTEXT_BYTES + n * PER_PREDICTOR_OUTSIDE
    return {"allocated": allocated, "reserved": reserved, "process": process}


def _gpu_step(n: int, started: float, ended: float, *, oom: bool = False) -> Step:
    fig = _gpu_figures(n, wobble=0.05)
    layers = gpu_layers(fig["process"], fig["allocated"], fig["reserved"], MODEL_BYTES,
                        OTHER_PROCESS_BYTES, DRIVER_RESERVED)
    memory: dict[str, Any] = {
        "process_gpu_bytes": fig["process"],
        "device_used_bytes": fig["process"] + OTHER_PROCESS_BYTES + DRIVER_RESERVED,
        "device_total_bytes": GPU_TOTAL,
        "driver_reserved_bytes": DRIVER_RESERVED,
        "torch_allocated_bytes": fig["allocated"],
        "torch_reserved_bytes": fig["reserved"],
        "other_processes_bytes": OTHER_PROCESS_BYTES,
        "rss_bytes": 3 * GiB + n * 20 * MiB,
        "uss_bytes": 2 * GiB + n * 20 * MiB,
        "model_bytes": MODEL_BYTES,
        "layers": layers,
    }
    thr = _throughput(n, 4, 1800.0)
    duration = ended - started
    return Step(predictors=n, requests=int(thr * duration), errors=3 if n == 8 else 0, duration_s=duration,
                throughput_rps=thr, latency_ms=_latency(n, 2.2), memory=memory, cpu_util_pct=30.0 + 9 * n,
                windows_rps=[thr, thr * 1.01, thr * 0.99], stable=n != 8, oom=oom, distinct_weight_sets=1,
                intra_op_threads=1, started_s=started, ended_s=ended)


def _cpu_step(n: int, started: float, ended: float) -> Step:
    rss = CPU_RSS_BASE + MODEL_BYTES // 4 + n * 12 * MiB
    memory: dict[str, Any] = {
        "process_gpu_bytes": Unavailable(NO_DEVICE, "no CUDA device"),
        "device_used_bytes": Unavailable(NO_DEVICE, "no CUDA device"),
        "device_total_bytes": Unavailable(NO_DEVICE, "no CUDA device"),
        "driver_reserved_bytes": Unavailable(NO_DEVICE, "no CUDA device"),
        "torch_allocated_bytes": Unavailable(NO_DEVICE, "no CUDA device"),
        "torch_reserved_bytes": Unavailable(NO_DEVICE, "no CUDA device"),
        "other_processes_bytes": Unavailable(NO_DEVICE, "no CUDA device"),
        "rss_bytes": rss,
        "uss_bytes": rss - 60 * MiB,
        "model_bytes": MODEL_BYTES // 4,
        "layers": cpu_layers(rss, MODEL_BYTES // 4),
    }
    thr = _throughput(n, 2, 240.0)
    duration = ended - started
    return Step(predictors=n, requests=int(thr * duration), duration_s=duration, throughput_rps=thr,
                latency_ms=_latency(n, 8.0), memory=memory, cpu_util_pct=45.0 * n, stable=True,
                distinct_weight_sets=1, intra_op_threads=1, started_s=started, ended_s=ended)


def gpu_findings() -> list[Finding]:
    return [
        Finding("OUTSIDE_ALLOCATOR", "info", "1.1 GiB of this process's memory is outside PyTorch's allocator",
                {"outside_allocator_bytes": 1100 * MiB, "context_baseline_bytes": CONTEXT_BYTES,
                 "CUDA_MODULE_LOADING": "LAZY"},
                "Keep lazy module loading; fewer processes per GPU.", at_predictors=4),
        Finding("FOREIGN_PROCESS", "warn", "another process (pid 777, python) holds 2.00 GiB on cuda:0",
                {"pid": OTHER_PID, "name": "<script>alert('proc')</script>", "used_bytes": OTHER_PROCESS_BYTES,
                 "sm_util_pct": 12.5, "engines": ["jax"]},
                "Run one process per GPU with threads, or cap each engine's memory.", at_predictors=1),
        Finding("PER_PREDICTOR_GROWTH", "warn", "each extra predictor costs 64 MiB outside PyTorch's allocator",
                {"slope_process_bytes": 64 * MiB, "slope_reserved_bytes": 160 * MiB, "steps": [1, 2, 4, 8]},
                "Use a fixed pool of long-lived predictor threads; CUBLAS_WORKSPACE_CONFIG=:0:0 removes the "
                "workspaces (measure the speed cost).", at_predictors=8),
        Finding("THROUGHPUT_PLATEAU", "info", "throughput stops growing at 4 predictors (1,800 requests/s)",
                {"best_rps": 1800.0, "knee_predictors": 4, "p99_ms_at_knee": 10.6},
                "Run 4 predictors; more only add latency and memory.", at_predictors=4),
        Finding("DUPLICATE_MODEL", "fail", "predictors hold 2 copies of the model (2 weight sets)",
                {"distinct_weight_sets": 2, "model_bytes": MODEL_BYTES,
                 "growth_per_predictor_bytes": Unavailable(NOT_SUPPORTED, "one step only")},
                "Load the model once and hand the same module to every predictor.", at_predictors=2),
    ]


def _processes(gpu: bool, pid: int) -> list[dict[str, Any]]:
    me = {"pid": pid, "name": "python3", "user": "alice",
          "cmdline": "python3 -m gpuscope diagnose --model " + EVIL_NAME + " --api-key=***",
          "engines": ["torch"], "gpu": 0 if gpu else None, "peak_used_bytes": _gpu_figures(8)["process"] if gpu
          else Unavailable(NO_DEVICE, "cpu run"), "self": True, "exists": True,
          "memory_env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}}
    if not gpu:
        return [me]
    other = {"pid": OTHER_PID, "name": "<script>alert('proc')</script>", "user": Unavailable(NO_PERMISSION, "root"),
             # deliberately NOT pre-redacted: the report must redact again at render time
             "cmdline": "python serve.py --token=hunter2 --db postgres://bob:s3cret@db:5432/x",
             "engines": ["jax", "torch"], "gpu": 0, "peak_used_bytes": OTHER_PROCESS_BYTES, "self": False,
             "exists": True, "memory_env": {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}}
    ghost = {"pid": 99999, "name": "?", "user": Unavailable("process_gone", "not in this pid namespace"),
             "cmdline": Unavailable("process_gone", "not in this pid namespace"),
             "engines": {"unavailable": "process_gone"}, "gpu": 0, "peak_used_bytes": 0, "self": False,
             "exists": False}
    return [me, other, ghost]


def _environment(gpu: bool) -> dict[str, Any]:
    return {"gpuscope": "0.1.0", "torch": "2.5.1+cu124" if gpu else "2.5.1+cpu",
            "cuda": "12.4" if gpu else Unavailable(NO_DEVICE, "cpu build"), "python": "3.11.7",
            "driver": "550.54.15" if gpu else Unavailable(NO_DEVICE, "no NVIDIA driver"),
            "memory_env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "CUDA_MODULE_LOADING": "LAZY",
                           "SECRET_TOKEN": "abc123", "HF_ENDPOINT": "https://u:pw@hub.example"}}


def write_samples(path: str, record: RunRecord, *, gpu: bool, interval_s: float, pid: int = PID,
                  tear_last_line: bool = False, stop_after_s: float | None = None) -> None:
    """Write a samples file consistent with the record's steps (one tick every interval_s)."""
    writer = SampleWriter(path, {"started_at": record.started_at, "t0_ns": T0_NS, "interval_s": interval_s,
                                 "pid": pid})
    end = max((s.ended_s for s in record.steps), default=3.0) + 0.5
    if stop_after_s is not None:
        end = min(end, stop_after_s)
    step_bounds = [(s.started_s, s.ended_s, s.predictors) for s in record.steps]
    ticks = int(end / interval_s) + 1
    marked: set[tuple[str, int]] = set()
    for i in range(ticks):
        t = i * interval_s
        t_ns = T0_NS + int(t * 1e9)
        n = next((p for a, b, p in step_bounds if a <= t < b), 0)
        for a, b, p in step_bounds:
            if a <= t and ("start", p) not in marked:
                writer.write({"t_ns": T0_NS + int(a * 1e9), "event": "step_start", "predictors": p})
                marked.add(("start", p))
            if b <= t and ("end", p) not in marked:
                writer.write({"t_ns": T0_NS + int(b * 1e9), "event": "step_end", "predictors": p})
                marked.add(("end", p))
        wave = 0.5 + 0.5 * ((i % 7) / 7)
        v: dict[str, Any] = {"host": {"cpu_util_pct": 20 + 10 * n, "mem_used_bytes": 12 * GiB}}
        pscope: dict[str, Any] = {"cpu_util_pct": 50.0 * max(1, n), "num_threads": 8 + n}
        if i % max(1, int(round(1.0 / interval_s))) == 0:
            rss = CPU_RSS_BASE + (MODEL_BYTES // 4 if not gpu else 2 * GiB) + int(n * 12 * MiB * wave)
            pscope.update(rss_bytes=rss, uss_bytes=rss - 60 * MiB)
        v[f"pid:{pid}"] = pscope
        if gpu:
            fig = _gpu_figures(n, wobble=0.05 * wave) if n else {"allocated": MODEL_BYTES,
                                                                   "reserved": MODEL_BYTES + 256 * MiB,
                                                                   "process": MODEL_BYTES + 256 * MiB + CONTEXT_BYTES}
            used = fig["process"] + OTHER_PROCESS_BYTES + DRIVER_RESERVED
            v["gpu:0"] = {"total_bytes": GPU_TOTAL, "used_bytes": used, "free_bytes": GPU_TOTAL - used,
                          "driver_reserved_bytes": DRIVER_RESERVED, "util_pct": min(100, 20 * n),
                          "process_count": 2}  # NVML listed both processes, as GpuProbe writes it
            v[f"pid:{pid}/gpu:0"] = {"used_bytes": fig["process"], "sm_util_pct": min(100, 20 * n),
                                     "torch_allocated_bytes": fig["allocated"],
                                     "torch_reserved_bytes": fig["reserved"],
                                     "torch_peak_allocated_bytes": fig["allocated"] + 10 * MiB,
                                     "torch_peak_reserved_bytes": fig["reserved"]}
            v[f"pid:{OTHER_PID}/gpu:0"] = {"used_bytes": OTHER_PROCESS_BYTES, "sm_util_pct": 5}
        writer.write({"t_ns": t_ns, "v": v})
    writer.close()
    if tear_last_line:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write('{"t_ns": 123, "v": {"gpu:0": {"used_')


def _base_record(gpu: bool, model: str, counts: tuple[int, ...]) -> RunRecord:
    device = "cuda:0" if gpu else "cpu"
    record = RunRecord(tool_version="0.1.0", started_at="2025-01-02T03:04:05+00:00", status=STATUS_COMPLETE,
                       host={"hostname": "box", "logical_cores": 16, "usable_cores": 16,
                             "memory_total_bytes": 128 * GiB},
                       config={"device": device, "model": model, "predictors": list(counts), "interval_s": 0.05,
                               "input_shape": [8, 3, 224, 224], "streams": "per-predictor",
                               "auth_token": "do-not-show"},
                       model={"source": model, "param_bytes": (MODEL_BYTES if gpu else MODEL_BYTES // 4) - 4 * MiB,
                              "buffer_bytes": 4 * MiB, "unique_storages": 161, "input_shape": [8, 3, 224, 224],
                              "dtype": "float32"},
                       environment=_environment(gpu), pid=PID, ended_at="2025-01-02T03:05:05+00:00")
    if gpu:
        record.devices = [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "total_bytes": GPU_TOTAL,
                           "driver": "550.54.15", "uuid": "GPU-1234"}]
    else:
        record.device_unavailable = {"reason": NO_DEVICE, "detail": "no CUDA device (torch built without CUDA)"}
    record.processes = _processes(gpu, PID)
    return record


def gpu_run(directory: str, *, model: str = EVIL_NAME, counts: tuple[int, ...] = GPU_COUNTS,
            step_s: float = 2.0, interval_s: float = 0.05, samples: bool = True) -> tuple[RunRecord, str, str]:
    """A complete GPU sweep with findings; returns (record, run.json path, samples path)."""
    os.makedirs(directory, exist_ok=True)
    record = _base_record(True, model, counts)
    t = 0.5
    for n in counts:
        record.steps.append(_gpu_step(n, t, t + step_s))
        t += step_s + 0.2
    record.findings = gpu_findings()
    record.recommendation = {"predictors": 4, "reason": "throughput stops growing after 4 predictors",
                             "memory_bytes": _gpu_figures(4)["process"], "more_would_fit": True}
    record.sharing = {"verified": True, "distinct_weight_sets": 1, "bytes_per_extra_predictor": 400 * MiB}
    record.check = {"exit_code": 1, "results": [
        {"name": "max-device-memory", "status": "pass", "measured": 7 * GiB, "limit": 20 * GiB, "message": "ok"},
        {"name": "max-p99-ms", "status": "fail", "measured": 12.3, "limit": 10.0,
         "message": "p99 12.3 ms at 4 predictors > 10 ms"},
        {"name": "forbid:foreign-process", "status": "fail", "measured": 1, "limit": 0,
         "message": "FOREIGN_PROCESS <b>fired</b>"},
        {"name": "min-throughput", "status": "unmeasured", "measured": Unavailable(ERROR, "no steps"),
         "limit": 800, "message": "could not measure"}]}
    run_path = os.path.join(directory, "run.json")
    samples_path = os.path.join(directory, "samples.jsonl")
    if samples:
        write_samples(samples_path, record, gpu=True, interval_s=interval_s)
    save_run(record, run_path)
    return record, run_path, samples_path


def cpu_run(directory: str, *, model: str = "resnet18 (built-in)", counts: tuple[int, ...] = CPU_COUNTS,
            step_s: float = 2.0, interval_s: float = 0.05) -> tuple[RunRecord, str, str]:
    """A complete CPU sweep, clean (a single info finding)."""
    os.makedirs(directory, exist_ok=True)
    record = _base_record(False, model, counts)
    t = 0.5
    for n in counts:
        record.steps.append(_cpu_step(n, t, t + step_s))
        t += step_s + 0.2
    record.findings = [Finding("THROUGHPUT_PLATEAU", "info", "throughput stops growing at 2 predictors (240 requests/s)",
                               {"best_rps": 240.0, "knee_predictors": 2}, "Run 2 predictors.", at_predictors=2)]
    record.recommendation = {"predictors": 2, "reason": "throughput stops growing after 2 predictors",
                             "memory_bytes": CPU_RSS_BASE, "more_would_fit": True}
    run_path = os.path.join(directory, "run.json")
    samples_path = os.path.join(directory, "samples.jsonl")
    write_samples(samples_path, record, gpu=False, interval_s=interval_s)
    save_run(record, run_path)
    return record, run_path, samples_path


def interrupted_run(directory: str, *, gpu: bool = True) -> tuple[RunRecord, str, str]:
    """Ctrl-C during the first step: no steps, no findings, a samples file with a torn last line."""
    os.makedirs(directory, exist_ok=True)
    record = _base_record(gpu, EVIL_NAME, GPU_COUNTS)
    record.status = STATUS_INTERRUPTED
    record.ended_at = None
    samples_path = os.path.join(directory, "samples.jsonl")
    # samples as if the first step had begun
    shadow = _base_record(gpu, EVIL_NAME, (1,))
    shadow.steps = [_gpu_step(1, 0.5, 2.5) if gpu else _cpu_step(1, 0.5, 2.5)]
    write_samples(samples_path, shadow, gpu=gpu, interval_s=0.05, tear_last_line=True, stop_after_s=1.2)
    run_path = os.path.join(directory, "run.json")
    save_run(record, run_path)
    return record, run_path, samples_path


def unavailable_run(directory: str) -> tuple[RunRecord, str, str]:
    """A GPU run where nothing could be read (no permission everywhere) and no samples file."""
    os.makedirs(directory, exist_ok=True)
    record = _base_record(True, "mypkg.serving:load_model", (1, 2))
    nope = Unavailable(NO_PERMISSION, "NVML: insufficient permissions")
    for i, n in enumerate((1, 2)):
        record.steps.append(Step(predictors=n, requests=0, errors=5, throughput_rps=0.0,
                                 latency_ms={"p50": nope, "p99": nope},
                                 memory={k: nope for k in ("process_gpu_bytes", "device_used_bytes",
                                                           "device_total_bytes", "driver_reserved_bytes",
                                                           "torch_allocated_bytes", "torch_reserved_bytes",
                                                           "other_processes_bytes", "rss_bytes", "uss_bytes",
                                                           "model_bytes")} | {"layers": {}},
                                 cpu_util_pct=nope, started_s=i * 2.0, ended_s=i * 2.0 + 1.5))
    record.devices = [{"index": 0, "name": nope, "total_bytes": nope, "driver": nope, "uuid": nope}]
    record.environment = {"gpuscope": "0.1.0", "torch": nope, "cuda": nope, "python": "3.11", "driver": nope,
                          "memory_env": nope}
    record.model = {"source": "mypkg.serving:load_model", "param_bytes": nope, "buffer_bytes": nope}
    record.processes = [{"pid": PID, "name": "python", "user": nope, "cmdline": nope, "engines": nope,
                         "gpu": 0, "peak_used_bytes": nope, "self": True, "exists": True}]
    run_path = os.path.join(directory, "run.json")
    save_run(record, run_path)
    return record, run_path, os.path.join(directory, record.samples)


def write_long_samples(path: str, *, hours: float = 24.0, interval_s: float = 1.0, pid: int = PID,
                       gpu: bool = True) -> int:
    """A `watch`-style samples file: hours of ticks at interval_s with a few spikes. Returns the tick count.

    Lines are written in one buffered pass (the same line format SampleWriter writes) so that
    building 86,400 ticks stays well under a second or two.
    """
    ticks = int(hours * 3600 / interval_s)
    header = {"schema": SAMPLES_SCHEMA, "started_at": "2025-01-02T00:00:00+00:00", "t0_ns": T0_NS,
              "interval_s": interval_s, "pid": pid, "mode": "watch"}
    dumps = json.dumps
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(dumps(header) + "\n")
        for i in range(ticks):
            t_ns = T0_NS + int(i * interval_s * 1e9)
            load = 1 + (i // 3600) % 4          # the load changes every hour
            spike = 1500 * MiB if i % 9973 == 0 else 0  # rare, single-tick spikes must survive downsampling
            allocated = MODEL_BYTES + load * 150 * MiB + (i % 13) * MiB
            reserved = allocated + 300 * MiB + spike
            process = reserved + CONTEXT_BYTES + load * PER_PREDICTOR_OUTSIDE
            v: dict[str, Any] = {"host": {"cpu_util_pct": 30.0 + load, "mem_used_bytes": 40 * GiB},
                                 f"pid:{pid}": {"cpu_util_pct": 80.0 * load, "num_threads": 20 + load,
                                                "rss_bytes": 3 * GiB + load * MiB, "uss_bytes": 2 * GiB}}
            if gpu:
                other = OTHER_PROCESS_BYTES if (i // 7200) % 2 else 0
                used = process + other + DRIVER_RESERVED
                v["gpu:0"] = {"total_bytes": GPU_TOTAL, "used_bytes": used, "free_bytes": GPU_TOTAL - used,
                              "driver_reserved_bytes": DRIVER_RESERVED, "util_pct": 40 + load,
                              "process_count": 2 if other else 1}
                v[f"pid:{pid}/gpu:0"] = {"used_bytes": process, "sm_util_pct": 40, "torch_allocated_bytes": allocated,
                                         "torch_reserved_bytes": reserved,
                                         "torch_peak_allocated_bytes": allocated,
                                         "torch_peak_reserved_bytes": reserved}
                if other:
                    v[f"pid:{OTHER_PID}/gpu:0"] = {"used_bytes": other, "sm_util_pct": 3}
            fh.write(dumps(reading_to_json({"t_ns": t_ns, "v": v}), separators=(",", ":")) + "\n")
    return ticks


def long_watch_run(directory: str, *, hours: float = 24.0) -> tuple[RunRecord, str, str]:
    """A 24-hour `watch` at 1 s: no sweep steps, one finding with a moment in time."""
    os.makedirs(directory, exist_ok=True)
    record = _base_record(True, "watched pid 4242", ())
    record.mode = "watch"
    record.config.update(interval_s=1.0, predictors=[])
    record.findings = [Finding("CACHE_BLOAT", "warn", "the allocator cache holds 1.8 GiB (62% of reserved)",
                               {"allocator_cache_bytes": 1800 * MiB, "t_s": 9973.0}, "Call empty_cache() between "
                               "phases if other processes must share the card.")]
    samples_path = os.path.join(directory, "samples.jsonl")
    write_long_samples(samples_path, hours=hours)
    run_path = os.path.join(directory, "run.json")
    save_run(record, run_path)
    return record, run_path, samples_path
