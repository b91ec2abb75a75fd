"""`gpuscope export`: serve every GPU process of this node as Prometheus metrics."""
from __future__ import annotations

import sys
import threading
from typing import Any, Callable

from gpuscope.measure.exporter import Exporter, NodeSource, start_exporter
from gpuscope.record.errors import EXIT_OK, EXIT_USAGE, UsageError


def run_export(port: int, bind: str = "127.0.0.1", opener: Callable[[], Any] | None = None,
               stop: threading.Event | None = None, describe: Callable[[int, str], Any] | None = None,
               pid_exists: Callable[[int], bool] | None = None, err: Any = None,
               handle_signals: bool = True, on_ready: Callable[[Exporter], None] | None = None) -> int:
    """`gpuscope export --port PORT`: serve every GPU and process until Ctrl-C/SIGTERM. Exit 2 without a GPU."""
    from gpuscope.commands.watch import validate_port
    from gpuscope.measure.recording import Interrupts
    from gpuscope.probes.nvml import DeviceUnavailable, open_backend

    err = err or sys.stderr
    validate_port(port, "--port")
    try:
        backend = (opener or open_backend)()
    except DeviceUnavailable as exc:
        err.write(f"gpuscope export: no GPU here: {exc.detail}\n")
        return EXIT_USAGE
    stop = stop or threading.Event()
    try:
        exporter = start_exporter(NodeSource(backend, describe, pid_exists), port, bind)
    except UsageError:
        backend.shutdown()
        raise
    err.write(f"gpuscope export: serving Prometheus metrics on {exporter.url} (Ctrl-C stops)\n")
    err.flush()
    if on_ready is not None:
        on_ready(exporter)
    interrupts = Interrupts(stop) if handle_signals else None
    try:
        if interrupts is not None:
            interrupts.__enter__()
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if interrupts is not None:
            interrupts.__exit__(None, None, None)
        exporter.close()
        backend.shutdown()
    return EXIT_OK
