"""The terminal summary of a run: the step table, findings, and the recommendation."""
from __future__ import annotations

from typing import Any

from gpuscope.analysis.gate import FAIL, PASS, UNMEASURED, CheckOutcome, _at
from gpuscope.analysis.verdict import PROCESSES, THREADS, _fmt
from gpuscope.measure.snapshot import PsSnapshot
from gpuscope.probes.readings import Unavailable, is_available
from gpuscope.probes.redact import printable, redact_text
from gpuscope.probes.redact import printable as _printable
from gpuscope.probes.units import format_bytes, format_ms
from gpuscope.record.run import RunRecord, sorted_findings

_MARK = {"fail": "FAIL", "warn": "WARN", "info": "info"}


def _mem(value: Any) -> str:
    return format_bytes(value) if is_available(value) else "n/a"


def _p99_text(step: Any) -> str:
    p99 = (step.latency_ms or {}).get("p99")
    return format_ms(p99) if is_available(p99) else "n/a"


def _ms(value: Any) -> str:
    """Milliseconds with digits that matter, n/a when nothing was measured."""
    if not is_available(value):
        return "n/a"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def format_findings(findings: list[Any]) -> list[str]:
    """The findings block of every terminal summary, most severe first. Titles name outside processes,
    so control characters are shown escaped, never obeyed by the terminal."""
    ordered = sorted_findings(findings)
    lines = [f"findings ({len(ordered)}):" if ordered else "findings: none"]
    for finding in ordered:
        lines.append(f"  {_MARK.get(finding.severity, finding.severity):<4} {finding.code}: {printable(finding.title)}")
        if finding.severity != "info" and finding.remedy:
            lines.append(f"       remedy: {printable(finding.remedy)}")
    return lines


def format_summary(record: RunRecord) -> str:
    lines: list[str] = []
    model = record.model
    lines.append(f"gpuscope {record.tool_version}: {redact_text(str(model.get('source', '?')))} "
                 f"({format_bytes(model.get('model_bytes') or 0)} of weights) on {record.config.get('device', '?')}"
                 f"  [{record.status}]")
    if record.device_unavailable and not record.gpu:
        lines.append(f"GPU readings: unavailable ({record.device_unavailable.get('reason')}: "
                     f"{record.device_unavailable.get('detail')})")
    gpu = record.gpu
    open_loop = bool(record.config.get("rate_rps"))
    header = f"{'predictors':>10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
    if open_loop:
        header += f"{'queue p50':>9} {'compute p50':>11} {'dropped':>8} "
    header += f"{'GPU (NVML)':>11} {'torch rsv':>10}" if gpu else f"{'RSS':>10} {'USS':>10}"
    lines += ["", header]
    for step in record.steps:
        lat = step.latency_ms
        served = step.requests > 0
        row = (f"{step.predictors:>10} {step.throughput_rps:>9.1f} {_ms(lat.get('p50')) if served else 'n/a':>8} "
               f"{_ms(lat.get('p99')) if served else 'n/a':>8} {step.errors:>7} ")
        if open_loop:
            queue, compute = step.queue_ms or {}, step.compute_ms or {}
            row += f"{_ms(queue.get('p50')):>9} {_ms(compute.get('p50')):>11} {step.dropped_arrivals:>8} "
        if gpu:
            row += f"{_mem(step.memory.get('process_gpu_bytes')):>11} {_mem(step.memory.get('torch_reserved_bytes')):>10}"
        else:
            row += f"{_mem(step.memory.get('rss_bytes')):>10} {_mem(step.memory.get('uss_bytes')):>10}"
        if step.oom:
            row += "  OOM"
        if step.partial:
            row += "  (cut short: not used for the recommendation)"
        lines.append(row)
    if not record.steps:
        lines.append("  (no step completed)")
    sharing = record.sharing
    if sharing:
        per = sharing.get("bytes_per_extra_predictor")
        lines.append("")
        verdict = ("verified: all predictors ran one copy of the weights" if sharing.get("verified") else
                   "nothing to compare: the predictors ran no weights gpuscope can see" if
                   sharing.get("distinct_weight_sets") == 0 else "NOT verified")
        lines.append(f"sharing: {verdict}"
                     f" ({sharing.get('distinct_weight_sets')} distinct weight set(s)); "
                     f"memory per extra predictor: {_mem(per) if not is_available(per) or per >= 0 else '-' + format_bytes(-per)}")
    lines.append("")
    lines += format_findings(record.findings)
    rec = record.recommendation or {}
    lines.append("")
    if record.extra.get("stopped_by"):
        lines.append(f"the sweep stopped early: {record.extra['stopped_by']}")
    if rec.get("predictors"):
        text = f"recommendation: {rec['predictors']} predictor{'s' if rec['predictors'] != 1 else ''}: {rec.get('reason', '')}"
        if is_available(rec.get("memory_bytes")):
            text += f"; needs {format_bytes(rec['memory_bytes'])}"
        if rec.get("more_would_fit") is not None:
            text += f"; about {rec['more_would_fit']} more would fit in memory"
        lines.append(text)
    else:
        lines.append(f"recommendation: none ({rec.get('reason', 'nothing measured')})")
    return "\n".join(lines)


SUMMARY_SCHEMA = "gpuscope.summary/1"


def summary_json(record: RunRecord) -> dict[str, Any]:
    """A compact machine-readable summary (`--json`): a subset of run.json, labelled as such."""
    data = record.to_json()
    out: dict[str, Any] = {"schema": SUMMARY_SCHEMA, "run_schema": data["schema"]}
    out.update({k: data[k] for k in ("status", "config", "model", "steps", "sharing", "findings",
                                     "recommendation", "devices", "device_unavailable", "extra") if k in data})
    return out


def format_live_summary(record: RunRecord) -> str:
    """The terminal summary of a watch or an in-process profile."""
    from gpuscope.probes.redact import redact_text
    from gpuscope.reports.text import format_findings

    live = record.extra.get("live") or {}
    series = live.get("series") or {}
    target = next((p for p in record.processes if p.get("pid") == record.pid), {})
    name = redact_text(str(target.get("name") or record.model.get("source") or "?"))
    what = "profiled this process" if record.mode == "profile" else f"watched pid {record.pid}"
    lines = [f"gpuscope {record.tool_version}: {what} ({_printable(name)}) for {live.get('duration_s', 0):.1f} s, "
             f"{live.get('ticks', 0)} samples  [{record.status}; ended by {record.config.get('ended_by', '?')}]"]
    if record.device_unavailable and live.get("gpu_index") is None:
        lines.append(f"GPU readings: unavailable ({record.device_unavailable.get('reason')}: "
                     f"{record.device_unavailable.get('detail')})")
    gpu = series.get("process_gpu_bytes")
    if gpu:
        lines.append(f"GPU memory on gpu:{live.get('gpu_index')}: {_mem(gpu.get('first_value'))} -> "
                     f"{_mem(gpu.get('last_value'))} (peak {_mem(gpu.get('peak'))})")
    elif live.get("gpu_index") is None and not record.device_unavailable:
        lines.append("GPU memory: the process did not appear on any GPU")
    rss = series.get("rss_bytes")
    if rss:
        lines.append(f"resident memory (RSS): {_mem(rss.get('first_value'))} -> {_mem(rss.get('last_value'))} "
                     f"(peak {_mem(rss.get('peak'))})")
    others = [p for p in record.processes if not p.get("self") and p.get("gpu") == live.get("gpu_index")
              and live.get("gpu_index") is not None]
    if others:
        lines.append(f"other processes on gpu:{live.get('gpu_index')}: " + ", ".join(
            f"pid {p.get('pid')} {_printable(str(p.get('name', '?')))} ({_mem(p.get('peak_used_bytes'))})"
            for p in others[:5]))
    if record.steps:  # requests marked with gpuscope.request
        levels = ", ".join(f"{s.level}: {s.throughput_rps:.0f} req/s p99 {_p99_text(s)}"
                           + (" (too few)" if s.too_few_requests else "") for s in record.steps)
        lines.append(f"requests: {sum(s.requests for s in record.steps):,} ({sum(s.errors for s in record.steps):,} "
                     f"errors); per level in flight: {levels}")
        lines.append(f"pool size: {(record.recommendation or {}).get('reason', '?')}")
    sharing = record.sharing or {}
    if sharing.get("source") == "threads":
        lines.append(f"model: {_mem(sharing.get('model_bytes'))} of weights; sharing "
                     f"{'verified' if sharing.get('verified') else 'NOT verified'}: {sharing.get('detail')}")
    lines.append("")
    lines += format_findings(record.findings)
    return "\n".join(lines)



def format_comparison(record: RunRecord) -> str:
    comparison = record.extra.get("comparison") or {}
    rows = comparison.get("rows", [])
    model = record.model or {}
    lines = [f"gpuscope compare: {model.get('source', record.config.get('model', '?'))} "
             f"({format_bytes(model.get('model_bytes') or 0)} of weights) on {record.config.get('device', '?')}, "
             f"{record.config.get('max_step_s', 0):g} s per step  [{record.status}]", ""]

    def mem(value: Any) -> str:
        return format_bytes(value) if is_available(value) else "n/a"

    def cell(row: dict[str, Any] | None) -> str:
        if row is None:
            return f"{'-':>8} {'':>8} {'':>8} {'':>10} {'':>10}"
        if row.get("error"):
            return f"{'failed':>8} {'':>8} {'':>8} {'':>10} {'':>10}"
        lat = row.get("latency_ms") or {}
        latency = (f"{lat['p50']:>8.2f} {lat['p99']:>8.2f}" if "p50" in lat and "p99" in lat
                   else f"{'none done':>17}")  # no completed request: no latency, not 0.00 ms
        return (f"{row['throughput_rps']:>8.1f} {latency} "
                f"{mem(row.get('host_uss_bytes')):>10} {mem(row.get('device_bytes')):>10}")

    width = len(cell(None))
    lines.append(f"{'':>4}  {'threads (1 process)':<{width}}  | {'processes (1 predictor each)':<{width}}")
    head = f"{'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'host USS':>10} {'device':>10}"
    lines.append(f"{'N':>4}  {head}  | {head}")
    by = {(r.get("mode"), r.get("predictors")): r for r in rows}
    for n in sorted({r.get("predictors") for r in rows}):
        lines.append(f"{n:>4}  {cell(by.get((THREADS, n)))}  | {cell(by.get((PROCESSES, n)))}")
    per_extra = comparison.get("per_extra_predictor", {})

    def extra(mode: str) -> str:
        e = per_extra.get(mode, {})
        return f"host {_fmt(e.get('host_uss_bytes'))}, device {_fmt(e.get('device_bytes'))}"

    lines.append(f"{'per extra predictor:':<{width + 6}}")
    lines.append(f"{'':>4}  {extra(THREADS):<{width}}  | {extra(PROCESSES)}")
    for row in rows:
        if row.get("error"):
            lines.append(f"{row['mode']} x{row['predictors']} failed: {row['error']}")
    lines += ["", f"verdict: {comparison.get('verdict', 'none')}"]
    for finding in record.findings:
        lines.append(f"  [{finding.severity}] {finding.code}: {finding.title}")
    if record.failure:
        lines.append(f"failure: {record.failure}")
    return "\n".join(lines)


def _na(value: Any, kind: str = "bytes") -> str:
    if not is_available(value):
        return "n/a"
    if kind == "bytes":
        return format_bytes(value)
    return f"{value:.0f}%"


def _engines_text(info: Any) -> str:
    engines = getattr(info, "engines", None)
    if isinstance(engines, tuple):
        return ",".join(engines) if engines else "-"
    if isinstance(engines, Unavailable):
        return {"no_permission": "(no access)", "process_gone": "(not here)"}.get(engines.reason, "n/a")
    return "n/a"


def _clip(text: str, width: int | None) -> str:
    if width is None or len(text) <= width:
        return text
    return text[: max(0, width - 3)] + "..."


def format_table(snapshot: PsSnapshot, width: int | None = None) -> str:
    """The one-screen table. `width` clips command lines to a terminal's width (None: never clip)."""
    from gpuscope.record.run import sorted_findings
    from gpuscope.reports.text import _MARK

    count = len(snapshot.devices)
    lines = [f"gpuscope ps: {count} GPU{'s' if count != 1 else ''}, driver {printable(_text(snapshot.driver))}, "
             f"CUDA {printable(_text(snapshot.cuda_driver))}"]
    for device in snapshot.devices:
        total, used, free = device.total_bytes, device.used_bytes, device.free_bytes
        share = f" ({used / total:.0%})" if is_available(used) and is_available(total) and total else ""
        head = (f"GPU {device.index}  {printable(_text(device.name))}  memory {_na(used)} used{share} of {_na(total)}, "
                f"{_na(free)} free")
        if is_available(device.driver_reserved_bytes):
            head += f" (driver reserve {format_bytes(device.driver_reserved_bytes)})"
        head += f"  util {_na(device.util_pct, 'pct')}  mem util {_na(device.mem_util_pct, 'pct')}"
        lines += ["", head]
        if device.flags:
            lines.append("  ! " + "; ".join(device.flags))
        if not device.processes:
            if device.unlisted_bytes:
                lines.append(f"  no process listed, yet {format_bytes(device.unlisted_bytes)} is in use (see below)")
            elif is_available(device.process_list):
                lines.append("  no processes")
            else:
                missing = device.process_list
                why = f"{missing.reason}: {missing.detail}" if isinstance(missing, Unavailable) and missing.detail \
                    else getattr(missing, "reason", str(missing))
                lines.append(f"  process list unavailable ({printable(why)})")
            continue
        pods = any(isinstance(getattr(q.info, k, None), str) for q in device.processes
                   for k in ("pod_uid", "container_id"))  # pod columns only on a node that has pods
        lines.append(f"  {'PID':>8} {'USER':<10} {'NAME':<20} {'GPU MEM':>10} {'SM':>4}  {'ENGINES':<16} "
                     + (f"{'POD':<36} {'CONTAINER':<12} " if pods else "") + "COMMAND")
        for p in device.processes:
            info = p.info
            user = getattr(info, "user", None)
            user_text = user if isinstance(user, str) else "?"
            cmd = getattr(info, "cmdline", None)
            cmd_text = cmd if isinstance(cmd, str) else (f"({cmd.reason})" if isinstance(cmd, Unavailable) else "?")
            name = getattr(info, "name", "?") or "?"
            engines = _engines_text(info)
            if len(p.engines) >= 2:
                engines += " !"
            row = (f"  {p.pid:>8} {_clip(printable(user_text), 10):<10} {_clip(printable(name), 20):<20} "
                   f"{_na(p.used_bytes):>10} {_na(p.sm_util_pct, 'pct'):>4}  {_clip(engines, 16):<16} ")
            if pods:
                row += f"{_container_text(info, 'pod_uid', 36):<36} {_container_text(info, 'container_id', 12):<12} "
            lines.append(row + _clip(printable(cmd_text), None if width is None else max(20, width - len(row))))
    for note in snapshot.notes:
        lines += ["", "note: " + printable(note)]
    findings = [f for f in sorted_findings(snapshot.findings) if f.severity in ("warn", "fail")]
    if findings:
        lines += ["", f"findings ({len(findings)}):"]
        for finding in findings:
            lines.append(f"  {_MARK.get(finding.severity, finding.severity):<4} {finding.code}: {printable(finding.title)}")
    return "\n".join(lines)


def _container_text(info: Any, key: str, width: int) -> str:
    """A pod uid or a container id (short, as `docker ps` and `crictl ps` show it); '-' in none, '?' unread."""
    value = getattr(info, key, None)
    if isinstance(value, str):
        return printable(value)[:width]
    return "?" if isinstance(value, Unavailable) else "-"


def _text(value: Any) -> str:
    return str(value) if not isinstance(value, Unavailable) else "n/a"


_STATUS_LABEL = {PASS: "PASS", FAIL: "FAIL", UNMEASURED: "UNMEASURED"}


def format_lines(outcome: CheckOutcome, exit_code: int | None = None) -> list[str]:
    """One line per result, then a summary line, e.g.

    `PASS  max-p99-ms        p99 12.3 ms <= 25 ms (at 2 predictors)`
    `UNMEASURED  max-device-memory  not measured: no GPU was measured (no_device: ...)`

    `exit_code`: the code the process really exits with, when something after the evaluation
    (an output that could not be written) changed it; the summary line states it.
    """
    if not outcome.results:
        return ["check: no limits to evaluate"]
    status_w = max(len(_STATUS_LABEL[r.status]) for r in outcome.results) + 2
    label_w = max(18, max(len(r.label) for r in outcome.results) + 2)
    lines = [f"{_STATUS_LABEL[r.status]:<{status_w}}{r.label:<{label_w}}{r.message}" for r in outcome.results]
    lines.extend(f"note: {note}" for note in outcome.notes)
    lines.append(summary_line(outcome, exit_code))
    # Finding titles carry outside text (process names): a newline could forge a result line in a CI log,
    # an escape sequence recolour it, a name that is not UTF-8 (lone surrogates) crash the print.
    return [printable(line) for line in lines]


def summary_line(outcome: CheckOutcome, exit_code: int | None = None) -> str:
    c = outcome.counts()
    word = {PASS: "passed", FAIL: "FAILED", UNMEASURED: "could not measure every limit"}[outcome.status]
    where = _at(outcome.at_predictors).strip()
    if where and outcome.at_predictors_source in ("recommended", "smallest measured"):
        where = where[:-1] + f", {outcome.at_predictors_source})"
    return (f"check {word}: {c['passed']} passed, {c['failed']} failed, {c['unmeasured']} unmeasured"
            f"{' ' + where if where else ''} -> exit {outcome.exit_code if exit_code is None else exit_code}")
