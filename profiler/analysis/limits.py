"""The gate's limits: parsed from the command line or a config table into one Limits value."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping

from gpuscope.probes.units import parse_size
from gpuscope.record.catalogue import KNOWN_CODES, normalise_code, option_name

EXIT_PASS = 0


EXIT_FAIL = 1


EXIT_UNMEASURED = 2


EXIT_BAD_INPUT = 2


# The limits evaluated at a step of the sweep.
STEP_LIMITS = ("max_device_memory", "max_host_memory", "min_headroom_pct", "max_p99_ms", "min_throughput")


# What a watch or profile answers without steps: limit -> (series of record.extra["live"], what, needs a GPU).
LIVE_LIMITS = {
    "max_host_memory": ("rss_bytes", "peak RSS", False),
    "max_device_memory": ("process_gpu_bytes", "peak GPU memory of the process", True),
}


FAIL_ON_CHOICES = ("warn", "fail")


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


class CheckConfigError(ValueError):
    """A limit that cannot be used: unknown key, malformed value, unreadable config file.

    The message names where the value came from and the key, e.g.
    `gpuscope.toml: check.max_p99_ms: expected a number, got 'fast'`.
    """


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

    def gated_count(self, at_predictors: int | None = None) -> int | None:
        """The predictor count the gate is pinned to: the command line's, else the config's, else None
        (then the gate reads the sweep's recommendation)."""
        return at_predictors if at_predictors is not None else self.at_predictors

    def sweep_p99_limit_ms(self, at_predictors: int | None = None) -> float | None:
        """The p99 limit a sweep for this gate may stop at. None when the gate is pinned to a count: the
        sweep must measure that count, so a p99 past the limit below it must not end the sweep early."""
        return self.max_p99_ms if self.gated_count(at_predictors) is None else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value == ():
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


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
    catalogue = KNOWN_CODES
    out: list[str] = []
    for item in items:
        code = normalise_code(item)
        if code not in catalogue:
            close = difflib.get_close_matches(code, catalogue, n=1)
            hint = f"; did you mean {option_name(close[0])}?" if close else ""
            raise CheckConfigError(f"unknown finding code {item!r}{hint} "
                                   f"(known: {', '.join(option_name(c) for c in catalogue)})")
        if code not in out:
            out.append(code)
    return tuple(out)


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
