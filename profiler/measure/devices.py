"""Choosing the device to profile and matching torch's device index to NVML's.

Under CUDA_VISIBLE_DEVICES torch's cuda:0 may be NVML's device 3; per-process
NVML rows must be read from the right one, so indices are matched by UUID.

Everything a workload run asks torch.cuda about its device goes through one
`CudaDevices` backend (production: `TorchDevices`), handed in like NVML's, so
the wiring of a GPU run (index matching, the context baseline, the allocator's
scope) runs on a machine without a GPU against a fake.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Protocol

from gpuscope.record.errors import UsageError

if TYPE_CHECKING:
    from gpuscope.probes.allocator import TorchCudaBackend

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


class CudaDevices(Protocol):
    """torch.cuda as a workload run uses it, apart from running the model."""

    def is_available(self) -> bool: ...
    def device_count(self) -> int: ...
    def device_properties(self, index: int) -> Any: ...  # has .uuid, as torch.cuda.get_device_properties
    def device_name(self, device: str) -> str: ...
    def initialise(self, device: str) -> None: ...  # create the CUDA context on `device` and wait for it
    def tensor_device(self, device: str) -> str: ...  # where the model's tensors go when `device` is profiled
    def allocator(self) -> "TorchCudaBackend": ...  # the caching allocator's statistics


class TorchDevices:
    """torch.cuda itself, imported lazily so the CLI starts fast."""

    def is_available(self) -> bool:
        import torch

        return bool(torch.cuda.is_available())

    def device_count(self) -> int:
        import torch

        return int(torch.cuda.device_count())

    def device_properties(self, index: int) -> Any:
        import torch

        return torch.cuda.get_device_properties(index)

    def device_name(self, device: str) -> str:
        import torch

        return str(torch.cuda.get_device_name(device))

    def initialise(self, device: str) -> None:
        import torch

        torch.zeros(1, device=device)  # the first CUDA call creates the context (and loads kernels lazily)
        torch.cuda.synchronize(device)

    def tensor_device(self, device: str) -> str:
        return device

    def allocator(self) -> "TorchCudaBackend":
        from gpuscope.probes.allocator import RealTorchCuda

        return RealTorchCuda()


def resolve_device(text: str, cuda: CudaDevices | None = None) -> str:
    """`auto` -> cuda:0 when a GPU is usable, else cpu; validates `cpu`, `cuda`, `cuda:N`."""
    import torch

    cuda = cuda or TorchDevices()
    choice = (text or "auto").strip().lower()
    if choice == "auto":
        return "cuda:0" if cuda.is_available() else "cpu"
    if choice == "cpu":
        return "cpu"
    match = _CUDA_RE.match(choice)
    if not match:
        raise UsageError(f"unknown device {text!r} (use auto, cpu, cuda or cuda:N)")
    if not cuda.is_available():
        raise UsageError(f"device {text!r} requested but no CUDA GPU is usable here (torch {torch.__version__}, "
                         f"built {'with' if torch.version.cuda else 'without'} CUDA)")
    index = int(match.group(1) or 0)
    count = cuda.device_count()
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
        return _assumed(torch_index, f"torch could not read the UUID of cuda:{torch_index} ({type(exc).__name__}: "
                                     f"{exc})", on_fallback)
    return _by_uuid(uuid, nvml_uuids, torch_index, "torch's", on_fallback)


def nvml_index_for_uuid(uuid: Any, nvml_uuids: list[Any], torch_index: int,
                        on_fallback: Callable[[str], None] | None = None) -> int:
    """NVML's index of the worker's device, matched by the UUID the worker read from torch (the parent never
    touches CUDA); torch's index when the UUID is unknown, and `on_fallback` is told why in one line."""
    if not (isinstance(uuid, str) and uuid):
        return _assumed(torch_index, f"the worker could not read the UUID of cuda:{torch_index}", on_fallback)
    return _by_uuid(uuid, nvml_uuids, torch_index, "the worker's", on_fallback)


def _by_uuid(uuid: str, nvml_uuids: list[Any], torch_index: int, whose: str,
             on_fallback: Callable[[str], None] | None) -> int:
    """The NVML index whose UUID is `uuid` (with or without "GPU-", any case), else torch's index, said."""
    wanted = uuid.replace("GPU-", "").lower()
    for index, nvml_uuid in enumerate(nvml_uuids):
        if isinstance(nvml_uuid, str) and nvml_uuid.replace("GPU-", "").lower() == wanted:
            return index
    return _assumed(torch_index, f"no NVML device has the UUID of {whose} cuda:{torch_index} ({uuid})", on_fallback)


def _assumed(torch_index: int, why: str, on_fallback: Callable[[str], None] | None) -> int:
    if on_fallback is not None:
        on_fallback(f"{why}: assuming NVML device {torch_index}, which is wrong if CUDA_VISIBLE_DEVICES reorders "
                    "devices")
    return torch_index


def index_match(torch_index: int, nvml_index: int, fallback: list[str]) -> dict[str, Any]:
    """record.extra["gpu_index"]: how torch's device was matched to NVML's, and why it was assumed if it was."""
    return {"torch_index": torch_index, "nvml_index": nvml_index, "matched_by": "assumed" if fallback else "uuid",
            **({"detail": fallback[0]} if fallback else {})}
