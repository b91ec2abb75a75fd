"""Byte sizes and latencies for humans, and parsing the sizes and durations humans write (`20GiB`, `50ms`)."""
from __future__ import annotations

import math
import numbers
import re
from typing import Any

KiB = 1024
MiB = 1024**2
GiB = 1024**3

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": KiB,
    "m": 1000**2, "mb": 1000**2, "mib": MiB,
    "g": 1000**3, "gb": 1000**3, "gib": GiB,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse `20GiB`, `512MiB`, `1.5GB`, `1048576` into bytes; ValueError if malformed."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (expected e.g. 512MiB, 20GiB)")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} in {text!r} (use B, KiB, MiB, GiB, TiB, KB, MB, GB)")
    return int(float(number) * factor)


def format_bytes(num_bytes: float) -> str:
    """`1.5 GiB`, `612 MiB`, `4.0 KiB`: binary units, like nvidia-smi's MiB."""
    value = float(num_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value >= GiB:
        return f"{sign}{value / GiB:.2f} GiB"
    if value >= MiB:
        return f"{sign}{value / MiB:.0f} MiB" if value >= 100 * MiB else f"{sign}{value / MiB:.1f} MiB"
    if value >= KiB:
        return f"{sign}{value / KiB:.1f} KiB"
    return f"{sign}{value:.0f} B"


def format_ms(value_ms: Any) -> str:
    """`123 ms`, `18.0 ms`, `0.45 ms`, `85 us`: the digits that matter for a latency. Sub-millisecond models
    are common on a GPU and on small CPU models; a fixed `.1f` printed their p50 as "0.0 ms". Anything but a
    finite number (None from an old or damaged run.json, NaN, an Unavailable) is "n/a", never an error."""
    if isinstance(value_ms, bool) or not isinstance(value_ms, numbers.Real) or not math.isfinite(value_ms):
        return "n/a"
    value = float(value_ms)
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 10:
        return f"{value:.1f} ms"
    if value >= 0.1:
        return f"{value:.2f} ms"
    return f"{value * 1000:.0f} us"


_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|)\s*$")


def parse_duration_s(text: str) -> float:
    """Parse `50ms`, `1s`, `10m`, `2h`, `0.5` (seconds) into seconds."""
    match = _DURATION_RE.match(str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (expected e.g. 50ms, 1s, 10m)")
    number, unit = match.groups()
    scale = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0}[unit]
    return float(number) * scale
