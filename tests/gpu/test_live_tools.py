"""Live tools on a real GPU (issue 7's GPU checks): `ps` shows two torch processes with their engines,
and `watch` on a torch process sees the 2 GiB a test allocation adds.

Both run the real CLI in a subprocess (`python -m gpuscope ...`), against processes planted here.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpuscope.probes.readings import is_available
from gpuscope.probes.samplefile import load_timeline

from . import scenarios as sc

pytestmark = pytest.mark.gpu

GROWER = textwrap.dedent("""
    import sys, time, torch
    torch.zeros(1, device="cuda:0"); torch.cuda.synchronize()       # context only
    print("ready", flush=True)
    time.sleep(3.0)
    block = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda:0"); block.zero_(); torch.cuda.synchronize()
    time.sleep(4.0)
""")


def _cli(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpuscope", *args], capture_output=True, text=True,
                          cwd=str(sc.ROOT), env=sc.child_env(), timeout=timeout_s)


def test_ps_shows_two_torch_processes_with_their_engines(figures):
    with sc.foreign_process(1) as first, sc.foreign_process(2) as second:
        backend = sc.nvml_backend()
        sc.wait_listed(backend, first.pid, sc.GiB)
        sc.wait_listed(backend, second.pid, 2 * sc.GiB)
        done = _cli("ps", "--json")
    assert done.returncode == 0, done.stderr
    snapshot = json.loads(done.stdout)
    rows = {p["pid"]: p for d in snapshot["devices"] for p in d["processes"]}
    figures.record(pids=sorted(rows), engines={str(k): v.get("engines") for k, v in rows.items()})
    for child, gib in ((first, 1), (second, 2)):
        row = rows[child.pid]
        assert "torch" in row["engines"], row
        assert row["used_bytes"] >= gib * sc.GiB, row
    shared = [d for d in snapshot["devices"] if {first.pid, second.pid} <= {p["pid"] for p in d["processes"]}]
    assert shared and any("SHARED" in str(flag).upper() for flag in shared[0]["flags"]), shared


def test_watch_sees_the_2_gib_a_torch_process_adds(figures, tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", GROWER], stdout=subprocess.PIPE, text=True,
                            env=sc.child_env(), cwd=str(sc.ROOT))
    try:
        assert proc.stdout.readline().strip() == "ready"
        done = _cli("watch", "--pid", str(proc.pid), "--interval", "200ms", "--duration", "20s", "--quiet",
                    "--out", str(tmp_path / "watch"))
    finally:
        proc.kill()
        proc.wait(timeout=15)
    assert done.returncode in (0, 143), done.stderr
    timeline = load_timeline(str(tmp_path / "watch" / "samples.jsonl"))
    used = [v for v in timeline.column(f"pid:{proc.pid}/gpu:0", "used_bytes") if is_available(v)]
    assert used, "watch never saw the process on GPU 0"
    growth = max(used) - used[0]
    figures.record(first_bytes=used[0], peak_bytes=max(used), growth_bytes=growth)
    assert abs(growth - 2 * sc.GiB) <= 0.02 * 2 * sc.GiB, f"growth {growth / sc.MiB:.0f} MiB, expected ~2048 MiB"
