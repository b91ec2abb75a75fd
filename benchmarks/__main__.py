"""`python -m benchmarks [--quick] [--json PATH] [--only NAME,...] [--overhead-rounds N]`"""
from __future__ import annotations

import argparse
import json
import sys

from benchmarks.suite import BENCHMARKS, run_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 3 minutes)")
    parser.add_argument("--json", dest="json_path", help="write the results as JSON here")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--overhead-rounds", type=int, default=None,
                        help="rounds per sampler_overhead row (default 120, 30 with --quick; 1.5 s each)")
    args = parser.parse_args(argv)
    if args.overhead_rounds is not None and args.overhead_rounds < 3:
        parser.error("--overhead-rounds must be at least 3")
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    results = run_all(quick=args.quick, only=only, echo=lambda text: print(text, flush=True),
                      overhead_rounds=args.overhead_rounds)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
