"""`gpuscope tune`: search predictor count x intra-op threads (x streams x environment on a GPU) for a deployment.

The search itself is pure (analysis/search.py); measuring a configuration is
measure/tuning.py; this module strings them into the one recording lifecycle
(measure/recording.py), so a tune run leaves diagnose's folder: samples.jsonl,
run.json (with a `tuning` block), report.html with a tuning section and
tuning.png. The default settings' steps are the record's `steps`, so findings
read exactly as diagnose's would, and each finding whose remedy was searched
says what the remedy measured (analysis/remedies.py).

Exit codes: 0 a configuration met every constraint; 1 none did (the report shows
the closest); 2 bad input, or nothing could be measured; 130/143 interrupted
(run.json keeps what was measured, status "interrupted").
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from gpuscope.analysis.search import (
    Constraints,
    Group,
    Policy,
    Search,
    Settings,
    Space,
    default_threads,
    gain_text,
    rank,
)
from gpuscope.measure.options import MAX_PREDICTORS, WorkloadOptions, parse_predictors, parse_seconds
from gpuscope.measure.recording import Interrupts, Progress, Recording, SessionResult, environment_facts, open_nvml
from gpuscope.probes.units import format_bytes, format_ms, parse_size
from gpuscope.record.catalogue import MODE_TUNE
from gpuscope.record.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE, UsageError
from gpuscope.record.run import STATUS_COMPLETE, STATUS_FAILED, STATUS_INTERRUPTED, RunRecord, now_iso

# What the GPU findings recommend, searched on CUDA; each runs in a fresh worker (it acts before CUDA starts).
CUDA_ENV_SETTINGS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("CUBLAS_WORKSPACE_CONFIG", ":0:0"),),
    (("CUBLAS_WORKSPACE_CONFIG", ":4096:8"),),
    (("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),),
)
MAX_BUDGET_S = 24 * 3600.0


@dataclass(frozen=True)
class TuneOptions(WorkloadOptions):
    """Everything `gpuscope tune` needs: the model options of diagnose plus the search's own."""

    duration: str = "3s"  # the longest measured window per configuration; a stable one ends sooner
    warmup: str = "0.3s"
    window: str = "0.5s"
    threads: str | None = None  # --intra-op-threads 1,2,4 (None: 1, cores/N, torch's default)
    env: tuple[str, ...] = ()  # extra NAME=VALUE settings, each tried in its own process
    budget: str = "3m"
    rate: float | None = None
    max_p99_ms: float | None = None
    max_device_memory: str | None = None
    max_host_memory: str | None = None
    out: str = "gpuscope-tune"


def parse_threads(text: str | None) -> tuple[int, ...] | None:
    """`1,2,4` -> (1, 2, 4); None when not given. Empty, zero, negative or non-numeric items are bad input."""
    if text is None:
        return None
    if not str(text).strip():
        raise UsageError("--intra-op-threads is empty (expected e.g. 1,2,4; leave the flag out for the default)")
    values = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            raise UsageError(f"--intra-op-threads {text!r}: {item!r} is not a whole number") from None
        if not 1 <= value <= MAX_PREDICTORS:
            raise UsageError(f"--intra-op-threads {text!r}: each count must be 1 to {MAX_PREDICTORS}, got {value}")
        values.append(value)
    return tuple(sorted(set(values)))


def parse_budget(text: str) -> float:
    """`90s`, `3m` -> seconds; 0, words and more than a day are bad input."""
    value = parse_seconds("--budget", text, 0.0)
    if value is None or value <= 0:
        raise UsageError(f"--budget {text}: must be more than 0 s (e.g. 90s, 3m)")
    if value > MAX_BUDGET_S:
        raise UsageError(f"--budget {text}: at most 24h")
    return value


def parse_env_settings(items: tuple[str, ...]) -> tuple[tuple[tuple[str, str], ...], ...]:
    out = []
    for item in items:
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip() or any(c in name for c in " \t\n"):
            raise UsageError(f"--env {item!r}: expected NAME=VALUE, e.g. OMP_WAIT_POLICY=PASSIVE")
        out.append(((name.strip(), value),))
    return tuple(out)


def _size(flag: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    if value <= 0:
        raise UsageError(f"{flag}: must be more than 0 bytes, got {text!r}")
    return value


def build_space(counts: tuple[int, ...], threads: tuple[int, ...], torch_default: int, gpu: bool,
                env_settings: tuple[tuple[tuple[str, str], ...], ...]) -> Space:
    """The default group first (torch's own threads: what diagnose measures), then the other thread counts,
    then on CUDA streams and the memory settings, then the user's --env settings."""
    groups = [Group(torch_default)] + [Group(t) for t in threads if t != torch_default]
    if gpu:
        groups.append(Group(torch_default, streams=True))
        groups += [Group(torch_default, env=env) for env in CUDA_ENV_SETTINGS]
    groups += [Group(torch_default, env=env) for env in env_settings if Group(torch_default, env=env) not in groups]
    return Space(counts, tuple(groups))


def run_tune(opts: TuneOptions, progress: Progress | None = None,
             nvml_opener: Callable[[], tuple[Any, dict[str, str] | None]] = open_nvml,
             clock_s: Callable[[], float] = time.monotonic) -> SessionResult:
    """Run the whole tune session. Raises UsageError for bad input (before anything is written)."""
    import torch

    from gpuscope.analysis.findings import conclude
    from gpuscope.analysis.remedies import verify_remedies
    from gpuscope.commands.diagnose import MAX_RATE_RPS, _finish_record
    from gpuscope.measure.devices import resolve_device
    from gpuscope.measure.models import ModelLoadError, load_model, parse_input_shape, validate_model
    from gpuscope.measure.sweep import SweepHooks, default_predictor_counts
    from gpuscope.measure.tuning import ChildMeasurer, InProcessMeasurer, StepPlan
    from gpuscope.measure.workers import WorkerSpec
    from gpuscope.measure.workload import PredictorPool
    from gpuscope.probes.host import usable_cores
    from gpuscope.record.files import check_out_path
    from gpuscope.reports.render import render_run

    progress = progress or Progress(opts.quiet)
    # ---- everything the user typed, before touching the device or the disk
    counts = parse_predictors(opts.predictors)
    threads = parse_threads(opts.threads)
    env_settings = parse_env_settings(opts.env)
    budget_s = parse_budget(opts.budget)
    plan = StepPlan(max_step_s=parse_seconds("--duration", opts.duration, 0.1),
                    warmup_s=parse_seconds("--warmup", opts.warmup, 0.0),
                    window_s=parse_seconds("--window", opts.window, 0.05), rate_rps=opts.rate)
    interval_s = parse_seconds("--interval", opts.interval, 0.005)
    if budget_s < plan.estimate_s:
        raise UsageError(f"--budget {opts.budget} is shorter than one measured step ({plan.estimate_s:g} s: "
                         f"--warmup {opts.warmup} + --duration {opts.duration})")
    if opts.rate is not None and not (math.isfinite(opts.rate) and 0 < opts.rate <= MAX_RATE_RPS):
        raise UsageError(f"--rate must be a number of requests/s between 0 and {MAX_RATE_RPS:g}, got {opts.rate}")
    if opts.max_p99_ms is not None and not (math.isfinite(opts.max_p99_ms) and opts.max_p99_ms > 0):
        raise UsageError(f"--max-p99-ms must be a positive number of milliseconds, got {opts.max_p99_ms}")
    constraints = Constraints(opts.max_p99_ms, _size("--max-device-memory", opts.max_device_memory),
                              _size("--max-host-memory", opts.max_host_memory))
    try:
        shape = parse_input_shape(opts.input_shape) if opts.input_shape else None
    except ValueError as exc:
        raise UsageError(f"--input-shape: {exc}") from None
    check_out_path(opts.out)
    device = resolve_device(opts.device)
    gpu = device.startswith("cuda")
    if constraints.max_device_bytes is not None and not gpu:
        raise UsageError(f"--max-device-memory cannot be measured on the CPU (--device {opts.device}): "
                         "no configuration would have a device memory figure")
    cores = usable_cores()
    counts = counts or default_predictor_counts(cores, gpu)
    torch_default = torch.get_num_threads()
    threads = threads or default_threads(cores, counts, torch_default)
    space = build_space(counts, threads, torch_default, gpu, env_settings)
    size = opts.model_size or ("large" if gpu else "small")

    # ---- the recording: devices, the model, the folder, samples (as diagnose)
    pid = os.getpid()
    recording = Recording(MODE_TUNE, pid, progress, nvml_opener)
    record = recording.record
    nvml_index = recording.prepare_device(device, None if gpu else f"tuning on the CPU (--device {opts.device})")
    gpu_probe = recording.gpu_probe
    try:
        model = load_model(opts.model, device, shape, opts.dtype, size, opts.trust_model_file)
        validate_model(model)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from None
    out_dir = recording.claim_folder(opts.out)
    recording.config({"device": device, "gpu_index": nvml_index, "model": opts.model, "model_size": size,
                      "predictors": list(counts), "intra_op_threads_searched": list(threads),
                      "torch_default_threads": torch_default, "max_step_s": plan.max_step_s,
                      "warmup_s": plan.warmup_s, "window_s": plan.window_s, "interval_s": interval_s,
                      "budget_s": budget_s, "rate_rps": opts.rate, "max_p99_ms": opts.max_p99_ms,
                      "max_device_memory_bytes": constraints.max_device_bytes,
                      "max_host_memory_bytes": constraints.max_host_bytes,
                      "env_settings": [dict(e) for e in env_settings], "streams": False, "out": out_dir})
    record.model = model.to_json()
    record.environment = environment_facts(device)
    if gpu_probe is not None and gpu_probe.devices:
        record.environment["driver"] = gpu_probe.devices[0].driver

    sampling = recording.sample_workload(device, nvml_index, model.model_bytes, interval_s)
    host_probe, monitor, run_peaks, gaps, sampler = (sampling.host_probe, sampling.monitor, sampling.run_peaks,
                                                     sampling.gaps, sampling.sampler)

    def step_end_tick() -> Any:
        host_probe.request_all()
        return sampler.tick()

    label = {"text": ""}  # the configuration being measured, in place of the sweep's own "[1/1]" label

    def make_hooks() -> SweepHooks:
        return SweepHooks(mark=sampler.mark, tick=step_end_tick, t0_ns=recording.t0_ns,
                          on_progress=lambda text: progress.update(f"{label['text']}: {text.split(': ', 1)[-1]}"),
                          on_line=progress.line)

    stop = threading.Event()
    pools = {False: PredictorPool(model)}
    if gpu:
        pools[True] = PredictorPool(model, streams=True)
    inproc = InProcessMeasurer(pools, monitor, plan, make_hooks, stop, torch.set_num_threads, clock_s)
    child = ChildMeasurer(WorkerSpec(model=opts.model, device=device, input_shape=shape, dtype=opts.dtype, size=size,
                                     trust_model_file=opts.trust_model_file), plan, stop,
                          recording.nvml, nvml_index, clock_s=clock_s)
    search = Search(space, constraints, budget_s, plan.estimate_s, Policy())
    steps: dict[Settings, Any] = {}
    default_group = space.groups[0]
    started_s = clock_s()

    def save() -> None:
        record.steps = sorted((st for s, st in steps.items() if s.group == default_group and st is not None),
                              key=lambda st: st.predictors)
        record.tuning = tuning_block(search, steps, None, budget_s, clock_s() - started_s)
        recording.save_progress()

    recording.save_progress()
    progress.line(f"tuning {len(space.groups)} setting{'s' if len(space.groups) != 1 else ''} x "
                  f"{len(counts)} predictor counts ({len(space.cells())} configurations) within {budget_s:g} s")
    crash: BaseException | None = None
    with Interrupts(stop) as interrupts:
        sampler.start()
        sampler.mark("phase", name="tune")
        try:
            while not stop.is_set():
                settings = search.next(clock_s() - started_s)
                if settings is None:
                    break
                label["text"] = f"[{search.measured_count + 1}] {settings.label()}"
                progress.update(f"{label['text']}: starting")
                measurer = child if settings.group.needs_child else inproc
                measurement, step = measurer.measure(settings)
                steps[settings] = step
                outcome = search.record(measurement)
                progress.line(outcome_line(outcome))
                save()
            if stop.is_set():
                search.interrupt()
        except KeyboardInterrupt:
            interrupts.signum = interrupts.signum or signal.SIGINT
            search.interrupt()
        except BaseException as exc:
            crash = exc
            search.interrupt(f"the search stopped: {type(exc).__name__}: {exc}")
        finally:
            stop.set()
            child.close()
            torch.set_num_threads(torch_default)
            recording.stop_samples()
            for pool in pools.values():
                pool.release_copies()
    progress.finish()
    elapsed_s = clock_s() - started_s
    record.ended_at = now_iso()
    record.extra["worker_pids"] = child.pids
    record.steps = sorted((st for s, st in steps.items() if s.group == default_group and st is not None),
                          key=lambda st: st.predictors)
    _finish_record(record, run_peaks, gaps, gpu_probe, pid, nvml_index, gpu, sampler)
    if crash is not None:
        record.status, record.failure = STATUS_FAILED, f"{type(crash).__name__}: {crash}"
    elif interrupts.exit_code is not None:
        record.status = STATUS_INTERRUPTED
    else:
        record.status = STATUS_COMPLETE
    conclude(record)  # findings and diagnose's own recommendation, from the default settings' sweep
    diagnose_pick = record.recommendation.get("predictors")
    default = default_group.at(diagnose_pick) if isinstance(diagnose_pick, int) else None
    record.tuning = tuning_block(search, steps, default, budget_s, elapsed_s)
    record.recommendation = recommendation(record.tuning, record.recommendation)
    record.findings = verify_remedies(record, cores)
    exit_code = interrupts.exit_code or EXIT_OK
    if record.status == STATUS_COMPLETE:
        unmeasurable = unmeasured_constraints(constraints, search)
        if search.measured_count == 0 or not any(o.measurement and o.measurement.throughput_rps > 0
                                                 for o in search.outcomes.values()):
            progress.error("gpuscope: no configuration completed a request (run.json and the report keep what was seen)")
            exit_code = EXIT_USAGE
        elif unmeasurable:
            progress.error(f"gpuscope: error: {unmeasurable}")
            exit_code = EXIT_USAGE
        elif search.best() is None:
            exit_code = EXIT_FAIL
    recording.close_devices()
    result = recording.finish(exit_code, opts.report, render_run)
    if crash is not None:
        raise crash
    return result


def unmeasured_constraints(constraints: Constraints, search: Search) -> str:
    """A constraint that no measured configuration had a figure for: the verdict would be a guess (exit 2)."""
    measured = [o.measurement for o in search.outcomes.values() if o.measurement is not None
                and not o.measurement.interrupted]
    if not measured:
        return ""
    if constraints.max_device_bytes is not None and all(m.device_bytes is None for m in measured):
        return "--max-device-memory: no configuration could measure the process's device memory (NVML unavailable?)"
    if constraints.max_host_bytes is not None and all(m.host_bytes is None for m in measured):
        return "--max-host-memory: no configuration could measure the process's host memory"
    if constraints.max_p99_ms is not None and all(m.p99_ms is None for m in measured):
        return "--max-p99-ms: no configuration completed a request to measure latency against"
    return ""


def _entry(outcome: Any, steps: dict[Settings, Any]) -> dict[str, Any]:
    data = outcome.to_json()
    data["label"] = outcome.settings.label()
    step = steps.get(outcome.settings)
    if step is not None:
        data["step"] = step.to_json()
    return data


def tuning_block(search: Search, steps: dict[Settings, Any], default: Settings | None, budget_s: float,
                 elapsed_s: float) -> dict[str, Any]:
    """run.json's `tuning`: every configuration of the grid, the best, the default, the budget."""
    configurations = [{**o.to_json(), "label": o.settings.label()} for o in search.configurations()]
    best = search.best()
    default_outcome = search.outcomes.get(default) if default is not None else None
    block: dict[str, Any] = {"configurations": configurations, "best": None, "default": None,
                             "budget_s": budget_s, "elapsed_s": round(elapsed_s, 2),
                             "measured": search.measured_count, "grid_size": len(configurations),
                             "stopped_by": search.stopped_by,
                             "constraints": {"max_p99_ms": search.constraints.max_p99_ms,
                                             "max_device_bytes": search.constraints.max_device_bytes,
                                             "max_host_bytes": search.constraints.max_host_bytes},
                             "ranked": [o.settings.to_json() for o in rank(list(search.outcomes.values()),
                                                                           search.policy.tie_share)]}
    if default_outcome is not None and default_outcome.measurement is not None:
        block["default"] = {**_entry(default_outcome, steps),
                            "reason": "what diagnose alone recommends: torch's default intra-op threads, the "
                                      "smallest predictor count within 5% of its best throughput"}
    if best is not None:
        m = best.measurement
        base = block["default"]
        gain = m.throughput_rps / base["throughput_rps"] if base and base["throughput_rps"] > 0 else None
        reason = f"{m.throughput_rps:.1f} req/s at p99 {format_ms(m.p99_ms)} with {best.settings.label()}" \
            if m.p99_ms is not None else f"{m.throughput_rps:.1f} req/s with {best.settings.label()}"
        if base:
            reason += (f"; the default ({base['label']}) measured {base['throughput_rps']:.1f} req/s "
                       f"({gain_text(m.throughput_rps, base['throughput_rps'])})")
        block["best"] = {**_entry(best, steps), "gain_vs_default": round(gain, 4) if gain else None, "reason": reason}
    else:
        closest = search.closest()
        if closest is not None:
            block["closest"] = {**_entry(closest, steps),
                                "reason": f"no configuration met every constraint; the closest: {closest.reason}"}
    return block


def recommendation(tuning: dict[str, Any], diagnose: dict[str, Any]) -> dict[str, Any]:
    """record.recommendation of a tune run: the best settings, named (diagnose's own pick stays in tuning.default)."""
    best = tuning.get("best")
    if best:
        s = best["settings"]
        return {"predictors": s["predictors"], "intra_op_threads": s["intra_op_threads"], "streams": s["streams"],
                "env": s["env"], "reason": best["reason"], "throughput_rps": best["throughput_rps"],
                "p99_ms": best["latency_ms"].get("p99"), "gain_vs_default": best.get("gain_vs_default"),
                "memory_bytes": best["memory"].get("device_bytes") or best["memory"].get("host_bytes")}
    closest = tuning.get("closest")
    if closest:
        unmet = "max_p99_ms" if "--max-p99-ms" in str(closest.get("reason")) else "constraints"
        return {"predictors": None, "reason": closest["reason"], "unmet": unmet}
    return {"predictors": None, "reason": diagnose.get("reason") or "no configuration was measured"}


# ---------------------------------------------------------------- terminal output

def outcome_line(outcome: Any) -> str:
    m = outcome.measurement
    if m is None:
        return f"  {outcome.settings.label()}: {outcome.status}: {outcome.reason}"
    p99 = f"{format_ms(m.p99_ms) if m.p99_ms is not None else 'n/a':>9}"
    memory = m.device_bytes if m.device_bytes is not None else m.host_bytes
    text = (f"  {m.throughput_rps:8.1f} req/s  p99 {p99}  mem {format_bytes(memory) if memory is not None else 'n/a':>9}"
            f"  {outcome.settings.label()}")
    return text + (f"  [{outcome.status}: {outcome.reason}]" if outcome.status != "measured" else "")


def paste_block(settings: dict[str, Any]) -> str:
    """The best configuration as something to paste into a server."""
    lines = [f"export {k}={v}" for k, v in (settings.get("env") or {}).items()]
    lines.append(f"torch.set_num_threads({settings['intra_op_threads']})")
    lines.append(f"predictors = {settings['predictors']}  # the pool size: threads serving one shared model")
    if settings.get("streams"):
        lines.append("# give each predictor thread its own torch.cuda.Stream()")
    return "\n".join(lines)


def format_tuning(record: RunRecord) -> str:
    """The ranked table, what was skipped and why, and the best as something to paste."""
    tuning = record.tuning or {}
    rows = tuning.get("configurations") or []
    lines = [f"gpuscope tune: {tuning.get('measured', 0)} of {tuning.get('grid_size', len(rows))} configurations "
             f"measured in {tuning.get('elapsed_s', 0):.0f} s (budget {tuning.get('budget_s', 0):g} s); "
             f"status {record.status}"]
    order = {json_key(s): i for i, s in enumerate(tuning.get("ranked") or [])}
    measured = sorted((r for r in rows if json_key(r["settings"]) in order), key=lambda r: order[json_key(r["settings"])])
    if measured:
        lines.append(f"{'rank':>4}  {'req/s':>8}  {'p50 ms':>8}  {'p99 ms':>8}  {'memory':>9}  status      settings")
    for i, r in enumerate(measured, start=1):
        lat = r.get("latency_ms") or {}
        mem = (r.get("memory") or {}).get("device_bytes") or (r.get("memory") or {}).get("host_bytes")
        lines.append(f"{i:>4}  {r['throughput_rps']:8.1f}  {_ms(lat.get('p50'))}  {_ms(lat.get('p99'))}  "
                     f"{format_bytes(mem) if mem else 'n/a':>9}  {r['status']:<10}  {r['label']}")
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        lines.append(f"skipped {len(skipped)}:")
        reasons: dict[str, list[str]] = {}
        for r in skipped:
            reasons.setdefault(r.get("reason", ""), []).append(str(r["settings"]["predictors"]) + "/"
                                                               + str(r["settings"]["intra_op_threads"]))
        for reason, cells in reasons.items():
            lines.append(f"  {reason} ({len(cells)}: predictors/threads {', '.join(cells)})")
    best, default = tuning.get("best"), tuning.get("default")
    if default:
        lines.append(f"default (diagnose alone): {default['label']}: {default['throughput_rps']:.1f} req/s")
    if best:
        lines.append(f"best: {best['reason']}")
        lines.append("paste:\n" + "\n".join("  " + line for line in paste_block(best["settings"]).splitlines()))
    elif tuning.get("closest"):
        lines.append(f"no configuration met every constraint; closest: {tuning['closest']['label']}: "
                     f"{tuning['closest'].get('reason')}")
    for f in record.findings:
        measured_text = (f.evidence or {}).get("remedy_measured") if isinstance(f.evidence, dict) else None
        if measured_text:
            lines.append(f"{f.code}: {measured_text.get('text')}")
    return "\n".join(lines)


def json_key(settings: dict[str, Any]) -> tuple:
    return (settings["predictors"], settings["intra_op_threads"], bool(settings.get("streams")),
            tuple(sorted((settings.get("env") or {}).items())))


def _ms(value: Any) -> str:
    return f"{value:8.1f}" if isinstance(value, (int, float)) else f"{'n/a':>8}"
