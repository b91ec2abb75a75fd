"""Which GPU engines (frameworks with their own device allocator) a process has loaded.

Read from /proc/PID/maps, because that is the only view that works for *other*
processes too (a JAX sibling that grabbed 75% of the card), and from each
engine's memory-policy environment variables, which decide whether it
preallocates.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from gpuscope.probes.readings import NO_PERMISSION, NOT_SUPPORTED, PROCESS_GONE, Unavailable
from gpuscope.probes.redact import redact_env

# Library path fragments that prove an engine's GPU runtime is mapped (FINDINGS.md).
ENGINE_SIGNATURES: dict[str, tuple[str, ...]] = {
    "torch": ("libtorch_cuda",),
    # jaxlib's _jax.so/_xla.so are mapped by CPU-only installs too: only the CUDA plugin means a GPU engine.
    "jax": ("xla_cuda_plugin", "jax_cuda", "jax_plugins/xla_cuda"),
    "cupy": ("/cupy/", "/cupy_backends/"),
    "tensorflow": ("libtensorflow_framework", "_pywrap_tensorflow_internal"),
    "onnxruntime": ("libonnxruntime_providers_cuda",),
    "tensorrt": ("libnvinfer",),
    "mxnet": ("libmxnet",),
    "paddle": ("libpaddle",),
}

# Environment variables that set each engine's memory policy.
ENGINE_MEMORY_VARIABLES: dict[str, tuple[str, ...]] = {
    "torch": ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUDA_MODULE_LOADING",
              "CUBLAS_WORKSPACE_CONFIG", "TORCH_CUBLAS_WORKSPACE_CACHE"),
    "jax": ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR"),
    "tensorflow": ("TF_FORCE_GPU_ALLOW_GROWTH", "TF_GPU_ALLOCATOR"),
    "cupy": ("CUPY_GPU_MEMORY_LIMIT",),
    "onnxruntime": (),
    "tensorrt": (),
    "mxnet": ("MXNET_GPU_MEM_POOL_TYPE", "MXNET_GPU_MEM_POOL_RESERVE"),
    "paddle": ("FLAGS_fraction_of_gpu_memory_to_use", "FLAGS_allocator_strategy"),
}
COMMON_VARIABLES = ("CUDA_VISIBLE_DEVICES", "CUDA_MODULE_LOADING")


@dataclass(frozen=True)
class EngineReport:
    """Engines one process has loaded and the memory variables it runs with."""

    pid: int
    engines: tuple[str, ...] | Unavailable
    memory_env: dict[str, str] | Unavailable = field(default_factory=dict)


def engines_in_maps(maps_text: str) -> tuple[str, ...]:
    """Engines whose signature libraries appear in the text of a /proc/PID/maps file."""
    paths = {line.split(None, 5)[5] for line in maps_text.splitlines() if len(line.split(None, 5)) == 6}
    found = []
    for engine, signatures in ENGINE_SIGNATURES.items():
        if any(sig in path for path in paths for sig in signatures):
            found.append(engine)
    return tuple(found)


def memory_variables(environ: dict[str, str]) -> dict[str, str]:
    """The engines' memory-policy variables that are set, secrets redacted."""
    names = set(COMMON_VARIABLES)
    for variables in ENGINE_MEMORY_VARIABLES.values():
        names.update(variables)
    return redact_env({k: v for k, v in environ.items() if k in names})


def _unavailable_for(exc: OSError) -> Unavailable:
    if isinstance(exc, FileNotFoundError) or isinstance(exc, ProcessLookupError):
        return Unavailable(PROCESS_GONE, str(exc))
    if isinstance(exc, PermissionError):
        return Unavailable(NO_PERMISSION, str(exc))
    return Unavailable(NOT_SUPPORTED, str(exc))


def read_environ(pid: int, proc_root: str = "/proc") -> dict[str, str] | Unavailable:
    """A process's environment (its own view at exec time, for other pids)."""
    if pid == os.getpid() and proc_root == "/proc":
        return dict(os.environ)
    try:
        with open(f"{proc_root}/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        return _unavailable_for(exc)
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            key, _, value = item.partition(b"=")
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


class EnginesProbe:
    """Reads engines from /proc/PID/maps. `proc_root` is injectable for tests."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self._proc_root = proc_root

    def report(self, pid: int) -> EngineReport:
        try:
            with open(f"{self._proc_root}/{pid}/maps", encoding="utf-8", errors="replace") as fh:
                engines: tuple[str, ...] | Unavailable = engines_in_maps(fh.read())
        except OSError as exc:
            engines = _unavailable_for(exc)
        environ = read_environ(pid, self._proc_root)
        env = environ if isinstance(environ, Unavailable) else memory_variables(environ)
        return EngineReport(pid, engines, env)
