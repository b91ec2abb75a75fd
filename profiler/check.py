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

Exit code rule (`CheckOutcome.exit_code`):

  1  at least one result failed (a measured failure is the most useful answer,
     so it wins even when other limits were unmeasured: fail + unmeasured -> 1)
  2  nothing failed, but at least one result is unmeasured
  0  every result passed
  2  is also what the caller returns for bad input (CheckConfigError, RunFileError);
     see profiler/check_command.py.
"""
from __future__ import annotations

import difflib
import importlib
import math
import os
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from probes.redact import printable
from probes.readings import Unavailable, is_available
from probes.units import format_bytes, parse_size

CHECK_SCHEMA = "gpuscope.check/1"

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_UNMEASURED = 2
EXIT_BAD_INPUT = 2

PASS = "pass"
FAIL = "fail"
UNMEASURED = "unmeasured"

# The findings catalogue (DESIGN.md, FINDINGS.md). profiler/findings.py may add codes
# through a KNOWN_CODES tuple; see known_codes().
BASE_CODES = (
    "CACHE_BLOAT", "OUTSIDE_ALLOCATOR", "PER_PREDICTOR_GROWTH", "DUPLICATE_MODEL",
    "FOREIGN_PROCESS", "MULTIPLE_ENGINES", "ENGINE_PREALLOCATION",
    "DEFAULT_STREAM_SERIALIZATION", "THROUGHPUT_PLATEAU", "CPU_OVERSUBSCRIPTION", "OOM",
    "GRAD_ENABLED", "LOW_HEADROOM", "FRAGMENTATION", "PID_NAMESPACE",
)
# Codes whose rule reads NVML or the CUDA allocator: on a run without a GPU their
# absence proves nothing, so forbidding them there is unmeasured, not a pass.
BASE_GPU_ONLY_CODES = (
    "CACHE_BLOAT", "OUTSIDE_ALLOCATOR", "PER_PREDICTOR_GROWTH", "FOREIGN_PROCESS", "DEFAULT_STREAM_SERIALIZATION",
    "LOW_HEADROOM", "FRAGMENTATION", "PID_NAMESPACE",
)

# Records without a predictor sweep (RunRecord.mode other than "diagnose").
LIVE_MODES = ("watch", "profile")
# The limits evaluated at a step of the sweep.
STEP_LIMITS = ("max_device_memory", "max_host_memory", "min_headroom_pct", "max_p99_ms", "min_throughput")
# What a watch or profile answers without steps: limit -> (series of record.extra["live"], what, needs a GPU).
LIVE_LIMITS = {
    "max_host_memory": ("rss_bytes", "peak RSS", False),
    "max_device_memory": ("process_gpu_bytes", "peak GPU memory of the process", True),
}
# The codes whose rules run on a record of each mode without steps: forbidding any other code there is
# unmeasured (its rule reads the sweep, so its absence proves nothing). Watch and profile run the
# process-level rules of profiler/findings.py and the live ones (profiler/watch_findings.py); compare
# its own (profiler/compare.py).
LIVE_CHECKED_CODES = ("FOREIGN_PROCESS", "MULTIPLE_ENGINES", "ENGINE_PREALLOCATION", "PID_NAMESPACE",
                      "MEASUREMENT_GAP", "CACHE_BLOAT", "MEMORY_GROWTH", "LOW_HEADROOM", "OUTSIDE_ALLOCATOR")
MODE_CODES = {"watch": LIVE_CHECKED_CODES, "profile": LIVE_CHECKED_CODES, "compare": ("PROCESSES_VS_THREADS",)}
# Codes only another mode's rules raise: a diagnose sweep never looks for them.
NOT_IN_DIAGNOSE_CODES = ("PROCESSES_VS_THREADS",)
# A trend over fewer samples than this is not looked for (profiler/watch_findings.py: LiveThresholds.min_points).
TREND_CODES_MIN_TICKS = {"MEMORY_GROWTH": 5}

FAIL_ON_CHOICES = ("warn", "fail")
_SEVERITY_RANK = {"fail": 0, "warn": 1, "info": 2}

# Limit name (snake case, the config key) -> command-line flag.
LIMIT_FLAGS = {
    "max_device_memory": "--max-device-memory",
    "max_host_memory": "--max-host-memory",
    "min_headroom_pct": "--min-headroom-pct",
    "max_p99_ms": "--max-p99-ms",
    "min_throughput": "--min-throughput",
    "max_memory_per_predictor": "--max-memory-per-predictor",
    "forbid": "--forbid",
    "fail_on": "--fail-on",
    "at_predictors": "--at-predictors",
}
SIZE_KEYS = ("max_device_memory", "max_host_memory", "max_memory_per_predictor")


class CheckConfigError(ValueError):
    """A limit that cannot be used: unknown key, malformed value, unreadable config file.

    The message names where the value came from and the key, e.g.
    `gpuscope.toml: check.max_p99_ms: expected a number, got 'fast'`.
    """


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """Every limit the gate can evaluate; None means not set. Sizes are bytes."""

    max_device_memory: int | None = None
    max_host_memory: int | None = None
    min_headroom_pct: float | None = None
    max_p99_ms: float | None = None
    min_throughput: float | None = None
    max_memory_per_predictor: int | None = None
    forbid: tuple[str, ...] = ()
    fail_on: str = "fail"
    at_predictors: int | None = None

    def any_set(self) -> bool:
        """True when at least one explicit limit (not counting fail_on) is set."""
        return any(getattr(self, name) not in (None, ()) for name in
                   ("max_device_memory", "max_host_memory", "min_headroom_pct", "max_p99_ms",
                    "min_throughput", "max_memory_per_predictor", "forbid"))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value == ():
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _findings_codes(attribute: str) -> tuple[str, ...]:
    """A tuple of codes declared by profiler/findings.py, imported lazily; () if it does not exist yet."""
    try:
        module = importlib.import_module("profiler.findings")
    except ImportError:
        return ()
    return tuple(normalise_code(c) for c in getattr(module, attribute, ()) or ())


def known_codes() -> tuple[str, ...]:
    """The catalogue, plus any codes profiler/findings.py declares in KNOWN_CODES."""
    return tuple(dict.fromkeys(BASE_CODES + _findings_codes("KNOWN_CODES")))


def gpu_only_codes() -> frozenset[str]:
    """Codes whose rule needs a GPU: ours plus any profiler/findings.py declares in GPU_ONLY_CODES."""
    return frozenset(BASE_GPU_ONLY_CODES + _findings_codes("GPU_ONLY_CODES"))


def normalise_code(text: str) -> str:
    """`duplicate-model`, `Duplicate_Model`, ` DUPLICATE-MODEL ` -> `DUPLICATE_MODEL`."""
    return str(text).strip().upper().replace("-", "_")


def parse_forbid(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Finding codes to forbid, from `a,b c` text or a list; CheckConfigError on an unknown code.

    Case-insensitive, kebab or snake case; duplicates dropped, order kept.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.replace(",", " ").split()
        if not items:  # `--forbid "$EXTRA"` with EXTRA unset must not silently drop the config's list
            raise CheckConfigError("no finding code given (e.g. duplicate-model,foreign-process); "
                                   "leave the option out to keep the configured ones")
    elif isinstance(value, (list, tuple)):
        items = []
        for item in value:
            if not isinstance(item, str):
                raise CheckConfigError(f"expected finding codes as strings, got {_show(item)}")
            items.extend(item.replace(",", " ").split())
    else:
        raise CheckConfigError(f"expected a list of finding codes, got {_show(value)}")
    catalogue = known_codes()
    out: list[str] = []
    for item in items:
        code = normalise_code(item)
        if code not in catalogue:
            close = difflib.get_close_matches(code, catalogue, n=1)
            hint = f"; did you mean {close[0].lower().replace('_', '-')}?" if close else ""
            raise CheckConfigError(f"unknown finding code {item!r}{hint} "
                                   f"(known: {', '.join(c.lower().replace('_', '-') for c in catalogue)})")
        if code not in out:
            out.append(code)
    return tuple(out)


# --------------------------------------------------------------------------- config


class CheckConfig(dict):
    """The raw `check` table of a config file, remembering where it came from.

    `source` is the file as shown in messages; `table` the dotted table name
    (`check` or `tool.gpuscope.check`); `path` the file's absolute path ("" when
    no file applied).
    """

    def __init__(self, data: Mapping[str, Any] | None = None, source: str = "config", table: str = "check"):
        super().__init__(data or {})
        self.source = source
        self.table = table
        self.path = ""  # the file's absolute path; "" when no file applied


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(text)


def _read_toml(path: str, shown: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError as exc:
        raise CheckConfigError(f"{shown}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckConfigError(f"{shown}: cannot read ({getattr(exc, 'strerror', None) or exc})") from exc
    try:
        return _toml_loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise CheckConfigError(f"{shown}: not valid TOML ({exc})") from exc


def _table(data: dict[str, Any], dotted: str, shown: str) -> dict[str, Any] | None:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if not isinstance(node, dict):
        raise CheckConfigError(f"{shown}: {dotted}: expected a table, got {_show(node)}")
    return node


def load_config(cwd: str, config_path: str | None = None) -> CheckConfig:
    """The check limits from a config file, raw (validated by merge_limits).

    Precedence, first match wins (files are not merged):
      1. `config_path` (--config): its `[check]` table; a file named pyproject.toml
         is read at `[tool.gpuscope.check]`. A missing file or table is an error.
      2. Otherwise, like pytest and ruff, the folders from `cwd` up to the filesystem
         root are searched, nearest first; in each, gpuscope.toml with a `[check]`
         table, then pyproject.toml with a `[tool.gpuscope.check]` table. The search
         stops at the first folder holding one, and after the first folder holding
         `.git` (the repository root), so a CI job run from a subfolder is still gated.
    Returns an empty CheckConfig when none applies. `CheckConfig.path` is the file's
    absolute path ("" when none); `source` is the file as shown in messages (its name
    in `cwd`, else its path relative to `cwd`).
    """
    if config_path:
        shown = config_path
        path = config_path if os.path.isabs(config_path) else os.path.join(cwd, config_path)
        data = _read_toml(path, shown)
        dotted = "tool.gpuscope.check" if os.path.basename(path) == "pyproject.toml" else "check"
        table = _table(data, dotted, shown)
        if table is None:
            raise CheckConfigError(f"{shown}: no [{dotted}] table")
        config = CheckConfig(table, source=shown, table=dotted)
        config.path = os.path.abspath(path)
        return config
    for folder in _folders_up(cwd):
        for name, dotted in (("gpuscope.toml", "check"), ("pyproject.toml", "tool.gpuscope.check")):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                continue
            shown = _shown_path(path, cwd)
            table = _table(_read_toml(path, shown), dotted, shown)
            if table is not None:
                config = CheckConfig(table, source=shown, table=dotted)
                config.path = path
                return config
        if os.path.exists(os.path.join(folder, ".git")):
            break
    return CheckConfig({}, source="config", table="check")


def _folders_up(cwd: str) -> list[str]:
    """`cwd` (absolute) and each folder above it, up to the filesystem root."""
    folder = os.path.abspath(cwd)
    out = [folder]
    while True:
        parent = os.path.dirname(folder)
        if parent == folder:
            return out
        out.append(parent)
        folder = parent


def _shown_path(path: str, cwd: str) -> str:
    """`gpuscope.toml` in cwd, `../pyproject.toml` above it (the absolute path if relpath fails)."""
    try:
        return os.path.relpath(path, os.path.abspath(cwd))
    except ValueError:  # another drive on Windows
        return path


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _number(value: Any, *, minimum: float | None = None, maximum: float | None = None,
            strict_min: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise CheckConfigError(f"expected a number, got {_show(value)}")
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise CheckConfigError(f"expected a number, got {value!r}") from None
    else:
        number = float(value)
    if not math.isfinite(number):
        raise CheckConfigError(f"expected a finite number, got {_show(value)}")
    if minimum is not None and (number <= minimum if strict_min else number < minimum):
        raise CheckConfigError(f"expected a number {'>' if strict_min else '>='} {minimum:g}, got {_show(value)}")
    if maximum is not None and number > maximum:
        raise CheckConfigError(f"expected a number <= {maximum:g}, got {_show(value)}")
    return number


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise CheckConfigError(f"expected a size like 512MiB or 20GiB, got {_show(value)}")
    if isinstance(value, str):
        if value.strip().replace(".", "", 1).isdigit():  # "100" is 100 bytes to a parser, rarely to a person
            raise CheckConfigError(f"a size needs a unit, got {_show(value)} (e.g. {value.strip()}MiB or "
                                   f"{value.strip()}GiB; {value.strip()}B for bytes)")
        try:
            return parse_size(value)
        except ValueError as exc:
            raise CheckConfigError(str(exc)) from None
    if not math.isfinite(float(value)) or value < 0:
        raise CheckConfigError(f"expected a size like 512MiB or 20GiB, got {_show(value)}")
    return int(value)


def _count(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckConfigError(f"expected a whole number of predictors >= 1, got {_show(value)}")
    return value


def _fail_on(value: Any) -> str:
    if isinstance(value, str) and value.strip().lower() in FAIL_ON_CHOICES:
        return value.strip().lower()
    raise CheckConfigError(f"expected one of {', '.join(FAIL_ON_CHOICES)}, got {_show(value)}")


_CONVERTERS = {
    "max_device_memory": _size,
    "max_host_memory": _size,
    "max_memory_per_predictor": _size,
    "min_headroom_pct": lambda v: _number(v, minimum=0, maximum=100),
    "max_p99_ms": lambda v: _number(v, minimum=0, strict_min=True),
    "min_throughput": lambda v: _number(v, minimum=0),
    "forbid": parse_forbid,
    "fail_on": _fail_on,
    "at_predictors": _count,
}


def _unknown_key_message(key: str) -> str:
    guess = str(key).replace("-", "_").lower()
    if guess in _CONVERTERS:
        return f"unknown key (keys are snake case: did you mean {guess}?)"
    close = difflib.get_close_matches(guess, list(_CONVERTERS), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown key{hint} (known: {', '.join(_CONVERTERS)})"


def merge_limits(config: Mapping[str, Any] | None, cli_values: Mapping[str, Any] | None) -> Limits:
    """Validate the config table and the command-line values; the command line wins.

    `config` is load_config's result (any mapping works; a CheckConfig names its
    file in errors). `cli_values` maps snake-case limit names to what the user
    passed, None meaning not given (sizes may be text like `20GiB`, forbid a
    comma-separated string). A CLI `forbid` replaces the config's list.
    Raises CheckConfigError naming the source and key.
    """
    config = config or {}
    source = getattr(config, "source", "config")
    table = getattr(config, "table", "check")
    values: dict[str, Any] = {}
    for key, raw in config.items():
        where = f"{source}: {table}.{key}"
        if key not in _CONVERTERS:
            raise CheckConfigError(f"{where}: {_unknown_key_message(key)}")
        try:
            values[key] = _CONVERTERS[key](raw)
        except CheckConfigError as exc:
            raise CheckConfigError(f"{where}: {exc}") from None
    for key, raw in (cli_values or {}).items():
        if raw is None:
            continue
        name = str(key).replace("-", "_").lstrip("_")
        flag = LIMIT_FLAGS.get(name, f"--{str(key).replace('_', '-')}")
        if name not in _CONVERTERS:
            raise CheckConfigError(f"{flag}: unknown limit")
        try:
            values[name] = _CONVERTERS[name](raw)
        except CheckConfigError as exc:
            raise CheckConfigError(f"{flag}: {exc}") from None
    for key in ("min_headroom_pct", "max_p99_ms", "min_throughput"):
        if key in values:
            values[key] = float(values[key])
    return Limits(**values)


# --------------------------------------------------------------------------- results


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


# --------------------------------------------------------------------------- evaluation


def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 10:
        return f"{value:.1f} ms"
    return f"{value:.2f} ms"


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
    """One series of a watch/profile record's `extra["live"]` summary (profiler/watch.py), {} when absent."""
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
    if mode == "diagnose":
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
    mode = _mode(record)
    swept = mode == "diagnose"
    notes: list[str] = []
    given = at_predictors if at_predictors is not None else limits.at_predictors
    source = "given" if given is not None else ""
    rec = record.recommendation or {}
    if not swept:
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
    measured_counts = ", ".join(str(s.predictors) for s in record.steps) or "none"
    if not swept:
        no_step = f"a {mode} run has no predictor steps (needs a diagnose run)"
    elif given is None:
        no_step = "the run has no recommended predictor count; pass --at-predictors N"
    elif step is None:
        no_step = f"the run did not measure {given} predictors (measured: {measured_counts})"
    elif step.partial:
        no_step = f"the step at {given} predictors was cut short by an interruption (not a full measurement)"
        step = None
    else:
        no_step = ""
    no_gpu = _no_gpu_reason(record)
    results: list[LimitResult] = []

    def step_limit(name: str, compute) -> None:
        """compute(step) -> (measured_raw or Unavailable/None, what, unit) ; comparison by name."""
        limit_raw = getattr(limits, name)
        if limit_raw is None:
            return
        upper = name.startswith("max_")
        fmt = {"max_device_memory": format_bytes, "max_host_memory": format_bytes,
               "min_headroom_pct": _pct, "max_p99_ms": _ms, "min_throughput": _rps}[name]
        unit = {"max_device_memory": "bytes", "max_host_memory": "bytes", "min_headroom_pct": "pct",
                "max_p99_ms": "ms", "min_throughput": "rps"}[name]
        limit_text = format_bytes(limit_raw) if unit == "bytes" else _plain(limit_raw, unit)
        common = dict(name=name, limit=limit_text, limit_raw=limit_raw, unit=unit, at_predictors=given)
        if step is None and mode in LIVE_MODES and name in LIVE_LIMITS:
            live_limit(name, limit_raw, limit_text, common)
            return
        if step is None:
            results.append(LimitResult(status=UNMEASURED, message=f"not measured: {no_step}", **common))
            return
        value, what, gpu_needed = compute(step)
        if step.oom:
            shown = f"{what} {fmt(value)}, " if is_available(value) else ""
            results.append(LimitResult(
                status=FAIL, measured=fmt(value) if is_available(value) else None,
                measured_raw=value if is_available(value) else None,
                message=f"{shown}ran out of memory at {given} predictors; limit {limit_text}", **common))
            return
        if not is_available(value):
            why = no_gpu if (gpu_needed and no_gpu) else _why_unavailable(value, what)
            results.append(LimitResult(status=UNMEASURED, message=f"not measured: {why}{_at(given)}",
                                       **common))
            return
        ok = value <= limit_raw if upper else value >= limit_raw
        op = ("<=" if ok else ">") if upper else (">=" if ok else "<")
        results.append(LimitResult(status=PASS if ok else FAIL, measured=fmt(value), measured_raw=value,
                                   message=f"{what} {fmt(value)} {op} {limit_text}{_at(given)}", **common))

    def live_limit(name: str, limit_raw: Any, limit_text: str, common: dict[str, Any]) -> None:
        """max_host_memory / max_device_memory of a watch or profile: the target's peak over the whole run."""
        key, what, gpu_needed = LIVE_LIMITS[name]
        series = _live_series(record, key)
        value = series.get("peak")
        peak_t = series.get("peak_t_s")
        over = f" over the {mode}" + (f" (peak at {peak_t:.1f} s)" if isinstance(peak_t, (int, float))
                                      and not isinstance(peak_t, bool) and math.isfinite(peak_t) else "")
        if not is_available(value) or isinstance(value, bool) or not isinstance(value, (int, float)):
            if gpu_needed and no_gpu:
                why = no_gpu
            elif not series:
                why = f"the {mode} recorded no {what}"  # `what` already names the process's figure
            else:
                why = _why_unavailable(value, what)
            results.append(LimitResult(status=UNMEASURED, message=f"not measured: {why}", **common))
            return
        ok = value <= limit_raw
        results.append(LimitResult(status=PASS if ok else FAIL, measured=format_bytes(value), measured_raw=value,
                                   message=f"{what} {format_bytes(value)} {'<=' if ok else '>'} {limit_text}{over}",
                                   **common))

    def device_memory(s):
        return (s.memory or {}).get("process_gpu_bytes"), "peak GPU memory of the process", True

    def host_memory(s):
        return (s.memory or {}).get("rss_bytes"), "peak RSS", False

    def headroom(s):
        used = (s.memory or {}).get("device_used_bytes")
        total = _device_total(record, s)
        if not is_available(used):
            return used, "headroom", True
        if not is_available(total) or total <= 0:
            return total, "headroom", True
        # (total - used) first: exact in integers, so a headroom exactly at the limit passes (1 - 0.9 is 0.0999...)
        return 100.0 * (total - used) / total, "headroom", True

    def p99(s):
        value = (s.latency_ms or {}).get("p99")
        if s.requests == 0 and not s.oom:
            value = Unavailable("error", "no request completed at this step")
        return value, "p99", False

    def throughput(s):
        return s.throughput_rps, "throughput", False

    step_limit("max_device_memory", device_memory)
    step_limit("max_host_memory", host_memory)
    step_limit("min_headroom_pct", headroom)
    step_limit("max_p99_ms", p99)
    step_limit("min_throughput", throughput)

    if limits.max_memory_per_predictor is not None:
        limit_raw = limits.max_memory_per_predictor
        common = dict(name="max_memory_per_predictor", limit=format_bytes(limit_raw), limit_raw=limit_raw,
                      unit="bytes")
        value = (record.sharing or {}).get("bytes_per_extra_predictor")
        if not swept:
            results.append(LimitResult(status=UNMEASURED, message=f"not measured: {no_step}", **common))
        elif not is_available(value):
            if len(record.steps) < 2 and value is None:
                why = "the sweep measured fewer than two predictor counts"
            else:
                why = _why_unavailable(value, "memory per extra predictor")
            results.append(LimitResult(status=UNMEASURED, message=f"not measured: {why}", **common))
        else:
            ok = value <= limit_raw
            results.append(LimitResult(
                status=PASS if ok else FAIL, measured=format_bytes(value), measured_raw=value,
                message=f"each extra predictor costs {format_bytes(value)} {'<=' if ok else '>'} "
                        f"{format_bytes(limit_raw)}", **common))

    # Absence of a finding proves something only on a run that finished and measured something.
    incomplete_why = _not_finished(record) or _nothing_measured(record)
    incomplete = bool(incomplete_why)
    checked_codes = None if swept else MODE_CODES.get(mode, ())
    gpu_only = gpu_only_codes()
    by_code: dict[str, list[Any]] = {}
    for finding in record.findings:
        by_code.setdefault(normalise_code(finding.code), []).append(finding)

    for code in limits.forbid:
        common = dict(name=f"forbid.{code}", kind="forbid", limit="absent", limit_raw=code)
        found = by_code.get(code, [])
        if found:
            worst = sorted(found, key=lambda f: _SEVERITY_RANK.get(f.severity, 9))[0]
            more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
            results.append(LimitResult(
                status=FAIL, measured=f"{len(found)} finding{'s' if len(found) != 1 else ''}",
                measured_raw=len(found), at_predictors=worst.at_predictors,
                message=f"{code} found ({worst.severity}): {worst.title}{more}", **common))
        elif checked_codes is not None and code not in checked_codes:
            needs = "" if code in LIVE_CHECKED_CODES else " (its rule reads a predictor sweep: a diagnose run)"
            results.append(LimitResult(status=UNMEASURED, message=f"not measured: a {mode} run does not look for "
                                       f"{code}{needs}", **common))
        elif swept and code in NOT_IN_DIAGNOSE_CODES:
            where = "gpuscope compare" if code == "PROCESSES_VS_THREADS" else "gpuscope watch or profiler.profile()"
            results.append(LimitResult(status=UNMEASURED, message=f"not measured: a diagnose run does not look for "
                                       f"{code} (its rule reads a {where} record)", **common))
        elif code in TREND_CODES_MIN_TICKS and mode in LIVE_MODES \
                and (_live_ticks(record) or 0) < TREND_CODES_MIN_TICKS[code]:
            results.append(LimitResult(status=UNMEASURED, message=f"not measured: {code} needs at least "
                                       f"{TREND_CODES_MIN_TICKS[code]} samples; the {mode} took "
                                       f"{_live_ticks(record) or 0}", **common))
        elif code in gpu_only and no_gpu:
            results.append(LimitResult(status=UNMEASURED,
                                       message=f"not measured: {code} needs a GPU; {no_gpu}", **common))
        elif incomplete:
            results.append(LimitResult(status=UNMEASURED, message=f"not measured: {incomplete_why}", **common))
        else:
            results.append(LimitResult(status=PASS, measured="0 findings", measured_raw=0,
                                       message=f"{code} not found", **common))

    threshold = _SEVERITY_RANK[limits.fail_on]
    at_or_above = [f for f in record.findings if _SEVERITY_RANK.get(f.severity, 9) <= threshold]
    gated = [f for f in at_or_above if normalise_code(f.code) not in limits.forbid]
    besides = " besides the forbidden codes above" if len(gated) < len(at_or_above) else ""
    gated.sort(key=lambda f: (_SEVERITY_RANK.get(f.severity, 9), f.code))
    seen: dict[str, int] = {}
    for finding in gated:
        code = normalise_code(finding.code)
        seen[code] = seen.get(code, 0) + 1
        name = f"finding.{code}" + (f".{seen[code]}" if seen[code] > 1 else "")
        results.append(LimitResult(
            name=name, kind="findings", status=FAIL, measured=finding.severity, measured_raw=finding.severity,
            limit=f"no {limits.fail_on} findings", limit_raw=limits.fail_on, at_predictors=finding.at_predictors,
            message=f"{code} ({finding.severity}): {finding.title}"))
    if not gated:
        worse = "fail" if limits.fail_on == "fail" else "warn or fail"
        common = dict(name="findings", kind="findings", limit=f"no {limits.fail_on} findings",
                      limit_raw=limits.fail_on)
        if incomplete:
            results.append(LimitResult(status=UNMEASURED, message=f"not measured: {incomplete_why}", **common))
        else:
            results.append(LimitResult(status=PASS, measured="0 findings", measured_raw=0,
                                       message=f"no {worse} findings{besides}", **common))

    run_info = {"started_at": record.started_at, "tool_version": record.tool_version, "status": record.status,
                "mode": mode,
                "device": (record.config or {}).get("device", "cpu"),
                "hostname": (record.host or {}).get("hostname", "") if isinstance(record.host, dict) else ""}
    return CheckOutcome(results=tuple(results), limits=limits, at_predictors=given, at_predictors_source=source,
                        run=run_info, checked_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        notes=tuple(notes))


# --------------------------------------------------------------------------- output


_STATUS_LABEL = {PASS: "PASS", FAIL: "FAIL", UNMEASURED: "UNMEASURED"}


def format_lines(outcome: CheckOutcome, exit_code: int | None = None) -> list[str]:
    """One line per result, then a summary line, e.g.

    `PASS  max-p99-ms        p99 12.3 ms <= 25 ms (at 2 predictors)`
    `UNMEASURED  max-device-memory  not measured: no GPU was measured (no_device: ...)`

    `exit_code`: the code the process really exits with, when something after the evaluation
    (an output that could not be written) changed it; the summary line states it.
    """
    if not outcome.results:
        return ["check: no limits to evaluate"]
    status_w = max(len(_STATUS_LABEL[r.status]) for r in outcome.results) + 2
    label_w = max(18, max(len(r.label) for r in outcome.results) + 2)
    lines = [f"{_STATUS_LABEL[r.status]:<{status_w}}{r.label:<{label_w}}{r.message}" for r in outcome.results]
    lines.extend(f"note: {note}" for note in outcome.notes)
    lines.append(summary_line(outcome, exit_code))
    # Finding titles carry outside text (process names): a newline could forge a result line in a CI log,
    # an escape sequence recolour it, a name that is not UTF-8 (lone surrogates) crash the print.
    return [printable(line) for line in lines]


def summary_line(outcome: CheckOutcome, exit_code: int | None = None) -> str:
    c = outcome.counts()
    word = {PASS: "passed", FAIL: "FAILED", UNMEASURED: "could not measure every limit"}[outcome.status]
    where = _at(outcome.at_predictors).strip()
    if where and outcome.at_predictors_source in ("recommended", "smallest measured"):
        where = where[:-1] + f", {outcome.at_predictors_source})"
    return (f"check {word}: {c['passed']} passed, {c['failed']} failed, {c['unmeasured']} unmeasured"
            f"{' ' + where if where else ''} -> exit {outcome.exit_code if exit_code is None else exit_code}")
