"""Who a pid is: name, user, redacted command line, and whether /proc knows it.

NVML reports pids from the host's pid namespace; inside a container those pids
may not exist in our /proc (PID_NAMESPACE). `exists` records exactly that.
`pod_uid`/`container_id` come from /proc/PID/cgroup (probes/cgroups.py): None when
the process is in no pod or container, Unavailable when the file could not be read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import psutil

from gpuscope.probes.cgroups import ContainerIds, read_container_ids
from gpuscope.probes.engines import EngineReport, EnginesProbe
from gpuscope.probes.readings import NO_PERMISSION, PROCESS_GONE, Unavailable
from gpuscope.probes.redact import redact_argv


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    exists: bool
    name: str
    user: str | Unavailable
    cmdline: str | Unavailable  # redacted
    engines: tuple[str, ...] | Unavailable
    memory_env: dict[str, str] | Unavailable
    pod_uid: str | Unavailable | None = None        # None: in no Kubernetes pod
    container_id: str | Unavailable | None = None   # None: in no container

    def to_json(self) -> dict:
        """The description as JSON: encoded once per description (a description is kept, unchanged, for
        describe_every_s while every refresh of the exporter's 64 processes asks for it), and handed
        out as a copy, its lists and dicts too, so a caller may change what it gets."""
        encoded = self.__dict__.get("_json")
        if encoded is None:
            encoded = self.__dict__["_json"] = self._encode()
        return {key: (value.copy() if type(value) is dict or type(value) is list else value)
                for key, value in encoded.items()}

    def _encode(self) -> dict:
        from gpuscope.probes.readings import reading_to_json

        out = {
            "pid": self.pid, "exists": self.exists, "name": self.name, "user": self.user,
            "cmdline": self.cmdline,
            "engines": list(self.engines) if isinstance(self.engines, tuple) else self.engines,
            "memory_env": self.memory_env,
        }
        for key in ("pod_uid", "container_id"):  # keys only where the cgroup names them (or could not be read)
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return reading_to_json(out)


def _container_fields(pid: int, proc_root: str) -> dict[str, "str | Unavailable | None"]:
    ids = read_container_ids(pid, proc_root)
    if isinstance(ids, Unavailable):
        return {"pod_uid": ids, "container_id": ids}
    assert isinstance(ids, ContainerIds)
    return {"pod_uid": ids.pod_uid, "container_id": ids.container_id}


Describer = Callable[[int, str], ProcessInfo]


def describe_process(pid: int, nvml_name: str = "", engines_probe: EnginesProbe | None = None,
                     proc_root: str = "/proc") -> ProcessInfo:
    """Describe a pid from psutil and /proc; `nvml_name` is the fallback name."""
    probe = engines_probe or EnginesProbe()
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            name = proc.name()
            try:
                user: str | Unavailable = proc.username()
            except (psutil.AccessDenied, KeyError) as exc:
                user = Unavailable(NO_PERMISSION, str(exc))
            try:
                cmdline: str | Unavailable = " ".join(redact_argv(proc.cmdline()))
            except psutil.AccessDenied as exc:
                cmdline = Unavailable(NO_PERMISSION, str(exc))
    except psutil.ZombieProcess:  # it exists (NVML may still list it for a moment): not a namespace problem
        gone = Unavailable(PROCESS_GONE, f"pid {pid} has exited (zombie)")
        return ProcessInfo(pid, True, nvml_name or "?", gone, gone, gone, gone, gone, gone)
    except psutil.NoSuchProcess:
        gone = Unavailable(PROCESS_GONE, f"pid {pid} is not in this pid namespace")
        return ProcessInfo(pid, False, nvml_name or "?", gone, gone, gone, gone, gone, gone)
    except psutil.AccessDenied as exc:
        denied = Unavailable(NO_PERMISSION, str(exc))
        return ProcessInfo(pid, True, nvml_name or "?", denied, denied, denied, denied,
                           **_container_fields(pid, proc_root))  # /proc/PID/cgroup is world-readable
    report: EngineReport = probe.report(pid)
    return ProcessInfo(pid, True, name or nvml_name, user, cmdline, report.engines, report.memory_env,
                       **_container_fields(pid, proc_root))
