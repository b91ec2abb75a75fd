"""`gpuscope tune` on a real GPU: streams on and off in the process, and each CUDA memory setting
(CUBLAS_WORKSPACE_CONFIG, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True) in a spawned worker of its own,
with the worker's device memory read from NVML. Skipped without a CUDA GPU (tests/conftest.py).

Runs the real CLI in a subprocess, so the pytest process itself never creates a CUDA context.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


def test_tune_searches_streams_and_the_memory_settings_on_cuda(tmp_path: Path) -> None:
    out = tmp_path / "tune"
    proc = subprocess.run([sys.executable, "-m", "gpuscope", "tune", "--device", "cuda:0", "--predictors", "1,2",
                           "--intra-op-threads", "1", "--duration", "1s", "--warmup", "0.3s", "--budget", "4m",
                           "--out", str(out), "-q"], capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "run.json").read_text())
    rows = data["tuning"]["configurations"]
    envs = {tuple(sorted(r["settings"]["env"].items())) for r in rows}
    assert (("CUBLAS_WORKSPACE_CONFIG", ":0:0"),) in envs
    assert (("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),) in envs
    assert any(r["settings"]["streams"] for r in rows)
    for r in rows:
        assert r["status"] in ("measured", "skipped", "failed", "over_limit")
        if r["status"] == "measured":
            assert r["throughput_rps"] > 0
            assert isinstance(r["memory"]["device_bytes"], int) and r["memory"]["device_bytes"] > 0, r
        else:
            assert r["reason"], r
    measured_in_child = [r for r in rows if r["settings"]["env"] and r["status"] == "measured"]
    assert measured_in_child, "no environment setting was measured within the budget"
    assert data["extra"]["worker_pids"]
    assert (out / "tuning.png").exists()
