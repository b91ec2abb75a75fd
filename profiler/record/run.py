"""The run record (`run.json`): a public format whose keys are a contract.

Scripts and dashboards read it, so keys are added freely and never renamed
without bumping `SCHEMA`. Readings inside it that could not be taken are
`{"unavailable": reason}`, never 0. `gpuscope report run.json` re-renders
everything from it and the samples file beside it.
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field, fields
from typing import Any

from gpuscope.probes.readings import reading_from_json, reading_to_json
from gpuscope.record.catalogue import SEVERITY_ORDER
from gpuscope.record.files import write_json_atomic

SCHEMA = "gpuscope.run/1"
SCHEMA_FAMILY = "gpuscope.run/"
SUPPORTED_SCHEMAS = (SCHEMA,)

STATUS_COMPLETE = "complete"
STATUS_INTERRUPTED = "interrupted"
STATUS_FAILED = "failed"
STATUS_RUNNING = "running"



def _fields_to_json(obj: Any) -> dict[str, Any]:
    """Encode a dataclass's fields; not dataclasses.asdict, which would flatten a nested
    Unavailable into {"reason": ...} before it could become {"unavailable": ...}."""
    return reading_to_json({f.name: getattr(obj, f.name) for f in fields(obj)})


@dataclass(frozen=True)
class Finding:
    """One diagnosis: a stable code, a severity, a title with the number that matters, evidence, a remedy."""

    code: str
    severity: str  # info | warn | fail
    title: str
    evidence: dict[str, Any] = field(default_factory=dict)
    remedy: str = ""
    at_predictors: int | None = None

    def to_json(self) -> dict[str, Any]:
        return _fields_to_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Finding":
        return cls(code=str(data["code"]), severity=str(data["severity"]), title=str(data.get("title") or ""),
                   evidence=reading_from_json(data.get("evidence", {})), remedy=str(data.get("remedy") or ""),
                   at_predictors=data.get("at_predictors"))


@dataclass
class Step:
    """One measured predictor count of the sweep.

    `memory` holds peak figures in bytes (keys end in `_bytes`) or Unavailable:
    process_gpu_bytes (NVML, this process), device_used_bytes, torch_allocated_bytes,
    torch_reserved_bytes, other_processes_bytes, rss_bytes, uss_bytes.
    """

    predictors: int
    requests: int = 0
    errors: int = 0
    duration_s: float = 0.0
    throughput_rps: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    queue_ms: dict[str, float] | None = None
    compute_ms: dict[str, float] | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    cpu_util_pct: Any = None  # mean CPU of the process over the measured window (100 = one core)
    windows_rps: list[float] = field(default_factory=list)
    stable: bool = False
    oom: bool = False
    error_messages: list[str] = field(default_factory=list)
    distinct_weight_sets: int = 1
    grad_enabled_in_workers: bool = False
    outputs_with_grad: int = 0
    intra_op_threads: int | None = None
    ctx_switches_involuntary: Any = None
    dead_predictors: int = 0
    started_s: float = 0.0
    ended_s: float = 0.0
    partial: bool = False  # cut short by an interruption: shown, never recommended or gated on
    offered_rps: float | None = None  # --rate: the arrival rate offered
    dropped_arrivals: int = 0  # --rate: arrivals dropped because the backlog was full
    # each stage's wall time per request: {"preprocess"|"model"|"postprocess": {"p50", "p99", "mean"}}; a
    # predictor without a stage has no key for it; None for a plain model (its latency is the model stage)
    stages_ms: dict[str, dict[str, float]] | None = None
    # the predictor threads' scheduler times over the window, summed (seconds): wall, on_cpu, runqueue
    # (waiting for a core), blocked (neither: the GIL, a lock, I/O); Unavailable where the kernel has no schedstat
    thread_times_s: Any = None
    # A live profile's traffic (profiler/analysis/live_traffic.py): a group of concurrency levels, not a swept count.
    observed: bool = False  # measured on the application's own requests; `predictors` = most in flight
    level: str | None = None  # the group of levels: "1", "2", "3-4", "5-8", ...
    too_few_requests: bool = False  # shown, never recommended, plateaued or gated on
    threads: int | None = None  # distinct threads that served this level's requests
    concurrency_mean: float | None = None  # request-weighted mean of the levels in the group

    @property
    def error_rate(self) -> float:
        total = self.requests + self.errors
        return self.errors / total if total else 0.0

    def to_json(self) -> dict[str, Any]:
        out = _fields_to_json(self)
        out["error_rate"] = self.error_rate
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Step":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: reading_from_json(v) for k, v in data.items() if k in known})


@dataclass
class RunRecord:
    """Everything a run measured and concluded. Mutable while the run builds it."""

    tool_version: str
    started_at: str
    status: str = STATUS_RUNNING
    host: dict[str, Any] = field(default_factory=dict)
    devices: list[dict[str, Any]] = field(default_factory=list)
    device_unavailable: dict[str, str] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    sharing: dict[str, Any] = field(default_factory=dict)
    # the check before the sweep (measure/thread_safety.py): writes seen, outputs compared; None when not run
    thread_safety: dict[str, Any] | None = None
    processes: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    recommendation: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] | None = None
    sampler: dict[str, Any] = field(default_factory=dict)
    pid: int = 0
    mode: str = "diagnose"
    ended_at: str | None = None
    failure: str | None = None
    samples: str = "samples.jsonl"
    extra: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, Any] | None = None  # `gpuscope tune`: every configuration, the best, the default, the budget

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"schema": SCHEMA}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "tuning" and value is None:
                continue  # only a tune run has the block
            if name == "steps":
                data[name] = [step.to_json() for step in value]
            elif name == "findings":
                data[name] = [finding.to_json() for finding in sorted_findings(value)]
            elif name == "processes":
                data[name] = [_redacted_process(p) for p in reading_to_json(value)]
            else:
                data[name] = reading_to_json(value)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunRecord":
        check_schema(data)
        known = set(cls.__dataclass_fields__)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                continue
            if key == "steps":
                kwargs[key] = [Step.from_json(s) for s in value]
            elif key == "findings":
                kwargs[key] = [Finding.from_json(f) for f in value]
            else:
                kwargs[key] = reading_from_json(value)
        return cls(**kwargs)

    def step_at(self, predictors: int) -> Step | None:
        return next((s for s in self.steps if s.predictors == predictors), None)

    @property
    def gpu(self) -> bool:
        return str(self.config.get("device", "cpu")).startswith("cuda")

    @property
    def nvml_index(self) -> int:
        """NVML's index of the profiled GPU: the one samples, `devices` and processes use. It differs from
        torch's `cuda:N` under CUDA_VISIBLE_DEVICES, so never derive it from config["device"] when it is known."""
        index = self.config.get("gpu_index")
        if isinstance(index, int) and not isinstance(index, bool):
            return index
        device = str(self.config.get("device", "cuda:0"))
        suffix = device.split(":", 1)[1] if ":" in device else "0"
        return int(suffix) if suffix.isdigit() else 0

    def device_entry(self) -> dict[str, Any]:
        """The `devices` entry of the profiled GPU ({} when unknown)."""
        return next((d for d in self.devices if isinstance(d, dict) and d.get("index") == self.nvml_index), {})


def _redacted_process(process: Any) -> Any:
    """Command lines are redacted when first read; again here so no record path can leak one."""
    from gpuscope.probes.redact import redact_cmdline

    if isinstance(process, dict) and isinstance(process.get("cmdline"), str):
        return {**process, "cmdline": redact_cmdline(process["cmdline"])}
    return process


class RunFileError(ValueError):
    """A run.json that is corrupt, foreign, or from a newer schema."""


def check_schema(data: Any) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("schema"), str):
        raise RunFileError("not a gpuscope run record (no \"schema\" key)")
    schema = data["schema"]
    if schema in SUPPORTED_SCHEMAS:
        return
    if schema.startswith(SCHEMA_FAMILY):
        raise RunFileError(f"run record schema {schema!r} is newer than this gpuscope reads ({SCHEMA}); upgrade gpuscope")
    raise RunFileError(f"not a gpuscope run record (schema {schema!r})")


def sorted_findings(findings: list[Finding]) -> list[Finding]:
    """Most severe first, then by code, so reports and JSON read the same way."""
    return sorted(findings, key=lambda f: (SEVERITY_ORDER.get(f.severity, 9), f.code))


def save_run(record: RunRecord, path: str) -> None:
    write_json_atomic(path, record.to_json())


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a measurement (run.json holds only finite numbers)")


def load_run(path: str) -> RunRecord:
    """Load run.json; RunFileError (one clear line) for anything that is not a run we can read."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh, parse_constant=_reject_constant)
    except FileNotFoundError as exc:
        raise RunFileError(f"{path}: no such file") from exc
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, or Infinity/NaN
        raise RunFileError(f"{path}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise RunFileError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        return RunRecord.from_json(data)
    except RunFileError as exc:
        raise RunFileError(f"{path}: {exc}") from exc
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise RunFileError(f"{path}: malformed run record ({type(exc).__name__}: {exc})") from exc


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")
