"""The whole predictor: a translator's preprocess, its model, its postprocess, and the requests it serves.

A served predictor decodes a request, builds the model's input, runs the model
and turns the output into a response (DJL's Translator: processInput, the
model, processOutput). That is where multi-threaded Python serving breaks:
pure-Python stages hold the GIL, and state kept on shared objects mixes
requests. So a factory may return, instead of an nn.Module, an object with
`preprocess(request)`, a `model` attribute and `postprocess(output)` (either of
the two may be absent), and gpuscope times each stage per request.

Requests come from `--requests FILE.jsonl` (one JSON value per line, cycled),
else from the object's `example_requests()`, else today's random `--input-shape`
tensor stands for the request.
"""
from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

STAGES = ("preprocess", "model", "postprocess")
MAX_REQUEST_LINE_BYTES = 64 * 1024 * 1024  # one JSON line beyond this is a mistake, not a request


class RequestsError(Exception):
    """The requests could not be read or served; the message is one line for the user."""


@dataclass
class Translator:
    """The user's predictor object, split into what gpuscope calls for each request."""

    owner: Any  # the object the factory returned: watched for writes by the thread-safety check
    model: Any  # an nn.Module, or anything with forward/__call__
    preprocess: Callable[[Any], Any] | None
    postprocess: Callable[[Any], Any] | None

    @property
    def name(self) -> str:
        return type(self.owner).__name__

    @property
    def has_python_stages(self) -> bool:
        return self.preprocess is not None or self.postprocess is not None

    def to_json(self) -> dict[str, Any]:
        return {"type": self.name, "preprocess": self.preprocess is not None,
                "postprocess": self.postprocess is not None, "model_type": type(self.model).__name__}


def is_translator(obj: Any) -> bool:
    """An object that holds a model rather than being one: a `model` attribute and no `forward` of its own."""
    return not hasattr(obj, "forward") and hasattr(obj, "model") and not isinstance(obj, type)


def as_translator(obj: Any, spec: str) -> Translator:
    """Split a translator object into its stages; RequestsError-free, ValueError with the reason if it is not one."""
    model = getattr(obj, "model")
    if not (callable(model) or hasattr(model, "forward")):
        raise ValueError(f"model factory {spec!r} returned a {type(obj).__name__} whose .model is a "
                         f"{type(model).__name__}, not an nn.Module or anything with forward/__call__")
    pre = getattr(obj, "preprocess", None)
    post = getattr(obj, "postprocess", None)
    for name, fn in (("preprocess", pre), ("postprocess", post)):
        if fn is not None and not callable(fn):
            raise ValueError(f"model factory {spec!r}: {type(obj).__name__}.{name} is not callable")
    return Translator(owner=obj, model=model, preprocess=pre, postprocess=post)


def load_requests_file(path: str) -> list[Any]:
    """Every line of a JSONL file, parsed; RequestsError (one line) for a missing, unreadable, non-JSON or empty file."""
    if not os.path.exists(path):
        raise RequestsError(f"--requests {path}: no such file")
    if os.path.isdir(path):
        raise RequestsError(f"--requests {path}: is a directory, not a JSONL file")
    requests: list[Any] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if len(line) > MAX_REQUEST_LINE_BYTES:
                    raise RequestsError(f"--requests {path}: line {number} is longer than "
                                        f"{MAX_REQUEST_LINE_BYTES // (1024 * 1024)} MiB")
                if not line.strip():
                    continue  # blank lines (a trailing newline) are not requests
                try:
                    requests.append(json.loads(line, parse_constant=_reject_constant))
                except ValueError as exc:
                    raise RequestsError(f"--requests {path}: line {number} is not JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise RequestsError(f"--requests {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise RequestsError(f"--requests {path}: cannot read ({exc.strerror or exc})") from None
    if not requests:
        raise RequestsError(f"--requests {path}: holds no request (one JSON value per line)")
    return requests


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def example_requests(owner: Any) -> list[Any] | None:
    """The translator's own example requests, if it offers them (RequestsError when that call fails)."""
    fn = getattr(owner, "example_requests", None)
    if fn is None or not callable(fn):
        return None
    try:
        found = list(fn())
    except Exception as exc:
        raise RequestsError(f"{type(owner).__name__}.example_requests() raised {type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")) from None
    if not found:
        raise RequestsError(f"{type(owner).__name__}.example_requests() returned no request")
    return found


def to_device(value: Any, device: str) -> Any:
    """A tensor preprocess built elsewhere, moved to the model's device; the tensors inside a dict, list or
    tuple too (a tokenizer's `input_ids`/`attention_mask`: a Hugging Face BatchEncoding is a mapping).
    Other values as they are."""
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_device(item, device) for item in value)
    to = getattr(value, "to", None)
    where = getattr(value, "device", None)
    if to is not None and where is not None and str(where) != device and hasattr(value, "dtype"):
        return to(device)
    return value


def keyword_or_positional(module: Any) -> Callable[[Any], Any]:
    """The model called the way serving code calls it with what preprocess returned: a mapping as keyword
    arguments (`model(**tokenizer(text))`, every Hugging Face model), a tuple as positional arguments
    (`model(ids, mask)`), anything else as the one input. A model whose forward takes the mapping or the
    tuple whole (`forward(self, batch)`) gets it whole: decided once per mapping's keys or tuple's length
    from forward's signature (binding costs ~10 us: not at every request). It is spread where the signature
    cannot be read (TorchScript), where a key of the mapping names a parameter of forward or forward takes
    more than one positional argument (the input does not fit the model: its own error, "unexpected keyword
    argument", then says why), and where neither way binds."""
    try:
        signature: inspect.Signature | None = inspect.signature(getattr(module, "forward", module))
    except (TypeError, ValueError):
        signature = None
    parameters = signature.parameters if signature is not None else {}
    positional = sum(1 for p in parameters.values()
                     if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    spread_by_shape: dict[Any, bool] = {}

    def spreads(value: Any) -> bool:
        if signature is None:
            return True
        try:
            signature.bind(**value) if isinstance(value, Mapping) else signature.bind(*value)
            return True
        except TypeError:
            pass
        if any(key in parameters for key in value) if isinstance(value, Mapping) else positional != 1:
            return True  # meant to be spread, and wrong: whole, the error would be about something else
        try:
            signature.bind(value)
            return False
        except TypeError:
            return True

    def call(value: Any) -> Any:
        if isinstance(value, Mapping):
            shape: Any = tuple(value)
        elif type(value) is tuple:
            shape = len(value)
        else:
            return module(value)
        spread = spread_by_shape.get(shape)
        if spread is None:
            spread = spread_by_shape[shape] = spreads(value)
        if not spread:
            return module(value)
        return module(**value) if isinstance(value, Mapping) else module(*value)

    return call


def default_preprocess(target: Any, device: str) -> Callable[[Any], Any]:
    """Without a preprocess, a JSON request (numbers, nested lists) becomes a tensor of dtype `target`: JSON
    cannot hold one."""
    import torch

    def convert(request: Any) -> Any:
        if isinstance(request, (list, int, float)) and not isinstance(request, bool):
            return torch.as_tensor(request, dtype=target, device=device)
        return request

    return convert


def on_device(fn: Callable[[Any], Any], device: str) -> Callable[[Any], Any]:
    """`fn` whose tensor result lands on `device` (a preprocess that builds CPU tensors for a GPU model)."""
    if device == "cpu":
        return fn

    def moved(request: Any) -> Any:
        return to_device(fn(request), device)

    return moved


@dataclass(frozen=True)
class Stages:
    """The calls of one request, ready to run; None for a stage the predictor does not have."""

    preprocess: Callable[[Any], Any] | None
    model: Callable[[Any], Any]
    postprocess: Callable[[Any], Any] | None

    def run(self, request: Any) -> Any:
        """One request end to end, untimed (validation and the thread-safety check)."""
        value = self.preprocess(request) if self.preprocess is not None else request
        value = self.model(value)
        return self.postprocess(value) if self.postprocess is not None else value

    def run_naming_stage(self, request: Any) -> Any:
        """Like run(), but an exception says which stage raised: StageError(stage, cause)."""
        value = request
        for stage, fn in (("preprocess", self.preprocess), ("model", self.model), ("postprocess", self.postprocess)):
            if fn is None:
                continue
            try:
                value = fn(value)
            except Exception as exc:
                raise StageError(stage, exc) from exc
        return value


class StageError(Exception):
    """A stage of a request raised: which one, and why."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage} raised {describe_exception(cause)}")
        self.stage = stage
        self.cause = cause


def describe_exception(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def check_tolerance(value: float | None) -> float:
    """--output-tolerance: a finite number >= 0 (0: outputs must match exactly); ValueError otherwise."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"--output-tolerance must be a finite number >= 0 (0 means exact), got {value}")
    return float(value)
