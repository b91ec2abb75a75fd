"""The diagnose session: probes, sampler, model, sweep, conclusions, and the files they leave.

Order matters for honesty and safety: bad input is rejected before anything is
written; the CUDA context baseline is read before the model loads; samples
stream to disk from the first tick; Ctrl-C/SIGTERM stop the predictors and
still leave run.json (status `interrupted`) and a report of what was measured.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any

from gpuscope.record.errors import OutputError

RUN_FILE = "run.json"


SAMPLES_FILE = "samples.jsonl"


def check_out_path(path: str) -> None:
    """Fail at once, before the slow part (CUDA, the model), when --out can never be a folder because
    it or a folder above it is a file. Permissions are proven later by prepare_out_dir."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
    if not os.path.isdir(probe):
        what = "it is a file" if probe == os.path.abspath(path) else f"{probe} is a file"
        raise OutputError(f"cannot write to output folder {path}: {what}, not a folder")


def prepare_out_dir(path: str) -> str:
    """Create the output folder and prove it is writable, before any measurement."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".gpuscope-write-test-{os.getpid()}-{threading.get_ident()}")
        with open(probe, "w", encoding="utf-8") as fh:
            fh.write("ok")
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {path}: {exc.strerror or exc}") from None
    # A new run must not append to, or be mistaken for, the last one: nor may the last report sit beside
    # a run that is killed before it renders its own.
    for stale in (SAMPLES_FILE, RUN_FILE, *REPORT_FILES.values()):
        target = os.path.join(path, stale)
        if os.path.isfile(target) or os.path.islink(target):
            try:
                os.unlink(target)
            except FileNotFoundError:
                pass  # removed meanwhile by another run starting here
    return path


# What a report folder holds besides run.json and samples.jsonl (reports/render.py writes them). A new run
# in the same folder removes them first, so a run killed before its report never sits beside the last one's.
REPORT_FILES = {
    "html": "report.html",
    "memory_breakdown": "memory_breakdown.png",
    "memory_timeline": "memory_timeline.png",
    "throughput_latency": "throughput_latency.png",
    "compare": "compare.png",
    "tuning": "tuning.png",
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
