"""`gpuscope export`'s NVML that may come and go: keep serving, retry with backoff, recover.

As a DaemonSet the exporter meets nodes whose driver is being installed or
upgraded, GPUs that fall off the bus, and containers started before the NVIDIA
runtime was ready. Exiting there makes the kubelet restart it in a loop
(CrashLoopBackOff) and the node's series vanish, which reads like a dead
exporter rather than a sick node. So the endpoint stays up and says
`gpuscope_nvml_available 0`, with the reason in `gpuscope_nvml_info`, while
this source retries NVML: after 1 s, then doubling up to every 60 s, and at once
back to normal readings when NVML answers again.

A backend that opened but whose every device reading now fails (a lost GPU, a
driver unloaded under it) is shut down and reopened on the same schedule: a
reloaded driver needs a fresh nvmlInit, an old handle never recovers.
"""
from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any, Callable, TextIO

from gpuscope.measure.exporter import lost_reason
from gpuscope.probes.readings import NOT_INITIALIZED

FIRST_RETRY_S = 1.0
MAX_RETRY_S = 60.0


class Backoff:
    """Delays between attempts: first_s, doubling, at most max_s; `reset()` after a success."""

    def __init__(self, first_s: float = FIRST_RETRY_S, max_s: float = MAX_RETRY_S) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.failures = 0

    def next_delay_s(self) -> float:
        delay = min(self.max_s, self.first_s * (2 ** self.failures))
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class RetryingNodeSource:
    """A callable source of LiveViews for the exporter that never raises when NVML is missing.

    `opener` returns an NvmlBackend or raises probes.nvml.DeviceUnavailable. `clock` is
    injectable so tests step time instead of sleeping. `log` gets one line per change of
    state (unavailable, back), never one per retry.
    """

    def __init__(self, opener: Callable[[], Any], describe: Callable[[int, str], Any] | None = None,
                 pid_exists: Callable[[int], bool] | None = None, min_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, backoff: Backoff | None = None,
                 log: TextIO | None = None) -> None:
        self._opener = opener
        self._describe = describe
        self._pid_exists = pid_exists
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._backoff = backoff or Backoff()
        self._log = log
        self._lock = threading.RLock()
        self.backend: Any = None
        self._source: Any = None
        self.unavailable: dict[str, str] | None = {"reason": NOT_INITIALIZED, "detail": "NVML not opened yet"}
        self._next_attempt = float("-inf")
        self.attempts = 0
        self.recoveries = 0

    # -- state
    @property
    def available(self) -> bool:
        return self._source is not None

    def health(self) -> str:
        """One line for /healthz."""
        with self._lock:
            if self.unavailable is None:
                return "nvml: available\n"
            return f"nvml: unavailable ({self.unavailable['reason']}: {self.unavailable['detail']})\n"

    def _say(self, text: str) -> None:
        if self._log is not None:
            self._log.write(f"gpuscope export: {text}\n")
            self._log.flush()

    # -- opening and dropping NVML
    def ensure(self) -> bool:
        """Open NVML if it is closed and an attempt is due; True when it is open."""
        from gpuscope.measure.exporter import NodeSource
        from gpuscope.probes.nvml import DeviceUnavailable

        with self._lock:
            if self._source is not None:
                return True
            now = self._clock()
            if now < self._next_attempt:
                return False
            self.attempts += 1
            try:
                backend = self._opener()
                source = NodeSource(backend, self._describe, self._pid_exists, self._min_interval_s, self._clock)
            except DeviceUnavailable as exc:
                self._failed({"reason": exc.reason, "detail": exc.detail}, now)
                return False
            except Exception as exc:  # a binding that raised something else: still not a reason to exit
                self._failed({"reason": "error", "detail": f"{type(exc).__name__}: {exc}"}, now)
                return False
            was_down = self.attempts > 1
            self.backend, self._source, self.unavailable = backend, source, None
            self._backoff.reset()
            if was_down:
                self.recoveries += 1
                count = len(getattr(source, "devices", []) or [])
                self._say(f"NVML is back ({count} GPU{'s' if count != 1 else ''}); serving readings again")
            return True

    def _failed(self, why: dict[str, str], now: float) -> None:
        delay = self._backoff.next_delay_s()
        self._next_attempt = now + delay
        if why != self.unavailable:
            self._say(f"NVML unavailable ({why['reason']}: {why['detail']}); serving gpuscope_nvml_available 0 "
                      f"and retrying in {delay:.0f} s, then with backoff up to every {self._backoff.max_s:.0f} s")
        self.unavailable = why

    def _drop(self, why: dict[str, str]) -> None:
        backend, self.backend, self._source = self.backend, None, None
        try:
            backend.shutdown()
        except Exception:
            pass
        self._failed(why, self._clock())

    def close(self) -> None:
        with self._lock:
            if self.backend is not None:
                try:
                    self.backend.shutdown()
                except Exception:
                    pass
            self.backend, self._source = None, None

    # -- the source
    def __call__(self) -> Any:
        from gpuscope.measure.exporter import LiveView

        with self._lock:
            if self.ensure():
                view = self._source()
                if view.nvml_available:
                    return view
                why = lost_reason(view.values)
                self._drop(why)  # every device reading failed: reopen later with a fresh nvmlInit
                return replace(view, device_unavailable=why)
            return LiveView(devices=[], values=[], nvml_available=False, device_unavailable=dict(self.unavailable or {}))
