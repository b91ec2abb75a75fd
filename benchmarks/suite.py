"""The benchmark suite. Each benchmark returns a JSON-able dict and prints a table."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Echo = Callable[[str], None]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _machine() -> dict[str, Any]:
    import psutil
    import torch

    from gpuscope.probes.host import usable_cores

    return {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "logical_cores": os.cpu_count(), "usable_cores": usable_cores(),
            "memory_bytes": psutil.virtual_memory().total, "gpu": torch.cuda.is_available(),
            "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _model(device: str) -> Any:
    from gpuscope.measure.models import load_model

    return load_model("builtin:mlp", device, size="small")


def _device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _probes(pid: int, device: str) -> dict[str, Any]:
    """The probes a diagnose run uses on this machine."""
    from gpuscope.probes.host import HostProbe

    probes: dict[str, Any] = {"host": HostProbe(pid)}
    if device.startswith("cuda"):
        from gpuscope.probes.allocator import AllocatorProbe, RealTorchCuda
        from gpuscope.probes.gpu import GpuProbe
        from gpuscope.probes.nvml import open_backend

        probes["gpu"] = GpuProbe(open_backend())
        probes["allocator"] = AllocatorProbe(RealTorchCuda(), {0: f"pid:{pid}/gpu:0"})
    return probes


# ---------------------------------------------------------------- 1. sampler overhead

def bench_sampler_overhead(quick: bool, echo: Echo) -> dict[str, Any]:
    """Throughput with the sampler at 50/10/5 ms vs without, interleaved A B A B."""
    from gpuscope.measure.workload import PredictorPool
    from gpuscope.probes.samplefile import SampleWriter
    from gpuscope.probes.sampler import PeakTracker, Sampler

    device = _device()
    model = _model(device)
    pool = PredictorPool(model)
    pairs = 5
    step_s = 1.0 if quick else 2.0
    intervals = (0.05, 0.01, 0.005)
    rows = []
    tmp = tempfile.mkdtemp(prefix="gpuscope-bench-")
    for predictors in (1, 2):
        for interval in intervals:
            without, with_sampler = [], []
            for pair in range(pairs):
                run = pool.run_step(predictors, step_s, warmup_s=0.3, window_s=step_s)
                without.append(run.requests / run.duration_s)
                writer = SampleWriter(os.path.join(tmp, f"s-{predictors}-{interval}-{pair}.jsonl"), {"t0_ns": 0})
                sampler = Sampler(_probes(os.getpid(), device), interval, writer, [PeakTracker()])
                sampler.start()
                run = pool.run_step(predictors, step_s, warmup_s=0.3, window_s=step_s)
                sampler.stop()
                writer.close()
                with_sampler.append(run.requests / run.duration_s)
            ratio = _median(with_sampler) / _median(without)
            rows.append({"predictors": predictors, "interval_ms": interval * 1000, "pairs": pairs,
                         "without_rps": _median(without), "with_rps": _median(with_sampler), "ratio": ratio,
                         "target": 0.98 if interval == 0.05 else None})
            echo(f"  sampler {interval * 1000:4.0f} ms, {predictors} predictor(s): {_median(with_sampler):8.1f} vs "
                 f"{_median(without):8.1f} req/s  ratio {ratio:.3f}")
    return {"rows": rows, "device": device}


# ---------------------------------------------------------------- 2. harness efficiency

def _bare_loop(model: Any, threads: int, seconds: float) -> float:
    """The same model called back to back on `threads` plain threads: the ceiling for the pool."""
    import torch

    from gpuscope.measure.models import make_input

    counts = [0] * threads
    stop = threading.Event()
    start = threading.Barrier(threads + 1)

    def worker(index: int) -> None:
        with torch.inference_mode():
            x = make_input(model)
            cuda = model.device.startswith("cuda")
            start.wait()
            while not stop.is_set():
                model.module(x)
                if cuda:
                    torch.cuda.current_stream().synchronize()
                counts[index] += 1

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    start.wait()
    time.sleep(0.3)  # warm-up, as the pool gets
    begin_count, begin = sum(counts), time.perf_counter()
    time.sleep(seconds)
    done, elapsed = sum(counts) - begin_count, time.perf_counter() - begin
    stop.set()
    for thread in pool:
        thread.join()
    return done / elapsed


def bench_harness(quick: bool, echo: Echo) -> dict[str, Any]:
    from gpuscope.measure.workload import PredictorPool

    model = _model(_device())
    pool = PredictorPool(model)
    pairs = 5
    step_s = 1.0 if quick else 2.0
    rows = []
    for threads in (1, 2):
        bare, pooled = [], []
        for _ in range(pairs):
            bare.append(_bare_loop(model, threads, step_s))
            run = pool.run_step(threads, step_s, warmup_s=0.3, window_s=step_s)
            pooled.append(run.requests / run.duration_s)
        ratio = _median(pooled) / _median(bare)
        rows.append({"threads": threads, "pairs": pairs, "bare_rps": _median(bare), "pool_rps": _median(pooled),
                     "ratio": ratio, "target": 0.95})
        echo(f"  pool vs bare loop, {threads} thread(s): {_median(pooled):8.1f} vs {_median(bare):8.1f} req/s  "
             f"ratio {ratio:.3f}")
    return {"rows": rows}


# ---------------------------------------------------------------- 3. tick cost

def bench_tick_cost(quick: bool, echo: Echo) -> dict[str, Any]:
    """Per-probe cost of one tick (wall and CPU), over 1,000 ticks, on an idle process with torch loaded."""
    import torch  # noqa: F401  (loaded, as in a real run: it changes /proc costs)

    from gpuscope.probes.samplefile import SampleWriter
    from gpuscope.probes.sampler import PeakTracker, Sampler

    sys.path.insert(0, REPO)
    ticks = 300 if quick else 1000
    device = _device()
    probes = _probes(os.getpid(), device)
    # Ticks run back to back here; a simulated 50 ms clock makes the host probe read USS as often
    # as it would in a real run (every 2 s = every 40th tick), so the average is honest.
    from gpuscope.probes.host import HostProbe

    simulated = {"now": 0.0}

    def clock_s() -> float:
        simulated["now"] += 0.05
        return simulated["now"]

    probes["host"] = HostProbe(os.getpid(), clock_s=clock_s)
    source = "real NVML" if "gpu" in probes else "replayed H200 readings (no GPU here)"
    if "gpu" not in probes:
        from gpuscope.probes.allocator import AllocatorProbe
        from gpuscope.probes.gpu import GpuProbe
        from tests.fakes.nvml import ReplayNvml
        from tests.fakes.torch_cuda import FakeTorchCuda

        replay = ReplayNvml()
        probes["gpu"] = GpuProbe(replay, describe=lambda pid, name: _fake_describe(pid, name))
        torch_fake = FakeTorchCuda.from_timeline()
        probes["allocator"] = AllocatorProbe(torch_fake, {0: f"pid:{os.getpid()}/gpu:0"})
    tmp = tempfile.mkdtemp(prefix="gpuscope-bench-")
    writer = SampleWriter(os.path.join(tmp, "samples.jsonl"), {"t0_ns": 0})
    sampler = Sampler(probes, 0.05, writer, [PeakTracker()])
    for _ in range(ticks):
        sampler.tick()
        if "gpu" in probes and hasattr(probes["gpu"], "_backend") and hasattr(probes["gpu"]._backend, "advance"):
            probes["gpu"]._backend.advance()
    writer.close()
    per_probe = {name: cost / ticks / 1000 for name, cost in sampler.probe_cost_ns.items()}
    result = {"ticks": ticks, "gpu_source": source, "mean_tick_wall_us": sampler.mean_tick_cost_us,
              "mean_tick_cpu_us": sampler.mean_tick_cpu_us, "per_probe_wall_us": per_probe, "target_us": 1000}
    echo(f"  {ticks} ticks: {sampler.mean_tick_cost_us:.0f} us wall, {sampler.mean_tick_cpu_us:.0f} us CPU per tick; "
         + ", ".join(f"{k} {v:.0f} us" for k, v in per_probe.items()) + f" (GPU probes: {source})")
    return result


def _fake_describe(pid: int, name: str) -> Any:
    from gpuscope.probes.processes import ProcessInfo

    return ProcessInfo(pid, True, name or "python3", "root", "python3 serve.py", ("torch",), {})


# ---------------------------------------------------------------- 4. time to answer

def bench_time_to_answer(quick: bool, echo: Echo) -> dict[str, Any]:
    """`gpuscope diagnose` with defaults, wall time, and the share spent outside measured windows."""
    import json

    out = tempfile.mkdtemp(prefix="gpuscope-bench-diag-")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gpuscope", "diagnose", "--out", out, "--quiet"],
                          cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-500:], "wall_s": wall}
    with open(os.path.join(out, "run.json"), encoding="utf-8") as fh:
        run = json.load(fh)
    measured = sum(step["duration_s"] for step in run["steps"])
    warmup = run["config"]["warmup_s"] * len(run["steps"])
    result = {"wall_s": wall, "measured_s": measured, "warmup_s": warmup, "steps": len(run["steps"]),
              "outside_measured_share": 1 - measured / wall, "target_s": 60}
    echo(f"  diagnose (defaults): {wall:.1f} s wall, {measured:.1f} s measured in {len(run['steps'])} steps, "
         f"{warmup:.1f} s warm-up; {result['outside_measured_share']:.0%} outside the measured windows")
    return result


# ---------------------------------------------------------------- 5. scale

def _synthetic_run(out_dir: str, seconds: int, interval_s: float) -> Any:
    """A watch-like run: `seconds / interval_s` ticks of realistic GPU readings, written as a real sampler would."""
    from gpuscope.probes.samplefile import SampleWriter
    from gpuscope.record.run import RunRecord, Step

    pid = 4242
    ticks = int(seconds / interval_s)
    writer = SampleWriter(os.path.join(out_dir, "samples.jsonl"), {"t0_ns": 0, "interval_s": interval_s, "pid": pid})
    mib = 1024**2
    for i in range(ticks):
        t_ns = int(i * interval_s * 1e9)
        wave = (i % 600) / 600
        writer.write({"t_ns": t_ns, "v": {
            "host": {"cpu_util_pct": 40.0 + 20 * wave, "mem_used_bytes": 8_000 * mib},
            f"pid:{pid}": {"rss_bytes": int((900 + 50 * wave) * mib), "cpu_util_pct": 95.0, "num_threads": 24},
            "gpu:0": {"total_bytes": 143_771 * mib, "used_bytes": int((4_000 + 600 * wave) * mib),
                      "free_bytes": int((139_771 - 600 * wave) * mib), "driver_reserved_bytes": 615 * mib, "util_pct": 70},
            f"pid:{pid}/gpu:0": {"used_bytes": int((3_385 + 600 * wave) * mib), "sm_util_pct": 68,
                                  "torch_allocated_bytes": int((1_200 + 500 * wave) * mib),
                                  "torch_reserved_bytes": int((2_600 + 600 * wave) * mib)},
        }})
    writer.close()
    record = RunRecord(tool_version="bench", started_at="2026-11-26T00:00:00+00:00", status="complete", pid=pid,
                       mode="watch", config={"device": "cuda:0", "gpu_index": 0, "interval_s": interval_s},
                       model={"source": "synthetic", "model_bytes": 512 * mib},
                       devices=[{"index": 0, "name": "NVIDIA H200", "total_bytes": 143_771 * mib}])
    record.steps = [Step(predictors=1, requests=1, duration_s=float(seconds), throughput_rps=1.0,
                         latency_ms={"p50": 1.0, "p99": 2.0}, memory={}, started_s=0.0, ended_s=float(seconds))]
    return record, ticks


def bench_scale(quick: bool, echo: Echo) -> dict[str, Any]:
    from gpuscope.record.run import save_run

    cases = [("1 h at 1 s", 3600, 1.0), ("10 min at 5 ms", 600, 0.005), ("24 h at 1 s", 86400, 1.0)]
    if quick:
        cases = cases[:2]
    rows = []
    for label, seconds, interval in cases:
        out = tempfile.mkdtemp(prefix="gpuscope-bench-scale-")
        record, ticks = _synthetic_run(out, seconds, interval)
        save_run(record, os.path.join(out, "run.json"))
        started = time.perf_counter()
        try:
            from gpuscope.reports.render import render_report

            render_report(record, out, os.path.join(out, "samples.jsonl"))
            render_s: float | None = time.perf_counter() - started
        except ImportError:
            render_s = None
        row = {"case": label, "ticks": ticks, "samples_bytes": os.path.getsize(os.path.join(out, "samples.jsonl")),
               "run_json_bytes": os.path.getsize(os.path.join(out, "run.json")), "render_s": render_s,
               "target_render_s": 5.0 if "24 h" in label else None}
        rows.append(row)
        echo(f"  {label}: {ticks} ticks, samples.jsonl {row['samples_bytes'] / 1e6:.1f} MB, run.json "
             f"{row['run_json_bytes'] / 1e3:.1f} kB, report rendered in "
             + (f"{render_s:.2f} s" if render_s is not None else "n/a"))
    return {"rows": rows, "sampler_memory": _sampler_memory(quick, echo)}


def _sampler_memory(quick: bool, echo: Echo) -> dict[str, Any]:
    """Python heap held by a sampler with its trackers after 2,000 vs 20,000 ticks: it must not grow with the run."""
    from gpuscope.probes.samplefile import SampleWriter
    from gpuscope.probes.sampler import PeakTracker, Sampler

    class SyntheticProbe:
        def __init__(self) -> None:
            self.i = 0

        def read(self) -> list[tuple[str, str, Any]]:
            self.i += 1
            return [("gpu:0", "used_bytes", 1000 + self.i % 97), ("pid:1/gpu:0", "used_bytes", 500 + self.i % 13),
                    ("host", "cpu_util_pct", float(self.i % 100))]

    out = tempfile.mkdtemp(prefix="gpuscope-bench-mem-")
    writer = SampleWriter(os.path.join(out, "samples.jsonl"), {"t0_ns": 0})
    sampler = Sampler({"synthetic": SyntheticProbe()}, 0.05, writer, [PeakTracker()])
    tracemalloc.start()
    checkpoints = {}
    total = 20_000 if not quick else 10_000
    for i in range(1, total + 1):
        sampler.tick()
        if i in (2_000, total):
            checkpoints[i] = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    writer.close()
    growth = checkpoints[total] - checkpoints[2_000]
    echo(f"  sampler heap after 2,000 ticks {checkpoints[2_000] / 1e3:.1f} kB, after {total:,} "
         f"{checkpoints[total] / 1e3:.1f} kB (growth {growth / 1e3:.1f} kB)")
    return {"ticks": total, "heap_bytes_at_2000": checkpoints[2_000], "heap_bytes_at_end": checkpoints[total],
            "growth_bytes": growth}


BENCHMARKS: dict[str, Callable[[bool, Echo], dict[str, Any]]] = {
    "tick_cost": bench_tick_cost,
    "scale": bench_scale,
    "harness": bench_harness,
    "sampler_overhead": bench_sampler_overhead,
    "time_to_answer": bench_time_to_answer,
}


def run_all(quick: bool, only: list[str] | None, echo: Echo) -> dict[str, Any]:
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    results: dict[str, Any] = {"machine": _machine(), "quick": quick, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    echo(f"machine: {results['machine']}")
    for name, bench in BENCHMARKS.items():
        if only and name not in only:
            continue
        echo(f"{name}:")
        started = time.perf_counter()
        results[name] = bench(quick, echo)
        results[name]["bench_s"] = round(time.perf_counter() - started, 1)
    return results
