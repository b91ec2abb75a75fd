"""Planted models for the GPU scenarios of issue 20: `gpuscope diagnose --model plants:NAME` loads them
(PYTHONPATH holds tests/gpu), each plants one cause with a figure known beforehand, and writes torch's own
figures of that moment to $GPUSCOPE_GPU_TORCH_STATS at exit (scenarios._record_torch_stats_at_exit).

- `outside_allocator_model`: at the step of 4 predictors, 2 GiB through the CUDA driver API (outside every
  allocator) and a matmul on 32 new streams (a cuBLAS workspace each, inside torch's allocator);
- `fragmentation_model`: 3 MiB blocks freed alternately on a side stream: holes the allocator cannot reuse;
- `headroom_model`: fills the card to a share the test sized from NVML's free memory;
- `oom_model`: from the second predictor on, asks torch for more than the device has free.

A plant keyed to a predictor count acts only on the thread of that index (references.predictor_index).
Torch is imported inside the factories: this module is imported by CPU tests too.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable

try:  # pytest imports tests.gpu.plants; a planted model's process imports the top-level `plants`
    from . import references as ref
    from . import scenarios as sc
except ImportError:
    import references as ref  # type: ignore[no-redef]
    import scenarios as sc  # type: ignore[no-redef]

MiB, GiB = sc.MiB, sc.GiB

OUTSIDE_PLANT_INDEX = 3           # predictor thread 3 exists only in steps of 4 or more: the last of 1,2,3,4
OUTSIDE_DRIVER_BYTES = 2 * GiB    # taken with cuMemAlloc at that step
OUTSIDE_STREAMS = 32              # new streams, one cuBLAS workspace each, at that step
OUTSIDE_WORKSPACE_CONFIG = ":4096:8"  # 8 x 4 MiB = 32 MiB per (handle, stream), torch's Hopper default

FRAGMENT_BLOCK_BYTES = 3 * MiB    # served from 20 MiB segments (requests of 1-10 MiB), six to a segment
FRAGMENT_BLOCKS = 96              # 16 segments; every other block freed: 48 holes
FRAGMENT_HOLES_BYTES = FRAGMENT_BLOCKS // 2 * FRAGMENT_BLOCK_BYTES  # 144 MiB that no later request fills

FILL_ENV = "GPUSCOPE_GPU_FILL_BYTES"
OOM_PLANT_INDEX = 1               # predictor thread 1: every step of 2 predictors or more
OOM_EXTRA_BYTES = GiB             # asked beyond the device's free memory

_LOCK = threading.Lock()


def _small_model() -> Any:
    model = sc._mlp()
    model.example_input_shape = (8, 1024)
    sc._HELD.append(model)  # held to exit: torch's figures at exit are then the run's last tick
    return model


def plants_once(name: str, plant: Callable[[Any], None], on_this_thread: Callable[[], bool] = lambda: True) -> Any:
    """A 16 MiB MLP (held to exit) whose first CUDA request on a thread where `on_this_thread()` holds
    runs `plant(device)`, once in the process, under a lock (the predictor threads race to it); every
    request then runs the MLP. `name` names the model's class (the run's record shows it)."""
    from torch import nn

    class PlantsOnce(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = sc._mlp()
            self.planted = False
            self.example_input_shape = (8, 1024)

        def forward(self, x: Any) -> Any:
            if not self.planted and x.is_cuda and on_this_thread():
                with _LOCK:
                    if not self.planted:
                        plant(x.device)
                        self.planted = True
            return self.net(x)

    PlantsOnce.__name__ = PlantsOnce.__qualname__ = name
    sc._record_torch_stats_at_exit()
    model = PlantsOnce()
    sc._HELD.append(model)
    return model


def _stats(torch: Any, device: Any) -> dict[str, int]:
    stats = torch.cuda.memory_stats(device)
    return {"allocated_bytes": int(stats.get("allocated_bytes.all.current", 0)),
            "reserved_bytes": int(stats.get("reserved_bytes.all.current", 0)),
            "inactive_split_bytes": int(stats.get("inactive_split_bytes.all.current", 0)),
            "num_alloc_retries": int(stats.get("num_alloc_retries", 0)),
            "num_ooms": int(stats.get("num_ooms", 0))}


def outside_allocator_model() -> Any:
    """16 MiB MLP; the first request of predictor thread OUTSIDE_PLANT_INDEX plants, once:

    1. OUTSIDE_DRIVER_BYTES with cuMemAlloc (references.DriverMemory): NVML counts them, torch never sees
       them: gpuscope's outside-the-allocator layer must grow by exactly that;
    2. a small matmul on each of OUTSIDE_STREAMS new streams: torch gives every (cuBLAS handle, stream) its
       own workspace of CUBLAS_WORKSPACE_CONFIG's size from its caching allocator (never freed), so these
       land in torch's allocated bytes, not outside. The blocks torch's memory_snapshot() shows on exactly
       those streams are recorded: torch's own figure of the plant.
    """
    import torch

    def plant(device: Any) -> None:
        before = _stats(torch, device)
        driver = ref.DriverMemory()
        driver.alloc(OUTSIDE_DRIVER_BYTES, device.index if device.index is not None else torch.cuda.current_device())
        streams = [torch.cuda.Stream(device=device) for _ in range(OUTSIDE_STREAMS)]
        a = torch.ones(64, 64, device=device)
        torch.cuda.current_stream(device).synchronize()
        for stream in streams:
            with torch.cuda.stream(stream):
                torch.mm(a, a)
            stream.synchronize()
        ids = {s.cuda_stream for s in streams}
        on_streams = [seg for seg in torch.cuda.memory_snapshot()
                      if seg.get("stream") in ids and seg.get("segment_type") == "large"]
        sc._HELD.extend([driver, streams])
        sc._EXIT_EXTRA["plant"] = {
            "driver_bytes": driver.total_bytes, "streams": len(streams),
            "workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "predicted_workspace_bytes": len(streams) * (ref.cublas_workspace_bytes(
                os.environ.get("CUBLAS_WORKSPACE_CONFIG")) or 0),
            "torch_workspace_bytes_on_planted_streams": sum(int(seg["total_size"]) for seg in on_streams),
            "torch_workspace_segments_on_planted_streams": len(on_streams),
            "torch_before": before, "torch_after": _stats(torch, device)}

    return plants_once("OutsideAllocator", plant, lambda: ref.predictor_index() == OUTSIDE_PLANT_INDEX)


def fragmentation_model() -> Any:
    """16 MiB MLP whose first CUDA request plants, once, on a side stream: FRAGMENT_BLOCKS blocks of
    FRAGMENT_BLOCK_BYTES, then every other one freed. The caching allocator serves 1-10 MiB requests from
    20 MiB segments, splitting them; a freed block between two live ones stays an inactive split block,
    and blocks are reused only on their own stream, so no predictor ever fills the holes.
    torch.cuda.memory_stats() right after the plant is recorded (inactive_split_bytes, num_alloc_retries).
    """
    import torch

    def plant(device: Any) -> None:
        before = _stats(torch, device)
        side = torch.cuda.Stream(device=device)
        with torch.cuda.stream(side):
            blocks = [torch.empty(FRAGMENT_BLOCK_BYTES, dtype=torch.uint8, device=device)
                      for _ in range(FRAGMENT_BLOCKS)]
        kept = blocks[0::2]
        del blocks  # the odd ones are freed here: holes between live blocks
        side.synchronize()
        sc._HELD.extend([side, kept])
        sc._EXIT_EXTRA["plant"] = {"blocks": FRAGMENT_BLOCKS, "block_bytes": FRAGMENT_BLOCK_BYTES,
                                   "holes_bytes": FRAGMENT_HOLES_BYTES, "torch_before": before,
                                   "torch_after": _stats(torch, device)}

    return plants_once("Fragmented", plant)


def headroom_model() -> Any:
    """16 MiB MLP, loaded beside a fill of $GPUSCOPE_GPU_FILL_BYTES on the current CUDA device (the
    test sizes it from NVML's free memory: references.fill_bytes). The fill is a torch tensor, held
    to exit; torch's free/total before and after it are recorded."""
    import torch

    fill = int(os.environ[FILL_ENV])
    free_before, total = torch.cuda.mem_get_info()
    block = torch.empty(fill, dtype=torch.uint8, device="cuda")
    block.zero_()  # touched, as a real workload's memory would be
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    sc._HELD.append(block)
    sc._EXIT_EXTRA["plant"] = {"fill_bytes": fill, "free_before_bytes": int(free_before),
                               "free_after_bytes": int(free_after), "total_bytes": int(total)}
    sc._record_torch_stats_at_exit()
    return _small_model()


def oom_model() -> Any:
    """16 MiB MLP; every request of predictor thread OOM_PLANT_INDEX asks torch for the device's free
    memory (torch.cuda.mem_get_info, read just before) + OOM_EXTRA_BYTES. Each OutOfMemoryError it raises
    is counted here, beside torch's own num_ooms, and re-raised for gpuscope to count."""
    import torch
    from torch import nn

    raised = {"count": 0, "requests": []}
    sc._EXIT_EXTRA["plant"] = raised

    class RunsOutOfMemory(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = sc._mlp()
            self.example_input_shape = (8, 1024)

        def forward(self, x: Any) -> Any:
            if x.is_cuda and ref.predictor_index() == OOM_PLANT_INDEX:
                free, total = torch.cuda.mem_get_info(x.device)
                asked = int(free) + OOM_EXTRA_BYTES
                try:
                    torch.empty(asked, dtype=torch.uint8, device=x.device)
                except torch.cuda.OutOfMemoryError:
                    with _LOCK:
                        raised["count"] += 1
                        if len(raised["requests"]) < 5:
                            raised["requests"].append({"free_bytes": int(free), "asked_bytes": asked,
                                                       "total_bytes": int(total)})
                    raise
            return self.net(x)

    sc._record_torch_stats_at_exit()
    model = RunsOutOfMemory()
    sc._HELD.append(model)
    return model
