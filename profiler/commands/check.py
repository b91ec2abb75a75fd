"""What `gpuscope check` does once it has a run record: the part profiler/commands/app.py calls.

    limits = limits_from_sources(os.getcwd(), config_path, cli_values)   # CheckConfigError -> exit 2
    record = load_run(path)  or  the record of a fresh sweep             # RunFileError -> exit 2
    code = run_check(record, limits, at_predictors, junit_path, json_path)
    raise typer.Exit(code)

Exit codes: 0 every limit passed; 1 any limit failed (even if others could not be
measured); 2 nothing failed but something could not be measured, or the input
was bad (config, run file, an output file that could not be written while
nothing failed). See profiler/analysis/gate.py.

This module belongs to the command line's composition root, so it may import
`reports` (lazily, only when --junit is given).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Mapping

from gpuscope.analysis.gate import CheckOutcome, evaluate
from gpuscope.analysis.limits import EXIT_BAD_INPUT, EXIT_FAIL, CheckConfigError, Limits, merge_limits
from gpuscope.commands.check_config import load_config
from gpuscope.record.files import write_json_atomic
from gpuscope.record.run import RunRecord, save_run
from gpuscope.reports.text import format_lines

__all__ = ["run_check", "limits_from_sources", "CheckConfigError"]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def limits_from_sources(cwd: str, config_path: str | None, cli_values: Mapping[str, Any] | None,
                        echo_err: Callable[[str], Any] = _stderr) -> Limits:
    """Limits from the config file (see gpuscope.commands.check_config.load_config) overridden by command-line values.

    When a config file applies, one line on `echo_err` says which (the file is looked
    up from `cwd` upwards, so a gate run from a subfolder shows where its limits came from).

    `cli_values` maps snake-case names (max_device_memory, max_host_memory, min_headroom_pct,
    max_p99_ms, min_throughput, max_memory_per_predictor, forbid, fail_on, at_predictors)
    to what the user typed, None for flags not given. Raises CheckConfigError with a
    message naming the file and key (or the flag).
    """
    config = load_config(cwd, config_path)
    limits = merge_limits(config, cli_values or {})
    if config.path:
        echo_err(f"check: limits from {config.path} [{config.table}]")
    return limits


def _ensure_parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def run_check(record: RunRecord, limits: Limits, at_predictors: int | None = None,
              junit_path: str | None = None, json_path: str | None = None,
              echo: Callable[[str], Any] = print, echo_err: Callable[[str], Any] = _stderr,
              run_path: str | None = None) -> int:
    """Evaluate `limits` against `record`, print one line per result, write the outputs; return the exit code.

    - `at_predictors` overrides limits.at_predictors; by default the run's recommended count.
    - `junit_path`: JUnit XML (reports.junit.write_junit); `json_path`: the outcome as JSON.
    - The outcome's JSON is stored in `record.check`; with `run_path` the record is also
      saved there (so run.json and report.html show the check).
    - An output that cannot be written is reported on echo_err; the exit code is then 1
      if the gate failed, else 2.
    """
    if not limits.any_set():
        echo_err(f"check: no limits set; only findings of severity {limits.fail_on} or worse can fail the gate")
    outcome: CheckOutcome = evaluate(record, limits, at_predictors=at_predictors)
    code = outcome.exit_code
    data = outcome.to_json()
    record.check = data

    def attempt(what: str, path: str, write: Callable[[], None]) -> None:
        nonlocal code
        try:
            _ensure_parent(path)
            write()
        except OSError as exc:
            echo_err(f"check: could not write {what} {path}: {exc.strerror or exc}")
            if code != EXIT_FAIL:
                code = EXIT_BAD_INPUT

    if junit_path:
        from gpuscope.reports.junit import write_junit  # lazy: reports is imported only by the entry points

        attempt("JUnit XML", junit_path, lambda: write_junit(outcome, junit_path))
    if json_path:
        attempt("JSON", json_path, lambda: write_json_atomic(json_path, data))
    if run_path:
        attempt("run record", run_path, lambda: save_run(record, run_path))
    for line in format_lines(outcome, exit_code=code):  # after the writes: the summary states the real exit code
        echo(line)
    return code
