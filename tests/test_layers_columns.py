"""record/layers.py's columnar attribution (`column_layers`, `column_cpu_layers`) gives, tick by tick,
exactly what the scalar one (`tick_layers(device_tick(...))`, `cpu_layers`) gives: the same keys and the
same bytes. The report's timeline uses the columnar form; the run's StepMonitor the scalar one."""
from __future__ import annotations

import random
from typing import Any

import numpy as np

from gpuscope.probes.readings import NO_PERMISSION, NOT_SUPPORTED, Unavailable
from gpuscope.record.layers import (
    column_cpu_layers,
    column_layers,
    cpu_layers,
    device_columns,
    device_tick,
    tick_layers,
)

PID, GPU = 77, 1
MiB = 1024**2
KEYS = [
    (f"pid:{PID}/gpu:{GPU}", "used_bytes"), (f"pid:{PID}/gpu:{GPU}", "torch_allocated_bytes"),
    (f"pid:{PID}/gpu:{GPU}", "torch_reserved_bytes"), (f"gpu:{GPU}", "used_bytes"),
    (f"gpu:{GPU}", "driver_reserved_bytes"), (f"gpu:{GPU}", "process_count"),
    (f"pid:5/gpu:{GPU}", "used_bytes"), (f"pid:6/gpu:{GPU}", "used_bytes"),
    (f"pid:{PID}/gpu:0", "used_bytes"), ("gpu:0", "used_bytes"), (f"pid:{PID}", "rss_bytes"),
    (f"pid:{PID}/gpu:{GPU}", "sm_util_pct"),
]


def _reading(rng: random.Random, metric: str) -> Any:
    """A reading as a samples file can hold it: absent, unavailable, 0, an int, a float with a fraction."""
    roll = rng.random()
    if roll < 0.12:
        return None
    if roll < 0.2:
        return Unavailable(rng.choice([NO_PERMISSION, NOT_SUPPORTED]))
    if metric == "process_count":
        return rng.choice([0, 0, 1, 2, 3, 0.0])
    if roll < 0.25:
        return 0
    value = rng.randrange(0, 8_000) * MiB + rng.randrange(0, MiB)
    return value + 0.5 if roll > 0.9 else value


def _as_float(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def test_column_layers_agree_with_tick_layers_exactly_tick_by_tick() -> None:
    rng = random.Random(17)
    ticks = 4000
    rows = [{key: _reading(rng, key[1]) for key in KEYS} for _ in range(ticks)]
    # some ticks shaped like the branches that matter: NVML lists nobody, torch above NVML, no torch figures
    for row in rows[:300]:
        row[KEYS[0]], row[KEYS[5]], row[KEYS[3]] = None, 0, 60_000 * MiB
    for row in rows[300:600]:
        row[KEYS[0]], row[KEYS[1]], row[KEYS[2]] = 1_000 * MiB, 900 * MiB, 1_200 * MiB
    columns = {key: np.array([_as_float(row[key]) for row in rows]) for key in KEYS}
    for model in (None, 0, 512 * MiB, 5_000 * MiB + 0.5, Unavailable(NOT_SUPPORTED)):
        got = column_layers(device_columns(columns, PID, GPU, ticks), model)
        branches = set()
        for i, row in enumerate(rows):
            expected = tick_layers(device_tick([(s, m, v) for (s, m), v in row.items() if v is not None], PID, GPU),
                                   model)
            actual = {key: int(values[i]) for key, (values, present) in got.items() if present[i]}
            assert actual == expected, (i, row)
            branches.add(tuple(sorted(expected)))
        assert len(branches) >= 6  # every branch of the attribution was exercised


def test_column_layers_without_a_profiled_pid_count_everyone_as_other() -> None:
    columns = {(f"pid:{PID}/gpu:0", "used_bytes"): np.array([5.0, np.nan]),
               ("gpu:0", "process_count"): np.array([1.0, 1.0])}
    got = column_layers(device_columns(columns, None, 0, 2), None)
    assert {k for k, (_v, p) in got.items() if p.any()} == set()  # no process of ours: no layers, as tick_layers
    assert tick_layers(device_tick([(f"pid:{PID}/gpu:0", "used_bytes", 5)], None, 0), None) == {}


def test_column_cpu_layers_agree_with_cpu_layers() -> None:
    rng = random.Random(3)
    rss = [_reading(rng, "rss_bytes") for _ in range(2000)]
    for model in (None, 700 * MiB, 10**12):
        got = column_cpu_layers(np.array([_as_float(v) for v in rss]), model)
        for i, value in enumerate(rss):
            actual = {key: int(values[i]) for key, (values, present) in got.items() if present[i]}
            assert actual == cpu_layers(value, model)
