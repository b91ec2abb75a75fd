"""Worker processes for `gpuscope compare`: each loads the model itself and serves it with a PredictorPool.

The same worker runs both sides of the comparison, so the only difference
between them is the one being measured:
  threads:   one worker process, N predictor threads sharing its one model;
  processes: N worker processes, one predictor thread each, N models.

Workers are started with the `spawn` method (a fresh interpreter: no forked
CUDA context, no copy-on-write pages inherited from the parent) and load the
model from its *spec* (builtin:NAME, a model file, or package.module:factory)
through measure/models.py, exactly as diagnose does; nothing is unpickled that
the user did not ask for (model files keep the --trust-model-file rule).

Protocol, over one duplex Pipe per worker (plain tuples only):
  worker -> parent  ("ready", info) | ("error", one_line) | ("result", payload)
  parent -> worker  ("run", threads) | ("stop", window_start_ns, window_end_ns) | ("quit",)
Latencies and end times use time.perf_counter_ns(), CLOCK_MONOTONIC on Linux,
so the parent's measured window applies to every worker's requests.

Lifetime: the parent reaps every worker on every exit path (`WorkerGroup.close`:
ask, join with a timeout, terminate, kill). Workers ignore SIGINT (Ctrl-C in a
terminal reaches the whole process group; the parent decides when they stop),
exit when the pipe to the parent closes, and on Linux ask the kernel to kill
them if the parent dies (PR_SET_PDEATHSIG), so none outlives a crashed parent.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

READY_TIMEOUT_S = 900.0  # loading a large model onto a busy device can take minutes
RESULT_TIMEOUT_S = 120.0
_SPAWNED: list[int] = []  # every worker pid this process started, for tests and diagnostics


def spawned_pids() -> list[int]:
    """Pids of every worker this process has started (alive or long reaped)."""
    return list(_SPAWNED)


@dataclass(frozen=True)
class WorkerSpec:
    """How a worker loads and runs the model: plain values only, sent to the spawned interpreter."""

    model: str
    device: str
    input_shape: tuple[int, ...] | None = None
    dtype: str | None = None
    size: str = "small"
    trust_model_file: bool = False
    intra_op_threads: int | None = None
    streams: bool = False
    inference_mode: bool = True
    # Environment variables set in the worker before it imports torch (`gpuscope tune`'s CUBLAS_WORKSPACE_CONFIG,
    # PYTORCH_CUDA_ALLOC_CONF): they take effect only before torch and CUDA initialise.
    env: tuple[tuple[str, str], ...] = ()
    requests_path: str | None = None  # --requests: a translator's (or the model's) requests, JSONL

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape) if self.input_shape else None
        data["env"] = [list(pair) for pair in self.env]
        return data


class WorkerError(Exception):
    """A worker could not load or run the model (its own one-line message), or died."""

    def __init__(self, message: str, index: int, pid: int | None, exitcode: int | None = None,
                 during: str = "") -> None:
        super().__init__(message)
        self.index = index
        self.pid = pid
        self.exitcode = exitcode
        self.during = during


class Interrupted(Exception):
    """The stop event was set (Ctrl-C, SIGTERM) while waiting on workers."""


# ---------------------------------------------------------------- the worker side (runs in the child)

def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this worker when its parent dies, even by SIGKILL. Best effort elsewhere."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except Exception:
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def _load(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torch

    from gpuscope.measure.models import load_model, validate_model

    if spec.get("intra_op_threads"):
        torch.set_num_threads(int(spec["intra_op_threads"]))
    shape = tuple(spec["input_shape"]) if spec.get("input_shape") else None
    model = load_model(spec["model"], spec["device"], shape, spec.get("dtype"), spec.get("size") or "small",
                       bool(spec.get("trust_model_file")), spec.get("requests_path"))
    validate_model(model)  # one request: the first call's one-off costs are paid before the parent measures
    info: dict[str, Any] = {"pid": os.getpid(), "model": model.to_json(), "torch_num_threads": torch.get_num_threads(),
                            "env": {str(k): os.environ.get(str(k)) for k, _ in spec.get("env") or []}}
    if model.device.startswith("cuda"):
        index = int(model.device.split(":")[1]) if ":" in model.device else 0
        torch.cuda.synchronize(model.device)
        try:
            info["device_uuid"] = str(torch.cuda.get_device_properties(index).uuid)
        except Exception:
            pass
    return model, info


def _apply_env(pairs: list[list[str]]) -> None:
    """Set the spec's environment before torch loads; a torch already imported would ignore it silently."""
    if pairs and "torch" in sys.modules:
        raise RuntimeError("torch was imported before the worker could set " + ", ".join(k for k, _ in pairs)
                           + ": the setting would not take effect")
    for name, value in pairs:
        os.environ[str(name)] = str(value)


def _window_payload(run: Any, start_ns: int, end_ns: int) -> dict[str, Any]:
    """The requests that ended inside the parent's window, and what went wrong."""
    latencies: list[int] = []
    messages: list[str] = []
    for result in run.results:
        latencies += [lat for lat, end in zip(result.latencies_ns, result.end_times_ns) if start_ns <= end <= end_ns]
        for message in result.error_messages + ([f"predictor died: {result.died}"] if result.died else []):
            if message not in messages:
                messages.append(message)
    return {"pid": os.getpid(), "threads": run.predictors, "latencies_ns": latencies,
            # errors in the same window as the requests: an error rate over mismatched spans means nothing
            "errors": sum(1 for r in run.results for end in r.error_end_ns if start_ns <= end <= end_ns),
            "error_messages": messages[:5],
            "dead_predictors": sum(1 for r in run.results if r.died), "oom": any(r.oom for r in run.results),
            "weight_sets": len({r.weights for r in run.results if r.weights})}


def worker_main(index: int, spec: dict[str, Any], conn: Any, parent_pid: int) -> None:
    """Entry point of a spawned worker (top level, so `spawn` can import it by name)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us; Ctrl-C goes to the whole group
    _die_with_parent(parent_pid)
    try:
        _apply_env(spec.get("env") or [])
        model, info = _load(spec)
    except BaseException as exc:  # any load failure, OSError included, is the parent's one line
        _fail(conn, exc)
    try:
        conn.send(("ready", info))
        _serve(conn, model, spec)
    except (EOFError, OSError):  # BrokenPipeError included: the parent is gone, nothing to report to
        return
    except BaseException as exc:
        _fail(conn, exc)


def _fail(conn: Any, exc: BaseException) -> None:
    """Tell the parent why this worker stops (if it still listens), then exit non-zero."""
    try:
        conn.send(("error", _one_line(exc)))
    except Exception:
        pass
    sys.exit(1)


def _serve(conn: Any, model: Any, spec: dict[str, Any]) -> None:
    from gpuscope.measure.workload import PredictorPool

    pool = PredictorPool(model, streams=bool(spec.get("streams")), inference_mode=spec.get("inference_mode", True))
    runner: threading.Thread | None = None
    step_stop = threading.Event()
    outcome: dict[str, Any] = {}

    def run_step(threads: int) -> None:
        try:
            # no warm-up, no stability rule: the parent owns the window and says when to stop
            outcome["run"] = pool.run_step(threads, max_duration_s=7 * 24 * 3600.0, warmup_s=0.0, window_s=1.0,
                                           stop=step_stop)
        except BaseException as exc:
            outcome["error"] = _one_line(exc)

    def finish() -> None:
        step_stop.set()
        if runner is not None:
            runner.join()

    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the parent closed the pipe or died
            kind = message[0]
            if kind == "run":
                finish()
                step_stop = threading.Event()
                outcome.clear()
                runner = threading.Thread(target=run_step, args=(int(message[1]),), name="gpuscope-worker-step",
                                          daemon=True)
                runner.start()
            elif kind == "stop":
                finish()
                runner = None
                if "error" in outcome:
                    raise RuntimeError(outcome["error"])
                run = outcome.get("run")
                if run is None:
                    raise RuntimeError("stop received before any step ran")
                conn.send(("result", _window_payload(run, int(message[1]), int(message[2]))))
            elif kind == "quit":
                return
    finally:
        finish()


# ---------------------------------------------------------------- the parent side

@dataclass
class Worker:
    index: int
    process: Any  # multiprocessing.Process (spawn context)
    conn: Any  # the parent's end of the pipe
    info: dict[str, Any] | None = None
    retired: bool = False

    @property
    def pid(self) -> int | None:
        return self.process.pid


class WorkerGroup:
    """Starts, drives and always reaps worker processes. Use as a context manager (or call close())."""

    def __init__(self, spec: WorkerSpec, stop: threading.Event, ready_timeout_s: float = READY_TIMEOUT_S,
                 on_spawn: Callable[[Worker], None] | None = None) -> None:
        import multiprocessing

        self._ctx = multiprocessing.get_context("spawn")
        self.spec = spec
        self.stop = stop
        self.ready_timeout_s = ready_timeout_s
        self.on_spawn = on_spawn
        self.workers: list[Worker] = []
        self._next_index = 0

    def __enter__(self) -> "WorkerGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- starting

    def spawn(self, count: int, during: str = "") -> list[Worker]:
        """Start `count` workers and wait until each has loaded the model (WorkerError / Interrupted otherwise)."""
        started: list[Worker] = []
        for _ in range(count):
            parent_end, child_end = self._ctx.Pipe(duplex=True)
            index = self._next_index
            self._next_index += 1
            process = self._ctx.Process(target=worker_main, args=(index, self.spec.to_json(), child_end, os.getpid()),
                                        name=f"gpuscope-worker-{index}", daemon=True)
            worker = Worker(index, process, parent_end)
            self.workers.append(worker)  # before start(): close() reaps it whatever happens next
            process.start()
            child_end.close()
            if process.pid is not None:
                _SPAWNED.append(process.pid)
            started.append(worker)
            if self.on_spawn is not None:
                self.on_spawn(worker)
        for worker in started:
            kind, payload = self._receive(worker, self.ready_timeout_s, during or "loading the model")
            if kind != "ready":
                raise WorkerError(f"worker {worker.index} (pid {worker.pid}) sent {kind!r} instead of ready",
                                  worker.index, worker.pid, during=during)
            worker.info = payload
        return started

    # -- a step

    def start_run(self, workers: list[Worker], threads: int) -> None:
        for worker in workers:
            self._send(worker, ("run", threads), "starting a step")

    def check_alive(self, workers: list[Worker], during: str) -> None:
        for worker in workers:
            if not worker.process.is_alive():
                message = self._error_message(worker)
                raise WorkerError(message or f"worker {worker.index} (pid {worker.pid}) exited with code "
                                  f"{worker.process.exitcode} while {during}",
                                  worker.index, worker.pid, worker.process.exitcode, during)
            if worker.conn.poll():
                kind, payload = self._read(worker, during)
                raise WorkerError(payload if kind == "error" else f"worker {worker.index} sent {kind!r} while {during}",
                                  worker.index, worker.pid, None, during)

    def finish_run(self, workers: list[Worker], window_start_ns: int, window_end_ns: int,
                   timeout_s: float = RESULT_TIMEOUT_S) -> list[dict[str, Any]]:
        for worker in workers:
            self._send(worker, ("stop", window_start_ns, window_end_ns), "stopping a step")
        payloads = []
        for worker in workers:
            kind, payload = self._receive(worker, timeout_s, "reporting its latencies", interruptible=False)
            if kind != "result":
                raise WorkerError(f"worker {worker.index} (pid {worker.pid}) sent {kind!r} instead of its results",
                                  worker.index, worker.pid)
            payloads.append(payload)
        return payloads

    # -- messages

    def _send(self, worker: Worker, message: tuple, during: str) -> None:
        try:
            worker.conn.send(message)
        except (OSError, EOFError, BrokenPipeError):
            self.check_alive([worker], during)
            raise WorkerError(f"worker {worker.index} (pid {worker.pid}) closed its pipe while {during}",
                              worker.index, worker.pid, worker.process.exitcode, during) from None

    def _read(self, worker: Worker, during: str) -> tuple[str, Any]:
        try:
            return worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(timeout=2)
            raise WorkerError(f"worker {worker.index} (pid {worker.pid}) exited with code {worker.process.exitcode} "
                              f"while {during}", worker.index, worker.pid, worker.process.exitcode, during) from None

    def _error_message(self, worker: Worker) -> str | None:
        try:
            if worker.conn.poll():
                kind, payload = worker.conn.recv()
                if kind == "error":
                    return str(payload)
        except (EOFError, OSError):
            pass
        return None

    def _receive(self, worker: Worker, timeout_s: float, during: str, interruptible: bool = True) -> tuple[str, Any]:
        """The next message from `worker`; WorkerError if it dies or says error, Interrupted on stop."""
        from multiprocessing.connection import wait

        deadline = time.monotonic() + timeout_s
        while True:
            if interruptible and self.stop.is_set():
                raise Interrupted()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"worker {worker.index} (pid {worker.pid}) did not answer within {timeout_s:g} s "
                                  f"while {during}", worker.index, worker.pid, during=during)
            ready = wait([worker.conn, worker.process.sentinel], timeout=min(0.1, remaining))
            if worker.conn in ready or worker.conn.poll():
                kind, payload = self._read(worker, during)
                if kind == "error":
                    raise WorkerError(str(payload), worker.index, worker.pid, None, during)
                return kind, payload
            if worker.process.sentinel in ready:
                worker.process.join(timeout=1)
                raise WorkerError(f"worker {worker.index} (pid {worker.pid}) exited with code {worker.process.exitcode} "
                                  f"while {during}", worker.index, worker.pid, worker.process.exitcode, during)

    # -- stopping

    def retire(self, workers: list[Worker], grace_s: float = 10.0) -> None:
        """Stop and reap these workers now (the rest keep running)."""
        reap([w for w in workers if not w.retired], grace_s)
        for worker in workers:
            worker.retired = True

    def close(self, grace_s: float = 10.0) -> None:
        """Stop and reap every worker this group started. Safe to call twice, and from any exit path."""
        if self.stop.is_set():
            grace_s = min(grace_s, 3.0)  # interrupted: the user is waiting
        self.retire(self.workers, grace_s)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None]


def reap(workers: list[Worker], grace_s: float = 10.0) -> None:
    """Ask each worker to quit, join with a timeout, then terminate, then kill. Leaves none running.

    SIGINT is ignored while reaping (main thread only), so a second Ctrl-C cannot
    leave a half-reaped group behind; reaping itself is bounded by ~grace_s + 4 s.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        try:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except (ValueError, OSError):
            previous = None
    try:
        started = [w for w in workers if w.process.pid is not None]
        for worker in started:
            try:
                worker.conn.send(("quit",))
            except Exception:
                pass
        deadline = time.monotonic() + grace_s
        for worker in started:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for escalate in ("terminate", "kill"):
            alive = [w for w in started if w.process.is_alive()]
            if not alive:
                break
            for worker in alive:
                try:
                    getattr(worker.process, escalate)()
                except Exception:
                    pass
            for worker in alive:
                worker.process.join(timeout=2.0)
        for worker in workers:
            try:
                worker.conn.close()
            except Exception:
                pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
