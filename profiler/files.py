"""Writing output files so a reader never sees half of one (temp file in the same folder, then rename)."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

# What a report folder holds besides run.json and samples.jsonl (reports/render.py writes them). A new run
# in the same folder removes them first, so a run killed before its report never sits beside the last one's.
REPORT_FILES = {
    "html": "report.html",
    "memory_breakdown": "memory_breakdown.png",
    "memory_timeline": "memory_timeline.png",
    "throughput_latency": "throughput_latency.png",
    "compare": "compare.png",
}


def write_bytes_atomic(path: str, data: bytes, make_dirs: bool = False) -> None:
    """Write `data` to `path` atomically, world-readable (reports and records are meant to be shared)."""
    directory = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gpuscope-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; CI artifact collectors may run as another user
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json_atomic(path: str, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8"))
