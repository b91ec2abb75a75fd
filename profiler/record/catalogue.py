"""The one catalogue of finding codes, severities and run modes.

Codes are a public contract: they appear in run.json, in `check --forbid`, in
JUnit files and as Prometheus labels, so each exists here once and every layer
reads it from here. A code records which modes' rules look for it and whether
its rule needs a GPU: forbidding a code that no rule of a run looked for is
"unmeasured" in the gate, never a silent pass.
"""
from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------- severities
SEVERITIES = ("fail", "warn", "info")  # most severe first
SEVERITY_ORDER = {name: rank for rank, name in enumerate(SEVERITIES)}  # sort key: 0 is the most severe
SEVERITY_LEVEL = {name: len(SEVERITIES) - rank for rank, name in enumerate(SEVERITIES)}  # info 1 .. fail 3

# ---------------------------------------------------------------- run modes
MODE_DIAGNOSE = "diagnose"
MODE_WATCH = "watch"
MODE_PROFILE = "profile"
MODE_COMPARE = "compare"
MODE_TUNE = "tune"  # a search over settings; its findings are read off the default sweep, as diagnose's are
LIVE_MODES = (MODE_WATCH, MODE_PROFILE)  # a live process: samples over time, no predictor sweep
SWEPT = (MODE_DIAGNOSE, MODE_TUNE)
# diagnose's sweep, and a profile's own traffic (gpuscope.request: levels of concurrency observed) and registered
# models (profile(model=...)); a profile that marked no request or registered no model lists the code it could not
# look for in extra["unmeasured_codes"], which the gate reports as unmeasured
SWEPT_OR_TRAFFIC = SWEPT + (MODE_PROFILE,)
_ALL_LIVE = SWEPT + LIVE_MODES


@dataclass(frozen=True)
class Code:
    """One finding code: where its rule runs and what it needs to mean anything."""

    name: str
    modes: tuple[str, ...]  # the modes whose rules look for it
    gpu_only: bool = False  # its rule reads NVML or the CUDA allocator: on the CPU its absence proves nothing
    min_ticks: int = 0  # a trend over fewer live samples than this is not looked for
    needs_thread_check: bool = False  # its rule reads the thread-safety check run before the sweep


CODES: dict[str, Code] = {c.name: c for c in (
    Code("CACHE_BLOAT", _ALL_LIVE, gpu_only=True),
    Code("OUTSIDE_ALLOCATOR", _ALL_LIVE, gpu_only=True),
    Code("PER_PREDICTOR_GROWTH", SWEPT, gpu_only=True),
    Code("DUPLICATE_MODEL", SWEPT_OR_TRAFFIC),
    Code("FOREIGN_PROCESS", _ALL_LIVE, gpu_only=True),
    Code("MULTIPLE_ENGINES", _ALL_LIVE),
    Code("ENGINE_PREALLOCATION", _ALL_LIVE),
    Code("DEFAULT_STREAM_SERIALIZATION", SWEPT, gpu_only=True),
    Code("THROUGHPUT_PLATEAU", SWEPT_OR_TRAFFIC),
    Code("CPU_OVERSUBSCRIPTION", SWEPT),
    Code("OOM", SWEPT),
    Code("GRAD_ENABLED", SWEPT),
    Code("LOW_HEADROOM", _ALL_LIVE, gpu_only=True),
    Code("FRAGMENTATION", SWEPT, gpu_only=True),
    Code("PID_NAMESPACE", _ALL_LIVE, gpu_only=True),
    Code("PREDICTOR_ERRORS", SWEPT_OR_TRAFFIC),
    Code("MEASUREMENT_GAP", _ALL_LIVE),
    Code("OVERLOADED", SWEPT),
    Code("MEMORY_GROWTH", _ALL_LIVE, min_ticks=5),  # watch and profile, and growth inside diagnose's steps
    Code("PROCESSES_VS_THREADS", (MODE_COMPARE,)),
    Code("THREAD_UNSAFE", SWEPT, needs_thread_check=True),  # writes seen, responses compared before the sweep
    Code("NONDETERMINISTIC_OUTPUT", SWEPT, needs_thread_check=True),
    Code("GIL_CONTENTION", SWEPT),  # stage times and the predictors' scheduler times across the sweep
)}

KNOWN_CODES = tuple(CODES)
GPU_ONLY_CODES = frozenset(c.name for c in CODES.values() if c.gpu_only)


def codes_for_mode(mode: str) -> tuple[str, ...]:
    """The codes a run of `mode` looks for (an unknown mode: none)."""
    return tuple(c.name for c in CODES.values() if mode in c.modes)


def normalise_code(text: str) -> str:
    """`duplicate-model`, `Duplicate_Model`, ` DUPLICATE-MODEL ` -> `DUPLICATE_MODEL`."""
    return str(text).strip().upper().replace("-", "_")


def option_name(code: str) -> str:
    """How a code is typed on the command line: DUPLICATE_MODEL -> duplicate-model."""
    return code.lower().replace("_", "-")
