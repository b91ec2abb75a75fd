"""Is the predictor safe to share between threads? A bounded check (about a second) before the sweep.

Why: a model or translator that keeps per-request state on a shared object
(`self.last = h`, a buffer updated in place) mixes requests, but only under
concurrency, so single-threaded tests pass and a throughput sweep shows nothing.
Two kinds of evidence, both kept in run.json (`thread_safety`) for the rules:

* writes: a fixed set of requests runs once, one at a time, and around each the
  attributes of every module of the model and of the translator object are
  compared: an attribute rebound (its value's identity changed), a container
  attribute whose items changed, or a tensor written in place (its version
  counter moved). Writes are looked for after the validation requests, so a
  cache filled once on the first call is not one.
* outputs: the same requests run a second time one at a time, then from N
  concurrent predictors (each from its own offset) for as many rounds as the
  budget allows; each response is compared with its first sequential one,
  exactly or within `tolerance`. Outputs that differ between the two sequential
  passes make the concurrent comparison meaningless (dropout left on): the
  check says so rather than judging. A concurrent mismatch is also marked
  `rounding` when every float in it is within a few units of rounding of the
  sequential answer (relative to the tensor's largest value): a matmul whose
  intra-op threads are shared with other predictors may split its sums
  differently, which changes the last bits, not the answer; a request mixed
  with another's state is off by far more.
"""
from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from gpuscope.measure.models import LoadedModel, first_requests
from gpuscope.measure.translator import describe_exception

MAX_LISTED = 10  # mismatches and writes named in the record; the counts are complete
MAX_CONTAINER_ITEMS = 4096  # container attributes larger than this are compared by identity and length only
# float32 sums split across 1 to 16 intra-op threads differ by up to ~8 units of rounding on our models;
# 64 leaves room for deep models, 1% caps the half-precision bound (64 x 2^-7 would allow 50%)
ROUNDING_EPS_MULTIPLE = 64
ROUNDING_MAX_RELATIVE = 0.01


@dataclass(frozen=True)
class SafetyConfig:
    """How hard to look: concurrent predictors, the time budget, the comparison tolerance."""

    predictors: int = 4
    budget_s: float = 1.0
    tolerance: float = 0.0  # 0: responses must match exactly
    max_requests: int = 8
    max_rounds: int = 8


# ---------------------------------------------------------------- what a request writes

Signature = tuple[int, Any, Any]  # identity of the value, its tensor version (None), its items (None)


def _version(value: Any) -> Any:
    try:
        return value._version if hasattr(value, "_version") and hasattr(value, "data_ptr") else None
    except Exception:  # an inference tensor has no version counter
        return None


def _items(value: Any) -> Any:
    """The identities of a plain container's items (one level deep), None for anything else."""
    if type(value) in (dict,) and len(value) <= MAX_CONTAINER_ITEMS:
        return tuple((id(k), id(v), _version(v)) for k, v in value.items())
    if type(value) in (list, set) and len(value) <= MAX_CONTAINER_ITEMS:
        return tuple((id(v), _version(v)) for v in value) if type(value) is list else frozenset(id(v) for v in value)
    return None


def _attributes(obj: Any) -> dict[str, Any]:
    """An object's own attributes; for an nn.Module its parameters, buffers and plain attributes by name
    (its child modules are watched on their own)."""
    try:
        own = dict(vars(obj))
    except TypeError:
        return {}
    out: dict[str, Any] = {}
    for name, value in own.items():
        if name in ("_parameters", "_buffers") and isinstance(value, dict):
            out.update({key: item for key, item in value.items() if item is not None})
        elif name == "_modules" and isinstance(value, dict):
            out.update({f"{key} (module)": item for key, item in value.items()})
        else:
            out[name] = value
    return out


def _signature(value: Any) -> Signature:
    return (id(value), _version(value), _items(value))


@dataclass
class Watched:
    """One object whose attributes a request must not write: how to name it, and what it held."""

    label: str  # "Stateful" (the type), as the finding names it: Stateful.last
    path: str  # where it sits: "model", "model.encoder.0", "translator"
    obj: Any

    def snapshot(self) -> dict[str, Signature]:
        return {name: _signature(value) for name, value in _attributes(self.obj).items()}


def watched_objects(model: LoadedModel) -> list[Watched]:
    """Every module of the shared model, and the translator object that holds it."""
    out: list[Watched] = []
    module = model.module
    named = getattr(module, "named_modules", None)
    if named is not None:
        try:
            for path, sub in named():
                out.append(Watched(type(sub).__name__, "model" + (f".{path}" if path else ""), sub))
        except Exception:
            out = [Watched(type(module).__name__, "model", module)]
    else:
        out.append(Watched(type(module).__name__, "model", module))
    if model.translator is not None:
        out.append(Watched(model.translator.name, "translator", model.translator.owner))
    return out


def _writes(before: dict[str, Signature], after: dict[str, Signature]) -> list[tuple[str, str]]:
    """(attribute, kind) for each attribute added, removed, rebound, changed in its items or written in place."""
    found = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old is None:
            found.append((name, "added"))
        elif new is None:
            found.append((name, "removed"))
        elif old[0] != new[0]:
            found.append((name, "rebound"))
        elif old[1] != new[1]:
            found.append((name, "in_place"))
        elif old[2] != new[2]:
            found.append((name, "contents"))
    return found


# ---------------------------------------------------------------- responses

def keep(value: Any) -> Any:
    """A copy of a response that later requests cannot change (a stateful predictor may return its buffer)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: keep(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(keep(v) for v in value) if type(value) in (list, tuple) else [keep(v) for v in value]
    try:
        return copy.deepcopy(value)
    except Exception:
        return value


def difference(a: Any, b: Any, tolerance: float) -> float | None:
    """None when two responses agree (exactly, or within `tolerance` absolute and relative); else how far
    apart they are: the largest absolute difference, or inf when their shapes or types differ."""
    if hasattr(a, "shape") and hasattr(b, "shape") and hasattr(a, "dtype"):
        return _array_difference(a, b, tolerance)
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return float("inf")
        diffs = [d for k in a if (d := difference(a[k], b[k], tolerance)) is not None]
        return max(diffs) if diffs else None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return float("inf")
        diffs = [d for x, y in zip(a, b) if (d := difference(x, y, tolerance)) is not None]
        return max(diffs) if diffs else None
    if isinstance(a, float) and isinstance(b, (int, float)) or isinstance(b, float) and isinstance(a, (int, float)):
        if a == b or (a != a and b != b):
            return None
        gap = abs(a - b)
        return None if gap <= tolerance + tolerance * abs(b) else gap
    try:
        return None if a == b else float("inf")
    except Exception:
        return float("inf")


def _array_difference(a: Any, b: Any, tolerance: float) -> float | None:
    import numpy as np
    import torch

    if tuple(a.shape) != tuple(b.shape) or str(a.dtype) != str(b.dtype):
        return float("inf")
    x = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    y = b if isinstance(b, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(b))
    if torch.equal(x, y) or (x.is_floating_point() and torch.allclose(x, y, rtol=tolerance, atol=tolerance,
                                                                          equal_nan=True)):
        return None
    if x.is_floating_point() or x.is_complex():
        gap = (x.double() - y.double()).abs()
        gap = torch.nan_to_num(gap, nan=float("inf"))
        return float(gap.max()) if gap.numel() else None
    return float((x.long() - y.long()).abs().max()) if x.numel() else None


# Python floats (a postprocess's .tolist() or float()) do not say the dtype they came from: judged at
# float32's rounding, the dtype models serve in (a float64 model's gaps are smaller still).
_PYTHON_FLOAT_EPS = 2.0 ** -23


def _within_rounding(x: Any, y: Any, eps: float) -> bool:
    """Two float64 tensors of one shape: the same non-finite values at the same places, and the finite
    ones within ROUNDING_EPS_MULTIPLE units of `eps` at the larger of their largest value and 1."""
    import torch

    if x.numel() == 0:
        return True
    finite = torch.isfinite(y)
    if not bool(torch.isfinite(x).eq(finite).all()):
        return False
    odd_x, odd_y = x[~finite], y[~finite]
    if not bool((odd_x.eq(odd_y) | (odd_x.isnan() & odd_y.isnan())).all()):  # +inf vs -inf, nan vs inf
        return False
    scale = max(1.0, float(y[finite].abs().max())) if bool(finite.any()) else 1.0
    bound = min(ROUNDING_MAX_RELATIVE, ROUNDING_EPS_MULTIPLE * eps) * scale
    return bool(((x - y).abs()[finite] <= bound).all())


def _plain_numbers(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and any(isinstance(v, float) for v in value)


def rounding_only(a: Any, b: Any) -> bool:
    """True when `a` and `b` differ only in float rounding: same structure, every floating array (a torch
    tensor or a numpy array) within ROUNDING_EPS_MULTIPLE units of its dtype's rounding and a list of
    plain numbers or a float within as many of float32's, relative to the larger of its largest value and
    1; non-finite values identical; everything else equal."""
    import numpy as np
    import torch

    if hasattr(a, "shape") and hasattr(b, "shape") and hasattr(a, "dtype"):
        if tuple(a.shape) != tuple(b.shape) or str(a.dtype) != str(b.dtype):
            return False
        try:
            x = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
            y = b if isinstance(b, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(b))
        except TypeError:  # an array type torch cannot take
            return False
        if not x.is_floating_point():
            return bool(torch.equal(x, y))
        return _within_rounding(x.double(), y.double(), torch.finfo(x.dtype).eps)
    if _plain_numbers(a) and _plain_numbers(b) and len(a) == len(b):
        return _within_rounding(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                                _PYTHON_FLOAT_EPS)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(rounding_only(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(rounding_only(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return _within_rounding(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64),
                                _PYTHON_FLOAT_EPS)
    try:
        return bool(a == b)
    except Exception:
        return False


# ---------------------------------------------------------------- the check

def _gap(value: float | None) -> dict[str, Any]:
    """A difference as run.json holds it: finite numbers only (a shape or type mismatch says so instead)."""
    if value is None or value == float("inf"):
        return {"max_abs_diff": None, "differs_in": "shape or type"} if value is not None else {"max_abs_diff": None}
    return {"max_abs_diff": value}


def check_thread_safety(model: LoadedModel, config: SafetyConfig = SafetyConfig(),
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Run the check; a plain-JSON result for run.json's `thread_safety` (see the module's docstring)."""
    import torch

    started = clock()
    stages = model.stages()
    requests = first_requests(model, config.max_requests)
    watched = watched_objects(model)
    writes: dict[tuple[str, str, str], dict[str, Any]] = {}
    first: list[Any] = []
    with torch.inference_mode():
        for index, request in enumerate(requests):
            before = [w.snapshot() for w in watched]
            first.append(keep(_run(stages, request, model.device)))
            for w, old in zip(watched, before):
                for name, kind in _writes(old, w.snapshot()):
                    key = (w.path, name, kind)
                    entry = writes.setdefault(key, {"attribute": f"{w.label}.{name}", "path": w.path, "kind": kind,
                                                    "owner": "translator" if w.path == "translator" else "model",
                                                    "requests": 0})
                    entry["requests"] += 1
            # a slow predictor serves fewer requests (at least two): each is served 2 + N times in all
            if index >= 1 and (clock() - started) * (2 + config.predictors) > config.budget_s:
                break
    requests = requests[:len(first)]
    with torch.inference_mode():
        second = [keep(_run(stages, request, model.device)) for request in requests]
    sequential = [{"request": i, **_gap(d)} for i, (a, b) in enumerate(zip(first, second))
                  if (d := difference(b, a, config.tolerance)) is not None]
    concurrent: list[dict[str, Any]] = []
    rounds = 0
    if not sequential:
        while rounds < config.max_rounds and (rounds == 0 or clock() - started < config.budget_s):
            concurrent += _concurrent_round(model, stages, requests, first, config)
            rounds += 1
    return {"checked": True, "requests": len(requests), "concurrent_predictors": config.predictors,
            "rounds": rounds, "tolerance": config.tolerance, "duration_s": clock() - started,
            "writes": sorted(writes.values(), key=lambda w: (w["owner"] != "model", w["path"], w["attribute"]))[:MAX_LISTED],
            "write_count": len(writes),
            "sequential_mismatches": sequential[:MAX_LISTED], "sequential_mismatch_count": len(sequential),
            "concurrent_judged": not sequential,
            "concurrent_mismatches": (sorted(concurrent, key=lambda m: bool(m.get("rounding")))[:MAX_LISTED]),
            "concurrent_mismatch_count": len(concurrent),
            "concurrent_beyond_rounding_count": sum(1 for m in concurrent if not m.get("rounding")),
            "concurrent_requests": rounds * config.predictors * len(requests)}


def _run(stages: Any, request: Any, device: str) -> Any:
    import torch

    out = stages.run(request)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return out


def _concurrent_round(model: LoadedModel, stages: Any, requests: list[Any], expected: list[Any],
                      config: SafetyConfig) -> list[dict[str, Any]]:
    """Every predictor serves every request once, each from its own offset, all at once; the mismatches."""
    import torch

    n = config.predictors
    start = threading.Barrier(n)
    found: list[list[dict[str, Any]]] = [[] for _ in range(n)]

    def predictor(index: int) -> None:
        try:
            start.wait(timeout=60)
        except threading.BrokenBarrierError:
            return
        with torch.inference_mode():
            for step in range(len(requests)):
                i = (index + step) % len(requests)
                try:
                    got = keep(_run(stages, requests[i], model.device))
                except Exception as exc:  # a request that fails only under concurrency is a mismatch too
                    found[index].append({"request": i, "predictor": index, "max_abs_diff": None,
                                         "error": describe_exception(exc)[:200]})
                    continue
                gap = difference(got, expected[i], config.tolerance)
                if gap is not None:
                    found[index].append({"request": i, "predictor": index, **_gap(gap),
                                         "rounding": rounding_only(got, expected[i])})

    threads = [threading.Thread(target=predictor, args=(i,), name=f"gpuscope-safety-{i}", daemon=True)
               for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [m for per in found for m in per]
