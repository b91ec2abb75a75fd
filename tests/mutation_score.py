"""The mutation run's sample and score, per target (docs/testing.md, "Mutation testing"). Not a test module.

Why a script: issue 20 asks for a score per target (the rules in `findings`, the gate's evaluation), while
mutmut prints one count over every mutated file; and a sample must be drawn the same way each time to be
compared. Run it from the repository root after `mutmut run` has generated mutants/:

    python tests/mutation_score.py sample --seed 20 --per-target 200 > mutants/sample.txt
    python tests/mutation_score.py score [--names mutants/sample.txt]

It reads mutmut's own records (mutants/<file>.meta: each mutant's exit code) and mutmut's own table of what
an exit code means; it runs nothing.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import random
import sys
from pathlib import Path

# target -> (the file mutmut mutates, the mutant-name patterns that are the target). The gate's evaluation is
# the class _Evaluation (every method; mutmut writes a method's mutants as x<U+01C1>Class<U+01C1>method__mutmut_N)
# and the function evaluate() that drives it.
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "findings": ("profiler/analysis/findings.py", ("profiler.analysis.findings.*",)),
    "gate evaluation": ("profiler/analysis/gate.py", ("profiler.analysis.gate.x\u01c1_Evaluation\u01c1*",
                                                      "profiler.analysis.gate.x_evaluate__mutmut_*")),
}
Z_95 = 1.959964


def exit_codes(mutants_dir: Path, source_file: str) -> dict[str, int | None]:
    """mutant name -> the exit code mutmut recorded (None: not run yet)."""
    meta = mutants_dir / (source_file + ".meta")
    if not meta.is_file():
        raise SystemExit(f"{meta} is missing: run `mutmut run` first (docs/testing.md)")
    return json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]


def target_names(mutants_dir: Path) -> dict[str, list[str]]:
    """target -> its mutants' names, sorted."""
    out = {}
    for target, (source_file, patterns) in TARGETS.items():
        names = exit_codes(mutants_dir, source_file)
        out[target] = sorted(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))
    return out


def draw_sample(names_by_target: dict[str, list[str]], per_target: int, seed: int) -> list[str]:
    """A uniform random sample without replacement, `per_target` from each target (all when fewer)."""
    rng = random.Random(seed)
    chosen: list[str] = []
    for target in TARGETS:
        names = names_by_target[target]
        chosen += sorted(rng.sample(names, min(per_target, len(names))))
    return chosen


def wilson_95(killed: int, n: int) -> tuple[float, float]:
    """The 95% Wilson interval of a killed share, as fractions: a sample's score with its margin."""
    if n == 0:
        return (math.nan, math.nan)
    p = killed / n
    z2 = Z_95 * Z_95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (centre - half, centre + half)


def score(mutants_dir: Path, only: set[str] | None) -> list[dict]:
    """Per target: how many of its (sampled) mutants were run, killed, and what became of the others."""
    from mutmut.stats import status_by_exit_code  # the run's own meaning of each exit code

    rows = []
    for target, (source_file, _) in TARGETS.items():
        codes = exit_codes(mutants_dir, source_file)
        names = [n for n in target_names(mutants_dir)[target] if only is None or n in only]
        statuses = {n: status_by_exit_code[codes[n]] for n in names}
        checked = [n for n in names if statuses[n] != "not checked"]
        killed = sum(1 for n in checked if statuses[n] == "killed")
        low, high = wilson_95(killed, len(checked))
        rows.append({
            "target": target, "mutants": len(names), "checked": len(checked), "killed": killed,
            "score_pct": 100.0 * killed / len(checked) if checked else math.nan,
            "wilson95_pct": (100.0 * low, 100.0 * high),
            "not_killed": {n: statuses[n] for n in checked if statuses[n] != "killed"},
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample", help="print a random sample of mutant names, one a line")
    sample.add_argument("--seed", type=int, required=True)
    sample.add_argument("--per-target", type=int, required=True)
    scored = sub.add_parser("score", help="the killed share per target, with survivors")
    scored.add_argument("--names", type=Path, help="score only the names in this file (a sample)")
    args = parser.parse_args(argv)

    if args.command == "sample":
        print("\n".join(draw_sample(target_names(args.mutants), args.per_target, args.seed)))
        return 0
    only = set(args.names.read_text(encoding="utf-8").split()) if args.names else None
    for row in score(args.mutants, only):
        low, high = row["wilson95_pct"]
        print(f"{row['target']}: {row['killed']}/{row['checked']} killed = {row['score_pct']:.1f}% "
              f"(95% Wilson {low:.1f}-{high:.1f}%), {row['mutants'] - row['checked']} of {row['mutants']} not run")
        for name, status in sorted(row["not_killed"].items()):
            print(f"    {status:>10}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
