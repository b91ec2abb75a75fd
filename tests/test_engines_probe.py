"""Which GPU engines a process has loaded: synthetic maps text, this process's real maps, a fake /proc."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpuscope.probes.engines import (
    ENGINE_SIGNATURES,
    EngineReport,
    EnginesProbe,
    _unavailable_for,
    engines_in_maps,
    memory_variables,
    read_environ,
)
from gpuscope.probes.readings import NO_PERMISSION, NOT_SUPPORTED, PROCESS_GONE, Unavailable

SITE = "/opt/torch/.venv/lib/python3.12/site-packages"


def maps_line(path: str, address: str = "7f3a1c000000-7f3a1c400000") -> str:
    return f"{address} r-xp 00000000 103:02 1835123                   {path}"


# Library paths as the H200's /proc/PID/maps showed them (h200-2026-11-26.json), one set per engine.
ENGINE_PATHS = {
    "torch": [f"{SITE}/torch/lib/libtorch_cuda.so"],
    "jax": [f"{SITE}/jax_plugins/xla_cuda13/xla_cuda_plugin.so"],
    "cupy": [f"{SITE}/cupy/_core/core.cpython-312-x86_64-linux-gnu.so"],
    "tensorflow": [f"{SITE}/tensorflow/libtensorflow_framework.so.2",
                   f"{SITE}/tensorflow/python/_pywrap_tensorflow_internal.so"],
    "onnxruntime": [f"{SITE}/onnxruntime/capi/libonnxruntime_providers_cuda.so"],
    "tensorrt": ["/usr/lib/x86_64-linux-gnu/libnvinfer.so.10"],
    "mxnet": [f"{SITE}/mxnet/libmxnet.so"],
    "paddle": [f"{SITE}/paddle/base/libpaddle.so"],
}

COMMON_MAPS = "\n".join([
    "55d0c0a00000-55d0c0a01000 r--p 00000000 103:02 1 /usr/bin/python3.12",
    "7f3a00000000-7f3a00021000 rw-p 00000000 00:00 0 ",          # anonymous: five fields
    "7ffd1e9de000-7ffd1e9ff000 rw-p 00000000 00:00 0                          [stack]",
    maps_line("/usr/lib/x86_64-linux-gnu/libc.so.6"),
    maps_line("/usr/lib/x86_64-linux-gnu/libcuda.so.580.159.04"),  # the driver alone is no engine
    maps_line(f"{SITE}/torch/lib/libtorch_cpu.so"),
])


def test_every_engine_has_synthetic_paths():
    assert set(ENGINE_PATHS) == set(ENGINE_SIGNATURES)


@pytest.mark.parametrize("engine", sorted(ENGINE_PATHS))
def test_each_engine_is_found_from_each_of_its_libraries(engine):
    for path in ENGINE_PATHS[engine]:
        assert engines_in_maps(COMMON_MAPS + "\n" + maps_line(path) + "\n") == (engine,), path


def test_no_engine_in_a_process_with_only_cpu_libraries():
    assert engines_in_maps(COMMON_MAPS) == ()
    # a CPU-only jaxlib maps _jax.so and _xla.so but no CUDA plugin: not a GPU engine
    cpu_jax = "\n".join(maps_line(f"{SITE}/jaxlib/{lib}") for lib in ("_jax.so", "_xla.so"))
    assert engines_in_maps(COMMON_MAPS + "\n" + cpu_jax) == ()
    assert engines_in_maps("") == ()


def test_two_engines_in_one_process_are_both_reported():
    text = "\n".join([COMMON_MAPS, maps_line(ENGINE_PATHS["torch"][0]), maps_line(ENGINE_PATHS["jax"][0]),
                      maps_line(ENGINE_PATHS["cupy"][0])])
    assert engines_in_maps(text) == ("torch", "jax", "cupy")


def test_a_path_with_spaces_is_read_whole():
    path = "/home/a user/env with space/lib/python3.12/site-packages/torch/lib/libtorch_cuda.so"
    assert engines_in_maps(maps_line(path)) == ("torch",)


def test_this_cpu_torch_process_maps_libtorch_cpu_and_reports_no_gpu_engine():
    torch = pytest.importorskip("torch")
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
        maps = fh.read()
    if torch.cuda.is_available() or "libtorch_cuda" in maps:
        pytest.skip("a CUDA build of torch is loaded here")
    assert "libtorch_cpu" in maps
    assert engines_in_maps(maps) == ()
    report = EnginesProbe().report(os.getpid())
    assert report.engines == ()
    assert isinstance(report.memory_env, dict)


def test_the_own_process_environment_is_read_live(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    report = EnginesProbe().report(os.getpid())
    assert report.memory_env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


# -- a fake /proc ----------------------------------------------------------------------------------

def fake_process(proc_root, pid: int, maps: str, environ: dict[str, str]) -> None:
    directory = proc_root / str(pid)
    directory.mkdir(parents=True)
    (directory / "maps").write_text(maps)
    (directory / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in environ.items()) + b"\0")


JAX_MAPS = "\n".join([COMMON_MAPS] + [maps_line(f"{SITE}/jaxlib/{name}") for name in ("_chlo.so", "_jax.so", "_xla.so")]
                     + [maps_line(ENGINE_PATHS["jax"][0])]) + "\n"


def test_a_jax_process_at_default_settings_shows_no_preallocation_variable(tmp_path):
    fake_process(tmp_path, 527, JAX_MAPS, {"PATH": "/usr/bin", "HOME": "/root", "CUDA_VISIBLE_DEVICES": "0"})
    report = EnginesProbe(proc_root=str(tmp_path)).report(527)
    assert report == EngineReport(527, ("jax",), {"CUDA_VISIBLE_DEVICES": "0"})
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in report.memory_env  # unset: JAX takes ~75% of the card


def test_a_jax_process_with_preallocation_off_shows_its_variables(tmp_path):
    fake_process(tmp_path, 528, JAX_MAPS, {"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                                          "XLA_PYTHON_CLIENT_MEM_FRACTION": ".25", "HF_TOKEN": "hf_abc"})
    report = EnginesProbe(proc_root=str(tmp_path)).report(528)
    assert report.engines == ("jax",)
    assert report.memory_env == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": ".25"}


def test_a_process_gone_from_proc_reads_process_gone(tmp_path):
    report = EnginesProbe(proc_root=str(tmp_path)).report(999)
    assert isinstance(report.engines, Unavailable) and report.engines.reason == PROCESS_GONE
    assert isinstance(report.memory_env, Unavailable) and report.memory_env.reason == PROCESS_GONE


def test_unreadable_maps_read_no_permission(tmp_path):
    fake_process(tmp_path, 77, JAX_MAPS, {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    (tmp_path / "77" / "maps").chmod(0)
    (tmp_path / "77" / "environ").chmod(0)
    if os.geteuid() != 0:
        report = EnginesProbe(proc_root=str(tmp_path)).report(77)
        reasons = [report.engines.reason, report.memory_env.reason]
    else:  # root reads any file: read as `nobody` in a child process instead
        tmp_path.chmod(0o755)
        (tmp_path / "77").chmod(0o755)
        code = ("import json, os, sys; from probes.engines import EnginesProbe; "
                "os.setgid(65534); os.setuid(65534); "
                "r = EnginesProbe(proc_root=sys.argv[1]).report(77); "
                "print(json.dumps([r.engines.reason, r.memory_env.reason]))")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        try:
            done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, capture_output=True,
                                  text=True, timeout=30, env={**os.environ, "PYTHONPATH": root})
        except OSError as exc:
            pytest.skip(f"cannot start a child as nobody: {exc}")
        if done.returncode != 0 and "PermissionError" in done.stderr and "setuid" in done.stderr:
            pytest.skip("cannot drop to an unprivileged user here")
        assert done.returncode == 0, done.stderr
        reasons = json.loads(done.stdout)
    assert reasons == [NO_PERMISSION, NO_PERMISSION]


def test_os_errors_map_to_reasons():
    assert _unavailable_for(PermissionError(13, "Permission denied")).reason == NO_PERMISSION
    assert _unavailable_for(FileNotFoundError(2, "No such file")).reason == PROCESS_GONE
    assert _unavailable_for(ProcessLookupError(3, "No such process")).reason == PROCESS_GONE
    assert _unavailable_for(OSError(5, "Input/output error")).reason == NOT_SUPPORTED


def test_maps_that_are_not_a_file_read_not_supported(tmp_path):
    (tmp_path / "5" / "maps").mkdir(parents=True)
    report = EnginesProbe(proc_root=str(tmp_path)).report(5)
    assert report.engines.reason == NOT_SUPPORTED
    assert report.memory_env.reason == PROCESS_GONE  # no environ file


def test_read_environ_splits_on_nul_and_tolerates_odd_bytes(tmp_path):
    (tmp_path / "8").mkdir()
    (tmp_path / "8" / "environ").write_bytes(b"A=1\0B=x=y\0NOEQUALS\0C=\xff\0")
    assert read_environ(8, proc_root=str(tmp_path)) == {"A": "1", "B": "x=y", "C": "\ufffd"}


def test_memory_variables_keep_only_engine_variables_and_redact_secrets():
    env = {"PATH": "/usr/bin", "CUDA_MODULE_LOADING": "LAZY", "TF_FORCE_GPU_ALLOW_GROWTH": "true",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "AWS_SECRET_ACCESS_KEY": "abc"}
    assert memory_variables(env) == {"CUDA_MODULE_LOADING": "LAZY", "TF_FORCE_GPU_ALLOW_GROWTH": "true",
                                     "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
