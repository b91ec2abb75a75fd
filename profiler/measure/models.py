"""Models to profile: built-in ones, and the user's (TorchScript, torch.export, a factory).

Model files are classified by their bytes before anything loads them: a plain
pickle or a `torch.save` archive can run arbitrary code when unpickled, so it
is refused unless the user passes `--trust-model-file`. TorchScript archives
(torch.jit.load's restricted loader) and torch.export programs (.pt2: a JSON
graph plus raw weights) are loaded by torch's own formats, a .pt2 only after
every entry torch.export.load would unpickle has passed a weights-only load.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

from gpuscope.measure.translator import (
    StageError,
    Stages,
    Translator,
    as_translator,
    default_preprocess,
    example_requests,
    is_translator,
    keyword_or_positional,
    load_requests_file,
    on_device,
)

BUILTIN_PREFIX = "builtin:"
BUILTIN_NAMES = ("mlp", "cnn", "transformer")
SIZES = ("small", "medium", "large")
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32")


class ModelLoadError(Exception):
    """The model could not be loaded or run; the message is one line for the user."""


@dataclass
class LoadedModel:
    """A model ready to serve: one module, where it came from, how to feed it, what it weighs."""

    module: Any  # nn.Module / ScriptModule / GraphModule: callable on one input tensor
    source: str
    kind: str  # builtin | torchscript | export | factory | pickle
    input_shape: tuple[int, ...]
    dtype: str
    device: str
    param_bytes: int = 0
    buffer_bytes: int = 0
    unique_storages: int = 0
    reload: Callable[[], Any] | None = field(default=None, repr=False)  # fresh copy, for --copy-model
    translator: Translator | None = field(default=None, repr=False)  # the object holding `module`, if any
    requests: list[Any] | None = field(default=None, repr=False)  # cycled through; None: a random input each
    requests_source: str = "input_shape"  # file:PATH | example_requests | input_shape

    @property
    def model_bytes(self) -> int:
        return self.param_bytes + self.buffer_bytes

    def stages(self, module: Any | None = None) -> Stages:
        """What a predictor calls per request (on `module`, a predictor's own copy, when given)."""
        module = self.module if module is None else module
        pre = self.translator.preprocess if self.translator is not None else None
        post = self.translator.postprocess if self.translator is not None else None
        if pre is None and self.requests is not None:
            pre = default_preprocess(torch_dtype(self.dtype), self.device)
        if pre is None:  # the model's own input tensor, called as it always was
            return Stages(None, module, post)
        return Stages(on_device(pre, self.device), keyword_or_positional(module), post)

    def to_json(self) -> dict[str, Any]:
        out = {"source": self.source, "kind": self.kind, "input_shape": list(self.input_shape), "dtype": self.dtype,
               "param_bytes": self.param_bytes, "buffer_bytes": self.buffer_bytes,
               "model_bytes": self.model_bytes, "unique_storages": self.unique_storages,
               "requests_source": self.requests_source}
        if self.translator is not None:
            out["translator"] = self.translator.to_json()
        if self.requests is not None:
            out["requests"] = len(self.requests)
        return out


def parse_input_shape(text: str) -> tuple[int, ...]:
    """`8x3x224x224` -> (8, 3, 224, 224); ValueError with the reason otherwise."""
    parts = str(text).lower().replace("*", "x").replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"input shape {text!r} must be integers joined by 'x', e.g. 8x3x224x224") from None
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"input shape {text!r} must have positive dimensions")
    return shape


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return getattr(torch, name)


# ---------------------------------------------------------------- built-in models

def _builtin(name: str, size: str) -> tuple[Any, tuple[int, ...]]:
    """Real torch models sized so CPU runs stay quick and GPU runs show memory worth looking at."""
    from torch import nn

    if name == "mlp":
        width, depth, batch = {"small": (2048, 4, 16), "medium": (4096, 4, 16), "large": (4096, 8, 8)}[size]
        layers: list[Any] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        return nn.Sequential(*layers), (batch, width)
    if name == "cnn":
        channels, image, batch = {"small": (32, 64, 8), "medium": (64, 128, 8), "large": (128, 224, 16)}[size]

        def block(cin: int, cout: int) -> Any:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        model = nn.Sequential(block(3, channels), block(channels, channels * 2), block(channels * 2, channels * 4),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels * 4, 1000))
        return model, (batch, 3, image, image)
    if name == "transformer":
        d_model, layers_n, seq, batch = {"small": (256, 4, 64, 8), "medium": (512, 6, 128, 8),
                                         "large": (1024, 12, 256, 8)}[size]
        layer = nn.TransformerEncoderLayer(d_model, nhead=8, dim_feedforward=4 * d_model, batch_first=True)
        return nn.TransformerEncoder(layer, layers_n, enable_nested_tensor=False), (batch, seq, d_model)
    raise ModelLoadError(f"unknown built-in model {name!r} (choose from {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)})")


# ---------------------------------------------------------------- file classification

PICKLE = "pickle"
TORCH_SAVE = "torch_save"
TORCHSCRIPT = "torchscript"
EXPORT = "export"
NOT_A_MODEL = "not_a_model"


def classify_model_file(path: str) -> str:
    """What a file is, from its bytes alone (nothing is loaded or unpickled)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        return NOT_A_MODEL
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return PICKLE  # a raw pickle stream (protocol 2-5), e.g. pickle.dump or legacy torch.save
    if head != b"PK\x03\x04":
        return NOT_A_MODEL
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError):
        return NOT_A_MODEL
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names) and any("models/" in n for n in names):
        return EXPORT
    if any("/code/" in n or n.startswith("code/") for n in names) and any(n.endswith("constants.pkl") for n in names):
        return TORCHSCRIPT
    if any(n.endswith("data.pkl") for n in names):
        return TORCH_SAVE
    return NOT_A_MODEL


_EXPORT_TEXT_FILES = ("archive_format", "archive_version", "version", "byteorder", "serialization_id",
                      ".format_version", ".storage_alignment")


def export_archive_risks(path: str) -> list[str]:
    """Entries of a torch.export archive that loading it would unpickle or run, and that are not plain tensors.

    torch.export.load is not a weights-only loader: it unpickles sample inputs (retrying with
    weights_only=False when the safe load fails), pickled weights and constants (weights_only=False, plain
    pickle.loads for opaque objects) and loads AOTInductor libraries. Raw tensor payloads named by the
    weights/constants configs, JSON and the archive's text markers are safe; every other entry must load
    under torch.load(weights_only=True), or it is named here.
    """
    import io
    import json
    import warnings

    import torch

    risky: list[str] = []
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        rel = {n: n.split("/", 1)[1] if "/" in n else n for n in names}  # entries sit under one root folder
        raw: set[str] = set()
        referenced: set[str] = set()
        for name in names:
            folder, _, base = rel[name].rpartition("/")
            if folder not in ("data/weights", "data/constants") or not base.endswith("_config.json"):
                continue
            try:
                config = json.loads(archive.read(name)).get("config", {})
            except (ValueError, AttributeError):
                continue  # torch cannot read it either, so nothing it names gets loaded
            for meta in config.values() if isinstance(config, dict) else ():
                if not isinstance(meta, dict):
                    continue
                target = f"{folder}/{meta.get('path_name', '')}"
                referenced.add(target)
                if not meta.get("use_pickle") and (folder == "data/weights" or
                                                   str(meta.get("path_name", "")).startswith("tensor_")):
                    raw.add(target)
        for name in names:
            relative = rel[name]
            base = relative.rpartition("/")[2]
            if relative in raw:
                continue
            if relative.startswith("data/aotinductor/"):
                risky.append(name)  # compiled code: loading it runs it
                continue
            if relative not in referenced and (base.endswith(".json") or base in _EXPORT_TEXT_FILES
                                               or relative.startswith("extra/")):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch's notes on odd pickle protocols are not the user's
                    torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
            except Exception:
                risky.append(name)
    return risky


# A TorchScript error opens with this header and a serialized traceback; the cause is its last line.
_TORCHSCRIPT_HEADER = "The following operation failed in the TorchScript interpreter"
_TORCHSCRIPT_TRACEBACK = "Traceback of TorchScript"
_EXCEPTION_PREFIX = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning): ")


def _one_line(exc: BaseException) -> str:
    """`Type: first line` of an exception; for a TorchScript interpreter error, its last line (the cause)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and (lines[0].startswith(_TORCHSCRIPT_HEADER)
                           or any(line.startswith(_TORCHSCRIPT_TRACEBACK) for line in lines)):
        last = lines[-1]  # e.g. "RuntimeError: mat1 and mat2 shapes cannot be multiplied (8x64 and 32x16)"
        return last if _EXCEPTION_PREFIX.match(last) else f"{type(exc).__name__}: {last}"
    return f"{type(exc).__name__}: {lines[0]}"


def _not_a_model(path: str, value: Any) -> str:
    """`path holds an OrderedDict (a state_dict: ...), not a model (an nn.Module)`."""
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    hint = ""
    if isinstance(value, dict):
        tensors = value and all(hasattr(v, "shape") and hasattr(v, "dtype") for v in value.values())
        hint = (" (a state_dict: load it in a factory, package.module:factory)" if tensors else
                " (a checkpoint? load its state_dict in a factory, package.module:factory)")
    return f"{path} holds {article} {name}{hint}, not a model (an nn.Module)"


def _load_file(path: str, device: str, trust: bool) -> tuple[Any, str]:
    import torch

    if not os.path.exists(path):
        raise ModelLoadError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise ModelLoadError(f"model path is a directory, not a file: {path}")
    try:
        kind = classify_model_file(path)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    if kind == NOT_A_MODEL:
        raise ModelLoadError(f"{path} is not a TorchScript (.pt) or torch.export (.pt2) model file")
    if kind in (PICKLE, TORCH_SAVE):
        if not trust:
            raise ModelLoadError(f"{path} is a pickle ({'torch.save archive' if kind == TORCH_SAVE else 'raw pickle'}), "
                                 "which can run arbitrary code when loaded: refused. Save it with torch.jit.save or "
                                 "torch.export.save, or pass --trust-model-file if you trust its author")
        try:
            module = torch.load(path, map_location=device, weights_only=False)
        except Exception as exc:
            raise ModelLoadError(f"could not load {path}: {_one_line(exc)}") from exc
        if not callable(module):
            raise ModelLoadError(_not_a_model(path, module))
        return module, "pickle"
    if kind == EXPORT and not trust:
        try:
            risky = export_archive_risks(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelLoadError(f"could not load {path}: {_one_line(exc)}") from exc
        if risky:
            raise ModelLoadError(f"{path} is a torch.export archive whose {', '.join(risky[:3])} would be unpickled "
                                 "or run when loaded (not plain tensors): refused. Pass --trust-model-file if you "
                                 "trust its author")
    try:
        if kind == TORCHSCRIPT:
            with warnings.catch_warnings():  # torch >= 2.14 deprecates jit.load loudly; the user's file is what it is
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(path, map_location=device), "torchscript"
        with _quiet_logger("torch.export"):  # it logs a traceback to stderr before raising on a corrupt file
            program = torch.export.load(path)
        module = program.module().to(device)
        example = _example_input(program)
        if example is not None:  # the exporter's own example: the default --input-shape and --dtype
            setattr(module, "example_input_shape", tuple(int(d) for d in example.shape))
            setattr(module, "example_input_dtype", str(example.dtype).removeprefix("torch."))
        setattr(module, "example_input_count", _example_count(program))
        return module, "export"
    except Exception as exc:
        raise ModelLoadError(f"could not load {path}: {_one_line(exc)}") from exc


def _example_input(program: Any) -> Any:
    """A torch.export program's single example tensor input, if it has exactly one."""
    try:
        args, kwargs = program.example_inputs
    except Exception:
        return None
    if kwargs or len(args) != 1 or not hasattr(args[0], "shape"):
        return None
    return args[0]


def _example_count(program: Any) -> int | None:
    """How many inputs the exported program takes (None when it does not say)."""
    try:
        args, kwargs = program.example_inputs
        return len(args) + len(kwargs)
    except Exception:
        return None


def _inputs_needed(module: Any) -> int | None:
    """How many inputs the module's forward requires (None when that cannot be read): gpuscope feeds one."""
    import inspect

    count = getattr(module, "example_input_count", None)
    if isinstance(count, int):
        return count
    schema = getattr(getattr(module, "forward", None), "schema", None)  # TorchScript: self, then the inputs
    if schema is not None:
        try:
            return sum(1 for a in list(schema.arguments)[1:] if not a.has_default_value())
        except Exception:
            return None
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return None
    return sum(1 for p in params if p.default is inspect.Parameter.empty
               and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


class _quiet_logger:
    """Silence one library logger for a block: the error it would log is reported once, by us."""

    def __init__(self, name: str) -> None:
        import logging

        self._logger = logging.getLogger(name)
        self._level = self._logger.level

    def __enter__(self) -> None:
        import logging

        self._logger.setLevel(logging.CRITICAL + 1)

    def __exit__(self, *exc: Any) -> None:
        self._logger.setLevel(self._level)


def _load_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"model {spec!r}: expected a file, builtin:NAME, or package.module:factory")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the user's own package in the current folder
    try:
        mod = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ModelLoadError(f"model factory {spec!r}: cannot import {module_name!r} ({exc.msg})") from exc
    except Exception as exc:
        raise ModelLoadError(f"model factory {spec!r}: importing {module_name!r} failed: {_one_line(exc)}") from exc
    factory = getattr(mod, attr, None)
    if factory is None:
        raise ModelLoadError(f"model factory {spec!r}: {module_name!r} has no attribute {attr!r}")
    try:
        # a function or a class (`mods:MLP` means an MLP()), not an instance that is already a module
        wants_call = callable(factory) and (isinstance(factory, type) or not hasattr(factory, "forward")) \
            and not is_translator(factory)  # a translator instance is used as it is, even if it has __call__
        module = factory() if wants_call else factory
    except Exception as exc:
        raise ModelLoadError(f"model factory {spec!r} raised {_one_line(exc)}") from exc
    if is_translator(module):
        return module  # a translator: its .model is checked when it is split into stages
    if not callable(module):
        raise ModelLoadError(f"model factory {spec!r} returned {type(module).__name__}, not an nn.Module "
                             "(nor an object with a .model and preprocess/postprocess)")
    return module


def _unregistered_tensors(module: Any) -> list[Any]:
    """Weights a model holds outside its parameters and buffers: plain tensor attributes (a lookup table
    kept as `self.table`, a torch.export program's lifted constants) and a frozen TorchScript module's
    graph constants (torch.jit.freeze turns every parameter into one). Without them such a model weighs
    0 B and its copies go unseen."""
    import torch

    found: list[Any] = []
    modules = module.modules() if hasattr(module, "modules") else [module]
    for sub in modules:
        try:
            found += [value for value in vars(sub).values() if isinstance(value, torch.Tensor)]
        except TypeError:
            continue
    graph = getattr(module, "graph", None)
    if graph is not None and hasattr(graph, "findAllNodes"):
        try:
            for node in graph.findAllNodes("prim::Constant"):
                output = node.output()
                if output.type().kind() == "TensorType":
                    found.append(output.toIValue())
        except Exception:  # an internal API: a torch without it only loses the constants
            pass
    return found


def weight_storages(module: Any, device_type: str | None = None) -> dict[int, int]:
    """Unique storages of a module's weights (parameters, buffers, tensor attributes, frozen constants):
    data pointer -> bytes; only those on `device_type` ("cuda", "cpu") when given."""
    storages: dict[int, int] = {}
    tensors = []
    for getter in ("parameters", "buffers"):
        fn = getattr(module, getter, None)
        if fn is not None:
            try:
                tensors += list(fn())
            except Exception:
                pass
    tensors += _unregistered_tensors(module)
    for tensor in tensors:
        try:
            if device_type is not None and tensor.device.type != device_type:
                continue
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except Exception:
            continue
    return storages


def weight_pointers(module: Any) -> frozenset[int]:
    """The identity of a set of weights: which storages a predictor runs on."""
    return frozenset(weight_storages(module))


def _sizes(module: Any) -> tuple[int, int, int]:
    param_ptrs: dict[int, int] = {}
    buffer_ptrs: dict[int, int] = {}
    for getter, target in (("parameters", param_ptrs), ("buffers", buffer_ptrs)):
        fn = getattr(module, getter, None)
        if fn is None:
            continue
        for tensor in fn():
            storage = tensor.untyped_storage()
            target[storage.data_ptr()] = storage.nbytes()
    for tensor in _unregistered_tensors(module):  # counted with the buffers: weights that are not parameters
        try:
            storage = tensor.untyped_storage()
            buffer_ptrs.setdefault(storage.data_ptr(), storage.nbytes())
        except Exception:
            continue
    for ptr in param_ptrs:
        buffer_ptrs.pop(ptr, None)
    return sum(param_ptrs.values()), sum(buffer_ptrs.values()), len(param_ptrs) + len(buffer_ptrs)


def _eval(module: Any) -> Any:
    """Eval mode where the module has one; torch.export's modules raise on eval() (the mode was fixed
    when the program was exported)."""
    try:
        if hasattr(module, "eval"):
            module.eval()
    except NotImplementedError:
        pass
    return module


def _to_device(module: Any, device: str, spec: str) -> Any:
    if not hasattr(module, "to"):
        return module  # a plain callable the translator holds: it places itself
    try:
        moved = module.to(device)
    except Exception as exc:
        raise ModelLoadError(f"model factory {spec!r}: moving the model to {device} failed: {_one_line(exc)}") from exc
    return module if moved is None else moved


def load_model(spec: str, device: str, input_shape: tuple[int, ...] | None = None, dtype: str | None = None,
               size: str = "small", trust_model_file: bool = False, requests_path: str | None = None) -> LoadedModel:
    """Load a model (or a translator and the model it holds) onto `device` once, in eval mode, with its sizes
    and how to feed it: the requests of `requests_path`, the translator's example_requests(), or a random
    input of `input_shape`. RequestsError (translator.py) for requests that cannot be read."""
    if size not in SIZES:
        raise ModelLoadError(f"unknown model size {size!r} (choose from {', '.join(SIZES)})")
    if dtype is not None and dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")

    translator: Translator | None = None

    def build() -> tuple[Any, str, tuple[int, ...] | None]:
        nonlocal translator
        if spec.startswith(BUILTIN_PREFIX):
            module, default_shape = _builtin(spec[len(BUILTIN_PREFIX):], size)
            return module.to(device), "builtin", default_shape
        if ":" in spec and not os.path.exists(spec) and not spec.endswith((".pt", ".pt2", ".pth")):
            module = _load_factory(spec)
            if is_translator(module):
                try:
                    translator = as_translator(module, spec)
                except ValueError as exc:
                    raise ModelLoadError(str(exc)) from None
                # the translator's model is what predictors share: moved, and its sharing verified, in place
                translator.model = _to_device(translator.model, device, spec)
                try:
                    setattr(translator.owner, "model", translator.model)
                except Exception:
                    pass
                return translator.model, "factory", getattr(module, "example_input_shape", None)
            return _to_device(module, device, spec), "factory", getattr(module, "example_input_shape", None)
        module, kind = _load_file(spec, device, trust_model_file)
        return module, kind, getattr(module, "example_input_shape", None)

    module, kind, default_shape = build()
    _eval(module)
    requests: list[Any] | None = None
    source = "input_shape"
    if requests_path is not None:
        requests, source = load_requests_file(requests_path), f"file:{requests_path}"
    elif translator is not None:
        found = example_requests(translator.owner)
        if found is not None:
            requests, source = found, "example_requests"
    needed = _inputs_needed(module)
    if needed is not None and needed > 1 and (translator is None or translator.preprocess is None):
        raise ModelLoadError(f"model {spec!r} takes {needed} inputs; gpuscope feeds one tensor (wrap it in a module "
                             "whose forward builds the others from one input, or export it that way)")
    shape = input_shape or (tuple(default_shape) if default_shape else None)
    if shape is None and requests is None:
        raise ModelLoadError(f"model {spec!r} has no default input shape: pass --input-shape, e.g. 8x3x224x224"
                             + (", or --requests FILE.jsonl" if translator is not None else ""))
    example_dtype = getattr(module, "example_input_dtype", None)
    chosen_dtype = dtype or (example_dtype if example_dtype in DTYPES else "float32")
    params, buffers, storages = _sizes(module)
    if kind == "builtin" and chosen_dtype in ("float16", "bfloat16", "float64"):
        module = module.to(torch_dtype(chosen_dtype))
        params, buffers, storages = _sizes(module)

    def reload() -> Any:
        if kind == "builtin" or kind == "factory":
            import copy

            return copy.deepcopy(module)
        fresh, _ = _load_file(spec, device, trust_model_file)
        return _eval(fresh)

    return LoadedModel(module=module, source=spec, kind=kind, input_shape=tuple(shape or ()), dtype=chosen_dtype,
                       device=device, param_bytes=params, buffer_bytes=buffers, unique_storages=storages, reload=reload,
                       translator=translator, requests=requests, requests_source=source)


def make_input(model: LoadedModel, device: str | None = None) -> Any:
    import torch

    dtype = torch_dtype(model.dtype)
    target = device or model.device
    if dtype.is_floating_point:
        return torch.randn(model.input_shape, dtype=dtype, device=target)
    return torch.randint(0, 100, model.input_shape, dtype=dtype, device=target)


MAX_VALIDATED_REQUESTS = 8  # the distinct requests served once before the sweep (the thread-safety check's set)


def first_requests(model: LoadedModel, count: int = MAX_VALIDATED_REQUESTS) -> list[Any]:
    """The first `count` requests a predictor serves (random inputs of the input shape without requests)."""
    if model.requests is not None:
        return [model.requests[i % len(model.requests)] for i in range(min(count, len(model.requests)))]
    return [make_input(model) for _ in range(count)]


def validate_model(model: LoadedModel) -> None:
    """Run one request before the sweep, so a wrong shape fails with the model's own error in one line; with
    requests, each of the first few, so a request its preprocess rejects fails here, naming it."""
    import torch

    if model.requests is not None or model.translator is not None:
        _validate_requests(model)
        return
    try:
        with torch.inference_mode():
            model.module(make_input(model))
        if model.device.startswith("cuda"):
            torch.cuda.synchronize(model.device)
    except Exception as exc:
        hint = ""
        if model.dtype.startswith(("float", "bfloat")) and "indices" in str(exc):  # an embedding takes token ids
            hint = " (token ids: pass --dtype int64, or a translator whose preprocess tokenizes)"
        raise ModelLoadError(f"the model rejected an input of shape {'x'.join(map(str, model.input_shape))} "
                             f"({model.dtype}): {_one_line(exc)}{hint}") from exc


def _validate_requests(model: LoadedModel) -> None:
    import torch

    stages = model.stages()
    where = model.requests_source.removeprefix("file:")
    for index, request in enumerate(first_requests(model)):
        try:
            with torch.inference_mode():
                stages.run_naming_stage(request)
            if model.device.startswith("cuda"):
                torch.cuda.synchronize(model.device)
        except StageError as exc:
            which = (f"request {index + 1} of {where}" if model.requests is not None
                     else f"an input of shape {'x'.join(map(str, model.input_shape))} ({model.dtype})")
            raise ModelLoadError(f"{exc.stage} rejected {which}: {_one_line(exc.cause)}") from None
