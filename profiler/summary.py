"""The terminal summary of a run: the step table, findings, and the recommendation."""
from __future__ import annotations

from typing import Any

from probes.readings import is_available
from probes.redact import printable, redact_text
from probes.units import format_bytes
from profiler.run import RunRecord, sorted_findings

_MARK = {"fail": "FAIL", "warn": "WARN", "info": "info"}


def _mem(value: Any) -> str:
    return format_bytes(value) if is_available(value) else "n/a"


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
