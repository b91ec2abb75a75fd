"""`python -m benchmarks [--quick] [--json PATH] [--only NAME,...] [--overhead-rounds N] [--overhead-rows MS:P,...]`"""
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
    parser.add_argument("--overhead-rows", default=None,
                        help="sampler_overhead rows to measure as INTERVAL_MS:PREDICTORS, e.g. 5:1,50:2 "
                             "(of 50:1, 5:1, 50:2, 5:2; default all)")
    args = parser.parse_args(argv)
    if args.overhead_rounds is not None and args.overhead_rounds < 3:
        parser.error("--overhead-rounds must be at least 3")
    rows = None
    if args.overhead_rows:
        known = {(50.0, 1), (5.0, 1), (50.0, 2), (5.0, 2)}
        try:
            rows = [(float(ms), int(p)) for ms, p in (item.split(":") for item in args.overhead_rows.split(","))]
        except ValueError:
            parser.error(f"--overhead-rows: expected INTERVAL_MS:PREDICTORS,..., got {args.overhead_rows!r}")
        if not set(rows) <= known:
            parser.error(f"--overhead-rows: the rows are 50:1, 5:1, 50:2 and 5:2, got {args.overhead_rows!r}")
    only = [name.strip() for name in args.only.split(",")] if args.only else None
    results = run_all(quick=args.quick, only=only, echo=lambda text: print(text, flush=True),
                      overhead_rounds=args.overhead_rounds, overhead_rows=rows)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
