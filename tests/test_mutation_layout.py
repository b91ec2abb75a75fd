"""tests/mutation_layout.py: inside a mutmut-style mutants/ copy, `gpuscope` is that copy, under the folder
names mutmut gives its mutants, ahead of the editable install; outside it nothing changes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.mutation_layout import folder_name, install_if_mutmut_copy, is_mutmut_copy

ROOT = Path(__file__).resolve().parent.parent


def test_import_names_map_to_the_folders_mutmut_names_mutants_after():
    assert folder_name("gpuscope") == "profiler"
    assert folder_name("gpuscope.analysis.findings") == "profiler.analysis.findings"
    assert folder_name("gpuscope.probes") == "probes"
    assert folder_name("gpuscope.probes.units") == "probes.units"
    assert folder_name("gpuscope.reports.text") == "reports.text"
    assert folder_name("gpuscopex") is None
    assert folder_name("gpuscope_probes") is None
    assert folder_name("probes") is None


def test_the_checkout_is_not_a_mutmut_copy(tmp_path):
    assert not is_mutmut_copy(ROOT)
    assert not install_if_mutmut_copy(ROOT)
    assert not is_mutmut_copy(tmp_path / "mutants")  # no profiler/ in it


def _copy_like_mutmut(mutants: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("profiler", "probes", "reports"):
        shutil.copytree(ROOT / folder, mutants / folder, ignore=ignore)
    shutil.copytree(ROOT / "tests", mutants / "tests", ignore=shutil.ignore_patterns("__pycache__", "fixtures"))


PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.mutation_layout import install_if_mutmut_copy
installed = install_if_mutmut_copy(Path(sys.argv[1]))
import gpuscope
from gpuscope.analysis import findings, gate
from gpuscope.probes import units
import probes.units
print(json.dumps({
    "installed": installed,
    "gpuscope": gpuscope.__name__,
    "findings_name": findings.__name__, "findings_file": findings.__file__,
    "rule_module": findings.rule_cache_bloat.__module__,
    "gate_name": gate.__name__, "planted": getattr(findings, "PLANTED_BY_THE_TEST", None),
    "units_is_one_module": units is probes.units, "units_file": units.__file__,
    "spec_name": findings.__spec__.name,
}))
"""


def test_inside_a_mutants_copy_gpuscope_is_the_copy_under_the_folder_names(tmp_path):
    """Run in a fresh interpreter that has the editable install (what `pytest` inside mutants/ has): the copy
    wins, a line planted in the copy of findings.py is seen, and each module is imported once."""
    mutants = tmp_path / "mutants"
    _copy_like_mutmut(mutants)
    with open(mutants / "profiler" / "analysis" / "findings.py", "a", encoding="utf-8") as f:
        f.write("\nPLANTED_BY_THE_TEST = 'the copy'\n")

    done = subprocess.run([sys.executable, "-c", PROBE, str(mutants)], cwd=tmp_path, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)

    assert seen["installed"] is True
    assert seen["gpuscope"] == "profiler"
    assert seen["findings_name"] == seen["rule_module"] == seen["spec_name"] == "profiler.analysis.findings"
    assert seen["gate_name"] == "profiler.analysis.gate"
    assert seen["planted"] == "the copy"
    assert Path(seen["findings_file"]).resolve().is_relative_to(mutants.resolve())
    assert Path(seen["units_file"]).resolve().is_relative_to(mutants.resolve())
    assert seen["units_is_one_module"] is True


def test_a_gpuscope_imported_before_the_conftest_is_refused(tmp_path):
    """Tests run against the unmutated install would kill nothing: refuse, loudly."""
    mutants = tmp_path / "mutants"
    _copy_like_mutmut(mutants)
    code = ("import sys; from pathlib import Path; import gpuscope; sys.path.insert(0, sys.argv[1]);"
            "from tests.mutation_layout import install_if_mutmut_copy; install_if_mutmut_copy(Path(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(mutants)], cwd=tmp_path, capture_output=True,
                          text=True, check=False)
    assert done.returncode != 0
    assert "gpuscope was imported before the tests' conftest" in done.stderr
