"""The GPU wiring of the real `run_diagnose`, on the CPU: a fake machine (tests/fakes/gpu_machine.py) stands in
NVML and torch.cuda through run_diagnose's own parameters (`nvml_opener`, `cuda`), and the session runs as on a
card: resolve the device, match torch's index to NVML's by UUID, create the context and read the baseline, load
the model, sweep with the allocator and NVML sampled, finish the record. Only the model computes on the CPU.

Each test is named after the failure it would catch. The fake shows the profiled pid on the NVML device torch's
cuda:0 really is (CUDA_VISIBLE_DEVICES="2,0": NVML's 2), holding the H200's 612 MiB context, plus the model's
segments once the model is placed; a run wired to the wrong index or the wrong moment reads other figures.
"""
from __future__ import annotations

import html
import io
from pathlib import Path

import pytest

from gpuscope.analysis.findings import DEFAULT_THRESHOLDS, rule_outside_allocator
from gpuscope.commands.diagnose import run_diagnose
from gpuscope.measure.options import DiagnoseOptions
from gpuscope.measure.recording import Progress
from gpuscope.probes.readings import Unavailable, is_available
from gpuscope.probes.samplefile import load_timeline
from gpuscope.probes.units import format_bytes
from gpuscope.record.run import load_run
from gpuscope.reports.html_machine import _configuration
from tests.fakes.gpu_machine import CONTEXT_BYTES, OUTSIDE_ALLOCATOR_BYTES, FakeGpuMachine, gpu_uuid
from tests.fakes.nvml import H200_DRIVER_RESERVED_BYTES, FakeProcess, MiB
from tests.fakes.torch_cuda import SEGMENT_BYTES

pytestmark = pytest.mark.slow

MODEL = "tests.predictor_models:clean"
NEIGHBOUR_PID = 2**22 + 7  # above Linux's largest pid_max: no process here has it
NEIGHBOUR_BYTES = 3000 * MiB


def clean_model_bytes() -> int:
    from tests.predictor_models import Clean

    module = Clean()
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def machine(visible: str | None, **kwargs) -> FakeGpuMachine:
    """Three H200s; NVML's device 0 busy with someone else's 3,000 MiB, so reading it for us cannot pass."""
    import os

    return FakeGpuMachine(os.getpid(), gpus=3, visible=visible, model_bytes=clean_model_bytes(),
                          neighbours={0: [FakeProcess(NEIGHBOUR_PID, NEIGHBOUR_BYTES, "python3", sm_util_pct=5)]},
                          **kwargs)


def diagnose(gpu: FakeGpuMachine, out: Path, device: str = "cuda:0"):
    stderr = io.StringIO()
    options = DiagnoseOptions(model=MODEL, device=device, predictors="1,2", duration="0.6s", warmup="0.1s",
                              window="0.2s", interval="50ms", out=str(out), report=False)
    result = run_diagnose(options, Progress(stream=stderr), nvml_opener=gpu.nvml_opener, cuda=gpu.cuda)
    return result, stderr.getvalue()


@pytest.fixture(scope="module", params=["2,0", f"{gpu_uuid(2)},{gpu_uuid(0)}"], ids=["indices", "uuids"])
def reordered(request, tmp_path_factory):
    """CUDA_VISIBLE_DEVICES puts NVML's device 2 first: torch's cuda:0 is NVML's 2."""
    gpu = machine(request.param)
    out = tmp_path_factory.mktemp("wiring") / "run"
    result, stderr = diagnose(gpu, out)
    steps = load_run(str(out / "run.json")).steps
    assert [s.predictors for s in steps] == [1, 2]  # the per-step checks below have steps to check
    return gpu, result, out, stderr


# ---------------------------------------------------------------- the context baseline

def test_a_context_baseline_read_after_the_model_loads_would_count_the_weights_as_context(reordered):
    gpu, result, out, _ = reordered
    assert result.exit_code == 0
    assert gpu.cuda.events == ["initialise cuda:0", "model placed on cuda:0"]
    assert gpu.opened == 1 and gpu.nvml.shut_down  # opened once, and released at the end
    record = load_run(str(out / "run.json"))
    # the context alone, as NVML showed it between CUDA's initialisation and the model (the H200's 612 MiB):
    # read before the initialisation it is Unavailable (no row yet), read after the model it is 2 MiB more
    assert record.baseline["context_bytes"] == CONTEXT_BYTES == 612 * MiB
    # and the rules take it as the context: the step's memory outside the allocator is NVML's row minus what
    # torch reserved (the context's own 610 MiB here), and OUTSIDE_ALLOCATOR quotes the baseline beside it
    reserved = SEGMENT_BYTES + SEGMENT_BYTES  # the context's segment and the model's
    for step in record.steps:
        assert step.memory["process_gpu_bytes"] == OUTSIDE_ALLOCATOR_BYTES + reserved
        assert step.memory["torch_reserved_bytes"] == reserved
        assert step.memory["layers"]["outside_allocator_bytes"] == OUTSIDE_ALLOCATOR_BYTES
        assert step.memory["layers"]["model_weights_bytes"] == clean_model_bytes()
    finding = next(f for f in rule_outside_allocator(record, DEFAULT_THRESHOLDS))
    assert f"CUDA context and kernels: {format_bytes(CONTEXT_BYTES)} right after initialisation" in finding.title
    assert finding.evidence["context_bytes"] == CONTEXT_BYTES


# ---------------------------------------------------------------- NVML's index through CUDA_VISIBLE_DEVICES

def test_torchs_ordinal_used_as_nvml_index_under_cuda_visible_devices_would_read_another_gpu(reordered):
    gpu, result, out, stderr = reordered
    record = load_run(str(out / "run.json"))
    pid = record.pid
    assert record.config["gpu_index"] == 2
    assert record.extra["gpu_index"] == {"torch_index": 0, "nvml_index": 2, "matched_by": "uuid"}
    assert "assuming NVML device" not in stderr
    # every figure of this process comes from NVML's device 2; device 0's neighbour is not this run's
    assert [(p["pid"], p["gpu"], p["self"]) for p in record.processes] == [(pid, 2, True)]
    assert record.processes[0]["peak_used_bytes"] == OUTSIDE_ALLOCATOR_BYTES + 2 * SEGMENT_BYTES
    assert record.processes[0]["peak_sm_util_pct"] == 40
    assert record.baseline["end"]["process_gpu_bytes"] == OUTSIDE_ALLOCATOR_BYTES + 2 * SEGMENT_BYTES
    device_2_used = H200_DRIVER_RESERVED_BYTES + OUTSIDE_ALLOCATOR_BYTES + 2 * SEGMENT_BYTES  # device 0: + 3,000 MiB
    assert record.baseline["end"]["device_used_bytes"] == device_2_used
    for step in record.steps:
        assert step.memory["device_used_bytes"] == device_2_used
        assert "other_processes_bytes" not in step.memory or step.memory["other_processes_bytes"] == 0
    assert {f.code for f in record.findings}.isdisjoint({"FOREIGN_PROCESS", "PID_NAMESPACE", "MEASUREMENT_GAP"})
    timeline = load_timeline(str(out / "samples.jsonl"))
    assert timeline.header["gpu_index"] == 2
    mine = {scope for scope in timeline.scopes() if scope.startswith(f"pid:{pid}/gpu:")}
    assert mine == {f"pid:{pid}/gpu:2"}


# ---------------------------------------------------------------- the allocator's scope

def test_allocator_figures_scoped_by_torchs_ordinal_would_not_meet_nvmls_row(reordered):
    gpu, result, out, _ = reordered
    record = load_run(str(out / "run.json"))
    pid = record.pid
    # torch is asked about its own device 0 ...
    assert {device for call, device in gpu.cuda.torch.calls} == {0}
    # ... and its figures are filed under NVML's index, beside NVML's row for this process
    timeline = load_timeline(str(out / "samples.jsonl"))
    reserved = [v for v in timeline.column(f"pid:{pid}/gpu:2", "torch_reserved_bytes") if v is not None]
    assert reserved and set(reserved) <= {SEGMENT_BYTES, 2 * SEGMENT_BYTES}
    assert all(v is None for v in timeline.column(f"pid:{pid}/gpu:0", "torch_reserved_bytes"))
    # so each step has torch's figures and the layers NVML's row splits into
    for step in record.steps:
        assert step.memory["torch_allocated_bytes"] == clean_model_bytes()
        assert step.memory["layers"]["allocator_cache_bytes"] == 2 * SEGMENT_BYTES - clean_model_bytes()
    assert record.baseline["end"]["torch_reserved_bytes"] == 2 * SEGMENT_BYTES


# ---------------------------------------------------------------- when the index cannot be matched

@pytest.mark.parametrize("why, fake, said", [
    ("mig_uuid", dict(torch_uuid="MIG-7d3e0b3a-0000-5000-8000-000000000001"),
     "no NVML device has the UUID of torch's cuda:0 (MIG-7d3e0b3a-0000-5000-8000-000000000001)"),
    ("uuid_unreadable", dict(uuid_error=RuntimeError("CUDA driver too old")),
     "torch could not read the UUID of cuda:0 (RuntimeError: CUDA driver too old)"),
], ids=["mig_uuid", "uuid_unreadable"])
def test_a_silent_fallback_to_torchs_index_would_hide_that_the_figures_may_be_another_gpus(tmp_path, why, fake, said):
    gpu = machine("2,0", **fake)
    result, stderr = diagnose(gpu, tmp_path / "run")
    record = load_run(str(tmp_path / "run" / "run.json"))
    note = record.extra["gpu_index"]
    assert (note["torch_index"], note["nvml_index"], note["matched_by"]) == (0, 0, "assumed")
    assert said in note["detail"] and "CUDA_VISIBLE_DEVICES" in note["detail"]
    assert record.config["gpu_index"] == 0
    lines = [line for line in stderr.splitlines() if "assuming NVML device 0" in line]
    assert len(lines) == 1 and said in lines[0]
    page = _configuration(record)  # the report's configuration says it too, where the figures are read
    assert "torch cuda:0 = NVML device 0, assumed</strong>: " + html.escape(said, quote=True) in page
    # and what it then read is what the note warns of: device 0's figures, where this process has no row
    assert isinstance(record.baseline["context_bytes"], Unavailable)
    assert [s.predictors for s in record.steps] == [1, 2]
    assert not any(is_available(s.memory.get("process_gpu_bytes")) for s in record.steps)
    assert result.exit_code == 0


def test_without_cuda_visible_devices_the_uuid_still_decides(tmp_path):
    gpu = machine(None)
    result, stderr = diagnose(gpu, tmp_path / "run", device="cuda:1")
    record = load_run(str(tmp_path / "run" / "run.json"))
    assert record.extra["gpu_index"] == {"torch_index": 1, "nvml_index": 1, "matched_by": "uuid"}
    assert "torch cuda:1 = NVML device 1 (matched by UUID)" in _configuration(record)
    assert record.baseline["context_bytes"] == CONTEXT_BYTES
    assert gpu.cuda.events == ["initialise cuda:1", "model placed on cuda:1"]
