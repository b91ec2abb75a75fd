"""The pre-deployment gate: limits evaluated against a run, with an exit code.

`gpuscope check` either runs a sweep or reads a saved run.json, then evaluates
the limits a platform team set (on the command line, in `[tool.gpuscope.check]`
of pyproject.toml, in a `[check]` table of gpuscope.toml, looked up from the
current folder upwards, or in the file named by `--config`) and the findings the
run produced.

Each limit becomes one `LimitResult` with status pass, fail or unmeasured:

  max_device_memory         peak NVML memory of the profiled process at the chosen step
                            (Step.memory["process_gpu_bytes"])
  max_host_memory           peak RSS of the profiled process at the chosen step
  min_headroom_pct          100 * (1 - peak device used / device total) at the chosen step
  max_p99_ms                p99 latency at the chosen step
  min_throughput            requests/s at the chosen step
  max_memory_per_predictor  record.sharing["bytes_per_extra_predictor"] (the sweep's slope)
  forbid                    one result per code: fails when the run has a finding with that
                            code, of any severity
  fail_on                   every finding of this severity or worse (warn: warn + fail;
                            fail: fail only) is a failing result, unless its code is
                            already covered by `forbid`; when there is none, one passing
                            `findings` result says so

The chosen step is `--at-predictors N` when given, else the run's recommended
predictor count. A sweep that measured its steps but recommended none because no
count met its p99 limit is gated at the smallest count measured, with a note:
the deployment missed its latency target there too, so the gate fails rather
than calling the limit unmeasured. (Without a recommendation for another reason,
such as every count failing requests, step limits stay unmeasured.) A step that ran out of memory fails
every step-based limit (the deployment did not fit, whatever the limit).

A limit is *unmeasured* when the run cannot answer it: a GPU figure on a run
that measured no GPU, a reading that came back Unavailable, a predictor count
the sweep did not measure, a run with no fully measured step (interrupted or
empty) and no `--at-predictors`. A forbidden code whose rule needs a GPU (FOREIGN_PROCESS,
CACHE_BLOAT, ...) is unmeasured on a run without a GPU, and absence of findings
proves nothing on a run that did not finish (any status but "complete": a run
killed with SIGKILL stays "running") or that measured nothing, so those are
unmeasured too. An unmeasured limit never passes.

A watch, profile or compare record (`mode` other than diagnose) has no steps: its
step limits are unmeasured, with one note saying they need a diagnose run, except
max_host_memory and max_device_memory on a watch or profile, which read the
target's peak RSS and peak NVML memory over the run (`extra["live"]["series"]`).
Forbidden codes and the findings gate read the record's own findings; forbidding
a code whose rule needs a sweep is unmeasured there.

A profile whose requests were marked with `gpuscope.request` has observed steps
(`"observed": true`, one per level of concurrency in its own traffic, see
profiler/analysis/live_traffic.py): max_p99_ms and min_throughput are gated at its
recommended level (or `--at-predictors N`, the most requests in flight) like a
sweep's step; a level marked `too_few_requests` is never gated on; memory limits
stay the peak over the run. A code the profile could not look for (no model
registered, no request marked: `extra["unmeasured_codes"]`) is unmeasured, never passed.

Exit code rule (`CheckOutcome.exit_code`):

  1  at least one result failed (a measured failure is the most useful answer,
     so it wins even when other limits were unmeasured: fail + unmeasured -> 1)
  2  nothing failed, but at least one result is unmeasured
  0  every result passed
  2  is also what the caller returns for bad input (CheckConfigError, RunFileError);
     see profiler/commands/check.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from gpuscope.analysis.limits import (
    EXIT_FAIL,
    EXIT_PASS,
    EXIT_UNMEASURED,
    LIMIT_FLAGS,
    LIVE_LIMITS,
    STEP_LIMITS,
    Limits,
)
from gpuscope.probes.readings import ERROR, Unavailable, is_available
from gpuscope.probes.units import format_bytes, format_ms
from gpuscope.record.catalogue import (
    CODES,
    GPU_ONLY_CODES,
    LIVE_MODES,
    MODE_DIAGNOSE,
    MODE_TUNE,
    MODE_WATCH,
    SWEPT,
    SEVERITY_ORDER,
    codes_for_mode,
    normalise_code,
)

CHECK_SCHEMA = "gpuscope.check/1"


PASS = "pass"


FAIL = "fail"


UNMEASURED = "unmeasured"


@dataclass(frozen=True)
class LimitResult:
    """The verdict on one limit, forbidden code or finding.

    `name` is the stable identifier (JUnit test name): a limit's snake-case key,
    `forbid.CODE`, `finding.CODE` (`finding.CODE.2` for a repeat), or `findings`.
    `measured` is for humans (`12.3 ms`, `18.50 GiB`), `measured_raw` the number
    (bytes, ms, %, req/s) or None when unmeasured; likewise `limit`/`limit_raw`.
    """

    name: str
    status: str  # pass | fail | unmeasured
    message: str
    measured: str | None = None
    measured_raw: float | int | None = None
    limit: str | None = None
    limit_raw: Any = None
    kind: str = "limit"  # limit | forbid | findings
    at_predictors: int | None = None
    unit: str = ""

    @property
    def label(self) -> str:
        """The name as the user typed it: `max-p99-ms`, `forbid`, `finding`."""
        if self.kind == "limit":
            return self.name.replace("_", "-")
        return self.name.split(".", 1)[0]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "status": self.status, "message": self.message,
                "measured": self.measured, "measured_raw": self.measured_raw, "limit": self.limit,
                "limit_raw": self.limit_raw, "unit": self.unit, "at_predictors": self.at_predictors}


@dataclass(frozen=True)
class CheckOutcome:
    """Every result of one check, the limits it used, and what it ran against."""

    results: tuple[LimitResult, ...]
    limits: Limits
    at_predictors: int | None = None
    at_predictors_source: str = ""  # given | recommended | smallest measured (none recommended) | ""
    run: dict[str, Any] = field(default_factory=dict)
    checked_at: str = ""
    notes: tuple[str, ...] = ()  # said once, before the summary line (e.g. step limits on a watch run)

    @property
    def failed(self) -> tuple[LimitResult, ...]:
        return tuple(r for r in self.results if r.status == FAIL)

    @property
    def unmeasured(self) -> tuple[LimitResult, ...]:
        return tuple(r for r in self.results if r.status == UNMEASURED)

    @property
    def passed(self) -> tuple[LimitResult, ...]:
        return tuple(r for r in self.results if r.status == PASS)

    @property
    def status(self) -> str:
        if self.failed:
            return FAIL
        if self.unmeasured:
            return UNMEASURED
        return PASS

    @property
    def exit_code(self) -> int:
        """1 if anything failed (even with unmeasured limits); else 2 if anything is unmeasured; else 0."""
        return {FAIL: EXIT_FAIL, UNMEASURED: EXIT_UNMEASURED, PASS: EXIT_PASS}[self.status]

    def counts(self) -> dict[str, int]:
        return {"total": len(self.results), "passed": len(self.passed), "failed": len(self.failed),
                "unmeasured": len(self.unmeasured)}

    def to_json(self) -> dict[str, Any]:
        """The `check` key of run.json (and the `--json` file)."""
        return {"schema": CHECK_SCHEMA, "status": self.status, "exit_code": self.exit_code,
                "checked_at": self.checked_at, "at_predictors": self.at_predictors,
                "at_predictors_source": self.at_predictors_source, "limits": self.limits.to_json(),
                "counts": self.counts(), "results": [r.to_json() for r in self.results], "run": dict(self.run),
                "notes": list(self.notes)}


def _rps(value: float) -> str:
    return f"{value:.0f} req/s" if value >= 100 else f"{value:.1f} req/s"


def _pct(value: float) -> str:
    return f"{value:.1f}%"


def _plain(value: float, unit: str) -> str:
    """A limit as the user wrote it: `25 ms`, `800 req/s`, `15%`."""
    return f"{value:g}%" if unit == "pct" else f"{value:g} {'req/s' if unit == 'rps' else unit}"


def _no_gpu_reason(record: Any) -> str | None:
    """Why the run has no GPU figures, or None when it profiled a GPU."""
    unavailable = getattr(record, "device_unavailable", None)
    if unavailable:
        reason = str(unavailable.get("reason", "")) if isinstance(unavailable, dict) else str(unavailable)
        detail = str(unavailable.get("detail", "")) if isinstance(unavailable, dict) else ""
        text = ": ".join(p for p in (reason, detail) if p)
        return f"no GPU was measured ({text})" if text else "no GPU was measured"
    if not getattr(record, "gpu", False):
        device = (getattr(record, "config", {}) or {}).get("device", "cpu")
        return f"no GPU was measured (the run profiled device {device})"
    return None


def _why_unavailable(value: Any, what: str) -> str:
    if isinstance(value, Unavailable):
        return f"{what} was not measured ({value.reason}{': ' + value.detail if value.detail else ''})"
    if value is None:
        return f"{what} is not in the run record"
    return f"{what} is not a number ({value!r})"


def _device_total(record: Any, step: Any) -> Any:
    total = (step.memory or {}).get("device_total_bytes")
    if is_available(total) and total > 0:
        return total
    index = record.nvml_index
    for entry in record.devices or []:
        if isinstance(entry, dict) and entry.get("index", 0) == index:
            value = entry.get("total_bytes")
            if is_available(value) and value > 0:
                return value
    return total


def _at(step_n: int | None) -> str:
    return f" (at {step_n} predictor{'s' if step_n != 1 else ''})" if step_n is not None else ""


def _mode(record: Any) -> str:
    return str(getattr(record, "mode", "") or "diagnose")


def _live_series(record: Any, key: str) -> dict[str, Any]:
    """One series of a watch/profile record's `extra["live"]` summary (profiler/commands/watch.py), {} when absent."""
    extra = getattr(record, "extra", None)
    live = extra.get("live") if isinstance(extra, dict) else None
    series = live.get("series") if isinstance(live, dict) else None
    found = series.get(key) if isinstance(series, dict) else None
    return found if isinstance(found, dict) else {}


def _live_ticks(record: Any) -> int | None:
    """How many samples a watch/profile took (None when the record does not say)."""
    extra = getattr(record, "extra", None)
    live = extra.get("live") if isinstance(extra, dict) else None
    for source in (live, getattr(record, "sampler", None)):
        ticks = source.get("ticks") if isinstance(source, dict) else None
        if isinstance(ticks, int) and not isinstance(ticks, bool):
            return ticks
    return None


def _not_finished(record: Any) -> str:
    """Why the findings of a run that did not complete cannot be trusted ("" when it completed)."""
    status = str(record.status)
    if status == "complete":
        return ""
    if status == "running":
        return ("the run did not finish (status running: it was killed or crashed before writing its final "
                "record), so its findings may be incomplete")
    return f"the run did not finish (status {status}), so its findings may be incomplete"


def _nothing_measured(record: Any) -> str:
    """Why a completed run has no findings to trust because it measured nothing ("" when it measured)."""
    mode = _mode(record)
    if mode in SWEPT:
        return "" if record.steps else "the run measured no steps, so it has no findings to trust"
    if mode in LIVE_MODES:
        ticks = _live_ticks(record)
        return "the run took no samples, so it has no findings to trust" if ticks == 0 else ""
    if mode == "compare":
        extra = getattr(record, "extra", None)
        comparison = extra.get("comparison") if isinstance(extra, dict) else None
        rows = comparison.get("rows") if isinstance(comparison, dict) else None
        return "" if rows else "the comparison measured nothing, so it has no findings to trust"
    return ""


def _missed_p99_limit(recommendation: dict[str, Any]) -> bool:
    """No count was recommended because none met the sweep's p99 limit, or none kept up with its --rate
    (`unmet`; older records say it only in the reason): measured verdicts, gated at the smallest count."""
    if recommendation.get("predictors") is not None:
        return False
    return recommendation.get("unmet") in ("max_p99_ms", "rate_rps") or \
        str(recommendation.get("reason", "")).startswith("no predictor count met p99")


def _smallest_measured_step(record: Any) -> Any:
    """The lowest predictor count that was measured to its end (served requests or ran out of memory);
    None when there is none (an interrupted or empty sweep: nothing there to gate on)."""
    steps = [s for s in record.steps if not s.partial and (s.requests > 0 or s.oom)]
    return min(steps, key=lambda s: s.predictors) if steps else None


def tuned_step(record: Any) -> tuple[Any, str]:
    """The step of a tune run's best configuration ("best"), else of the closest to its constraints ("closest")."""
    from gpuscope.record.run import Step

    tuning = getattr(record, "tuning", None) or {}
    for which in ("best", "closest"):
        entry = tuning.get(which)
        if isinstance(entry, dict) and isinstance(entry.get("step"), dict):
            return Step.from_json(entry["step"]), which
    return None, ""


class _Evaluation:
    """One evaluation of the gate: which step is gated and why, then one method per kind of limit, each
    appending its LimitResults. The state they share (the record, the gated step, why no step could be
    gated, why there is no GPU) is set once in __init__."""

    def __init__(self, record: Any, limits: Limits, at_predictors: int | None) -> None:
        mode = _mode(record)
        swept = mode in SWEPT
        # a profile that marked requests has observed steps (levels of concurrency in its own traffic): its step
        # limits are gated at the recommended level like a sweep's
        stepped = swept or (mode in LIVE_MODES and any(getattr(s, "observed", False) for s in record.steps))
        notes: list[str] = []
        given = at_predictors if at_predictors is not None else limits.at_predictors
        source = "given" if given is not None else ""
        rec = record.recommendation or {}
        if not stepped:
            step_names = [LIMIT_FLAGS[n][2:] for n in STEP_LIMITS if getattr(limits, n) is not None
                          and not (mode in LIVE_MODES and n in LIVE_LIMITS)]
            if limits.max_memory_per_predictor is not None:
                step_names.append(LIMIT_FLAGS["max_memory_per_predictor"][2:])
            if step_names:
                notes.append(f"{', '.join(step_names)}: a {mode} run has no predictor steps; these limits need a "
                             "diagnose run (gpuscope check without --run, or gpuscope diagnose)")
            if given is not None:
                notes.append(f"--at-predictors {given} is ignored: a {mode} run has no predictor steps")
            given, source = None, ""
        elif given is None and isinstance(rec.get("predictors"), int) and not isinstance(rec.get("predictors"), bool):
            given = rec["predictors"]
            source = "recommended"
        elif given is None and _missed_p99_limit(rec) and (fallback := _smallest_measured_step(record)) is not None:
            # Measured steps but no count met the run's p99 limit: a measured verdict on the deployment, not a
            # missing measurement. Gate the least loaded configuration, where latency is at its best. (Other
            # reasons for no recommendation, such as every count failing requests, stay unmeasured.)
            given, source = fallback.predictors, "smallest measured"
            notes.append(f"no predictor count was recommended ({rec.get('reason') or 'no reason recorded'}); "
                         f"the limits are checked at the smallest count measured, {given}")
        step = record.step_at(given) if given is not None else None
        if mode == MODE_TUNE and source != "given":
            # A tune run is gated on its best configuration (or, when none met its constraints, the closest one):
            # its own step, which need not be in the default sweep's steps.
            tuned, which = tuned_step(record)
            if tuned is not None:
                step, given, source = tuned, tuned.predictors, which
                notes.append(f"a tune run: the limits are checked on its {which} configuration "
                             f"({(record.tuning or {}).get(which, {}).get('label') or given})")
        measured_counts = ", ".join(str(s.predictors) for s in record.steps) or "none"
        if not stepped:
            no_step = f"a {mode} run has no predictor steps (needs a diagnose run)"
        elif given is None:
            no_step = "the run has no recommended predictor count; pass --at-predictors N"
        elif step is None:
            no_step = f"the run did not measure {given} predictors (measured: {measured_counts})"
        elif step.partial:
            no_step = f"the step at {given} predictors was cut short by an interruption (not a full measurement)"
            step = None
        elif step.too_few_requests:
            no_step = (f"the level of {step.level or given} requests in flight had too few requests ({step.requests}) "
                       "to measure")
            step = None
        else:
            no_step = ""
        no_gpu = _no_gpu_reason(record)
        results: list[LimitResult] = []

        self.record, self.limits, self.mode, self.swept, self.stepped = record, limits, mode, swept, stepped
        self.notes, self.given, self.source, self.step, self.no_step = notes, given, source, step, no_step
        self.no_gpu, self.results = no_gpu, results

    def _step_limit(self, name: str, compute) -> None:
        """compute(step) -> (measured_raw or Unavailable/None, what, unit) ; comparison by name."""
        limit_raw = getattr(self.limits, name)
        if limit_raw is None:
            return
        upper = name.startswith("max_")
        fmt = {"max_device_memory": format_bytes, "max_host_memory": format_bytes,
               "min_headroom_pct": _pct, "max_p99_ms": format_ms, "min_throughput": _rps}[name]
        unit = {"max_device_memory": "bytes", "max_host_memory": "bytes", "min_headroom_pct": "pct",
                "max_p99_ms": "ms", "min_throughput": "rps"}[name]
        limit_text = format_bytes(limit_raw) if unit == "bytes" else _plain(limit_raw, unit)
        common = dict(name=name, limit=limit_text, limit_raw=limit_raw, unit=unit, at_predictors=self.given)
        if self.mode in LIVE_MODES and name in LIVE_LIMITS:  # a live run's memory is its peak over the run
            self._live_limit(name, limit_raw, limit_text, common)
            return
        if self.step is None:
            self.results.append(LimitResult(status=UNMEASURED, message=f"not measured: {self.no_step}", **common))
            return
        value, what, gpu_needed = compute(self.step)
        if self.step.oom:
            shown = f"{what} {fmt(value)}, " if is_available(value) else ""
            self.results.append(LimitResult(
                status=FAIL, measured=fmt(value) if is_available(value) else None,
                measured_raw=value if is_available(value) else None,
                message=f"{shown}ran out of memory at {self.given} predictors; limit {limit_text}", **common))
            return
        if not is_available(value):
            why = self.no_gpu if (gpu_needed and self.no_gpu) else _why_unavailable(value, what)
            self.results.append(LimitResult(status=UNMEASURED, message=f"not measured: {why}{_at(self.given)}",
                                       **common))
            return
        ok = value <= limit_raw if upper else value >= limit_raw
        op = ("<=" if ok else ">") if upper else (">=" if ok else "<")
        self.results.append(LimitResult(status=PASS if ok else FAIL, measured=fmt(value), measured_raw=value,
                                   message=f"{what} {fmt(value)} {op} {limit_text}{_at(self.given)}", **common))

    def _live_limit(self, name: str, limit_raw: Any, limit_text: str, common: dict[str, Any]) -> None:
        """max_host_memory / max_device_memory of a watch or profile: the target's peak over the whole run."""
        key, what, gpu_needed = LIVE_LIMITS[name]
        series = _live_series(self.record, key)
        value = series.get("peak")
        peak_t = series.get("peak_t_s")
        over = f" over the {self.mode}" + (f" (peak at {peak_t:.1f} s)" if isinstance(peak_t, (int, float))
                                      and not isinstance(peak_t, bool) and math.isfinite(peak_t) else "")
        if not is_available(value) or isinstance(value, bool) or not isinstance(value, (int, float)):
            if gpu_needed and self.no_gpu:
                why = self.no_gpu
            elif not series:
                why = f"the {self.mode} recorded no {what}"  # `what` already names the process's figure
            else:
                why = _why_unavailable(value, what)
            self.results.append(LimitResult(status=UNMEASURED, message=f"not measured: {why}", **common))
            return
        ok = value <= limit_raw
        self.results.append(LimitResult(status=PASS if ok else FAIL, measured=format_bytes(value), measured_raw=value,
                                   message=f"{what} {format_bytes(value)} {'<=' if ok else '>'} {limit_text}{over}",
                                   **common))

    def _device_memory(self, s):
        return (s.memory or {}).get("process_gpu_bytes"), "peak GPU memory of the process", True

    def _host_memory(self, s):
        return (s.memory or {}).get("rss_bytes"), "peak RSS", False

    def _headroom(self, s):
        used = (s.memory or {}).get("device_used_bytes")
        total = _device_total(self.record, s)
        if not is_available(used):
            return used, "headroom", True
        if not is_available(total):
            return total, "headroom", True
        if total <= 0:  # a device that reports no memory has no headroom to compare (not 0% of it)
            return Unavailable(ERROR, f"the device reported {total} bytes of total memory"), "headroom", True
        # (total - used) first: exact in integers, so a headroom exactly at the limit passes (1 - 0.9 is 0.0999...)
        return 100.0 * (total - used) / total, "headroom", True

    def _p99(self, s):
        value = (s.latency_ms or {}).get("p99")
        if s.requests == 0 and not s.oom:
            value = Unavailable(ERROR, "no request completed at this step")
        return value, "p99", False

    def _throughput(self, s):
        return s.throughput_rps, "throughput", False

    def step_limits(self) -> None:
        self._step_limit("max_device_memory", self._device_memory)
        self._step_limit("max_host_memory", self._host_memory)
        self._step_limit("min_headroom_pct", self._headroom)
        self._step_limit("max_p99_ms", self._p99)
        self._step_limit("min_throughput", self._throughput)

    def memory_per_predictor(self) -> None:
        if self.limits.max_memory_per_predictor is not None:
            limit_raw = self.limits.max_memory_per_predictor
            common = dict(name="max_memory_per_predictor", limit=format_bytes(limit_raw), limit_raw=limit_raw,
                          unit="bytes")
            value = (self.record.sharing or {}).get("bytes_per_extra_predictor")
            if not self.swept:
                why = self.no_step or (f"a {self.mode} run observes requests in flight, not predictor counts "
                                       "with their memory (needs a diagnose run)")
                self.results.append(LimitResult(status=UNMEASURED, message=f"not measured: {why}", **common))
            elif not is_available(value):
                if len(self.record.steps) < 2 and value is None:
                    why = "the sweep measured fewer than two predictor counts"
                else:
                    why = _why_unavailable(value, "memory per extra predictor")
                self.results.append(LimitResult(status=UNMEASURED, message=f"not measured: {why}", **common))
            else:
                ok = value <= limit_raw
                self.results.append(LimitResult(
                    status=PASS if ok else FAIL, measured=format_bytes(value), measured_raw=value,
                    message=f"each extra predictor costs {format_bytes(value)} {'<=' if ok else '>'} "
                            f"{format_bytes(limit_raw)}", **common))


    def forbidden_codes(self) -> None:
        # Absence of a finding proves something only on a run that finished and measured something.
        incomplete_why = _not_finished(self.record) or _nothing_measured(self.record)
        incomplete = bool(incomplete_why)
        checked_codes = None if self.swept else codes_for_mode(self.mode)
        extra = getattr(self.record, "extra", None)
        not_looked_for = extra.get("unmeasured_codes") if isinstance(extra, dict) else None
        not_looked_for = not_looked_for if isinstance(not_looked_for, dict) else {}
        by_code: dict[str, list[Any]] = {}
        for finding in self.record.findings:
            by_code.setdefault(normalise_code(finding.code), []).append(finding)

        for code in self.limits.forbid:
            common = dict(name=f"forbid.{code}", kind="forbid", limit="absent", limit_raw=code)
            found = by_code.get(code, [])
            if found:
                worst = sorted(found, key=lambda f: SEVERITY_ORDER.get(f.severity, 9))[0]
                more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
                self.results.append(LimitResult(
                    status=FAIL, measured=f"{len(found)} finding{'s' if len(found) != 1 else ''}",
                    measured_raw=len(found), at_predictors=worst.at_predictors,
                    message=f"{code} found ({worst.severity}): {worst.title}{more}", **common))
            elif checked_codes is not None and code not in checked_codes:
                needs = "" if MODE_WATCH in CODES[code].modes else " (its rule reads a predictor sweep: a diagnose run)"
                self.results.append(LimitResult(status=UNMEASURED, message=f"not measured: a {self.mode} run does not look for "
                                           f"{code}{needs}", **common))
            elif code in not_looked_for:
                self.results.append(LimitResult(status=UNMEASURED, message=f"not measured: the {self.mode} could not look for "
                                           f"{code}: {not_looked_for[code]}", **common))
            elif self.swept and MODE_DIAGNOSE not in CODES[code].modes:
                where = "gpuscope compare" if code == "PROCESSES_VS_THREADS" else "gpuscope watch or gpuscope.profile()"
                self.results.append(LimitResult(status=UNMEASURED, message=f"not measured: a diagnose run does not look for "
                                           f"{code} (its rule reads a {where} record)", **common))
            elif self.mode in LIVE_MODES and (_live_ticks(self.record) or 0) < CODES[code].min_ticks:
                self.results.append(LimitResult(status=UNMEASURED, message=f"not measured: {code} needs at least "
                                           f"{CODES[code].min_ticks} samples; the {self.mode} took "
                                           f"{_live_ticks(self.record) or 0}", **common))
            elif CODES[code].needs_thread_check and not (self.record.thread_safety or {}).get("checked"):
                self.results.append(LimitResult(status=UNMEASURED, message=f"not measured: {code} needs the thread-safety "
                                           "check, which this run did not record", **common))
            elif code in GPU_ONLY_CODES and self.no_gpu:
                self.results.append(LimitResult(status=UNMEASURED,
                                           message=f"not measured: {code} needs a GPU; {self.no_gpu}", **common))
            elif incomplete:
                self.results.append(LimitResult(status=UNMEASURED, message=f"not measured: {incomplete_why}", **common))
            else:
                self.results.append(LimitResult(status=PASS, measured="0 findings", measured_raw=0,
                                           message=f"{code} not found", **common))


    def findings(self) -> None:
        incomplete_why = _not_finished(self.record) or _nothing_measured(self.record)
        incomplete = bool(incomplete_why)
        threshold = SEVERITY_ORDER[self.limits.fail_on]
        at_or_above = [f for f in self.record.findings if SEVERITY_ORDER.get(f.severity, 9) <= threshold]
        gated = [f for f in at_or_above if normalise_code(f.code) not in self.limits.forbid]
        besides = " besides the forbidden codes above" if len(gated) < len(at_or_above) else ""
        gated.sort(key=lambda f: (SEVERITY_ORDER.get(f.severity, 9), f.code))
        seen: dict[str, int] = {}
        for finding in gated:
            code = normalise_code(finding.code)
            seen[code] = seen.get(code, 0) + 1
            name = f"finding.{code}" + (f".{seen[code]}" if seen[code] > 1 else "")
            self.results.append(LimitResult(
                name=name, kind="findings", status=FAIL, measured=finding.severity, measured_raw=finding.severity,
                limit=f"no {self.limits.fail_on} findings", limit_raw=self.limits.fail_on, at_predictors=finding.at_predictors,
                message=f"{code} ({finding.severity}): {finding.title}"))
        if not gated:
            worse = "fail" if self.limits.fail_on == "fail" else "warn or fail"
            common = dict(name="findings", kind="findings", limit=f"no {self.limits.fail_on} findings",
                          limit_raw=self.limits.fail_on)
            if incomplete:
                self.results.append(LimitResult(status=UNMEASURED, message=f"not measured: {incomplete_why}", **common))
            else:
                self.results.append(LimitResult(status=PASS, measured="0 findings", measured_raw=0,
                                           message=f"no {worse} findings{besides}", **common))



def evaluate(record: Any, limits: Limits, at_predictors: int | None = None) -> CheckOutcome:
    """Evaluate every set limit, forbidden code and finding gate against a run record.

    `at_predictors` overrides `limits.at_predictors`; without either, the run's
    recommended predictor count is used (or, when no count met the sweep's p99 limit,
    the smallest count measured to its end). See the module docstring for each limit
    and for the exit-code rule.

    A record of another mode than diagnose (watch, profile, compare) has no predictor
    steps: its step limits are unmeasured (one note says they need a diagnose run),
    except that a watch or profile answers max_host_memory and max_device_memory with
    the target's peak RSS and peak NVML memory over the whole run; forbidden codes
    and the findings gate are evaluated on the record's own findings.
    """
    gate = _Evaluation(record, limits, at_predictors)
    gate.step_limits()
    gate.memory_per_predictor()
    gate.forbidden_codes()
    gate.findings()
    record, mode, given, source, notes, results = gate.record, gate.mode, gate.given, gate.source, gate.notes, gate.results
    run_info = {"started_at": record.started_at, "tool_version": record.tool_version, "status": record.status,
                "mode": mode,
                "device": (record.config or {}).get("device", "cpu"),
                "hostname": (record.host or {}).get("hostname", "") if isinstance(record.host, dict) else ""}
    return CheckOutcome(results=tuple(results), limits=limits, at_predictors=given, at_predictors_source=source,
                        run=run_info, checked_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        notes=tuple(notes))
