"""Makes `gpuscope` the mutated copy when the tests run inside mutmut's `mutants/` folder.

Why this exists: the wheel maps profiler/ -> `gpuscope`, probes/ -> `gpuscope.probes` and reports/ ->
`gpuscope.reports` (pyproject's [tool.setuptools.package-dir]), and the tests import `gpuscope`. mutmut 3.8.1
copies profiler/, probes/, reports/ and tests/ into mutants/, puts mutants/ first on sys.path and runs pytest
there. Two things then go wrong without help:

1. mutants/ holds no `gpuscope/`, so `import gpuscope` falls through to the editable install's finder, which
   maps it to the checkout's unmutated profiler/: every mutant would survive.
2. mutmut names a mutant after its file (`profiler/analysis/findings.py` -> `profiler.analysis.findings.x_...`)
   and its trampoline runs the mutant only when the function's `__module__` is that name. A copy imported as
   `gpuscope.analysis.findings` would never match, and mutmut's stats would find no test covering any mutant.

So inside mutants/ this module puts a finder first on sys.meta_path that makes every `gpuscope[.x]` the very
module object of the folder it is built from (`gpuscope.analysis.findings` IS `profiler.analysis.findings`,
`gpuscope.probes.units` IS `probes.units`), each imported once, from mutants/, under the name mutmut expects.
Outside mutants/ it does nothing: the tests import the installed package as always.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

# import name prefix -> the folder (top-level package inside mutants/) it is built from; longest first
FOLDER_BY_PREFIX: tuple[tuple[str, str], ...] = (
    ("gpuscope.probes", "probes"),
    ("gpuscope.reports", "reports"),
    ("gpuscope", "profiler"),
)
MUTANTS_DIR_NAME = "mutants"


def folder_name(import_name: str) -> str | None:
    """The folder-based module name that `import_name` stands for, or None when it is not under `gpuscope`."""
    for prefix, folder in FOLDER_BY_PREFIX:
        if import_name == prefix or import_name.startswith(prefix + "."):
            return folder + import_name[len(prefix):]
    return None


def is_mutmut_copy(root: Path) -> bool:
    """True when `root` (the folder holding tests/) is mutmut's working copy: mutants/ with profiler/ in it."""
    return root.name == MUTANTS_DIR_NAME and (root / "profiler" / "__init__.py").is_file()


class _AliasLoader(importlib.abc.Loader):
    """Hands back the folder-named module instead of executing the file a second time under another name."""

    def __init__(self, real_name: str) -> None:
        self.real_name = real_name
        self._real_spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.real_name)
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system set __spec__ to the alias's spec between create_module and here: give the module
        # back its own, so it keeps saying where it was loaded from (and under which name)
        module.__spec__ = self._real_spec


class AliasFinder(importlib.abc.MetaPathFinder):
    """`gpuscope[.x]` -> the module of the same path under profiler/, probes/ or reports/ in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        real = folder_name(fullname)
        if real is None:
            return None
        if importlib.util.find_spec(real) is None:  # no such module in the folder: a plain ImportError
            return None
        is_package = fullname in {prefix for prefix, _ in FOLDER_BY_PREFIX}
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real), is_package=is_package)


def _check_from_root(root: Path, name: str) -> None:
    """Fails loudly when a folder-named package would not come from `root` (a stray install of the same name,
    or gpuscope already imported from elsewhere): a run against unmutated code kills nothing and says nothing."""
    module = importlib.import_module(name)
    where = Path(module.__file__).resolve()
    if root.resolve() not in where.parents:
        raise RuntimeError(f"mutation run: `{name}` was imported from {where}, not from {root}")


def install(root: Path) -> AliasFinder:
    """Put the finder first on sys.meta_path (ahead of the editable install's finder). Idempotent."""
    for finder in sys.meta_path:
        if isinstance(finder, AliasFinder) and finder.root == root:
            return finder
    if "gpuscope" in sys.modules:
        raise RuntimeError(f"mutation run: gpuscope was imported before the tests' conftest, from "
                           f"{getattr(sys.modules['gpuscope'], '__file__', '?')}; it would not be the mutated copy")
    root_text = str(root)
    if root_text not in sys.path:
        sys.path.insert(0, root_text)
    finder = AliasFinder(root)
    sys.meta_path.insert(0, finder)  # before the packages import each other through `gpuscope`
    for _, folder in FOLDER_BY_PREFIX:
        _check_from_root(root, folder)
    return finder


def install_if_mutmut_copy(root: Path) -> bool:
    """What tests/conftest.py calls: installs the finder only inside mutmut's copy. Returns whether it did."""
    if not is_mutmut_copy(root):
        return False
    install(root)
    return True
