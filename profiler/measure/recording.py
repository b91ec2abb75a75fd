"""The one recording lifecycle: the pieces every mode (diagnose, watch, profile(), compare) runs through."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from gpuscope import __version__
from gpuscope.record.errors import EXIT_SIGINT, EXIT_SIGTERM
from gpuscope.record.run import RunRecord


def environment_facts(device: str) -> dict[str, Any]:
    import platform

    import torch

    from gpuscope.probes.engines import memory_variables

    facts: dict[str, Any] = {"gpuscope": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                             "python": platform.python_version(), "memory_env": memory_variables(dict(os.environ)),
                             "torch_num_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        facts["cudnn"] = torch.backends.cudnn.version()
        facts["device_name"] = torch.cuda.get_device_name(device)
    return facts


class Interrupts:
    """SIGINT/SIGTERM set a stop event instead of raising in the middle of a step."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out
        self.signum = signum
        self.stop.set()

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int | None:
        if self.signum == signal.SIGINT:
            return EXIT_SIGINT
        if self.signum == signal.SIGTERM:
            return EXIT_SIGTERM
        return None


@dataclass
class SessionResult:
    record: RunRecord | None
    exit_code: int
    out_dir: str | None = None
    report_paths: dict[str, str] | None = None


class Progress:
    """Progress on stderr: a refreshing line on a terminal, plain lines otherwise."""

    def __init__(self, quiet: bool = False, stream: Any = None, columns: Callable[[], int] | None = None) -> None:
        import shutil

        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._columns = columns or (lambda: shutil.get_terminal_size((120, 24)).columns)
        self._last_plain = 0.0
        self._pending = False  # a refreshing line is on screen without its newline

    def update(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            # One row, never wrapped: \r returns to the start of the last row only, so a wrapped status line
            # would leave its first rows behind at every refresh.
            width = max(20, self._columns() - 1)
            if len(text) > width:
                text = text[:width - 1] + "\u2026"
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            self._pending = True
        elif time.monotonic() - self._last_plain > 2.0 or "warming" in text:
            self._last_plain = time.monotonic()
            self.stream.write(text + "\n")
            self.stream.flush()

    def line(self, text: str) -> None:
        if self.quiet:
            return
        self.error(text)

    def error(self, text: str) -> None:
        """A line the user must see (a failure), written even with --quiet."""
        if self.tty:
            self.stream.write("\r\033[K")
            self._pending = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """Clear a refreshing line so what follows (the summary) starts on a clean line."""
        if self._pending:
            self.stream.write("\r\033[K")
            self.stream.flush()
        self._pending = False


def open_nvml() -> tuple[Any, dict[str, str] | None]:
    from gpuscope.probes.nvml import DeviceUnavailable, open_backend

    try:
        return open_backend(), None
    except DeviceUnavailable as exc:
        return None, {"reason": exc.reason, "detail": exc.detail}


def render(record: RunRecord, out_dir: str, progress: Progress) -> dict[str, str] | None:
    """Render the report; a rendering failure is one line, and run.json stays."""
    try:
        from gpuscope.reports.render import render_report
    except ImportError:
        return {}
    try:
        return render_report(record, out_dir, os.path.join(out_dir, record.samples))
    except Exception as exc:
        progress.error(f"gpuscope: could not render the report: {type(exc).__name__}: {exc} (run.json is kept)")
        return None
