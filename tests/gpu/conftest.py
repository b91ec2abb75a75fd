"""tests/gpu: the results collector, scenario folders, and the order GPU tests run in.

Every test here is marked `gpu` and skipped without a CUDA GPU (tests/conftest.py does that). On a GPU:

- figures each test measures go to $OUT/gpu-results.json (./gpu-results/gpu-results.json without $OUT),
  rewritten after every test phase, so a run cut short still leaves what it measured; each scenario's
  verdict (passed / failed with the first lines of why / skipped with the reason) is recorded beside them;
- each scenario's diagnose report folder is <reports root>/<scenario> (scenarios.reports_root());
- the planted scenarios run first, before any test that creates a CUDA context in the pytest process
  itself: that context would be a foreign process to every scenario's diagnose run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from . import scenarios as sc

HERE = Path(__file__).resolve().parent


class Results:
    """The results JSON: environment, per-scenario figures and verdicts, per-test outcomes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "schema": "gpuscope.gpu-validation/1",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": sc.environment(),
            "results_path": str(path),
            "reports_root": str(sc.reports_root()),
            "scenarios": {},
            "tests": {},
        }
        self.save()

    def scenario(self, name: str) -> dict[str, Any]:
        return self.data["scenarios"].setdefault(name, {"verdict": "not run", "figures": {}})

    def save(self) -> None:
        sc.write_json_atomic(self.path, self.data)


_RESULTS: Results | None = None


def results() -> Results:
    global _RESULTS
    if _RESULTS is None:
        _RESULTS = Results(sc.results_path())
    return _RESULTS


def _here(item: pytest.Item) -> bool:
    try:
        return Path(str(getattr(item, "path", None) or item.fspath)).resolve().is_relative_to(HERE)
    except (OSError, ValueError):
        return False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "scenario(name): a planted GPU scenario; its figures and verdict are "
                                       "recorded under that name in gpu-results.json")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Planted scenarios first (in file order), then the rest: they must run while no other process,
    this one included, holds GPU memory."""
    first = [item for item in items if _here(item) and item.get_closest_marker("scenario") is not None]
    if first:
        chosen = {id(item) for item in first}
        items[:] = first + [item for item in items if id(item) not in chosen]


def _scenario_name(item: pytest.Item) -> str:
    marker = item.get_closest_marker("scenario")
    if marker is not None and marker.args:
        return str(marker.args[0])
    return f"{Path(str(getattr(item, 'path', None) or item.fspath)).stem}::{item.name}"


def _message(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    text = getattr(report, "longreprtext", "") or ""
    # the assertion line(s) are what a reader needs: the E lines pytest prints, else the tail
    errors = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    return ("\n".join(errors) if errors else text)[-2500:]


@pytest.hookimpl(hookwrapper=True)  # the old style: any pytest >= 6 on the GPU machine accepts it
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    _note(item, outcome.get_result())


def _note(item: pytest.Item, report: pytest.TestReport) -> None:
    if not _here(item):
        return
    if _RESULTS is None:
        gpu_skip = report.skipped and "needs a CUDA GPU" in _message(report)  # tests/conftest.py's skip
        if gpu_skip or (report.passed and report.when != "call"):
            return  # nothing has run on a GPU yet: write no results file (the CPU-only case)
    res = results()
    name = _scenario_name(item)
    entry = res.scenario(name)
    test = res.data["tests"].setdefault(item.nodeid, {"scenario": name})
    test[report.when] = report.outcome
    test["duration_s"] = round(test.get("duration_s", 0.0) + report.duration, 2)
    if report.outcome == "passed":
        if report.when == "call" and entry.get("verdict") in ("not run", None):
            entry["verdict"] = "passed"
    else:
        entry["verdict"] = ("skipped" if report.skipped else
                            "failed" if report.when == "call" else f"error in {report.when}")
        entry["message"] = test["message"] = _message(report)
    res.save()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _RESULTS is not None:
        _RESULTS.data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _RESULTS.data["pytest_exit_status"] = int(exitstatus)
        _RESULTS.save()


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def gpu_results() -> Results:
    return results()


@pytest.fixture(scope="session")
def nvml() -> Any:
    backend = sc.nvml_backend()
    yield backend
    backend.shutdown()


class Figures:
    """The figures dict of one test's entry in gpu-results.json (saved as it grows)."""

    def __init__(self, name: str, res: Results) -> None:
        self.name = name
        self._results = res
        self.entry = res.scenario(name)
        self.figures: dict[str, Any] = self.entry["figures"]

    def record(self, **figures: Any) -> None:
        self.figures.update(figures)
        self._results.save()

    def recorder(self, prefix: str) -> Any:
        """`record` with every name prefixed: for a scenario with several runs checked alike."""
        return lambda **figures: self.record(**{f"{prefix}_{name}": value for name, value in figures.items()})


@pytest.fixture
def figures(request: pytest.FixtureRequest, gpu_results: Results) -> Figures:
    """Where a non-scenario GPU test (accuracy) records its figures: entry `<file stem>::<test name>`."""
    return Figures(_scenario_name(request.node), gpu_results)


class Scenario(Figures):
    """One planted scenario: its report folder(s) and its figures."""

    def __init__(self, name: str, res: Results) -> None:
        super().__init__(name, res)
        self.dir = sc.fresh_dir(sc.reports_root() / name)
        self.entry["report_dir"] = str(self.dir)

    def sub(self, name: str) -> Path:
        """A report folder inside the scenario's, for a scenario with several runs."""
        return sc.fresh_dir(self.dir / name)


@pytest.fixture
def scenario(request: pytest.FixtureRequest, gpu_results: Results, nvml: Any) -> Scenario:
    """The scenario named by the test's `scenario` marker, started on a quiet GPU (no process holds memory)."""
    import os

    marker = request.node.get_closest_marker("scenario")
    assert marker is not None and marker.args, "a scenario test needs @pytest.mark.scenario(name)"
    current = Scenario(str(marker.args[0]), gpu_results)
    listed = sc.wait_for_quiet_gpu(nvml)
    current.record(gpu_processes_before={str(pid): used for pid, used in listed.items()})
    if listed:
        why = ("the pytest process itself holds a CUDA context (a test before this one initialised CUDA here)"
               if os.getpid() in listed else "other processes hold GPU memory")
        pytest.fail(f"the GPU is not quiet before scenario {current.name}: {why}: "
                    + ", ".join(f"pid {pid} {((used or 0) // sc.MiB)} MiB" for pid, used in listed.items()))
    return current
