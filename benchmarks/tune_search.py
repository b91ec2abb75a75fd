"""`gpuscope tune` against a full grid (issue 15's target): on the built-in model, tune's best must be within 5%
of the full grid's best over the same space, found in at most half the grid's time.

Both walk the same space (predictor counts x intra-op threads) with the same measurer (measure/tuning.py's
InProcessMeasurer on one loaded model, the same step plan): the grid measures every cell, tune asks the search
(analysis/search.py). Measured once each, two winners can differ by the machine's noise alone, so both winners
are then measured again in alternation (`recheck` pairs) and compared on their medians: that ratio is the
quality figure. Time is each walk's wall time.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any, Callable

Echo = Callable[[str], None]


def bench_tune_search(quick: bool, echo: Echo) -> dict[str, Any]:
    import torch

    from gpuscope.analysis.search import Constraints, Group, Search, Settings, Space
    from gpuscope.measure.attribution import StepMonitor
    from gpuscope.measure.models import load_model
    from gpuscope.measure.sweep import SweepHooks
    from gpuscope.measure.tuning import InProcessMeasurer, StepPlan
    from gpuscope.measure.workload import PredictorPool
    from gpuscope.probes.host import usable_cores

    torch_default = torch.get_num_threads()
    cores = usable_cores()
    counts = (1, 2, 3, 4, 6, 8)
    threads = tuple(sorted({1, torch_default, max(1, cores // 2)}))
    space = Space(counts, (Group(torch_default), *(Group(t) for t in threads if t != torch_default)))
    plan = StepPlan(max_step_s=2.0, warmup_s=0.3, window_s=0.5)
    model = load_model("builtin:mlp", "cpu", None, None, "small", False)
    stop = threading.Event()
    monitor = StepMonitor(os.getpid(), None, model.model_bytes)
    clock = time.monotonic

    def hooks() -> SweepHooks:
        return SweepHooks(mark=lambda *a, **k: time.monotonic_ns(), tick=lambda: None, t0_ns=time.monotonic_ns())

    measurer = InProcessMeasurer({False: PredictorPool(model)}, monitor, plan, hooks, stop, torch.set_num_threads, clock)

    def measure(s: Settings) -> Any:
        m, _ = measurer.measure(s)
        return m

    try:
        # ---- the full grid
        started = clock()
        grid = [measure(s) for s in space.cells()]
        grid_s = clock() - started
        grid_best = max(grid, key=lambda m: m.throughput_rps)
        echo(f"  grid: {len(grid)} configurations in {grid_s:.1f} s, best {grid_best.settings.label()} "
             f"{grid_best.throughput_rps:.1f} req/s")
        # ---- tune's search, with a budget as large as the grid's time (it must stop well before)
        search = Search(space, Constraints(), budget_s=grid_s * 10, step_estimate_s=plan.estimate_s)
        started = clock()
        while (s := search.next(clock() - started)) is not None:
            search.record(measure(s))
        tune_s = clock() - started
        tune_best = search.best()
        assert tune_best is not None
        echo(f"  tune: {search.measured_count} configurations in {tune_s:.1f} s, best {tune_best.settings.label()} "
             f"{tune_best.measurement.throughput_rps:.1f} req/s")
        # ---- the two winners again, in alternation
        pairs = 2 if quick else 4
        again: dict[str, list[float]] = {"grid": [], "tune": []}
        for _ in range(pairs):
            again["grid"].append(measure(grid_best.settings).throughput_rps)
            again["tune"].append(measure(tune_best.settings).throughput_rps)
        grid_rps, tune_rps = statistics.median(again["grid"]), statistics.median(again["tune"])
        ratio = tune_rps / grid_rps if grid_rps > 0 else 0.0
        same = tune_best.settings == grid_best.settings
        spread = {k: (max(v) - min(v)) / statistics.median(v) if statistics.median(v) > 0 else None
                  for k, v in again.items()}
        echo(f"  rechecked ({pairs} alternating pairs): tune's pick {tune_rps:.1f} vs grid's {grid_rps:.1f} req/s "
             f"= {ratio:.3f} (target >= 0.95){' (same configuration)' if same else ''}; time {tune_s / grid_s:.2f} "
             f"of the grid's (target <= 0.5); spread of the rechecks {spread['grid']:.0%} / {spread['tune']:.0%}")
        return {"counts": list(counts), "threads": list(threads), "grid_configurations": len(grid),
                "grid_s": round(grid_s, 2), "tune_configurations": search.measured_count, "tune_s": round(tune_s, 2),
                "time_ratio": round(tune_s / grid_s, 3), "time_target": 0.5,
                "grid_best": grid_best.settings.to_json(), "grid_best_rps": grid_best.throughput_rps,
                "tune_best": tune_best.settings.to_json(), "tune_best_rps": tune_best.measurement.throughput_rps,
                "same_configuration": same, "recheck_pairs": pairs, "recheck_grid_rps": again["grid"],
                "recheck_tune_rps": again["tune"], "quality_ratio": round(ratio, 3), "quality_target": 0.95,
                "recheck_spread": spread,
                "skipped": [o.reason for o in search.configurations() if o.status == "skipped"],
                "grid": [{"settings": m.settings.to_json(), "throughput_rps": m.throughput_rps, "p99_ms": m.p99_ms}
                         for m in grid]}
    finally:
        torch.set_num_threads(torch_default)
