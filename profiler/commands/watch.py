"""`gpuscope watch`: the command around measure.watch, printing the summary."""
from __future__ import annotations

import os

from gpuscope.measure.watch import WatchOptions, run_watch
from gpuscope.reports.text import format_live_summary


def watch_command(pid: int, interval: str, duration: str, out: str, prometheus_port: int | None, bind: str,
                  quiet: bool, json_output: bool = False) -> int:
    """What `gpuscope watch` runs: the session, then the summary on stdout. Returns the exit code."""
    import json

    result = run_watch(WatchOptions(pid=pid, interval=interval, duration=duration, out=out, quiet=quiet,
                                    prometheus_port=prometheus_port, bind=bind))
    if json_output:
        data = result.record.to_json()
        print(json.dumps({k: data[k] for k in ("schema", "status", "mode", "pid", "config", "devices",
                                               "processes", "findings", "extra") if k in data}, indent=2, default=str))
    else:
        print(format_live_summary(result.record))
        html = (result.report_paths or {}).get("html")
        print(f"\nwrote {os.path.join(result.out_dir, 'run.json')}" + (f" and {html}" if html else ""))
    return result.exit_code
