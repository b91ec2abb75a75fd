#!/usr/bin/env bash
# Issue 10, "Truth on a real GPU": the one command, run from the repository root of a GPU machine:
#
#   bash tests/gpu/run.sh
#
# It needs torch with CUDA, nvidia-ml-py, psutil, matplotlib and typer; CuPy and JAX for scenarios 5
# and 6 (skipped, with the reason, without them). No pip, no network: gpuscope runs from this tree,
# through a folder of links that lays it out as the wheel does (gpuscope/ = profiler/, gpuscope/probes
# = probes/, gpuscope/reports = reports/), put first on PYTHONPATH. It runs, in this order:
#   1. pytest -m gpu tests/gpu: the planted scenarios first (each a fresh `python -m gpuscope diagnose`,
#      nvidia-smi polled beside it by the test process), then the accuracy tests and the probe tests,
#      which create a CUDA context in pytest's own process;
#   2. `python -m gpuscope diagnose` with every default, timed (diagnose's wall time; the sampler's
#      cost per tick is in its run.json).
# What it leaves under $OUT (./gpu-results without it); at most 8 files come back from a device machine:
#   gpu-results.json  the environment, each scenario's measured figures and verdict, the defaults run
#   pytest.txt        pytest's output
#   reports.tar.gz    each scenario's report folder (run.json, report.html, PNGs, diagnose stdout/stderr,
#                     nvidia-smi-readings.json, torch-at-exit.json where a planted model wrote one),
#                     diagnose-defaults/, nvidia-smi.txt
#   samples.tar.gz    every run's samples.jsonl
#   run.log           this script's timings
# It exits with pytest's exit code. About 6 minutes on an H100 (estimated: never run on a GPU yet); the
# limits below keep it under 9 (a device `run` needs timeout_s 600).
set -u -o pipefail
cd "$(dirname "$0")/../.." || exit 2
ROOT="$PWD"
export OUT="${OUT:-$ROOT/gpu-results}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpuscope-gpu.XXXXXX")"
export GPUSCOPE_GPU_REPORTS="$WORK/reports"
mkdir -p "$GPUSCOPE_GPU_REPORTS"
# The package as the wheel installs it, from this tree: links, so an edit here is what runs.
SITE="$WORK/site"
mkdir -p "$SITE/gpuscope"
for entry in "$ROOT"/profiler/*; do ln -s "$entry" "$SITE/gpuscope/$(basename "$entry")"; done
ln -s "$ROOT/probes" "$SITE/gpuscope/probes"
ln -s "$ROOT/reports" "$SITE/gpuscope/reports"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY="${PYTHON:-$(command -v python3 || command -v python)}"
PYTEST_LIMIT_S="${GPUSCOPE_GPU_PYTEST_LIMIT_S:-440}"
DEFAULTS_LIMIT_S="${GPUSCOPE_GPU_DEFAULTS_LIMIT_S:-90}"

log() { echo "[run.sh $(date +%H:%M:%S)] $*" | tee -a "$OUT/run.log" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# Packed after the suite and again at exit: a runner that kills this script during the defaults run
# still gets the scenarios' reports.
pack() {
  tar -czf "$OUT/reports.tar.gz" -C "$WORK" --exclude=samples.jsonl reports 2>>"$OUT/run.log"
  (cd "$WORK" && find reports -name samples.jsonl -print0 | tar -czf "$OUT/samples.tar.gz" --null -T -) 2>>"$OUT/run.log"
}
trap 'pack; rm -rf "$WORK"' EXIT

nvidia-smi > "$GPUSCOPE_GPU_REPORTS/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed (see nvidia-smi.txt)"
log "python $PY ($("$PY" --version 2>&1)); OUT=$OUT; reports in $GPUSCOPE_GPU_REPORTS, packed after the suite and at exit"

# 1. the suite. SIGINT on timeout: pytest unwinds, and every planted child is killed in its finally.
started=$(now)
timeout -s INT -k 20 "$PYTEST_LIMIT_S" "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rA --durations=0 \
  2>&1 | tee "$OUT/pytest.txt"
code=${PIPESTATUS[0]}
log "pytest exited $code after $(since "$started") s (limit $PYTEST_LIMIT_S s)"
pack

# 2. diagnose with every default, timed, in a fresh process
started=$(now)
timeout -s INT -k 15 "$DEFAULTS_LIMIT_S" "$PY" -m gpuscope diagnose --out "$GPUSCOPE_GPU_REPORTS/diagnose-defaults" \
  > "$GPUSCOPE_GPU_REPORTS/diagnose-defaults.txt" 2>&1
drc=$?
wall=$(since "$started")
log "diagnose (defaults) exited $drc after $wall s (limit $DEFAULTS_LIMIT_S s)"
"$PY" tests/gpu/scenarios.py record-defaults --results "$OUT/gpu-results.json" \
  --run "$GPUSCOPE_GPU_REPORTS/diagnose-defaults/run.json" --wall "$wall" --rc "$drc" 2>&1 | tee -a "$OUT/run.log"
"$PY" tests/gpu/scenarios.py summary --results "$OUT/gpu-results.json" 2>&1 | tee -a "$OUT/run.log"
exit "$code"
