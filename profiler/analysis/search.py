"""The tuning search: which configuration to measure next, and which to skip, as a pure function of what was measured.

`gpuscope tune` asks "what exactly should I deploy?": predictor count x intra-op
threads (x CUDA streams x environment settings on a GPU). A full grid is too slow
on the machines people tune on, so the search walks it the way a person would,
and says why it left each cell out:

* Configurations are grouped into *sweeps*: everything but the predictor count is
  fixed (a `Group`), and the sweep walks predictor counts. The first group is the
  default one (torch's own thread count, no streams, no environment): what
  `gpuscope diagnose` alone measures, swept upward from the smallest count.
* Every other sweep starts at the predictor count of the best configuration found
  so far (its *anchor*) and climbs while throughput grows by more than
  `plateau_gain`; when the first climb does not pay, it walks down from the anchor
  while throughput holds (fewer predictors, less memory). Throughput against
  predictor count rises to a peak and then flattens or falls, so the peak of a
  sweep is next to where climbing stops.
* A climb stops where p99 or memory exceeds its limit: more predictors only add
  latency and memory.
* A sweep is dropped once another configuration dominates it (more throughput at
  no worse p99) at `dominance_counts` predictor counts.
* Before each step the budget is checked against what a step has cost so far;
  what does not fit is skipped, with the budget named.

Nothing here reads a clock or runs a model: the caller measures (commands/tune.py)
and feeds `Measurement`s back, so tests script them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpuscope.probes.units import format_ms

MEASURED = "measured"
SKIPPED = "skipped"
FAILED = "failed"
OVER_LIMIT = "over_limit"
STATUSES = (MEASURED, SKIPPED, FAILED, OVER_LIMIT)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class Group:
    """Every setting but the predictor count: one predictor sweep."""

    intra_op_threads: int
    streams: bool = False
    env: tuple[tuple[str, str], ...] = ()

    def at(self, predictors: int) -> "Settings":
        return Settings(predictors, self.intra_op_threads, self.streams, self.env)

    @property
    def needs_child(self) -> bool:
        """Environment variables take effect only before torch/CUDA initialise: a fresh process per setting."""
        return bool(self.env)

    def label(self) -> str:
        parts = [_plural(self.intra_op_threads, "intra-op thread")]
        if self.streams:
            parts.append("a stream per predictor")
        parts += [f"{k}={v}" for k, v in self.env]
        return ", ".join(parts)


@dataclass(frozen=True)
class Settings:
    """One configuration: what a deployment sets."""

    predictors: int
    intra_op_threads: int
    streams: bool = False
    env: tuple[tuple[str, str], ...] = ()

    @property
    def group(self) -> Group:
        return Group(self.intra_op_threads, self.streams, self.env)

    def label(self) -> str:
        return f"{_plural(self.predictors, 'predictor')}, {self.group.label()}"

    def to_json(self) -> dict[str, Any]:
        return {"predictors": self.predictors, "intra_op_threads": self.intra_op_threads, "streams": self.streams,
                "env": dict(self.env)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Settings":
        env = data.get("env") or {}
        return cls(int(data["predictors"]), int(data["intra_op_threads"]), bool(data.get("streams")),
                   tuple(sorted((str(k), str(v)) for k, v in env.items())))


@dataclass(frozen=True)
class Measurement:
    """What one configuration measured. Memory figures are None when they could not be read (never 0)."""

    settings: Settings
    throughput_rps: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    device_bytes: int | None = None
    host_bytes: int | None = None
    wall_s: float = 0.0  # what the step cost, start-up included: the budget's unit
    failure: str | None = None  # the step failed (errors, out of memory, a worker died): why
    interrupted: bool = False  # cut short by Ctrl-C: shown, never ranked


@dataclass(frozen=True)
class Constraints:
    """The deployment's limits; None = not set."""

    max_p99_ms: float | None = None
    max_device_bytes: int | None = None
    max_host_bytes: int | None = None

    def violations(self, m: Measurement) -> list[str]:
        """Each limit the measurement exceeded, in the gate's words ("exceeded", never "passed")."""
        from gpuscope.probes.units import format_bytes

        out = []
        where = f"at {_plural(m.settings.predictors, 'predictor')}"
        if self.max_p99_ms is not None and m.p99_ms is not None and m.p99_ms > self.max_p99_ms:
            out.append(f"p99 {format_ms(m.p99_ms)} {where} exceeded --max-p99-ms {self.max_p99_ms:g}")
        if self.max_device_bytes is not None and m.device_bytes is not None and m.device_bytes > self.max_device_bytes:
            out.append(f"device memory {format_bytes(m.device_bytes)} {where} exceeded --max-device-memory "
                       f"{format_bytes(self.max_device_bytes)}")
        if self.max_host_bytes is not None and m.host_bytes is not None and m.host_bytes > self.max_host_bytes:
            out.append(f"host memory {format_bytes(m.host_bytes)} {where} exceeded --max-host-memory "
                       f"{format_bytes(self.max_host_bytes)}")
        return out

    def overshoot(self, m: Measurement) -> float:
        """How far past its worst limit a measurement is (1.0 = at the limit): 'closest' when nothing fits."""
        ratios = [1.0]
        if self.max_p99_ms and m.p99_ms is not None:
            ratios.append(m.p99_ms / self.max_p99_ms)
        if self.max_device_bytes and m.device_bytes is not None:
            ratios.append(m.device_bytes / self.max_device_bytes)
        if self.max_host_bytes and m.host_bytes is not None:
            ratios.append(m.host_bytes / self.max_host_bytes)
        return max(ratios)


@dataclass(frozen=True)
class Space:
    """The grid: predictor counts (ascending) x groups (the first is the default: diagnose's settings)."""

    counts: tuple[int, ...]
    groups: tuple[Group, ...]

    def cells(self) -> list[Settings]:
        return [g.at(n) for g in self.groups for n in self.counts]


@dataclass(frozen=True)
class Policy:
    """The search's rules of thumb, named so tests and docs can state them."""

    plateau_gain: float = 0.05  # a climb continues while a step adds more than this share of throughput
    tie_share: float = 0.02  # throughputs this close are a tie: less memory wins, then lower p99
    dominance_counts: int = 2  # a sweep dominated at this many counts is dropped


@dataclass
class Outcome:
    """A cell of the grid and what became of it."""

    settings: Settings
    status: str
    reason: str = ""
    measurement: Measurement | None = None
    violations: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        m = self.measurement
        out: dict[str, Any] = {"settings": self.settings.to_json(), "status": self.status}
        if m is not None:
            out["throughput_rps"] = m.throughput_rps
            out["latency_ms"] = {"p50": m.p50_ms, "p99": m.p99_ms}
            out["memory"] = {"device_bytes": m.device_bytes, "host_bytes": m.host_bytes}
            out["wall_s"] = round(m.wall_s, 3)
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class _Sweep:
    group: Group
    anchor: int | None = None  # index into counts
    direction: str = "up"  # up | down | done
    next_index: int | None = None
    dropped: str = ""


class Search:
    """Proposes the next configuration (`next`), learns from each measurement (`record`), ranks (`best`).

    Usage: `while (s := search.next(elapsed_s)) is not None: search.record(measure(s))`.
    `step_estimate_s` is the cost of a step before any was measured (warm-up plus the longest window);
    afterwards the costliest step measured so far stands for the next one.
    """

    def __init__(self, space: Space, constraints: Constraints, budget_s: float, step_estimate_s: float,
                 policy: Policy = Policy()) -> None:
        if not space.counts or not space.groups:
            raise ValueError("an empty search space")
        self.space = space
        self.constraints = constraints
        self.budget_s = budget_s
        self.step_estimate_s = step_estimate_s
        self.policy = policy
        self.outcomes: dict[Settings, Outcome] = {}
        self._sweeps = [_Sweep(g) for g in space.groups]
        self._current = 0
        self._pending: Settings | None = None
        self.stopped_by: str | None = None  # the budget, or an interruption

    # ------------------------------------------------------------ proposing
    def next(self, elapsed_s: float) -> Settings | None:
        """The next configuration to measure, or None when the search is over (every other cell then has a reason)."""
        if self._pending is not None:
            raise RuntimeError("record() the last proposal before asking for the next")
        proposal = self._propose()
        if proposal is None:
            self._close("not reached")
            return None
        cost = self._step_cost(proposal.group)
        if elapsed_s + cost > self.budget_s:
            self.stopped_by = (f"budget: {elapsed_s:.0f} of {self.budget_s:g} s used, and a step takes about "
                               f"{cost:.1f} s")
            self._close(f"skipped: {self.stopped_by}")
            return None
        self._pending = proposal
        return proposal

    def interrupt(self, why: str = "interrupted") -> None:
        """Stop: every cell not measured is skipped with `why`."""
        self._pending = None
        self.stopped_by = why
        self._close(why)

    def _step_cost(self, group: Group) -> float:
        walls = [o.measurement.wall_s for o in self.outcomes.values() if o.measurement is not None
                 and o.settings.group.needs_child == group.needs_child]
        return max(walls) if walls else self.step_estimate_s

    def _propose(self) -> Settings | None:
        counts = self.space.counts
        while self._current < len(self._sweeps):
            sweep = self._sweeps[self._current]
            if sweep.direction != "done" and sweep.next_index is None:
                self._start(sweep)
            while sweep.direction != "done":
                index = sweep.next_index
                if index is None or not 0 <= index < len(counts):
                    self._turn(sweep)
                    continue
                settings = sweep.group.at(counts[index])
                if settings in self.outcomes:  # decided already: a measured cell moves on, a skipped one ends the walk
                    known = self.outcomes[settings]
                    if known.measurement is not None:
                        self._advance(sweep, known)
                    elif sweep.direction == "up":
                        self._turn(sweep)
                    else:
                        sweep.direction, sweep.next_index = "done", None
                    continue
                return settings
            self._current += 1
        return None

    def _start(self, sweep: _Sweep) -> None:
        if self._current == 0:
            sweep.anchor = 0
        else:
            best = self.best()
            anchor_n = best.settings.predictors if best is not None else self.space.counts[0]
            sweep.anchor = self.space.counts.index(anchor_n)
        sweep.next_index = sweep.anchor

    def _turn(self, sweep: _Sweep) -> None:
        """The climb is over: walk down from the anchor when the climb never paid, else the sweep is done."""
        counts = self.space.counts
        if sweep.direction == "up" and sweep.anchor and sweep.anchor > 0:
            mine = self._measured(sweep.group)
            anchor = mine.get(counts[sweep.anchor])
            above = mine.get(counts[sweep.anchor + 1]) if sweep.anchor + 1 < len(counts) else None
            climbed = (anchor is not None and above is not None and self._ok(above)
                       and above.measurement.throughput_rps > anchor.measurement.throughput_rps
                       * (1 + self.policy.plateau_gain))
            if not climbed:
                sweep.direction, sweep.next_index = "down", sweep.anchor - 1
                return
            for i in range(sweep.anchor):
                self._skip(sweep.group.at(counts[i]), f"skipped: throughput rose above {_plural(counts[sweep.anchor], 'predictor')}"
                                                      f" with {sweep.group.label()}, so fewer cannot be the peak")
        sweep.direction, sweep.next_index = "done", None

    # ------------------------------------------------------------ learning
    def record(self, m: Measurement) -> Outcome:
        """Learn from a measurement of the last proposal; returns its outcome."""
        if self._pending is None or m.settings != self._pending:
            raise RuntimeError(f"record() expects the proposal {self._pending}, got {m.settings}")
        self._pending = None
        if m.interrupted:
            outcome = Outcome(m.settings, SKIPPED, "interrupted before the step finished", m)
            self.outcomes[m.settings] = outcome
            self.interrupt("interrupted")
            return outcome
        violations = self.constraints.violations(m)
        if m.failure:
            outcome = Outcome(m.settings, FAILED, m.failure, m)
        elif violations:
            outcome = Outcome(m.settings, OVER_LIMIT, "; ".join(violations), m, violations)
        else:
            outcome = Outcome(m.settings, MEASURED, "", m)
        self.outcomes[m.settings] = outcome
        sweep = self._sweeps[self._current]
        if not self._check_dominance(sweep):  # a dropped sweep says so, not that it plateaued
            self._advance(sweep, outcome)
        return outcome

    def _advance(self, sweep: _Sweep, outcome: Outcome) -> None:
        counts = self.space.counts
        index = counts.index(outcome.settings.predictors)
        g = sweep.group
        if sweep.direction == "up":
            if outcome.status in (FAILED, OVER_LIMIT):
                why = outcome.reason if outcome.status == OVER_LIMIT else f"failed at {_plural(counts[index], 'predictor')}"
                self._skip_range(g, index + 1, len(counts), f"skipped: {why}: more predictors only add load")
                self._turn(sweep)
                return
            earlier = [o for n, o in self._measured(g).items() if n < outcome.settings.predictors and self._ok(o)]
            if earlier:
                prev = max(earlier, key=lambda o: o.measurement.throughput_rps)
                gain = outcome.measurement.throughput_rps / prev.measurement.throughput_rps - 1 \
                    if prev.measurement.throughput_rps > 0 else 0.0
                if gain <= self.policy.plateau_gain:
                    self._skip_range(g, index + 1, len(counts),
                                     f"skipped: throughput plateaued with {g.label()}: "
                                     f"{outcome.measurement.throughput_rps:.1f} req/s at "
                                     f"{_plural(counts[index], 'predictor')} vs "
                                     f"{prev.measurement.throughput_rps:.1f} at {prev.settings.predictors} "
                                     f"({gain:+.0%}, not more than {self.policy.plateau_gain:.0%})")
                    self._turn(sweep)
                    return
            sweep.next_index = index + 1
        elif sweep.direction == "down":
            if outcome.status == MEASURED:
                best_here = max(o.measurement.throughput_rps for o in self._measured(g).values() if self._ok(o))
                if outcome.measurement.throughput_rps < best_here * (1 - self.policy.plateau_gain):
                    self._skip_range(g, 0, index, f"skipped: throughput fell to {outcome.measurement.throughput_rps:.1f}"
                                                  f" req/s at {_plural(counts[index], 'predictor')} with {g.label()}: "
                                                  "fewer predictors fall further")
                    sweep.direction, sweep.next_index = "done", None
                    return
            elif outcome.status == FAILED:
                self._skip_range(g, 0, index, f"skipped: {_plural(counts[index], 'predictor')} failed with {g.label()}")
                sweep.direction, sweep.next_index = "done", None
                return
            sweep.next_index = index - 1  # over a limit: fewer predictors may meet it

    def _check_dominance(self, sweep: _Sweep) -> bool:
        """Drop the sweep (True) when another configuration beat it at `dominance_counts` predictor counts."""
        if self._current == 0 or sweep.direction == "done":
            return False
        mine = self._measured(sweep.group)
        dominated_at: list[int] = []
        by: Group | None = None
        for n, own in sorted(mine.items()):
            for other in self.outcomes.values():
                om = other.measurement
                if other.settings.group == sweep.group or other.settings.predictors != n or not self._ok(other):
                    continue
                if om.throughput_rps > own.measurement.throughput_rps and \
                        (own.measurement.p99_ms is None or (om.p99_ms is not None and om.p99_ms <= own.measurement.p99_ms)):
                    dominated_at.append(n)
                    by = other.settings.group
                    break
        if len(dominated_at) >= self.policy.dominance_counts and by is not None:
            at = " and ".join(str(n) for n in dominated_at)
            sweep.dropped = f"skipped: {sweep.group.label()} is dominated by {by.label()} at {at} predictors"
            self._skip_range(sweep.group, 0, len(self.space.counts), sweep.dropped)
            sweep.direction, sweep.next_index = "done", None
            return True
        return False

    # ------------------------------------------------------------ bookkeeping
    def _measured(self, group: Group) -> dict[int, Outcome]:
        return {s.predictors: o for s, o in self.outcomes.items()
                if s.group == group and o.measurement is not None and not o.measurement.interrupted}

    @staticmethod
    def _ok(outcome: Outcome) -> bool:
        return outcome.status in (MEASURED, OVER_LIMIT) and outcome.measurement is not None

    def _skip(self, settings: Settings, reason: str) -> None:
        if settings not in self.outcomes:
            self.outcomes[settings] = Outcome(settings, SKIPPED, reason)

    def _skip_range(self, group: Group, start: int, end: int, reason: str) -> None:
        for n in self.space.counts[start:end]:
            self._skip(group.at(n), reason)

    def _close(self, reason: str) -> None:
        for settings in self.space.cells():
            self._skip(settings, reason)

    # ------------------------------------------------------------ answers
    def configurations(self) -> list[Outcome]:
        """Every cell of the grid, in the grid's order, each with its status."""
        return [self.outcomes.get(s) or Outcome(s, SKIPPED, "not reached") for s in self.space.cells()]

    def best(self) -> Outcome | None:
        """The best configuration that met every constraint (None when none did). See `rank`."""
        ranked = rank(list(self.outcomes.values()), self.policy.tie_share)
        return ranked[0] if ranked and ranked[0].status == MEASURED else None

    def closest(self) -> Outcome | None:
        """When nothing met the constraints: the measured configuration that missed them by the least."""
        over = [o for o in self.outcomes.values() if o.status == OVER_LIMIT]
        if not over:
            return None
        return min(over, key=lambda o: (self.constraints.overshoot(o.measurement), -o.measurement.throughput_rps))

    @property
    def measured_count(self) -> int:
        return sum(1 for o in self.outcomes.values() if o.measurement is not None and not o.measurement.interrupted)


def memory_of(m: Measurement) -> float:
    """The memory a tie is decided on: the device's when measured, else the host's; unknown ranks last."""
    if m.device_bytes is not None:
        return float(m.device_bytes)
    if m.host_bytes is not None:
        return float(m.host_bytes)
    return float("inf")


def rank(outcomes: list[Outcome], tie_share: float = 0.02) -> list[Outcome]:
    """Feasible configurations first, best first: the highest throughput; throughputs within `tie_share`
    of each other tie, and a tie goes to less memory, then to lower p99. Then the rest (over a limit, failed)
    by throughput. Skipped cells are left out."""
    feasible = [o for o in outcomes if o.status == MEASURED and o.measurement is not None]
    others = [o for o in outcomes if o.status in (OVER_LIMIT, FAILED) and o.measurement is not None]
    ordered: list[Outcome] = []
    pool = sorted(feasible, key=lambda o: -o.measurement.throughput_rps)
    while pool:
        top = pool[0].measurement.throughput_rps
        tied = [o for o in pool if o.measurement.throughput_rps >= top * (1 - tie_share)]
        tied.sort(key=lambda o: (memory_of(o.measurement), o.measurement.p99_ms if o.measurement.p99_ms is not None
                                 else float("inf"), -o.measurement.throughput_rps))
        ordered.append(tied[0])
        pool.remove(tied[0])
    others.sort(key=lambda o: (o.status != OVER_LIMIT, -o.measurement.throughput_rps))
    return ordered + others


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (p99_ms, throughput_rps) points no other point beats on both (lower p99, higher
    throughput), ordered by p99."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_tp = [], float("-inf")
    for i in order:
        if points[i][1] > best_tp:
            front.append(i)
            best_tp = points[i][1]
    return front


def default_threads(usable_cores: int, counts: tuple[int, ...], torch_default: int) -> tuple[int, ...]:
    """The intra-op thread counts tried when none are given: 1, cores // N for each count N, torch's default."""
    values = {1, torch_default, *(max(1, usable_cores // n) for n in counts)}
    return tuple(sorted(v for v in values if v >= 1))


def gain_text(new: float, old: float) -> str:
    """`+18%` (the change from `old` to `new`), or `n/a` when `old` is 0."""
    return f"{new / old - 1:+.0%}" if old > 0 else "n/a"
