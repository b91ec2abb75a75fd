"""Choosing the device to profile and matching torch's device index to NVML's.

Under CUDA_VISIBLE_DEVICES torch's cuda:0 may be NVML's device 3; per-process
NVML rows must be read from the right one, so indices are matched by UUID.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from gpuscope.record.errors import UsageError

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(text: str) -> str:
    """`auto` -> cuda:0 when a GPU is usable, else cpu; validates `cpu`, `cuda`, `cuda:N`."""
    import torch

    choice = (text or "auto").strip().lower()
    if choice == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return "cpu"
    match = _CUDA_RE.match(choice)
    if not match:
        raise UsageError(f"unknown device {text!r} (use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise UsageError(f"device {text!r} requested but no CUDA GPU is usable here (torch {torch.__version__}, "
                         f"built {'with' if torch.version.cuda else 'without'} CUDA)")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"device {text!r} does not exist: this machine has {count} GPU{'s' if count != 1 else ''} "
                         f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
    return f"cuda:{index}"


def nvml_index_for(torch_index: int, nvml_uuids: list[Any],
                   properties: Callable[[int], Any] | None = None,
                   on_fallback: Callable[[str], None] | None = None) -> int:
    """NVML index of torch's device `torch_index`, matched by UUID; the same index when no UUID matches.

    `properties(index)` reads torch's device properties (torch.cuda.get_device_properties unless given). When the
    UUID cannot be read or matches no NVML device, the same index is assumed, which is wrong under
    CUDA_VISIBLE_DEVICES: `on_fallback` is told why, in one line, so the caller can say so.
    """
    try:
        if properties is None:
            import torch

            properties = torch.cuda.get_device_properties
        uuid = str(properties(torch_index).uuid)
    except Exception as exc:
        why = f"torch could not read the UUID of cuda:{torch_index} ({type(exc).__name__}: {exc})"
    else:
        for index, nvml_uuid in enumerate(nvml_uuids):
            if isinstance(nvml_uuid, str) and nvml_uuid.replace("GPU-", "").lower() == uuid.replace("GPU-", "").lower():
                return index
        why = f"no NVML device has the UUID of torch's cuda:{torch_index} ({uuid})"
    if on_fallback is not None:
        on_fallback(f"{why}: assuming NVML device {torch_index}, which is wrong if CUDA_VISIBLE_DEVICES reorders "
                    "devices")
    return torch_index


def nvml_index_for_uuid(uuid: Any, nvml_uuids: list[Any], torch_index: int) -> int:
    """NVML's index of the worker's device, matched by the UUID the worker read from torch (the parent never
    touches CUDA); torch's index when the UUID is unknown."""
    if isinstance(uuid, str) and uuid:
        wanted = uuid.replace("GPU-", "").lower()
        for index, nvml_uuid in enumerate(nvml_uuids):
            if isinstance(nvml_uuid, str) and nvml_uuid.replace("GPU-", "").lower() == wanted:
                return index
    return torch_index
