"""Bad input to `gpuscope diagnose`: one clear line on stderr, exit code 2, no traceback, nothing written.

Every case runs the real CLI in a subprocess (`python -m gpuscope diagnose ...`).
The subprocesses of the table run a few at a time (each one imports torch), and
each test asserts on its own case: exit code 2, exactly one non-empty stderr
line, no "Traceback", nothing on stdout, and no run.json or samples.jsonl in
the output folder, so nothing half-written can be passed off as a run.

Pickles are refused by their bytes, before anything unpickles them: the
pickles here would create a marker file when unpickled, and it never appears.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEED = ["--duration", "1s", "--warmup", "0.1s", "--window", "0.3s"]
MARKER = "UNPICKLED-MARKER"

# `--device cuda:7` on a one-GPU machine, on any machine: torch is told it has exactly one usable GPU.
ONE_GPU_CLI = ("import sys, torch\n"
               "torch.cuda.is_available = lambda: True\n"
               "torch.cuda.device_count = lambda: 1\n"
               "from gpuscope.commands.app import main\n"
               "sys.exit(main(sys.argv[1:]))\n")


class _CreatesMarker:
    """Unpickling this creates a file (with builtins.open: no shell involved)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]                 # diagnose's arguments; {d} is the folder holding the inputs,
                                          # {unwritable} a folder that cannot be created (_unwritable_folder)
    says: tuple[str, ...] = ()            # fragments the one stderr line must contain
    one_gpu: bool = False                 # run under ONE_GPU_CLI instead of `python -m gpuscope`
    predictors: str | None = "1"         # None: the case passes its own --predictors
    xfail: str = ""                       # a known bug outside the tests: why this case fails today

    def __str__(self) -> str:
        return self.id


CASES = [
    # ---- model files
    Case("missing-model-file", ("--model", "{d}/no-such-model.pt"), ("not found", "no-such-model.pt")),
    Case("model-path-is-a-directory", ("--model", "{d}/a-folder.pt"), ("directory",)),
    Case("random-bytes", ("--model", "{d}/random.pt"), ("not a TorchScript",)),
    Case("empty-file", ("--model", "{d}/empty.pt"), ("not a TorchScript",)),
    Case("text-file", ("--model", "{d}/notes.pt"), ("not a TorchScript",)),
    Case("zip-that-is-no-model", ("--model", "{d}/archive.pt"), ("not a TorchScript",)),
    Case("truncated-torchscript", ("--model", "{d}/truncated.pt"), ("not a TorchScript",)),
    Case("corrupt-pt2", ("--model", "{d}/corrupt.pt2", "--input-shape", "2x4"), ("could not load", "corrupt.pt2")),
    Case("plain-pickle", ("--model", "{d}/evil.pkl"), ("pickle", "refused", "--trust-model-file")),
    Case("plain-pickle-named-pt", ("--model", "{d}/evil-pickle.pt"), ("pickle", "refused", "--trust-model-file")),
    Case("torch-save-of-an-object", ("--model", "{d}/evil-torch-save.pt"), ("torch.save", "refused", "--trust-model-file")),
    Case("protocol-0-pickle", ("--model", "{d}/evil-protocol0.pkl"), ("not a TorchScript",)),
    Case("trusted-pickle-that-is-no-model", ("--model", "{d}/dict.pt", "--trust-model-file"), ("dict", "not a model")),
    # ---- import paths and factories
    Case("import-path-does-not-exist", ("--model", "no_such_package.models:make"), ("cannot import", "no_such_package")),
    Case("factory-raises", ("--model", "gpuscope_badfactory:make"),
         ("raised", "RuntimeError", "weights bucket unreachable (code 42)")),
    Case("factory-import-raises", ("--model", "gpuscope_badimport:make"), ("importing", "ZeroDivisionError")),
    Case("factory-missing-attribute", ("--model", "gpuscope_badfactory:nothere"), ("no attribute", "nothere")),
    Case("factory-returns-no-model", ("--model", "gpuscope_badfactory:make_number"), ("returned int",)),
    # ---- predictor counts
    Case("predictors-0", ("--predictors", "0"), ("--predictors", "at least 1"), predictors=None),
    Case("predictors-minus-1", ("--predictors", "-1"), ("--predictors", "at least 1"), predictors=None),
    Case("predictors-abc", ("--predictors", "abc"), ("--predictors", "not a whole number"), predictors=None),
    Case("predictors-empty-item", ("--predictors", "1,,2"), ("--predictors", "empty item"), predictors=None),
    Case("predictors-empty", ("--predictors", ""), ("--predictors is empty",), predictors=None),  # an unset $P
    Case("predictors-too-many", ("--predictors", "100000"), ("--predictors", "at most 1024"), predictors=None),
    # ---- rates and limits
    Case("rate-nan", ("--rate", "nan"), ("--rate", "nan")),
    Case("rate-infinite", ("--rate", "inf"), ("--rate", "inf")),
    Case("rate-negative", ("--rate", "-5"), ("--rate",)),
    Case("max-p99-negative", ("--max-p99-ms", "-1"), ("--max-p99-ms", "positive")),
    # ---- input shapes
    Case("input-shape-does-not-fit", ("--model", "builtin:mlp", "--input-shape", "4x7"),
         ("rejected an input of shape 4x7", "mat1 and mat2")),
    Case("input-shape-not-a-shape", ("--input-shape", "8xabc"), ("--input-shape",)),
    Case("input-shape-does-not-fit-torchscript", ("--model", "{d}/linear4.pt", "--input-shape", "2x5"),
         ("rejected an input of shape 2x5",)),
    # ---- devices
    Case("unknown-device", ("--device", "tpu"), ("unknown device", "tpu")),
    Case("cuda-7", ("--device", "cuda:7"), ("cuda:7",)),
    Case("cuda-7-on-a-one-gpu-machine", ("--device", "cuda:7"), ("cuda:7", "does not exist", "1 GPU"), one_gpu=True),
    # ---- output folders
    # ---- requests for a translator, and the thread-safety check's tolerance
    Case("requests-file-missing", ("--model", "gpuscope_translators:make", "--requests", "{d}/no-such.jsonl"),
         ("--requests", "no-such.jsonl", "no such file")),
    Case("requests-file-not-json", ("--model", "gpuscope_translators:make", "--requests", "{d}/not-json.jsonl"),
         ("--requests", "line 2 is not JSON")),
    Case("requests-file-empty", ("--model", "gpuscope_translators:make", "--requests", "{d}/empty.jsonl"),
         ("--requests", "holds no request")),
    Case("requests-file-is-a-folder", ("--model", "gpuscope_translators:make", "--requests", "{d}/a-folder.pt"),
         ("--requests", "is a directory")),
    Case("preprocess-raises", ("--model", "gpuscope_translators:make_raising", "--requests", "{d}/requests.jsonl"),
         ("preprocess rejected request 1 of", "requests.jsonl", "ValueError: cannot decode 'first'")),
    Case("example-requests-raise", ("--model", "gpuscope_translators:make_no_examples"),
         ("example_requests() raised", "KeyError")),
    Case("output-tolerance-negative", ("--output-tolerance", "-0.1"), ("--output-tolerance", ">= 0")),
    Case("output-tolerance-nan", ("--output-tolerance", "nan"), ("--output-tolerance", "nan")),
    Case("output-tolerance-a-word", ("--output-tolerance", "tight"), ("--output-tolerance", "valid number")),
    Case("output-folder-under-a-file", ("--out", "{d}/a-file/report"), ("cannot write to output folder",)),
    Case("output-folder-is-a-file", ("--out", "{d}/a-file"), ("cannot write to output folder", "is a file")),
    Case("output-folder-read-only", ("--out", "{unwritable}"), ("cannot write to output folder",)),
]


def _is_sysfs(path: str) -> bool:
    try:
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            return any(line.split()[1:3] == [path, "sysfs"] for line in fh if len(line.split()) >= 3)
    except OSError:
        return False


def _unwritable_folder(d: Path) -> str:
    """An output folder that cannot be created, for whoever runs the tests.

    A normal user: a folder below a read-only (0555) folder. Root ignores permissions (and CI runs as root),
    so for root a folder nobody may create: in sysfs (EPERM, or EROFS where /sys is mounted read-only, as in
    containers), or, where /sys is no sysfs, below the regular file /proc/version.
    """
    if os.geteuid() != 0:
        return str(d / "read-only" / "report")
    if _is_sysfs("/sys"):
        return "/sys/gpuscope-test-read-only/report"
    return "/proc/version/gpuscope-test/report"


def _make_inputs(d: Path) -> None:
    """Every bad input file the table refers to."""
    import torch

    (d / "a-folder.pt").mkdir()
    (d / "random.pt").write_bytes(os.urandom(4096))
    (d / "empty.pt").write_bytes(b"")
    (d / "notes.pt").write_text("these are my notes, not a model\n")
    with zipfile.ZipFile(d / "archive.pt", "w") as zf:
        zf.writestr("readme.txt", "a zip, but no model inside")
    marker = str(d / MARKER)
    (d / "evil.pkl").write_bytes(pickle.dumps(_CreatesMarker(marker), protocol=4))
    (d / "evil-pickle.pt").write_bytes(pickle.dumps(_CreatesMarker(marker), protocol=2))
    (d / "evil-protocol0.pkl").write_bytes(pickle.dumps(_CreatesMarker(marker), protocol=0))
    torch.save(_CreatesMarker(marker), d / "evil-torch-save.pt")
    torch.save({"weights": [1, 2, 3]}, d / "dict.pt")
    script = torch.jit.script(torch.nn.Linear(4, 4))
    torch.jit.save(script, str(d / "linear4.pt"))
    data = (d / "linear4.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    (d / "gpuscope_badfactory.py").write_text(
        "def make():\n"
        "    raise RuntimeError('weights bucket unreachable (code 42)')\n\n"
        "def make_number():\n"
        "    return 42\n")
    (d / "gpuscope_badimport.py").write_text("RATIO = 1 / 0\n\ndef make():\n    return None\n")
    with zipfile.ZipFile(d / "corrupt.pt2", "w") as zf:  # looks like torch.export's layout, is not one
        zf.writestr("corrupt/archive_format", "pt2")
        zf.writestr("corrupt/models/model.json", "{not json")
    (d / "a-file").write_text("a file where a folder should be\n")
    (d / "requests.jsonl").write_text('"first"\n"second"\n')
    (d / "not-json.jsonl").write_text('"fine"\n{"text": unquoted}\n')
    (d / "empty.jsonl").write_text("\n\n")
    (d / "gpuscope_translators.py").write_text(
        "import torch\n\n"
        "class Text:\n"
        "    def __init__(self):\n"
        "        self.model = torch.nn.Linear(4, 4)\n"
        "    def preprocess(self, request):\n"
        "        return torch.ones(1, 4) * len(str(request))\n"
        "    def example_requests(self):\n"
        "        return ['a', 'bb']\n\n"
        "class Raising(Text):\n"
        "    def preprocess(self, request):\n"
        "        raise ValueError(f'cannot decode {request!r}')\n\n"
        "class NoExamples(Text):\n"
        "    def example_requests(self):\n"
        "        return {}['examples']\n\n"
        "def make():\n    return Text()\n\n"
        "def make_raising():\n    return Raising()\n\n"
        "def make_no_examples():\n    return NoExamples()\n")
    (d / "read-only").mkdir()
    (d / "read-only").chmod(0o555)


def _argv(case: Case, d: Path, out: Path) -> list[str]:
    """`diagnose` and its arguments, as typed after `gpuscope`."""
    args = [a.replace("{d}", str(d)).replace("{unwritable}", _unwritable_folder(d)) for a in case.args]
    argv = ["diagnose", "--out", str(out), *SPEED]
    if case.predictors is not None:
        argv += ["--predictors", case.predictors]
    if "--device" not in args:
        argv += ["--device", "cpu"]
    return argv + args  # the case's own --out, if any, comes last and wins


# Runs `python -m gpuscope ARGV` once per case in a forked child of one interpreter that imported
# torch once: the same entry point (runpy, like -m), its own stdout/stderr files, cwd and exit code,
# and an uncaught exception prints its traceback as the interpreter would. Saves a torch import per case.
RUNNER = r"""
import json, os, runpy, sys, traceback
import torch
import gpuscope.commands.app, gpuscope.measure.models, gpuscope.commands.diagnose

def child(case):
    os.chdir(case["cwd"])
    sys.path.insert(0, case["cwd"])
    for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    if case["one_gpu"]:
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: 1
    sys.argv = ["gpuscope"] + case["argv"]
    code = 0
    try:
        runpy.run_module("gpuscope", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)

cases = json.load(sys.stdin)
codes, running, pending = {}, {}, list(cases)
while pending or running:
    while pending and len(running) < int(os.environ.get("GPUSCOPE_TEST_JOBS", "3")):
        case = pending.pop(0)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(case)
        running[pid] = case["id"]
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps(codes))
"""


def _run_table(cases: list[Case], d: Path) -> dict[str, dict]:
    jobs = []
    for case in cases:
        out = d / "out" / case.id
        logs = d / "logs"
        logs.mkdir(exist_ok=True)
        jobs.append({"id": case.id, "argv": _argv(case, d, out), "cwd": str(d), "one_gpu": case.one_gpu,
                     "stdout": str(logs / f"{case.id}.out"), "stderr": str(logs / f"{case.id}.err"), "out": str(out)})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(d)]), COLUMNS="200")
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(jobs), cwd=d, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {job["id"]: {"rc": codes[job["id"]], "stdout": Path(job["stdout"]).read_text(),
                        "stderr": Path(job["stderr"]).read_text(), "out": job["out"],
                        "cmd": ["gpuscope", *job["argv"]]} for job in jobs}


def _run_real(case: Case, d: Path) -> dict:
    """The same case through a fresh `python -m gpuscope` (or the one-GPU wrapper)."""
    out = d / "out-real" / case.id
    argv = _argv(case, d, out)
    cmd = ([sys.executable, "-c", ONE_GPU_CLI] if case.one_gpu else [sys.executable, "-m", "gpuscope"]) + argv
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(d)]), COLUMNS="200")
    proc = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=120)
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "out": str(out), "cmd": cmd}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad-inputs")
    _make_inputs(d)
    return d


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, inputs: Path) -> dict[str, dict]:
    """Run the selected cases of the table; {case id: outcome}."""
    wanted = [item.callspec.params["case"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params]
    chosen = [c for c in CASES if c in wanted]
    return _run_table(chosen, inputs) if chosen else {}


def _assert_one_line_exit_2(case: Case, got: dict, inputs: Path) -> None:
    where = f"\n$ {' '.join(map(str, got['cmd']))}\nstdout: {got['stdout']!r}\nstderr: {got['stderr']!r}"
    assert got["rc"] == 2, where
    assert "Traceback" not in got["stderr"] and "Traceback" not in got["stdout"], where
    lines = got["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].strip(), where
    assert got["stderr"].endswith("\n") and got["stderr"].count("\n") == 1, where
    line = lines[0]
    assert line.startswith("gpuscope: "), where
    for fragment in case.says:
        assert fragment in line, f"{fragment!r} missing{where}"
    assert got["stdout"] == "", where
    out = Path(got["out"])
    if out.is_dir():
        assert not (out / "run.json").exists(), "bad input left a run.json behind"
        assert not (out / "samples.jsonl").exists(), "bad input left a samples.jsonl behind"
        assert not (out / "report.html").exists(), "bad input left a report behind"
    assert not (inputs / MARKER).exists(), "a refused pickle was unpickled"


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=c.xfail)) if c.xfail
                                  else c for c in CASES], ids=str)
def test_bad_input_is_one_line_and_exit_2(case: Case, outcomes: dict[str, dict], inputs: Path) -> None:
    _assert_one_line_exit_2(case, outcomes[case.id], inputs)


REAL = ("plain-pickle", "factory-raises", "cuda-7-on-a-one-gpu-machine")


@pytest.mark.parametrize("case", [c for c in CASES if c.id in REAL], ids=str)
def test_a_fresh_interpreter_says_the_same(case: Case, outcomes: dict[str, dict], inputs: Path) -> None:
    """A few cases again through a fresh `python -m gpuscope`, the command users type."""
    got = _run_real(case, inputs)
    _assert_one_line_exit_2(case, got, inputs)
    assert got["stderr"] == outcomes[case.id]["stderr"].replace("/out/", "/out-real/")


def test_a_refused_pickle_never_runs_its_payload(tmp_path: Path) -> None:
    """The three pickle flavours, each made to create a marker when unpickled: refused, no marker."""
    import torch

    marker = tmp_path / "pwned"
    paths = []
    for name, write in (("plain.pkl", lambda p: p.write_bytes(pickle.dumps(_CreatesMarker(str(marker))))),
                        ("saved.pt", lambda p: torch.save(_CreatesMarker(str(marker)), p)),
                        ("legacy.pt", lambda p: torch.save(_CreatesMarker(str(marker)), p,
                                                           _use_new_zipfile_serialization=False))):
        path = tmp_path / name
        write(path)
        paths.append(path)
    # the payload really works: unpickling one of them creates the marker (then it is removed)
    with open(paths[0], "rb") as fh:
        pickle.load(fh).close()
    assert marker.exists()
    marker.unlink()

    from gpuscope.measure.models import ModelLoadError, load_model

    for path in paths:
        with pytest.raises(ModelLoadError, match="refused"):
            load_model(str(path), "cpu", (2, 4))
        assert not marker.exists(), f"{path.name} was unpickled"


def test_a_trusted_pickle_of_a_real_model_loads(tmp_path: Path) -> None:
    """--trust-model-file is the explicit opt-in: a torch.save'd nn.Module then loads."""
    import torch

    from gpuscope.measure.models import load_model

    path = tmp_path / "whole-module.pt"
    torch.save(torch.nn.Linear(4, 3), path)
    model = load_model(str(path), "cpu", (2, 4), trust_model_file=True)
    assert model.kind == "pickle"
    assert model.module(torch.randn(2, 4)).shape == (2, 3)


def _export_archive(tmp_path: Path) -> Path:
    import torch

    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),)), str(good))
    return good


def _crafted_pt2(tmp_path: Path, where: str, marker: Path) -> Path:
    """A real torch.export archive with a malicious pickle planted where torch.export.load unpickles it."""
    import torch

    good = _export_archive(tmp_path)
    payload = io.BytesIO()
    torch.save(_CreatesMarker(str(marker)), payload)
    evil = tmp_path / f"evil-{where}.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as dst:
        config_name = next(n for n in src.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(src.read(config_name))
        first = next(iter(config["config"]))
        weight_file = config["config"][first]["path_name"]
        if where == "pickled-weight":
            config["config"][first]["use_pickle"] = True
        for name in src.namelist():
            data = src.read(name)
            if name == config_name:
                data = json.dumps(config).encode()
            elif where == "pickled-weight" and name.endswith(f"/weights/{weight_file}"):
                data = payload.getvalue()
            elif where == "sample-inputs" and "/sample_inputs/" in name:
                data = payload.getvalue()
            dst.writestr(name, data)
    return evil


@pytest.mark.parametrize("where", ["pickled-weight", "sample-inputs"])
def test_a_crafted_pt2_is_refused_without_running_its_pickle(tmp_path: Path, where: str) -> None:
    """torch.export.load unpickles a pickled weight with weights_only=False, and retries the sample inputs
    with weights_only=False when the safe load fails: both must be refused before torch sees the file."""
    marker = tmp_path / "pwned-by-pt2"
    evil = _crafted_pt2(tmp_path, where, marker)

    from gpuscope.measure.models import ModelLoadError, load_model

    try:
        with pytest.raises(ModelLoadError, match="refused"):
            load_model(str(evil), "cpu", (2, 4))
    finally:
        assert not marker.exists(), "loading a .pt2 ran the pickle inside it"


def test_a_valid_pt2_loads_and_runs(tmp_path: Path) -> None:
    """The guard refuses crafted archives, not real ones (and torch.export's module has no eval())."""
    import torch

    from gpuscope.measure.models import load_model, validate_model

    model = load_model(str(_export_archive(tmp_path)), "cpu", (2, 4))
    validate_model(model)
    assert model.kind == "export"
    assert model.module(torch.randn(2, 4)).shape == (2, 4)
