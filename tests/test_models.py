"""Loading models: built-ins, TorchScript, torch.export, factories; classifying files by their bytes;
refusing pickles (and .pt2 archives carrying pickles) that would run code; one-line load errors."""
from __future__ import annotations

import io
import json
import os
import pickle
import textwrap
import zipfile

import pytest
import torch
from torch import nn

from gpuscope.measure.models import (
    EXPORT,
    NOT_A_MODEL,
    PICKLE,
    TORCH_SAVE,
    TORCHSCRIPT,
    ModelLoadError,
    classify_model_file,
    export_archive_risks,
    load_model,
    make_input,
    validate_model,
    weight_pointers,
)


class Evil:
    """Unpickling this creates `path`: the stand-in for arbitrary code in a model file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def small() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Model files written once for the module: TorchScript, torch.export, torch.save, raw pickle."""
    root = tmp_path_factory.mktemp("models")
    module = small()
    paths = {}
    paths["torchscript"] = str(root / "model.pt")
    torch.jit.save(torch.jit.script(module), paths["torchscript"])
    paths["export"] = str(root / "model.pt2")
    torch.export.save(torch.export.export(module, (torch.randn(2, 4),)), paths["export"])
    paths["torch_save"] = str(root / "module.pth")
    torch.save(module, paths["torch_save"])
    paths["state_dict"] = str(root / "state.pt")
    torch.save(module.state_dict(), paths["state_dict"])
    paths["legacy"] = str(root / "legacy.pt")
    torch.save(module, paths["legacy"], _use_new_zipfile_serialization=False)
    paths["raw_pickle"] = str(root / "model.pkl")
    with open(paths["raw_pickle"], "wb") as fh:
        pickle.dump({"weights": [1.0, 2.0]}, fh)
    return paths


# ---------------------------------------------------------------- built-ins

@pytest.mark.parametrize("name, shape", [("mlp", (16, 2048)), ("cnn", (8, 3, 64, 64)), ("transformer", (8, 64, 256))])
def test_builtins_load_with_their_default_shapes(name, shape):
    model = load_model(f"builtin:{name}", "cpu")
    assert model.kind == "builtin"
    assert model.input_shape == shape
    assert model.dtype == "float32"
    assert model.model_bytes > 0 and model.unique_storages > 0
    assert not model.module.training
    validate_model(model)
    assert model.to_json()["model_bytes"] == model.param_bytes + model.buffer_bytes


def test_builtin_mlp_weighs_what_its_layers_hold():
    model = load_model("builtin:mlp", "cpu")
    assert model.param_bytes == 4 * (2048 * 2048 + 2048) * 4


def test_builtin_copies_are_distinct_weight_sets():
    model = load_model("builtin:mlp", "cpu")
    copy = model.reload()
    assert weight_pointers(copy) != weight_pointers(model.module)
    assert len(weight_pointers(copy)) == len(weight_pointers(model.module)) == 8


def test_builtin_dtype_converts_the_model():
    model = load_model("builtin:mlp", "cpu", input_shape=(2, 2048), dtype="float64")
    assert next(model.module.parameters()).dtype == torch.float64
    assert model.param_bytes == 4 * (2048 * 2048 + 2048) * 8
    validate_model(model)


@pytest.mark.parametrize("spec, kwargs, words", [
    ("builtin:resnet", {}, "unknown built-in model 'resnet'"), ("builtin:mlp", {"size": "huge"}, "unknown model size"),
    ("builtin:mlp", {"dtype": "float8"}, "unknown dtype")])
def test_bad_builtin_choices(spec, kwargs, words):
    with pytest.raises(ModelLoadError, match=words):
        load_model(spec, "cpu", **kwargs)


# ---------------------------------------------------------------- files

def test_torchscript_file_loads_and_validates(files):
    model = load_model(files["torchscript"], "cpu", input_shape=(3, 4))
    assert model.kind == "torchscript"
    assert model.param_bytes == (4 * 3 + 3) * 4
    validate_model(model)
    assert weight_pointers(model.reload()) != weight_pointers(model.module)  # --copy-model reloads the file


def test_export_file_loads_and_validates(files):
    assert export_archive_risks(files["export"]) == []
    model = load_model(files["export"], "cpu", input_shape=(2, 4))
    assert model.kind == "export"
    assert model.param_bytes == (4 * 3 + 3) * 4
    validate_model(model)
    assert model.module(make_input(model)).shape == (2, 3)
    assert weight_pointers(model.reload()) != weight_pointers(model.module)


def test_a_file_needs_an_input_shape(files):
    with pytest.raises(ModelLoadError, match="no default input shape: pass --input-shape"):
        load_model(files["torchscript"], "cpu")


def test_an_export_file_brings_its_own_example_shape(files):
    model = load_model(files["export"], "cpu")  # exported with one (2, 4) example input
    assert model.input_shape == (2, 4)
    validate_model(model)
    assert load_model(files["export"], "cpu", input_shape=(5, 4)).input_shape == (5, 4)  # --input-shape wins


@pytest.mark.parametrize("kind, expected", [
    ("torchscript", TORCHSCRIPT), ("export", EXPORT), ("torch_save", TORCH_SAVE), ("state_dict", TORCH_SAVE),
    ("legacy", PICKLE), ("raw_pickle", PICKLE)])
def test_classify_model_files(files, kind, expected):
    assert classify_model_file(files[kind]) == expected


@pytest.mark.parametrize("content", [b"", b"hello, this is a text file\n", bytes(range(7, 200)) * 10,
                                     b"\x80\x09not a protocol", b"PK\x03\x04 truncated zip"],
                         ids=["empty", "text", "random", "bad-protocol", "broken-zip"])
def test_classify_rejects_what_is_not_a_model(tmp_path, content):
    path = tmp_path / "thing.pt"
    path.write_bytes(content)
    assert classify_model_file(str(path)) == NOT_A_MODEL
    with pytest.raises(ModelLoadError, match="is not a TorchScript"):
        load_model(str(path), "cpu", input_shape=(1,))


def test_classify_a_zip_that_is_no_model(tmp_path):
    path = tmp_path / "notes.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "hi")
    assert classify_model_file(str(path)) == NOT_A_MODEL


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="model file not found"):
        load_model(str(tmp_path / "absent.pt"), "cpu", input_shape=(1,))
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="is a directory"):
        load_model(str(folder), "cpu", input_shape=(1,))


# ---------------------------------------------------------------- pickles that would run code

def test_raw_pickle_that_would_create_a_marker_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(Evil(str(marker))))
    assert classify_model_file(str(path)) == PICKLE
    with pytest.raises(ModelLoadError, match="can run arbitrary code when loaded: refused") as info:
        load_model(str(path), "cpu", input_shape=(1, 4))
    assert "--trust-model-file" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_save_of_an_object_that_would_create_a_marker_is_refused(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save(Evil(str(marker)), str(path), _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()  # saving does not run it
    assert classify_model_file(str(path)) == (PICKLE if legacy else TORCH_SAVE)
    with pytest.raises(ModelLoadError, match="refused"):
        load_model(str(path), "cpu", input_shape=(1, 4))
    assert not marker.exists()


def evil_export(files, tmp_path, marker) -> str:
    """The real .pt2 with its sample inputs swapped for a torch.save whose unpickling creates `marker`
    (torch.export.load retries such entries with weights_only=False)."""
    buffer = io.BytesIO()
    torch.save(Evil(str(marker)), buffer)
    path = tmp_path / "evil.pt2"
    with zipfile.ZipFile(files["export"]) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, buffer.getvalue() if name.endswith("data/sample_inputs/model.pt") else src.read(name))
    return str(path)


def test_export_archive_whose_sample_inputs_would_run_code_is_refused(files, tmp_path):
    marker = tmp_path / "pwned"
    path = evil_export(files, tmp_path, marker)
    assert classify_model_file(path) == EXPORT
    assert [n.rpartition("data/")[2] for n in export_archive_risks(path)] == ["sample_inputs/model.pt"]
    with pytest.raises(ModelLoadError, match="torch.export archive whose .* would be unpickled or run") as info:
        load_model(path, "cpu", input_shape=(2, 4))
    assert "--trust-model-file" in str(info.value)
    assert not marker.exists()


def test_export_archive_with_pickled_constants_or_compiled_code_is_refused(files, tmp_path):
    path = tmp_path / "opaque.pt2"
    with zipfile.ZipFile(files["export"]) as src, zipfile.ZipFile(path, "w") as dst:
        root = src.namelist()[0].split("/", 1)[0]
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("data/constants/model_constants_config.json"):
                config = json.loads(data)
                config["config"]["blob"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                            "tensor_meta": None}
                data = json.dumps(config).encode()
            dst.writestr(name, data)
        dst.writestr(f"{root}/data/constants/opaque_obj_0", pickle.dumps(Evil(str(tmp_path / "pwned"))))
        dst.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    risks = export_archive_risks(str(path))
    assert sorted(n.rpartition("data/")[2] for n in risks) == ["aotinductor/model/model.so", "constants/opaque_obj_0"]
    with pytest.raises(ModelLoadError, match="refused"):
        load_model(str(path), "cpu", input_shape=(2, 4))
    assert not (tmp_path / "pwned").exists()


def test_trust_model_file_loads_a_torch_saved_module(files):
    with pytest.raises(ModelLoadError, match="refused"):
        load_model(files["torch_save"], "cpu", input_shape=(2, 4))
    model = load_model(files["torch_save"], "cpu", input_shape=(2, 4), trust_model_file=True)
    assert model.kind == "pickle"
    assert isinstance(model.module, nn.Sequential)
    validate_model(model)


def test_trust_model_file_still_needs_a_model(files):
    with pytest.raises(ModelLoadError) as info:
        load_model(files["state_dict"], "cpu", input_shape=(2, 4), trust_model_file=True)
    assert str(info.value).endswith("holds an OrderedDict (a state_dict: load it in a factory, "
                                    "package.module:factory), not a model (an nn.Module)")


# ---------------------------------------------------------------- factories

def write_module(tmp_path, monkeypatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_factory_function_loads_and_validates(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "gpuscope_factory_ok", """
        from torch import nn

        def make():
            model = nn.Sequential(nn.Linear(6, 5), nn.Tanh())
            model.example_input_shape = (3, 6)
            return model
    """)
    model = load_model("gpuscope_factory_ok:make", "cpu")
    assert model.kind == "factory"
    assert model.input_shape == (3, 6)
    assert not model.module.training
    validate_model(model)


def test_factory_attribute_that_is_a_module(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "gpuscope_factory_instance", """
        from torch import nn
        MODEL = nn.Linear(4, 2)
    """)
    model = load_model("gpuscope_factory_instance:MODEL", "cpu", input_shape=(5, 4))
    assert model.kind == "factory"
    validate_model(model)


@pytest.mark.parametrize("spec, body, words", [
    ("gpuscope_factory_missing_module:make", None, "cannot import 'gpuscope_factory_missing_module'"),
    ("gpuscope_factory_noattr:make", "X = 1\n", "has no attribute 'make'"),
    ("gpuscope_factory_raises:make", "def make():\n    raise ValueError('no weights here\\nsecond line')\n",
     "raised ValueError: no weights here"),
    ("gpuscope_factory_needs:make", "import nonexistent_package_xyz\n", "(No module named 'nonexistent_package_xyz')"),
    ("gpuscope_factory_broken:make", "raise RuntimeError('CUDA driver too old\\nmore')\n",
     "importing 'gpuscope_factory_broken' failed: RuntimeError: CUDA driver too old"),
    ("gpuscope_factory_notmodel:make", "def make():\n    return 42\n", "returned int, not an nn.Module")])
def test_factory_errors_are_one_line(tmp_path, monkeypatch, spec, body, words):
    if body is not None:
        write_module(tmp_path, monkeypatch, spec.split(":")[0], body)
    with pytest.raises(ModelLoadError) as info:
        load_model(spec, "cpu", input_shape=(1, 4))
    assert words in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- validation

def test_wrong_input_shape_gives_the_models_own_message_in_one_line():
    model = load_model("builtin:mlp", "cpu", input_shape=(2, 7))
    with pytest.raises(ModelLoadError) as info:
        validate_model(model)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("the model rejected an input of shape 2x7 (float32): RuntimeError: ")
    assert "mat1 and mat2 shapes cannot be multiplied (2x7 and 2048x2048)" in message


def test_token_ids_given_as_floats_say_which_dtype_an_embedding_takes(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "gpuscope_factory_embedding", """
        from torch import nn

        def make():
            return nn.Sequential(nn.Embedding(100, 8), nn.Flatten(), nn.Linear(32, 2))
    """)
    with pytest.raises(ModelLoadError) as info:
        validate_model(load_model("gpuscope_factory_embedding:make", "cpu", input_shape=(2, 4)))
    assert str(info.value).endswith("(token ids: pass --dtype int64, or a translator whose preprocess tokenizes)")
    validate_model(load_model("gpuscope_factory_embedding:make", "cpu", input_shape=(2, 4), dtype="int64"))


def test_a_multi_line_model_error_keeps_its_first_line(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "gpuscope_factory_picky", """
        from torch import nn

        class Picky(nn.Module):
            def forward(self, x):
                raise ValueError("expected 3 channels, got " + str(x.shape[1]) + "\\n  at layer conv1\\n  at stem")

        def make():
            return Picky()
    """)
    model = load_model("gpuscope_factory_picky:make", "cpu", input_shape=(1, 4, 8, 8))
    with pytest.raises(ModelLoadError) as info:
        validate_model(model)
    assert str(info.value).endswith("ValueError: expected 3 channels, got 4")


def test_a_torchscript_error_gives_its_cause_not_the_interpreter_header(files):
    model = load_model(files["torchscript"], "cpu", input_shape=(8, 64))  # the model takes 4 features
    with pytest.raises(ModelLoadError) as info:
        validate_model(model)
    message = str(info.value)
    assert "\n" not in message and "TorchScript interpreter" not in message
    assert message.startswith("the model rejected an input of shape 8x64 (float32): RuntimeError: mat1 and mat2 "
                              "shapes cannot be multiplied (8x64 and 4x3)"), message


def test_tied_weights_count_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8, bias=False)
            self.b = nn.Linear(8, 8, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    path = tmp_path / "tied.pt"
    torch.jit.save(torch.jit.script(Tied()), str(path))
    model = load_model(str(path), "cpu", input_shape=(2, 8))
    assert model.param_bytes == 8 * 8 * 4
    assert model.unique_storages == 1
    assert os.path.getsize(path) > 0


class _Tokens(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 8)

    def forward(self, ids):
        return self.embed(ids).sum(-1)


class _TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, mask):
        return self.lin(x) * mask


def test_an_export_file_of_token_ids_brings_its_dtype_too(tmp_path):
    """Exported with int64 ids: the example's dtype is the default, as its shape is (float32 was fed)."""
    path = str(tmp_path / "tokens.pt2")
    torch.export.save(torch.export.export(_Tokens(), (torch.randint(0, 100, (8, 16)),)), path)
    model = load_model(path, "cpu")
    assert (model.input_shape, model.dtype) == ((8, 16), "int64")
    validate_model(model)
    assert load_model(path, "cpu", dtype="int32").dtype == "int32"  # --dtype wins


@pytest.mark.parametrize("how", ["export", "torchscript", "factory"])
def test_a_model_with_two_inputs_is_refused_saying_so(tmp_path, how, monkeypatch):
    if how == "export":
        spec = str(tmp_path / "two.pt2")
        torch.export.save(torch.export.export(_TwoInputs(), (torch.randn(2, 4), torch.ones(2, 4))), spec)
    elif how == "torchscript":
        spec = str(tmp_path / "two.pt")
        torch.jit.save(torch.jit.script(_TwoInputs()), spec)
    else:
        (tmp_path / "two_inputs_factory.py").write_text(
            "import torch\n\nclass Two(torch.nn.Module):\n    def forward(self, x, mask):\n        return x * mask\n\n"
            "def make():\n    return Two()\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        spec = "two_inputs_factory:make"
    with pytest.raises(ModelLoadError, match=r"takes 2 inputs; gpuscope feeds one tensor"):
        load_model(spec, "cpu", input_shape=(2, 4))


def test_a_factory_may_name_the_model_class_itself(tmp_path, monkeypatch):
    """`--model mods:MLP` means an MLP(): it was taken for a module and failed with "'str' object has no
    attribute '_apply'"."""
    (tmp_path / "class_factory.py").write_text(
        "import torch\n\nclass MLP(torch.nn.Module):\n    example_input_shape = (2, 4)\n"
        "    def __init__(self):\n        super().__init__()\n        self.lin = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n        return self.lin(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("class_factory:MLP", "cpu")
    assert model.kind == "factory" and model.param_bytes == (16 + 4) * 4
    validate_model(model)


class _WithTable(torch.nn.Module):
    """A lookup table kept as a plain tensor attribute (1 MiB), beside a small Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.table = torch.randn(512, 512)

    def forward(self, x):
        return self.lin(x) + self.table[: x.shape[0], :8]


@pytest.mark.parametrize("how", ["frozen-torchscript", "export-with-a-constant", "factory-with-a-constant"])
def test_weights_outside_parameters_are_weighed_and_their_copies_seen(tmp_path, how, monkeypatch):
    """torch.jit.freeze turns parameters into graph constants and a table kept as `self.table` is no
    parameter either: such models weighed 0 B or a few KiB, and --copy-model's copies went unseen."""
    table_bytes, linear_bytes = 512 * 512 * 4, (64 + 8) * 4
    if how == "frozen-torchscript":
        spec = str(tmp_path / "frozen.pt")
        torch.jit.save(torch.jit.freeze(torch.jit.script(_WithTable().eval())), spec)
    elif how == "export-with-a-constant":
        spec = str(tmp_path / "const.pt2")
        torch.export.save(torch.export.export(_WithTable(), (torch.randn(4, 8),)), spec)
    else:
        (tmp_path / "table_factory.py").write_text(
            "from tests.test_models import _WithTable\n\ndef make():\n    return _WithTable()\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        spec = "table_factory:make"
    model = load_model(spec, "cpu", input_shape=(4, 8))
    assert model.model_bytes >= table_bytes + linear_bytes, model.model_bytes
    validate_model(model)
    assert weight_pointers(model.reload()).isdisjoint(weight_pointers(model.module))  # a copy is a copy
