"""Readings: a number with its unit in its metric name, or an explicit Unavailable.

Why a separate type rather than None/NaN: a profiler that prints 0 MiB for
"could not read" sends people chasing phantom savings. `Unavailable` carries
the reason so reports can say *why* a figure is missing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

# The closed set of reasons a reading can be missing (DESIGN.md, data model).
NO_DEVICE = "no_device"
NOT_SUPPORTED = "not_supported"
NO_PERMISSION = "no_permission"
PROCESS_GONE = "process_gone"
NOT_INITIALIZED = "not_initialized"
ERROR = "error"
REASONS = (NO_DEVICE, NOT_SUPPORTED, NO_PERMISSION, PROCESS_GONE, NOT_INITIALIZED, ERROR)


@dataclass(frozen=True)
class Unavailable:
    """A reading that could not be taken, and why."""

    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown Unavailable reason {self.reason!r}")

    def __bool__(self) -> bool:  # so `if reading:` never treats it as data
        return False

    def __str__(self) -> str:
        return f"unavailable ({self.reason}{': ' + self.detail if self.detail else ''})"

    def to_json(self) -> dict[str, str]:
        out = {"unavailable": self.reason}
        if self.detail:
            out["detail"] = self.detail
        return out


Number = Union[int, float]
Reading = Union[int, float, Unavailable]


def is_available(value: Any) -> bool:
    """True for a real number (bools excluded), False for Unavailable/None."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def reading_to_json(value: Any) -> Any:
    """Encode a reading (or any nested structure holding readings) for JSON.

    The exact built-in types come first, by `type(...) is`: records of 64 processes are encoded at
    each exporter refresh, and isinstance checks in order cost several times more per value. Their
    subclasses (numpy's float64, an OrderedDict) take the general checks below, with the same result.
    """
    kind = type(value)
    if kind is int or kind is str or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else {"unavailable": ERROR, "detail": f"not a finite number ({value})"}
    if kind is dict:
        return {k: reading_to_json(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [reading_to_json(v) for v in value]
    if isinstance(value, Unavailable):
        return value.to_json()
    if isinstance(value, dict):
        return {k: reading_to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [reading_to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):  # JSON has no NaN/Infinity; never write them
        return {"unavailable": ERROR, "detail": f"not a finite number ({value})"}
    return value


def reading_from_json(value: Any) -> Any:
    """Inverse of `reading_to_json`: {"unavailable": r} dicts become Unavailable."""
    if isinstance(value, dict):
        if "unavailable" in value and set(value) <= {"unavailable", "detail"}:
            return Unavailable(str(value["unavailable"]), str(value.get("detail", "")))
        return {k: reading_from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [reading_from_json(v) for v in value]
    return value


def max_reading(values: list[Any]) -> Reading:
    """Largest available value; the first Unavailable if none is available."""
    nums = [v for v in values if is_available(v)]
    if nums:
        return max(nums)
    for v in values:
        if isinstance(v, Unavailable):
            return v
    return Unavailable(ERROR, "no readings")
