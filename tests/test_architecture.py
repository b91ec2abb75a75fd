"""The layers of docs/architecture.md, enforced: what each layer may import, no import circles, one package.

Every import counts, lazy ones inside functions included: a lazy import is still a
dependency, only a deferred one. The modules are read from the installed package's
own files (what users import), not from the checkout.
"""
from __future__ import annotations

import ast
from pathlib import Path

import gpuscope

PACKAGE_DIR = Path(gpuscope.__file__).resolve().parent

# layer -> the layers it may import (itself included)
ALLOWED = {
    "probes": {"probes"},
    "record": {"probes", "record"},
    "analysis": {"probes", "record", "analysis"},
    "measure": {"probes", "record", "analysis", "measure"},
    "reports": {"probes", "record", "analysis", "measure", "reports"},
    "commands": {"probes", "record", "analysis", "measure", "reports", "commands", "api"},
    "api": {"probes", "record", "analysis", "measure", "reports", "api"},  # gpuscope itself: profile(), request
}


def _module_files() -> dict[str, Path]:
    """gpuscope.* module name -> file, found through the package's own __path__ (works for an editable
    install mapping profiler/, probes/ and reports/ as well as for a wheel)."""
    import importlib
    import pkgutil

    out = {"gpuscope": Path(gpuscope.__file__)}
    for info in pkgutil.walk_packages(gpuscope.__path__, "gpuscope."):
        module = importlib.util.find_spec(info.name)
        assert module is not None and module.origin, info.name
        out[info.name] = Path(module.origin)
    return out


def layer_of(module: str) -> str:
    if module == "gpuscope.__main__":  # `python -m gpuscope` is the command line
        return "commands"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ("probes", "record", "analysis", "measure", "reports", "commands"):
        return parts[1]
    return "api"


def imports_of(name: str, path: Path) -> set[str]:
    """Every gpuscope module `name` imports, anywhere in its file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "gpuscope")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "gpuscope":
                continue
            found.add(module)
            for alias in node.names:  # `from gpuscope.probes import scopes` imports a module
                if f"{module}.{alias.name}" in MODULES:
                    found.add(f"{module}.{alias.name}")
    found.discard(name)
    return {m for m in found if m in MODULES}


MODULES = _module_files()
GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def test_every_module_imports_only_the_layers_below_it():
    wrong = [f"{name} ({layer_of(name)}) imports {dep} ({layer_of(dep)})"
             for name, deps in GRAPH.items() for dep in sorted(deps)
             if layer_of(dep) not in ALLOWED[layer_of(name)]
             and not (dep == "gpuscope" and layer_of(name) != "probes")]  # __version__ is everyone's
    assert not wrong, "\n".join(wrong)


def test_the_library_api_imports_no_command():
    reach: set[str] = set()
    todo = ["gpuscope", "gpuscope.inprocess"]
    while todo:
        name = todo.pop()
        if name in reach:
            continue
        reach.add(name)
        todo.extend(GRAPH.get(name, ()))
    commands = sorted(m for m in reach if layer_of(m) == "commands")
    assert not commands, f"profile() reaches commands: {commands}"


def test_there_are_no_import_circles():
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(GRAPH[name]):
            if dep == "gpuscope":  # the package's __init__ (the version, profile()) is a leaf by design
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_package_init_is_a_leaf():
    """`import gpuscope` stays instant and imports nothing of its own eagerly (profile() is lazy)."""
    tree = ast.parse(MODULES["gpuscope"].read_text(encoding="utf-8"))
    eager = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
             and (getattr(n, "module", "") or "").startswith("gpuscope")]
    assert not eager


def test_the_old_top_level_names_are_not_importable_from_the_package():
    """Nothing installs or needs `profiler`, `probes` or `reports` as top-level packages."""
    for name, deps in GRAPH.items():
        tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert (node.module or "").split(".")[0] not in ("profiler", "probes", "reports"), (name, node.module)
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] not in ("profiler", "probes", "reports") for a in node.names), name
