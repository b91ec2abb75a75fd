"""Which Kubernetes pod and which container a pid belongs to, from /proc/PID/cgroup.

NVML names a process by its host pid only; on a cluster the question is "which pod
is that?" (the question people ask dcgm-exporter and nvitop for). The kubelet and
the container runtimes put the answer in the cgroup path of every process they
start, so one small file read per process answers it without the Kubernetes API:

  cgroup v2, systemd driver (containerd):
    0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope
  cgroup v1, cgroupfs driver (containerd, or docker via dockershim):
    4:memory:/kubepods/besteffort/pod<uid>/<id>
  cri-o:        .../kubepods-pod<uid with _>.slice/crio-<id>.scope   (guaranteed pods have no QoS level)
  kind and some distributions nest it all under /kubelet.slice/kubelet-kubepods.slice/...
  plain docker: /docker/<id> (v1, cgroupfs) or /system.slice/docker-<id>.scope (systemd)
  podman:       .../libpod-<id>.scope

The systemd driver cannot have '-' inside a slice name, so it writes the pod uid
with underscores; we give it back with dashes, as the API server shows it. Static
pods (kubelet manifests) have a 32-hex uid without dashes, kept as it is.

A process in no container gives `ContainerIds(None, None)`; a file that cannot
be read gives `Unavailable(reason)`: "not in a container" and "could not tell"
are different answers.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from gpuscope.probes.readings import ERROR, NO_PERMISSION, PROCESS_GONE, Unavailable

_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"
# pod<uid>, kubepods-pod<uid>.slice, kubepods-besteffort-pod<uid>.slice, kubelet-kubepods-burstable-pod<uid>.slice
_POD = re.compile(rf"^(?:[a-z]+(?:-[a-z]+)*-)?pod({_UID})(?:\.slice)?$")
# <id>, cri-containerd-<id>.scope, crio-<id>.scope, docker-<id>.scope, libpod-<id>.scope
# (crio-conmon-<id>.scope is cri-o's monitor process, not the container: not matched)
_CONTAINER = re.compile(r"^(?:(?:cri-containerd|crio|docker|libpod|containerd)-)?([0-9a-f]{64})(?:\.scope)?$")


@dataclass(frozen=True)
class ContainerIds:
    """The pod uid (dashed, as Kubernetes shows it) and the 64-hex container id; None where the path has none."""

    pod_uid: str | None = None
    container_id: str | None = None

    @property
    def empty(self) -> bool:
        return self.pod_uid is None and self.container_id is None


def _from_path(path: str) -> ContainerIds:
    pod = container = None
    for segment in path.split("/"):
        match = _POD.match(segment)
        if match:
            pod = match.group(1).replace("_", "-")
            continue
        match = _CONTAINER.match(segment)
        if match:
            container = match.group(1)  # the innermost one wins (a container cgroup under a pod slice)
    return ContainerIds(pod, container)


def parse_cgroup(text: str) -> ContainerIds:
    """The pod and container named by the text of a /proc/PID/cgroup file (v1, v2 or hybrid).

    Every line is `hierarchy-id:controllers:path`. Under v1 each controller has a line, and they
    normally agree; the v2 line (`0::`) is preferred, then the line that names the most.
    """
    best = ContainerIds()
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        found = _from_path(parts[2])
        if found.empty:
            continue
        if parts[0] == "0" and parts[1] == "":
            return found
        if (found.pod_uid is not None) + (found.container_id is not None) > \
                (best.pod_uid is not None) + (best.container_id is not None):
            best = found
    return best


def read_container_ids(pid: int, proc_root: str = "/proc") -> ContainerIds | Unavailable:
    """Read and parse `<proc_root>/<pid>/cgroup`; Unavailable when it cannot be read (gone, no access)."""
    path = os.path.join(proc_root, str(pid), "cgroup")
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read(65536)
    except FileNotFoundError:
        return Unavailable(PROCESS_GONE, f"{path} does not exist (pid {pid} exited or is not in this pid namespace)")
    except PermissionError as exc:
        return Unavailable(NO_PERMISSION, f"{path}: {exc.strerror}")
    except OSError as exc:
        return Unavailable(ERROR, f"{path}: {exc.strerror or exc}")
    return parse_cgroup(text)
