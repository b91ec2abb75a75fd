"""Where `gpuscope check` finds its limits: [tool.gpuscope.check] in pyproject.toml, or gpuscope.toml."""
from __future__ import annotations

import os
from typing import Any, Mapping

from gpuscope.analysis.limits import CheckConfigError, _show


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
