"""The wheel installs one top-level package, `gpuscope`, and works from anywhere once installed.

PyPI holds unrelated packages named `profiler`, `probes` and `reports`: a wheel that installed
those names would overwrite their files (and theirs ours). This builds the real wheel from the
checkout, reads its file list, installs it into a fresh folder and imports it from another
directory, so the packaging itself is tested, not only the modules.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Run the installed copy only: an editable install's import hook (a meta-path finder) would otherwise
# answer `import gpuscope` from the checkout before the folder on PYTHONPATH is looked at.
ONLY_THE_WHEEL = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
                  "if 'editable' not in (getattr(f, '__module__', '') or '').lower()]; ")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: a build writes build/ and an egg-info beside its sources, never into the checkout.
    source = tmp_path_factory.mktemp("source") / "gpuscope"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__",
                                                                 "gpuscope-report*", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(source)], capture_output=True, text=True, timeout=300,
                          cwd=str(out), env={**os.environ, "PIP_NO_INPUT": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    [built] = list(out.glob("gpuscope-*.whl"))
    return built


def test_the_wheel_holds_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {name.split("/")[0] for name in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"gpuscope"}, sorted(top)
    with zipfile.ZipFile(wheel) as zf:
        top_level = [n for n in names if n.endswith("top_level.txt")]
        if top_level:
            assert zf.read(top_level[0]).decode().split() == ["gpuscope"]
    for layer in ("probes", "reports", "record", "measure", "analysis", "commands"):
        assert f"gpuscope/{layer}/__init__.py" in names
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    with zipfile.ZipFile(wheel) as zf:
        assert "gpuscope = gpuscope.commands.app:main" in zf.read(entry_points[0]).decode()


def test_the_installed_wheel_imports_and_runs_from_another_directory(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin") \
        == ["gpuscope"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    check = subprocess.run([sys.executable, "-c", ONLY_THE_WHEEL + "import gpuscope; from gpuscope import profile; "
                            "import gpuscope.probes.scopes, gpuscope.reports.render; print(gpuscope.__file__)"],
                           cwd=str(elsewhere), env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert Path(check.stdout.strip()).resolve().is_relative_to(target.resolve())
    helped = subprocess.run([sys.executable, "-c", ONLY_THE_WHEEL + "import runpy; sys.argv = ['gpuscope', '--help']; "
                             "runpy.run_module('gpuscope', run_name='__main__')"],
                            cwd=str(elsewhere), env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert "diagnose" in helped.stdout and "check" in helped.stdout
