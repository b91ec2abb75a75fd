"""Helpers for the planted GPU scenarios of tests/gpu (issue 10, "Truth on a real GPU").

Four roles, all without importing torch at module level (this file is also imported where no GPU exists):

1. Child processes planted beside a diagnose run, started by running this file as a script:
     python tests/gpu/scenarios.py foreign --gib 2   torch holds N GiB on cuda:0
     python tests/gpu/scenarios.py jax               JAX does one operation (with its memory policy from the env)
   Each prints one line `ready {json}` on stdout once its memory is in place, then blocks on stdin, so it
   ends when its parent closes the pipe or dies; `Child` also kills it in a finally.
2. Model factories that `gpuscope diagnose --model scenarios:NAME` loads (PYTHONPATH holds tests/gpu):
   `cache_bloat_model` (frees a large tensor without emptying the cache) and `cupy_torch_model` (a second
   engine, CuPy, allocating in the same process). With GPUSCOPE_GPU_TORCH_STATS=path they write torch's own
   allocator figures (and CuPy's pool) at interpreter exit: the ground truth a finding is compared with.
   The plants of issue 20 (outside the allocator, fragmentation, headroom, OOM) are in plants.py.
3. `diagnose()`: one fresh `python -m gpuscope diagnose` process per scenario (a fresh CUDA context, so
   baselines are not shared between scenarios), its run.json, and nvidia-smi polled from this process
   while it runs (references.SmiWatcher), matched to the run's steps by their samples.jsonl events.
4. Checks on a run.json that every GPU run must pass (`check_gpu_run`: each step's NVML figure against
   nvidia-smi's, torch's last tick against torch's own figures at exit), and small readers for findings.

Also a tiny command line for tests/gpu/run.sh: `record-defaults` (merge the timed defaults run into the
results JSON) and `summary` (print each scenario's verdict).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

try:  # pytest imports tests.gpu.scenarios; a planted model's process and run.sh import the top-level module
    from . import references as ref
except ImportError:
    import references as ref  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MiB = 1 << 20
GiB = 1 << 30

CACHE_BLOAT_BYTES = 2 * GiB     # what cache_bloat_model frees without emptying the cache
CUPY_BYTES = 256 * MiB          # what cupy_torch_model's CuPy pool holds
FOREIGN_GIB = 2                 # what the foreign process holds with torch
# The built-in large MLP (profiler/measure/models.py, _builtin): 8 x nn.Linear(4096, 4096), float32 weights
# and biases. Its bytes, known without asking gpuscope: what one planted copy costs.
BUILTIN_LARGE_MLP_BYTES = 8 * (4096 * 4096 + 4096) * 4
TORCH_STATS_ENV = "GPUSCOPE_GPU_TORCH_STATS"
REPORTS_ENV = "GPUSCOPE_GPU_REPORTS"

# Variables that change what memory looks like; stripped from every child so each scenario sets its own.
MEMORY_VARIABLES = (
    "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUDA_MODULE_LOADING", "CUBLAS_WORKSPACE_CONFIG",
    "TORCH_CUBLAS_WORKSPACE_CACHE", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "XLA_PYTHON_CLIENT_ALLOCATOR", "CUPY_GPU_MEMORY_LIMIT", TORCH_STATS_ENV,
)

# Layers of the profiled process itself (profiler/record/layers.py): they add up to NVML's per-process figure.
PROCESS_LAYERS = ("model_weights_bytes", "activations_bytes", "allocator_cache_bytes", "outside_allocator_bytes",
                  "unattributed_process_bytes")
# Findings a scenario plants; a clean run fires none of them.
PLANTED = ("CACHE_BLOAT", "DUPLICATE_MODEL", "FOREIGN_PROCESS", "MULTIPLE_ENGINES", "ENGINE_PREALLOCATION")
# Findings no healthy run on a working GPU may show (MEASUREMENT_GAP also reports a rule that crashed).
NEVER_HEALTHY = ("OOM", "PREDICTOR_ERRORS", "MEASUREMENT_GAP", "PID_NAMESPACE", "GRAD_ENABLED")


# ---------------------------------------------------------------- where results go

def results_dir() -> Path:
    """$OUT on the device machine, else ./gpu-results."""
    out = os.environ.get("OUT")
    return Path(out) if out else Path.cwd() / "gpu-results"


def results_path() -> Path:
    return results_dir() / "gpu-results.json"


def reports_root() -> Path:
    """Per-scenario report folders: $GPUSCOPE_GPU_REPORTS (run.sh points it at a scratch folder it packs
    into $OUT/reports.tar.gz, since only 8 files come back from $OUT), else <results>/reports."""
    explicit = os.environ.get(REPORTS_ENV)
    return Path(explicit) if explicit else results_dir() / "reports"


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=str(path.parent))
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str, sort_keys=False)
        fh.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the environment of the run

def _dist_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _dist_versions(prefix: str) -> dict[str, str]:
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name == prefix or name.startswith(prefix + "-") or name == prefix + "lib":  # jax, jax-cuda13-plugin, jaxlib
            found[name] = dist.version
    return dict(sorted(found.items()))


def environment() -> dict[str, Any]:
    """The card, driver, CUDA, torch and engines of this machine, read without creating a CUDA context."""
    import datetime as dt
    import platform

    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(), "python": platform.python_version(), "kernel": platform.release(),
        "cpu_count": os.cpu_count(), "executable": sys.executable,
        "cupy": _dist_versions("cupy") or None, "jax": _dist_versions("jax") or None,
        "nvidia_ml_py": _dist_version("nvidia-ml-py", "pynvml"),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
    except Exception as exc:  # pragma: no cover - torch is a dependency
        env["torch"] = f"not importable: {exc}"
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            def text(value: Any) -> str:
                return value.decode() if isinstance(value, bytes) else str(value)

            env["driver"] = text(pynvml.nvmlSystemGetDriverVersion())
            env["nvml"] = text(pynvml.nvmlSystemGetNVMLVersion())
            cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())
            env["cuda_driver"] = f"{cuda // 1000}.{(cuda % 1000) // 10}"
            cards = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                cards.append({"index": index, "name": text(pynvml.nvmlDeviceGetName(handle)),
                              "uuid": text(pynvml.nvmlDeviceGetUUID(handle)), "total_bytes": int(memory.total),
                              "total_mib": int(memory.total) // MiB})
            env["cards"] = cards
            env["card"] = cards[0]["name"] if cards else None
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:
        env["nvml_error"] = f"{type(exc).__name__}: {exc}"
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        env["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except Exception:
        env["git_commit"] = None  # the device machine gets a copy of the tree, maybe without .git
    return env


# ---------------------------------------------------------------- NVML and nvidia-smi, from the test process

def nvml_backend() -> Any:
    from gpuscope.probes.nvml import PynvmlBackend

    return PynvmlBackend.open()


def gpu_processes(backend: Any) -> dict[int, int | None]:
    """Every pid NVML lists on any device -> its used bytes (None: not reported)."""
    rows: dict[int, int | None] = {}
    for index in range(backend.device_count()):
        for row in backend.running_processes(index):
            rows[row.pid] = (rows.get(row.pid) or 0) + row.used_bytes if row.used_bytes is not None else rows.get(row.pid)
    return rows


def wait_for_quiet_gpu(backend: Any, timeout_s: float = 30.0) -> dict[int, int | None]:
    """Wait until NVML lists no process on any GPU (a killed child's memory takes a moment to go).

    Returns what is still listed after `timeout_s` (empty when quiet). A listed pid that is this
    process means the test process itself holds a CUDA context: every scenario would then see it as a
    foreign process, so that is returned at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        listed = gpu_processes(backend)
        if not listed or os.getpid() in listed or time.monotonic() > deadline:
            return listed
        time.sleep(0.25)


def nvidia_smi_apps(gpu_uuid: str | None = None) -> dict[int, int | None]:
    """`nvidia-smi --query-compute-apps`: pid -> used MiB (None where it prints N/A), on one GPU if named."""
    return {row.pid: row.used_mib for row in ref.parse_compute_apps(ref.run_nvidia_smi(ref.SMI_APPS_ARGV))
            if not gpu_uuid or row.gpu_uuid == gpu_uuid}


def stable_smi_figure(pid: int, gpu_uuid: str | None, tries: int = 10) -> int:
    """nvidia-smi's MiB for `pid`, read until two reads in a row agree."""
    last = None
    for _ in range(tries):
        now = nvidia_smi_apps(gpu_uuid).get(pid)
        if now is not None and now == last:
            return now
        last = now
        time.sleep(0.2)
    if last is None:
        raise AssertionError(f"nvidia-smi does not list pid {pid} (or prints N/A for its memory)")
    return last


# ---------------------------------------------------------------- child processes planted beside a run

class ChildFailed(RuntimeError):
    """A planted child process exited or never said it was ready."""


class ChildUnsupported(ChildFailed):
    """The child ran, but this machine cannot host its scenario (e.g. JAX without a GPU backend)."""


class Child:
    """A planted process: started, waited on until it prints `ready {json}`, always killed on exit."""

    def __init__(self, argv: list[str], env: dict[str, str], ready_timeout_s: float = 120.0) -> None:
        self.argv = argv
        self.env = env
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self._stderr = tempfile.TemporaryFile()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr_tail(self, chars: int = 3000) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-chars:]

    def start(self) -> "Child":
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     env=self.env, cwd=str(ROOT), text=True)
        lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=self.ready_timeout_s)
        except queue.Empty:
            self.stop()
            raise ChildFailed(f"{' '.join(self.argv[1:])}: not ready after {self.ready_timeout_s:.0f} s; "
                              f"stderr: {self.stderr_tail()}") from None
        if line.startswith("unsupported "):
            self.stop()
            raise ChildUnsupported(line[len("unsupported "):].strip())
        if not line.startswith("ready "):
            self.stop()
            raise ChildFailed(f"{' '.join(self.argv[1:])} exited (rc {self.proc.returncode}) without saying ready: "
                              f"stdout {line!r}; stderr: {self.stderr_tail()}")
        self.info = json.loads(line[len("ready "):])
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> "Child":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self._stderr.close()


def child_env(extra: dict[str, str] | None = None, drop: tuple[str, ...] = MEMORY_VARIABLES) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    paths = [str(ROOT), str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "Agg"
    env.update(extra or {})
    return env


def foreign_process(gib: int = FOREIGN_GIB) -> Child:
    """A second process holding `gib` GiB through torch on cuda:0 (plus its own CUDA context)."""
    return Child([sys.executable, str(Path(__file__)), "foreign", "--gib", str(gib)], child_env())


def jax_sibling(preallocate: bool) -> Child:
    """A process that imports JAX and runs one operation. `preallocate=True` leaves JAX's memory variables
    unset (it takes ~75% of the card); False sets XLA_PYTHON_CLIENT_PREALLOCATE=false in its environment,
    where gpuscope reads it (/proc/PID/environ)."""
    extra = {} if preallocate else {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    return Child([sys.executable, str(Path(__file__)), "jax"], child_env(extra))


def wait_listed(backend: Any, pid: int, min_bytes: int = 1, timeout_s: float = 15.0) -> int:
    """Wait until NVML lists `pid` with at least `min_bytes`; its used bytes."""
    deadline = time.monotonic() + timeout_s
    while True:
        used = gpu_processes(backend).get(pid)
        if used is not None and used >= min_bytes:
            return used
        if time.monotonic() > deadline:
            raise AssertionError(f"NVML does not list pid {pid} with >= {min_bytes // MiB} MiB after {timeout_s:.0f} s "
                                 f"(listed: {gpu_processes(backend)}); another pid namespace?")
        time.sleep(0.2)


def _wait_stdin() -> None:
    try:
        sys.stdin.read()
    except (OSError, ValueError):
        pass


def _ready(**info: Any) -> None:
    sys.stdout.write("ready " + json.dumps({"pid": os.getpid(), **info}) + "\n")
    sys.stdout.flush()


def _child_foreign(gib: int) -> int:
    import torch

    block = torch.empty(gib * GiB, dtype=torch.uint8, device="cuda:0")
    block.zero_()  # touch it, as a real workload would
    torch.cuda.synchronize()
    _ready(bytes=gib * GiB, torch_allocated=torch.cuda.memory_allocated(0), torch_reserved=torch.cuda.memory_reserved(0))
    _wait_stdin()
    del block
    return 0


def _child_jax() -> int:
    import jax
    import jax.numpy as jnp

    devices = jax.devices()
    if not devices or devices[0].platform != "gpu":
        sys.stdout.write(f"unsupported JAX {jax.__version__} has no GPU backend here (devices: {devices})\n")
        sys.stdout.flush()
        return 0
    x = jnp.ones((1024, 1024), dtype=jnp.float32)
    (x @ x).block_until_ready()  # the first operation: where JAX preallocates
    _ready(jax=jax.__version__, device=str(devices[0]),
           preallocate=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"))
    _wait_stdin()
    return 0


# ---------------------------------------------------------------- model factories (`--model scenarios:NAME`)

_PLANT_LOCK = threading.Lock()
_HELD: list[Any] = []  # what a factory keeps alive until the process exits (CuPy's array, a model)
_EXIT_EXTRA: dict[str, Any] = {}
_EXIT_WRITER_REGISTERED: list[str] = []  # the at-exit writer is registered once, whichever factories ask


def _record_torch_stats_at_exit() -> None:
    """With $GPUSCOPE_GPU_TORCH_STATS set, write torch's own allocator figures there when the process exits.

    After the sweep nothing allocates any more (predictors joined, the report is CPU work), so these are
    the figures of the run's last tick, as torch itself reports them.
    """
    path = os.environ.get(TORCH_STATS_ENV)
    if not path or _EXIT_WRITER_REGISTERED:
        return
    _EXIT_WRITER_REGISTERED.append(path)
    import atexit

    def write() -> None:
        import torch

        data: dict[str, Any] = dict(_EXIT_EXTRA)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            device = torch.cuda.current_device()
            stats = torch.cuda.memory_stats(device)
            data.update(device=device, allocated_bytes=torch.cuda.memory_allocated(device),
                        reserved_bytes=torch.cuda.memory_reserved(device),
                        inactive_split_bytes=int(stats.get("inactive_split_bytes.all.current", 0)),
                        num_alloc_retries=int(stats.get("num_alloc_retries", 0)),
                        num_ooms=int(stats.get("num_ooms", 0)))
        if "cupy" in sys.modules:  # only where the factory loaded it
            try:
                pool = sys.modules["cupy"].get_default_memory_pool()
                data.update(cupy_pool_total_bytes=int(pool.total_bytes()), cupy_pool_used_bytes=int(pool.used_bytes()))
            except Exception as exc:
                data["cupy_error"] = f"{type(exc).__name__}: {exc}"
        write_json_atomic(Path(path), data)

    atexit.register(write)


def _mlp(width: int = 1024, depth: int = 4) -> Any:
    from torch import nn

    layers: list[Any] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def cache_bloat_model() -> Any:
    """A small MLP (16 MiB) whose first forward allocates CACHE_BLOAT_BYTES and frees it without
    torch.cuda.empty_cache(): the block stays reserved (NVML counts it) while no tensor uses it.

    The big tensor lives on a side stream: the caching allocator reuses a freed block only for its own
    stream, so the predictors never split it, and the cache is exactly that block (plus the usual slack),
    not a fragmented remainder.
    """
    import torch
    from torch import nn

    class CacheBloat(nn.Module):
        example_input_shape = (8, 1024)

        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()
            self.planted = False

        def forward(self, x: Any) -> Any:
            if not self.planted and x.is_cuda:
                with _PLANT_LOCK:
                    if not self.planted:
                        side = torch.cuda.Stream(device=x.device)
                        with torch.cuda.stream(side):
                            block = torch.empty(CACHE_BLOAT_BYTES, dtype=torch.uint8, device=x.device)
                            block.zero_()
                        side.synchronize()
                        del block  # freed, not emptied: reserved stays, allocated drops
                        self.planted = True
            return self.net(x)

    _record_torch_stats_at_exit()
    _EXIT_EXTRA["planted_cache_bytes"] = CACHE_BLOAT_BYTES
    model = CacheBloat()
    # Held to the end: freed when diagnose returns, its 16 MiB would join the cache before the atexit
    # figures are taken, and torch's figure would no longer be the run's last tick (-0.8% of 2 GiB).
    _HELD.append(model)
    return model


def cupy_torch_model() -> Any:
    """A torch MLP (16 MiB) from a factory that also imports CuPy and allocates CUPY_BYTES with it:
    two engines, each with its own allocator, in the profiled process."""
    import cupy

    array = cupy.zeros(CUPY_BYTES, dtype=cupy.uint8)  # a memset, no kernel to compile
    cupy.cuda.Device().synchronize()
    _HELD.append(array)
    _EXIT_EXTRA["cupy_bytes"] = CUPY_BYTES
    _record_torch_stats_at_exit()
    model = _mlp()
    model.example_input_shape = (8, 1024)
    _HELD.append(model)  # held to exit, so torch's figures at exit are the run's last tick (check_gpu_run)
    return model


# ---------------------------------------------------------------- one diagnose run in a fresh process

@dataclass
class DiagnoseRun:
    """One diagnose run, with the independent readings taken beside it.

    `smi` is what nvidia-smi said while it ran (polled by the test process), `windows` each step's span from
    the run's samples.jsonl, `torch_at_exit` what torch itself reported in the profiled process at exit
    (where a planted model wrote it; None for the built-in model)."""

    out_dir: Path
    argv: list[str]
    rc: int
    wall_s: float
    stdout: str
    stderr: str
    run: dict[str, Any] = field(default_factory=dict)
    smi: list[ref.SmiReading] = field(default_factory=list)
    windows: list[ref.StepWindow] = field(default_factory=list)
    torch_at_exit: dict[str, Any] | None = None

    def explain(self) -> str:
        return (f"`{' '.join(self.argv)}` exited {self.rc} after {self.wall_s:.1f} s; "
                f"stderr: {self.stderr[-2500:]!r}; stdout: {self.stdout[-1500:]!r}")


def diagnose(out_dir: Path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 180.0,
             watcher: ref.SmiWatcher | None = None) -> DiagnoseRun:
    """`python -m gpuscope diagnose --out OUT_DIR --quiet ARGS` from the repository root; its run.json.

    While it runs, `watcher` (an SmiWatcher on the real nvidia-smi unless given) polls nvidia-smi from this
    process; the readings are saved beside the run as nvidia-smi-readings.json. A planted model
    writes torch's figures at exit to OUT_DIR/torch-at-exit.json (GPUSCOPE_GPU_TORCH_STATS, unless `env`
    names another path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "gpuscope", "diagnose", "--out", str(out_dir), "--quiet", *args]
    extra = {TORCH_STATS_ENV: str(out_dir / "torch-at-exit.json"), **(env or {})}
    watcher = (watcher or ref.SmiWatcher()).start()
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=str(ROOT), env=child_env(extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        rc = -9
        stderr = (stderr or "") + f"\n[killed after {timeout_s:.0f} s]"
    finally:
        readings = watcher.stop()
    wall = time.monotonic() - started
    (out_dir / "diagnose.stdout.txt").write_text(stdout or "")
    (out_dir / "diagnose.stderr.txt").write_text(stderr or "")
    write_json_atomic(out_dir / "nvidia-smi-readings.json", [r.to_json() for r in readings])
    result = DiagnoseRun(out_dir, [Path(argv[0]).name] + argv[1:], rc, wall, stdout or "", stderr or "",
                         smi=readings, windows=ref.read_step_windows(out_dir / "samples.jsonl"))
    run_path = out_dir / "run.json"
    if run_path.exists():
        result.run = json.loads(run_path.read_text())
    stats_path = Path(extra[TORCH_STATS_ENV])
    if stats_path.exists():
        result.torch_at_exit = json.loads(stats_path.read_text())
    return result


# ---------------------------------------------------------------- reading a run.json

def findings(run: dict[str, Any], code: str | None = None) -> list[dict[str, Any]]:
    return [f for f in run.get("findings", []) if code is None or f.get("code") == code]


def codes(run: dict[str, Any]) -> set[str]:
    return {f.get("code") for f in run.get("findings", [])}


def finding_summary(run: dict[str, Any]) -> list[str]:
    return [f"{f.get('severity')} {f.get('code')}: {f.get('title')}" for f in run.get("findings", [])]


def number(value: Any) -> int | float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope, computed here independently of the product's slope."""
    xs = {x for x, _ in points}
    if len(xs) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def step_points(run: dict[str, Any], key: str) -> list[tuple[int, int]]:
    return [(s["predictors"], s["memory"][key]) for s in run.get("steps", [])
            if s.get("requests", 0) > 0 and not s.get("oom") and number(s.get("memory", {}).get(key)) is not None]


def step_table(run: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for s in run.get("steps", []):
        memory = s.get("memory", {})
        rows.append({"predictors": s.get("predictors"), "requests": s.get("requests"),
                     "throughput_rps": round(s.get("throughput_rps", 0.0), 1),
                     "p50_ms": s.get("latency_ms", {}).get("p50"), "p99_ms": s.get("latency_ms", {}).get("p99"),
                     "process_gpu_bytes": memory.get("process_gpu_bytes"),
                     "torch_allocated_peak_bytes": memory.get("torch_allocated_bytes"),
                     "torch_reserved_peak_bytes": memory.get("torch_reserved_bytes"),
                     "other_processes_bytes": memory.get("other_processes_bytes"),
                     "device_used_bytes": memory.get("device_used_bytes"), "layers": memory.get("layers"),
                     "distinct_weight_sets": s.get("distinct_weight_sets"), "errors": s.get("errors")})
    return rows


def process_entry(run: dict[str, Any], pid: int) -> dict[str, Any] | None:
    return next((p for p in run.get("processes", []) if p.get("pid") == pid), None)


def run_figures(result: DiagnoseRun) -> dict[str, Any]:
    """The figures of one run worth keeping in the results JSON, whatever the verdict."""
    run = result.run
    return {"argv": result.argv[1:], "rc": result.rc, "wall_s": round(result.wall_s, 2),
            "status": run.get("status"), "failure": run.get("failure"), "pid": run.get("pid"),
            "config": {k: run.get("config", {}).get(k) for k in ("device", "gpu_index", "model", "model_size",
                                                                 "predictors", "streams", "copy_model")},
            "model": run.get("model"), "baseline": run.get("baseline"), "sharing": run.get("sharing"),
            "recommendation": run.get("recommendation"), "findings": finding_summary(run),
            "sampler": run.get("sampler"), "steps": step_table(run),
            "processes": [{k: p.get(k) for k in ("pid", "self", "name", "engines", "peak_used_bytes",
                                                 "peak_sm_util_pct", "memory_env")} for p in run.get("processes", [])],
            "environment": {k: run.get("environment", {}).get(k) for k in ("torch", "cuda", "device_name", "driver",
                                                                          "memory_env")}}


SMI_STEP_SHARE = 0.01          # a step's NVML figure vs nvidia-smi's: within 1% ...
SMI_STEP_FLOOR_BYTES = 2 * MiB  # ... or 2 MiB (nvidia-smi prints whole MiB; the last poll may miss a late page)
SMI_MIN_STEP_S = 1.0           # a step at least this long must have an nvidia-smi reading inside it


def smi_steps(result: DiagnoseRun) -> dict[int, ref.StepSmi]:
    """nvidia-smi's figures for the run's own pid on its GPU, step by step (references.match_steps)."""
    run = result.run
    device = next((d for d in run.get("devices", []) if d.get("index") == run.get("config", {}).get("gpu_index")), {})
    return ref.match_steps(result.windows, result.smi, int(run.get("pid") or 0), device.get("uuid"))


def smi_step_points(result: DiagnoseRun) -> list[tuple[int, int]]:
    """(predictors, bytes) from nvidia-smi for each step it has a figure for: the independent growth curve."""
    return [(n, m.process_mib * MiB) for n, m in sorted(smi_steps(result).items()) if m.process_mib is not None]


def gpu_run_figures(result: DiagnoseRun) -> dict[str, Any]:
    """What check_gpu_run compares, computed without asserting (recorded before the checks)."""
    run = result.run
    matched = smi_steps(result)
    rows = []
    for s in run.get("steps", []):
        n = s.get("predictors")
        memory = s.get("memory", {})
        smi = matched.get(n)
        process = number(memory.get("process_gpu_bytes"))
        rows.append({"predictors": n, "process_gpu_bytes": process, "layers": memory.get("layers"),
                     "nvidia_smi": smi.to_json() if smi else None,
                     "error_vs_smi_bytes": (process - smi.process_mib * MiB
                                            if process is not None and smi and smi.process_mib is not None else None)})
    end = run.get("baseline", {}).get("end") or {}
    return {"steps": rows, "smi_readings": len(result.smi), "smi_failed": sum(1 for r in result.smi if r.error),
            "smi_first_error": next((r.error for r in result.smi if r.error), None),
            "context_bytes": run.get("baseline", {}).get("context_bytes"), "end_of_run": end,
            "torch_at_exit": result.torch_at_exit}


def check_gpu_run(result: DiagnoseRun, record: Callable[..., None] | None = None,
                  oom_at: int | None = None) -> dict[str, Any]:
    """What every diagnose run on a working GPU must show; its figures go to `record` before any check.

    - it exited 0 with a complete run.json profiled on cuda, NVML open, every step served requests without
      errors (but for the step `oom_at`, which must be the last and have run out of memory);
    - at each step, the process's NVML figure agrees with nvidia-smi's for the same pid, read by this
      process during the same step (SMI_STEP_SHARE / SMI_STEP_FLOOR_BYTES; every step of SMI_MIN_STEP_S or
      more must have a reading); torch's figures were read (no unattributed layer) and something lies
      outside the allocator (the CUDA context);
    - where the planted model wrote torch's own figures at exit, the run's last tick shows the same reserved
      bytes to the byte and the same allocated bytes within 1 MiB (nothing allocates after the sweep);
    - the model weights layer is the model's bytes (x (1 + predictors) with --copy-model); the CUDA
      context baseline was measured;
    - NVML listed this process (no PID_NAMESPACE) and no rule crashed or reading stopped (no MEASUREMENT_GAP).
    """
    figures = gpu_run_figures(result)
    if record is not None:
        record(invariants=figures)
    assert result.rc == 0, result.explain()
    run = result.run
    assert run, f"no run.json in {result.out_dir}: {result.explain()}"
    assert run.get("status") == "complete", f"status {run.get('status')}: {run.get('failure')}"
    assert str(run.get("config", {}).get("device", "")).startswith("cuda"), f"profiled {run.get('config', {}).get('device')}"
    assert run.get("device_unavailable") in (None, {}), f"NVML unavailable: {run.get('device_unavailable')}"
    steps = run.get("steps", [])
    assert steps, "no step measured"
    assert result.smi and figures["smi_failed"] < len(result.smi), \
        f"nvidia-smi gave no reading during the run ({figures['smi_first_error']}): nothing independent to compare with"
    model_bytes = int(run.get("model", {}).get("model_bytes") or 0)
    windows = {w.predictors: w for w in result.windows}
    for s, row in zip(steps, figures["steps"]):
        n = s["predictors"]
        if oom_at is not None and n == oom_at:
            assert s is steps[-1] and s.get("oom"), f"{n} predictors: expected the last step, out of memory: {s}"
        else:
            assert s.get("requests", 0) > 0, f"{n} predictors served no request"
            assert s.get("errors", 0) == 0 and not s.get("oom") and not s.get("dead_predictors"), \
                f"{n} predictors: errors {s.get('errors')}, oom {s.get('oom')}, messages {s.get('error_messages')}"
        memory = s.get("memory", {})
        process = row["process_gpu_bytes"]
        assert process is not None, f"{n} predictors: no NVML per-process figure ({memory.get('process_gpu_bytes')})"
        smi = row["nvidia_smi"]
        window = windows.get(n)
        assert window is not None, f"{n} predictors: no step_start/step_end in samples.jsonl"
        if smi is None or smi["process_mib"] is None:
            assert window.seconds < SMI_MIN_STEP_S, \
                f"{n} predictors: {smi['why'] if smi else 'no nvidia-smi figure'} (step {window.seconds:.2f} s)"
        else:
            assert ref.within(process, smi["process_mib"] * MiB, SMI_STEP_SHARE, SMI_STEP_FLOOR_BYTES), \
                (f"{n} predictors: gpuscope {process / MiB:.1f} MiB, nvidia-smi {smi['process_mib']} MiB "
                 f"(largest of {smi['readings']} readings inside the step)")
        layers = memory.get("layers") or {}
        assert "unattributed_process_bytes" not in layers, f"{n} predictors: torch figures missing: {layers}"
        assert layers.get("outside_allocator_bytes", 0) > 0, f"{n} predictors: nothing outside the allocator? {layers}"
        # with --copy-model each predictor holds its own copy beside the original (profiler/measure/sweep.py)
        weights = model_bytes * (1 + n) if run.get("config", {}).get("copy_model") else model_bytes
        assert layers.get("model_weights_bytes") == weights, \
            f"{n} predictors: weights layer {layers.get('model_weights_bytes')} != {weights} (model bytes {model_bytes})"
    at_exit = result.torch_at_exit
    if at_exit is not None and "reserved_bytes" in at_exit:
        end = figures["end_of_run"]
        assert end.get("torch_reserved_bytes") == at_exit["reserved_bytes"], \
            f"torch reserved: gpuscope's last tick {end.get('torch_reserved_bytes')}, torch at exit {at_exit['reserved_bytes']}"
        assert number(end.get("torch_allocated_bytes")) is not None and \
            abs(end["torch_allocated_bytes"] - at_exit["allocated_bytes"]) <= MiB, \
            f"torch allocated: gpuscope's last tick {end.get('torch_allocated_bytes')}, torch at exit {at_exit['allocated_bytes']}"
    context = run.get("baseline", {}).get("context_bytes")
    assert number(context) is not None and context >= 64 * MiB, f"CUDA context baseline {context}"
    gaps = findings(run, "MEASUREMENT_GAP")
    assert not gaps, f"readings stopped or a rule crashed: {[f.get('title') for f in gaps]}"
    assert not findings(run, "PID_NAMESPACE"), f"NVML could not attribute processes: {finding_summary(run)}"
    me = process_entry(run, run.get("pid"))
    assert me is not None and me.get("self"), f"this process ({run.get('pid')}) is not among the processes"
    figures["self_engines"] = me.get("engines")
    return figures


# ---------------------------------------------------------------- run.sh's helpers

def record_defaults(results: Path, run_json: Path, wall_s: float, rc: int) -> dict[str, Any]:
    """Merge the timed `python -m gpuscope diagnose` (all defaults) into the results JSON."""
    data = json.loads(results.read_text()) if results.exists() else {"schema": "gpuscope.gpu-validation/1"}
    data.setdefault("environment", environment())
    entry: dict[str, Any] = {"argv": ["-m", "gpuscope", "diagnose", "--out", str(run_json.parent)], "rc": rc,
                             "wall_s": round(wall_s, 2)}
    if run_json.exists():
        run = json.loads(run_json.read_text())
        entry.update(status=run.get("status"), device=run.get("config", {}).get("device"),
                     predictors=run.get("config", {}).get("predictors"), sampler=run.get("sampler"),
                     findings=finding_summary(run), recommendation=run.get("recommendation"),
                     steps=step_table(run))
        sampler = run.get("sampler") or {}
        entry["sampler_tick_cost_us"] = sampler.get("mean_tick_cost_us")
        entry["sampler_tick_cpu_us"] = sampler.get("mean_tick_cpu_us")
    else:
        entry["status"] = "no run.json"
    entry["verdict"] = "passed" if rc == 0 and entry.get("status") == "complete" else "failed"
    data["diagnose_defaults"] = entry
    write_json_atomic(results, data)
    return entry


def summary(results: Path) -> str:
    if not results.exists():
        return f"{results}: no results (did any GPU test run?)"
    data = json.loads(results.read_text())
    env = data.get("environment", {})
    lines = [f"{env.get('card')} driver {env.get('driver')} CUDA {env.get('cuda_driver')} torch {env.get('torch')} "
             f"({env.get('date')})"]
    for name, entry in data.get("scenarios", {}).items():
        why = (entry.get("message") or "").strip().splitlines()
        lines.append(f"  {name:<28} {entry.get('verdict')}" + (f"  {why[0][:160]}" if why and entry.get("verdict") != "passed"
                                                               else ""))
    defaults = data.get("diagnose_defaults")
    if defaults:
        lines.append(f"  {'diagnose-defaults':<28} {defaults.get('verdict')}  wall {defaults.get('wall_s')} s, "
                     f"sampler tick {defaults.get('sampler_tick_cost_us')} us wall / "
                     f"{defaults.get('sampler_tick_cpu_us')} us CPU")
    return "\n".join(lines)


# What each scenario's row in docs/gpu-validation.md shows: (label, path into its figures).
KEY_FIGURES: dict[str, tuple[tuple[str, str], ...]] = {
    "clean": (("wall s", "wall_s"), ("findings", "fired"), ("context", "invariants.context_bytes"),
              ("per extra predictor", "run.sharing.bytes_per_extra_predictor")),
    "cache-bloat": (("CACHE_BLOAT cached", "cached_bytes"), ("torch reserved-allocated", "torch_cached_bytes"),
                    ("error", "error_vs_torch"), ("when", "when")),
    "copies": (("model", "model_bytes"), ("per extra predictor", "measured_bytes_per_predictor"),
               ("nvidia-smi per extra predictor", "nvidia_smi_bytes_per_predictor"),
               ("ratio", "per_predictor_vs_model"), ("nvidia-smi ratio", "smi_per_predictor_vs_model")),
    "foreign-process": (("pid", "child_pid"), ("gpuscope", "reported_bytes"), ("nvidia-smi MiB", "nvidia_smi_mib"),
                        ("error", "error_vs_smi")),
    "second-engine-cupy": (("engines", "finding.0.evidence.engines"), ("context", "context_bytes"),
                           ("outside allocator", "outside_allocator_bytes")),
    "jax-preallocation": (("pid", "child_pid"), ("held", "held_bytes"), ("share of card", "held_share_of_card"),
                          ("nvidia-smi MiB", "nvidia_smi_mib"), ("error", "error_vs_smi")),
    "jax-no-preallocation": (("pid", "child_pid"), ("held", "held_bytes"), ("share of card", "held_share_of_card"),
                             ("nvidia-smi MiB", "nvidia_smi_mib")),
    "per-predictor-growth": (("default stream", "default_stream_growth.measured_nvml_bytes_per_predictor"),
                             ("nvidia-smi", "default_stream_growth.nvidia_smi_bytes_per_predictor"),
                             ("streams", "streams_growth.measured_nvml_bytes_per_predictor"),
                             ("nvidia-smi", "streams_growth.nvidia_smi_bytes_per_predictor"),
                             ("plateau", "serialization.0.title"), ("streams gain at plateau", "plateau.streams_gain_at_to")),
    "outside-allocator": (("driver API", "driver_bytes"), ("outside, 2nd difference", "outside_second_difference"),
                          ("torch workspaces", "torch_workspace_bytes"),
                          ("reserved, 2nd difference", "reserved_second_difference"),
                          ("nvidia-smi, 2nd difference", "nvidia_smi_second_difference"),
                          ("severity", "finding.0.severity")),
    "fragmentation": (("torch inactive split", "torch_after_plant.inactive_split_bytes"),
                      ("gpuscope", "finding.0.evidence.inactive_split_bytes"),
                      ("gpuscope - torch bytes", "error_vs_torch_bytes")),
    "low-headroom": (("fill", "fill_bytes"), ("used share", "used_share"), ("nvidia-smi share", "nvidia_smi_share"),
                     ("severity", "finding.0.severity")),
    "oom": (("counted in the step", "step_errors"), ("raised", "raised"), ("torch num_ooms", "torch_num_ooms"),
            ("torch retries", "torch_num_alloc_retries"), ("finding", "finding.0.title")),
}


def _dig(data: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict):
            data = data.get(part)
        else:
            return None
    return data


def _show(label: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"{label} {value}"
    if isinstance(value, (int, float)) and ("error" in label or "ratio" in label or "share" in label or "gain" in label):
        return f"{label} {value:+.3%}" if "error" in label or "gain" in label else f"{label} {value:.3f}"
    if isinstance(value, (int, float)) and abs(value) >= MiB:
        return f"{label} {value / MiB:,.1f} MiB"
    if isinstance(value, list) and all(isinstance(v, (int, float)) and abs(v) >= MiB for v in value) and value:
        return f"{label} " + ", ".join(f"{v / MiB:,.0f}" for v in value) + " MiB"
    return f"{label} {value}"


def markdown(results: Path) -> str:
    """The tables docs/gpu-validation.md asks for, from a results JSON."""
    data = json.loads(results.read_text())
    env = data.get("environment", {})
    lines = ["| card | driver | CUDA (driver) | torch | CuPy | JAX | date | commit |", "|---|---|---|---|---|---|---|---|",
             f"| {env.get('card')} | {env.get('driver')} | {env.get('cuda_driver')} | {env.get('torch')} "
             f"(CUDA {env.get('torch_cuda')}) | {env.get('cupy')} | {env.get('jax')} | {env.get('date')} | "
             f"{(env.get('git_commit') or '')[:10]}{' (dirty)' if env.get('git_dirty') else ''} |", "",
             "| scenario / test | verdict | figures |", "|---|---|---|"]
    for name, entry in data.get("scenarios", {}).items():
        figures = entry.get("figures", {})
        shown = [_show(label, _dig(figures, path)) for label, path in KEY_FIGURES.get(name, ())]
        why = entry.get("message", "").splitlines()[0][:160] if entry.get("verdict") != "passed" and entry.get("message") else ""
        lines.append(f"| {name} | {entry.get('verdict')}{': ' + why if why else ''} | {'; '.join(shown)} |")
    defaults = data.get("diagnose_defaults")
    if defaults:
        lines.append(f"| diagnose (all defaults) | {defaults.get('verdict')} | wall {defaults.get('wall_s')} s; "
                     f"predictors {defaults.get('predictors')}; sampler tick {defaults.get('sampler_tick_cost_us')} us "
                     f"wall, {defaults.get('sampler_tick_cpu_us')} us CPU |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="tests/gpu/scenarios.py")
    sub = parser.add_subparsers(dest="command", required=True)
    foreign = sub.add_parser("foreign", help="hold N GiB with torch on cuda:0, print ready, wait on stdin")
    foreign.add_argument("--gib", type=int, default=FOREIGN_GIB)
    sub.add_parser("jax", help="one JAX operation (memory policy from the environment), print ready, wait on stdin")
    defaults = sub.add_parser("record-defaults", help="merge the timed defaults run into the results JSON")
    defaults.add_argument("--results", type=Path, required=True)
    defaults.add_argument("--run", type=Path, required=True)
    defaults.add_argument("--wall", type=float, required=True)
    defaults.add_argument("--rc", type=int, required=True)
    show = sub.add_parser("summary", help="print each scenario's verdict")
    show.add_argument("--results", type=Path, required=True)
    show.add_argument("--markdown", action="store_true", help="the tables for docs/gpu-validation.md")
    args = parser.parse_args(argv)
    if args.command == "foreign":
        return _child_foreign(args.gib)
    if args.command == "jax":
        return _child_jax()
    if args.command == "record-defaults":
        entry = record_defaults(args.results, args.run, args.wall, args.rc)
        print(f"diagnose with defaults: {entry['verdict']}, {entry['wall_s']} s, "
              f"sampler tick {entry.get('sampler_tick_cost_us')} us")
        return 0
    print(markdown(args.results) if args.markdown else summary(args.results))
    return 0


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
