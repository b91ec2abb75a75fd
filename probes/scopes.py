"""What a reading is about: the one place scope strings are built and parsed.

A sample's scope names the thing measured: `host`, a device `gpu:N` (NVML's
index), a process `pid:P`, or a process on a device `pid:P/gpu:N`. Scopes are
written into samples.jsonl and read back by the analysis and the reports, so
their spelling is part of the file format; every layer goes through these
functions rather than formatting or slicing the strings itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

HOST = "host"
_PID = "pid:"
_GPU = "gpu:"


def device(index: int) -> str:
    """`gpu:N`: device-level readings of NVML device N."""
    return f"{_GPU}{index}"


def process(pid: int) -> str:
    """`pid:P`: host-level readings of one process."""
    return f"{_PID}{pid}"


def process_on_device(pid: int, index: int) -> str:
    """`pid:P/gpu:N`: one process's readings on one device (NVML's, and the allocator's)."""
    return f"{_PID}{pid}/{_GPU}{index}"


@dataclass(frozen=True)
class Scope:
    """A parsed scope; `pid` and `gpu` are None where the scope has no such part."""

    text: str
    pid: int | None = None
    gpu: int | None = None

    @property
    def is_device(self) -> bool:
        return self.gpu is not None and self.pid is None

    @property
    def is_process(self) -> bool:
        return self.pid is not None and self.gpu is None

    @property
    def is_process_on_device(self) -> bool:
        return self.pid is not None and self.gpu is not None


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def parse(text: str) -> Scope:
    """Any scope string, including ones this version does not know (then neither pid nor gpu is set).

    Cached: a day of samples repeats the same few hundred scopes millions of times.
    """
    if text.startswith(_GPU):
        gpu = _int(text[len(_GPU):])
        return Scope(text, None, gpu)
    if text.startswith(_PID):
        pid_text, sep, rest = text[len(_PID):].partition("/")
        pid = _int(pid_text)
        if pid is None:
            return Scope(text)
        if not sep:
            return Scope(text, pid, None)
        if rest.startswith(_GPU):
            gpu = _int(rest[len(_GPU):])
            if gpu is not None:
                return Scope(text, pid, gpu)
        return Scope(text)
    return Scope(text)


def pid_on_device(text: str, index: int) -> int | None:
    """The pid of a `pid:P/gpu:<index>` scope; None for any other scope."""
    scope = parse(text)
    return scope.pid if scope.is_process_on_device and scope.gpu == index else None
