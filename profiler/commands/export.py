"""`gpuscope export`: serve every GPU process of this node as Prometheus metrics, never crash-looping.

Without NVML (no driver, a driver being upgraded, a lost GPU) it keeps serving
`gpuscope_nvml_available 0` with the reason and retries with backoff
(measure/nvml_retry.py); /healthz answers 200 while it serves. Only bad input exits 2.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable

from gpuscope.measure.exporter import Exporter, start_exporter
from gpuscope.record.errors import EXIT_OK, UsageError


def run_export(port: int, bind: str = "127.0.0.1", opener: Callable[[], Any] | None = None,
               stop: threading.Event | None = None, describe: Callable[[int, str], Any] | None = None,
               pid_exists: Callable[[int], bool] | None = None, err: Any = None,
               handle_signals: bool = True, on_ready: Callable[[Exporter], None] | None = None,
               clock: Callable[[], float] = time.monotonic, poll_s: float = 0.5) -> int:
    """`gpuscope export --port PORT`: serve every GPU and process until Ctrl-C/SIGTERM.

    Without NVML (no driver, a driver being upgraded, a lost GPU) it keeps serving
    `gpuscope_nvml_available 0` and retries (measure/nvml_retry.py); only bad input exits 2.
    """
    from gpuscope.measure.exporter import validate_port
    from gpuscope.measure.nvml_retry import RetryingNodeSource
    from gpuscope.measure.recording import Interrupts
    from gpuscope.probes.nvml import open_backend

    err = err or sys.stderr
    validate_port(port, "--port")
    stop = stop or threading.Event()
    source = RetryingNodeSource(opener or open_backend, describe, pid_exists, clock=clock, log=err)
    source.ensure()  # the first attempt before listening: a taken port still closes NVML
    try:
        exporter = start_exporter(source, port, bind, health=source.health)
    except UsageError:
        source.close()
        raise
    err.write(f"gpuscope export: serving Prometheus metrics on {exporter.url} (Ctrl-C stops)\n")
    err.flush()
    if on_ready is not None:
        on_ready(exporter)
    interrupts = Interrupts(stop) if handle_signals else None
    try:
        if interrupts is not None:
            interrupts.__enter__()
        while not stop.wait(poll_s):
            source.ensure()  # recover without waiting for a scrape
    except KeyboardInterrupt:
        pass
    finally:
        if interrupts is not None:
            interrupts.__exit__(None, None, None)
        exporter.close()
        source.close()
    return EXIT_OK
