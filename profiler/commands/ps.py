"""`gpuscope ps`: every GPU process, its memory and engines, who shares which device."""
from __future__ import annotations

import json
import sys
from typing import Any, Callable, TextIO

from gpuscope.measure.snapshot import collect
from gpuscope.record.errors import EXIT_OK, EXIT_USAGE
from gpuscope.reports.text import format_table


def run_ps(json_output: bool = False, opener: Callable[[], Any] | None = None,
           describe: Callable[[int, str], Any] | None = None, pid_exists: Callable[[int], bool] | None = None,
           out: TextIO | None = None, err: TextIO | None = None, width: int | None = None) -> int:
    """`gpuscope ps`: print the table (or JSON); without a GPU, one line on stderr and exit code 2.

    `opener` returns an NvmlBackend or raises probes.nvml.DeviceUnavailable (default: the real NVML).
    """
    from gpuscope.probes.nvml import DeviceUnavailable, MetricError, open_backend

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        backend = (opener or open_backend)()
    except DeviceUnavailable as exc:
        err.write(f"gpuscope ps: no GPU here: {exc.detail}\n")
        return EXIT_USAGE
    try:
        snapshot = collect(backend, describe=describe, pid_exists=pid_exists)
    except MetricError as exc:  # NVML started but cannot even count its devices
        err.write(f"gpuscope ps: NVML failed: {exc} ({exc.reason})\n")
        return EXIT_USAGE
    finally:
        try:
            backend.shutdown()
        except Exception:
            pass
    if not snapshot.devices:  # a driver without a visible GPU (CUDA_VISIBLE_DEVICES="", a container without one)
        err.write("gpuscope ps: no GPU here: NVML started but sees no device\n")
        return EXIT_USAGE
    if json_output:
        out.write(json.dumps(snapshot.to_json(), indent=2, default=str) + "\n")
    else:
        if width is None and getattr(out, "isatty", lambda: False)():
            import shutil

            width = shutil.get_terminal_size((160, 24)).columns
        out.write(format_table(snapshot, width) + "\n")
    return EXIT_OK
