"""Parsing and validating the sweep's options, shared by `diagnose` and `check`."""
from __future__ import annotations

from dataclasses import dataclass

from gpuscope.probes.units import parse_duration_s
from gpuscope.record.errors import UsageError

MAX_PREDICTORS = 1024  # threads per step; beyond this a machine runs out of threads before it says anything useful


def parse_predictors(text: str | None) -> tuple[int, ...] | None:
    """`1,2,4,8` -> (1, 2, 4, 8); None when the flag was not given (the default sweep).

    Rejects 0, negatives, words and empty items with one clear line; also an empty value, which is
    what an unset shell variable (`--predictors "$P"`) gives: running the default sweep instead
    would hide the mistake behind a longer run.
    """
    if text is None:
        return None
    if not str(text).strip():
        raise UsageError("--predictors is empty (expected e.g. 1,2,4,8; leave the flag out for the default sweep)")
    counts = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            raise UsageError(f"--predictors {text!r}: empty item (expected e.g. 1,2,4,8)")
        try:
            value = int(item)
        except ValueError:
            raise UsageError(f"--predictors {text!r}: {item!r} is not a whole number") from None
        if value < 1:
            raise UsageError(f"--predictors {text!r}: each count must be at least 1, got {value}")
        if value > MAX_PREDICTORS:
            raise UsageError(f"--predictors {text!r}: at most {MAX_PREDICTORS} predictor threads, got {value}")
        counts.append(value)
    return tuple(sorted(set(counts)))


def parse_seconds(name: str, text: str | float | None, minimum: float = 0.0) -> float | None:
    if text is None:
        return None
    try:
        value = parse_duration_s(str(text))
    except ValueError as exc:
        raise UsageError(f"{name}: {exc}") from None
    if value < minimum:
        raise UsageError(f"{name}: must be at least {minimum:g} s, got {value:g} s")
    return value


@dataclass(frozen=True)
class WorkloadOptions:
    """What every command that runs the model needs: which model, how to feed it, where, and the output.

    Commands subclass it and add their own fields or defaults (a dataclass field redeclared in a subclass
    keeps its place and takes the new default)."""

    model: str = "builtin:mlp"
    requests: str | None = None  # --requests FILE.jsonl: one JSON request per line, cycled through
    model_size: str | None = None
    input_shape: str | None = None
    dtype: str | None = None
    device: str = "auto"
    predictors: str | None = None
    duration: str = "6s"
    warmup: str = "0.5s"
    interval: str = "50ms"
    streams: bool = False
    intra_op_threads: int | None = None
    out: str = "gpuscope-report"
    trust_model_file: bool = False
    json_output: bool = False
    report: bool = True
    quiet: bool = False


@dataclass(frozen=True)
class DiagnoseOptions(WorkloadOptions):
    """Everything `gpuscope diagnose` (and `check` when it runs a sweep) needs."""

    window: str = "1s"
    copy_model: bool = False
    inference_mode: bool = True
    rate: float | None = None
    max_p99_ms: float | None = None
    include_predictors: int | None = None  # a count the sweep must measure (check --at-predictors N)
    output_tolerance: float | None = None  # the thread-safety check: None/0 exact, else abs and rel tolerance
