"""report.html: one self-contained file, readable without scripts or network.

- Images are embedded as data URIs; CSS is inline and pinned by its hash in a
  strict Content-Security-Policy meta tag (no script, no remote anything).
- Every string from the outside world (model path, process names, command
  lines, environment values, finding evidence) is escaped here, and command
  lines and free text go through probes.redact again at render time, even
  though the probes redacted them already (defence in depth).
- Unavailable readings read "unavailable (reason)", never 0; a non-finite number (Infinity or
  NaN in a damaged run.json) reads "n/a".
- The sections follow the run's mode: a diagnose sweep has its plots and steps table; a watch
  or in-process profile its memory over time (no sweep, so no throughput plot or steps); a
  compare its threads-versus-processes section.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable

from gpuscope.probes.readings import is_available
from gpuscope.probes.redact import REDACTED, is_secret_name, redact_argv, redact_cmdline, redact_text
from gpuscope.probes.units import format_bytes
from gpuscope.record.catalogue import LIVE_MODES, SEVERITY_ORDER
from gpuscope.record.layers import CPU_LAYERS, GPU_LAYERS, LAYER_LABELS
from gpuscope.record.run import sorted_findings
from gpuscope.reports.html_format import (
    _count,
    _figure,
    _has_steps_section,
    _inline_code,
    _millis,
    _na,
    _rate,
    csp,
    e,
    esc,
    fmt,
)
from gpuscope.reports.html_machine import _configuration, _environment, _processes
from gpuscope.reports.html_predictor import _has_predictor_section, _predictor
from gpuscope.reports.plotdata import (  # imported lazily
    capacity_bytes,
    finite,
    is_live,
    predictors,
    step_layers,
)
from gpuscope.reports.plots import LAYER_COLORS
from gpuscope.reports.tuning_section import tuning_section

if TYPE_CHECKING:  # pragma: no cover
    from gpuscope.record.run import RunRecord, Step
    from gpuscope.reports.plots import Plot


_CSS = """
:root { color-scheme: light; --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --bg-soft: #f6f8fa;
  --fail: #b00020; --warn: #9a4a00; --info: #3b5b7a; --ok: #1a7f37; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.45;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 28px 48px; }
header.top { border-bottom: 1px solid var(--line); padding-bottom: 10px; margin-bottom: 18px; }
header.top h1 { font-size: 22px; margin: 0 0 4px; }
.sub { color: var(--muted); margin: 0; overflow-wrap: anywhere; }
h2 { font-size: 19px; margin: 30px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 18px 0 8px; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
  font-size: 0.9em; }
code { background: var(--bg-soft); padding: 0 3px; border-radius: 3px; overflow-wrap: anywhere; }
nav.toc { font-size: 14px; color: var(--muted); margin: 6px 0 0; }
nav.toc a { color: inherit; margin-right: 12px; }
.verdict { border: 1px solid var(--line); border-left: 8px solid var(--ok); border-radius: 6px;
  padding: 14px 18px; background: var(--bg-soft); }
.verdict.v-fail { border-left-color: var(--fail); }
.verdict.v-warn { border-left-color: var(--warn); }
.verdict .headline { font-size: 20px; font-weight: 650; margin: 0 0 6px; }
.verdict p { margin: 4px 0; }
.kpis { display: flex; flex-wrap: wrap; gap: 10px 26px; margin: 10px 0 2px; padding: 0; list-style: none; }
.kpis li { min-width: 140px; }
.kpis .k { display: block; font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .03em; }
.kpis .v { font-size: 18px; font-weight: 600; }
.badge { display: inline-block; font-size: 12px; font-weight: 700; letter-spacing: .04em; padding: 1px 8px;
  border-radius: 10px; color: #fff; background: var(--info); vertical-align: 2px; text-transform: uppercase; }
.b-fail { background: var(--fail); } .b-warn { background: var(--warn); } .b-info { background: var(--info); }
.b-ok, .b-pass { background: var(--ok); } .b-skip, .b-unmeasured, .b-error { background: #6e7781; }
.banner { border: 1px solid #e3b341; background: #fff8c5; padding: 8px 12px; border-radius: 6px; margin: 10px 0; }
.notes { color: var(--muted); font-size: 14px; }
.finding { border: 1px solid var(--line); border-left: 6px solid var(--info); border-radius: 6px;
  padding: 10px 14px; margin: 10px 0; break-inside: avoid; }
.finding.sev-fail { border-left-color: var(--fail); }
.finding.sev-warn { border-left-color: var(--warn); }
.finding h3 { margin: 0 0 4px; font-size: 16px; overflow-wrap: anywhere; }
.finding .code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; color: var(--muted); }
.finding .remedy { margin: 8px 0 2px; }
dl.ev { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 6px 0; font-size: 14px; }
dl.ev dt { color: var(--muted); }
dl.ev dd { margin: 0; overflow-wrap: anywhere; }
figure { margin: 16px 0 22px; break-inside: avoid; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { font-size: 14px; color: var(--muted); margin-top: 4px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 14px; margin: 6px 0 12px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--bg-soft); font-weight: 600; }
table.steps th { font-size: 13px; vertical-align: bottom; }
table.steps td, table.steps th { padding: 4px 7px; }
.envs { display: block; margin-top: 3px; font-size: 12px; }
.envs code { overflow-wrap: anywhere; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
tr.rec td { background: #fff5d6; }
td.cmd { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; overflow-wrap: anywhere;
  min-width: 260px; max-width: 560px; }
.sw { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 6px; vertical-align: -1px;
  border: 1px solid rgba(0,0,0,.15); }
.na { color: #8a1c1c; }
.muted { color: var(--muted); }
footer { margin-top: 36px; font-size: 13px; color: var(--muted); border-top: 1px solid var(--line); padding-top: 8px; }
@media (max-width: 760px) { main { padding: 12px; } .kpis li { min-width: 120px; } }
@media print {
  @page { margin: 12mm; }
  body { font-size: 10.5pt; }
  main { max-width: none; padding: 0; }
  nav.toc { display: none; }
  h2 { break-after: avoid; }
  .verdict, .finding, figure, tr { break-inside: avoid; }
  .scroll { overflow: visible; }
  figure img { max-width: 100%; border: none; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
""" + "".join(f".sw-{key} {{ background: {color}; }}\n" for key, color in LAYER_COLORS.items())


def _no_recommendation(record: "RunRecord") -> bool:
    """A sweep that measured steps but could recommend no count (none met its p99 limit, every count
    failed requests, none completed a request): whatever the findings say, the run is not healthy."""
    rec = (record.recommendation or {}).get("predictors")
    return record.mode == "diagnose" and bool(record.steps) and not (isinstance(rec, int) and not isinstance(rec, bool))


def _worst(record: "RunRecord") -> str:
    severities = [f.severity for f in record.findings]
    if "fail" in severities or (record.check or {}).get("exit_code") == 1 or record.status == "failed":
        return "fail"
    if "warn" in severities or record.status != "complete" or _no_recommendation(record):
        return "warn"
    return "ok"


def _device_label(record: "RunRecord") -> str:
    device = str(record.config.get("device", "cpu"))
    if record.gpu:
        d = record.device_entry()
        if is_available(d.get("total_bytes")):
            return f"{device} ({fmt(d.get('name'))}, {format_bytes(d['total_bytes'])})"
        return device
    return "CPU"


def _peak_memory(record: "RunRecord", step: "Step") -> tuple[str, Any]:
    memory = step.memory or {}
    if record.gpu:
        return "device memory (this process)", memory.get("process_gpu_bytes")
    return "resident memory (RSS)", memory.get("rss_bytes")


def _verdict(record: "RunRecord") -> str:
    worst = _worst(record)
    rec = (record.recommendation or {}).get("predictors")
    reason = (record.recommendation or {}).get("reason", "")
    counts = {s: sum(1 for f in record.findings if f.severity == s) for s in ("fail", "warn", "info")}
    parts = [f'<section id="verdict" class="verdict v-{worst}">']
    if record.status == "failed":
        headline = "The run failed"
    elif record.mode == "compare" and (record.extra or {}).get("comparison"):
        verdict = str(record.extra["comparison"].get("verdict") or "")
        headline = "Threads versus processes" + (f": {verdict}" if verdict else "")
    elif record.mode in LIVE_MODES and not record.steps:
        watched = "a running process" if record.mode == "watch" else "this process, in place"
        headline = f"Observed {watched}" + (f" (pid {record.pid})" if record.pid else "")
    elif not record.steps:
        headline = ("No predictor count was measured: the run was interrupted"
                    if record.status == "interrupted" else "No predictor count was measured")
    elif isinstance(rec, int) and not isinstance(rec, bool):
        headline = f"Run {rec} predictor{'s' if rec != 1 else ''}"
    else:
        headline = "No recommendation could be made"
    badge = {"fail": "problems found", "warn": "warnings", "ok": "healthy"}[worst]
    if worst == "warn" and _no_recommendation(record) and record.status == "complete" \
            and not any(f.severity == "warn" for f in record.findings):
        badge = "no recommendation"
    parts.append(f'<p class="headline"><span class="badge b-{worst}">{esc(badge)}</span> {esc(headline)}</p>')
    if reason:
        parts.append(f"<p>{_inline_code(redact_text(str(reason)))}</p>")
    if record.failure:
        parts.append(f'<p class="na">{esc(redact_text(str(record.failure)))}</p>')
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no findings"
    parts.append(f"<p>Findings: {esc(summary)}. Model <code>{e(record.model.get('source') or record.config.get('model'))}"
                 f"</code> on {esc(_device_label(record))}.</p>")
    step = record.step_at(rec) if isinstance(rec, int) else None
    if step is not None:
        label, peak = _peak_memory(record, step)
        kpis = [("throughput", fmt(step.throughput_rps, "throughput_rps")),
                ("p50 latency", fmt((step.latency_ms or {}).get("p50"), "p50")),
                ("p99 latency", fmt((step.latency_ms or {}).get("p99"), "p99")),
                (f"peak {label}", fmt(peak, "peak_bytes"))]
        if record.gpu and finite(peak):
            cap = capacity_bytes(record)
            if cap:
                kpis.append(("share of the device", f"{peak / cap:.0%} of {format_bytes(cap)}"))
        parts.append('<ul class="kpis">' + "".join(
            f'<li><span class="k">{esc(k)}</span><span class="v">{esc(v)}</span></li>' for k, v in kpis) + "</ul>")
        parts.append(f'<p class="muted">Figures at {esc(predictors(rec))}.</p>')
    check = record.check
    if isinstance(check, dict) and "exit_code" in check:
        outcome = {0: "passed", 1: "failed", 2: "could not measure"}.get(check.get("exit_code"), "unknown")
        parts.append(f'<p>Check: <strong>{esc(outcome)}</strong> (exit code {e(check.get("exit_code"))}); '
                     f'see <a href="#check">the check</a>.</p>')
    parts.append("</section>")
    return "\n".join(parts)


def _banner(record: "RunRecord", notes: Iterable[str]) -> str:
    out = []
    if record.status == "interrupted":
        out.append('<p class="banner"><strong>Interrupted run.</strong> This report shows what was measured '
                   "before the run stopped; later predictor counts are missing.</p>")
    elif record.status == "running":
        out.append('<p class="banner"><strong>This run never finished</strong> (the process was killed or crashed '
                   "before it could write its final record). The report shows the steps completed and the samples "
                   "written up to the last interval.</p>")
    elif record.status not in ("complete", "failed"):
        out.append(f'<p class="banner">Run status: <strong>{e(record.status)}</strong>.</p>')
    for note in notes:
        out.append(f'<p class="banner">{esc(redact_text(note))}</p>')
    return "\n".join(out)


def _check(record: "RunRecord") -> str:
    check = record.check
    if not isinstance(check, dict):
        return ""
    rows = []
    for result in check.get("results") or []:
        if not isinstance(result, dict):
            continue
        status = str(result.get("status", ""))
        css = re.sub(r"[^a-z]", "", status.lower()) or "info"
        name = str(result.get("name", ""))
        unit_key = "_bytes" if "memory" in name else ("_ms" if name.endswith("-ms") or "_ms" in name else "")
        rows.append(f'<tr><td>{e(name)}</td><td><span class="badge b-{esc(css)}">{esc(status)}</span></td>'
                    f'<td class="num">{_na(result.get("measured"), unit_key)}</td>'
                    f'<td class="num">{_na(result.get("limit"), unit_key)}</td>'
                    f"<td>{_inline_code(fmt(result.get('message', '')))}</td></tr>")
    exit_code = check.get("exit_code")
    outcome = {0: "passed", 1: "failed", 2: "could not measure"}.get(exit_code, "unknown")
    at = check.get("at_predictors")
    source = check.get("at_predictors_source")
    where = (f" Step limits at {e(at)} predictor{'' if at == 1 else 's'}" + (f" ({esc(source)})" if source else "") + "."
             if isinstance(at, int) and not isinstance(at, bool) else "")
    notes = "".join(f"<p>Note: {esc(redact_text(str(note)))}</p>" for note in check.get("notes") or [])
    return (f'<section id="check"><h2>Check</h2><p>Outcome: <strong>{esc(outcome)}</strong> '
            f"(exit code {e(exit_code)}).{where}</p>{notes}"
            '<div class="scroll"><table><thead><tr><th>rule</th><th>status</th><th class="num">measured</th>'
            '<th class="num">limit</th><th>message</th></tr></thead><tbody>' + "".join(rows) +
            "</tbody></table></div></section>")


def _redacted_evidence(value: Any, key: str = "") -> Any:
    """Evidence with the outside text in it redacted again at render time, at any depth (FOREIGN_PROCESS lists
    the processes with their command lines): a command line's secret flags and any text under a secret name.
    A run.json from an older gpuscope, or edited by hand, may hold them unredacted."""
    if isinstance(value, dict):
        return {k: _redacted_evidence(v, str(k)) for k, v in value.items()}
    if key == "cmdline" and isinstance(value, list):  # argv as a list: a flag and its value are two items
        return redact_argv([str(v) for v in value])  # item by item: a secret with a space stays whole
    if isinstance(value, list):
        return [_redacted_evidence(v, key) for v in value]
    if isinstance(value, str):
        if is_secret_name(key):
            return REDACTED
        if key == "cmdline":
            return redact_cmdline(value)
    return value


def _evidence(evidence: Any) -> str:
    if not isinstance(evidence, dict) or not evidence:
        return ""
    items = []
    for key, value in evidence.items():
        text = fmt(_redacted_evidence(value, str(key)), str(key))
        if is_secret_name(str(key)) and not isinstance(value, (int, float)):
            text = REDACTED
        items.append(f"<dt>{esc(key)}</dt><dd>{esc(text)}</dd>")
    return '<dl class="ev">' + "".join(items) + "</dl>"


def _live_ticks(record: "RunRecord") -> int | None:
    """How many samples a watch or profile took; None when the record does not say."""
    extra = record.extra if isinstance(record.extra, dict) else {}
    for source in (extra.get("live"), record.sampler):
        ticks = source.get("ticks") if isinstance(source, dict) else None
        if isinstance(ticks, int) and not isinstance(ticks, bool):
            return ticks
    return None


def _comparison_rows(record: "RunRecord") -> list[dict[str, Any]]:
    comp = record.extra.get("comparison") if isinstance(record.extra, dict) else None
    rows = comp.get("rows") if isinstance(comp, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _measured_nothing(record: "RunRecord") -> bool:
    """True when the run measured nothing at all (so no findings means nothing), by mode."""
    if record.mode == "compare":
        return not _comparison_rows(record)
    if is_live(record):
        return _live_ticks(record) == 0
    return not record.steps


def _extent(record: "RunRecord") -> str:
    """What the run measured, for the header: `4 steps`, `31 samples over 6.0 s`, `threads and processes at 1, 2
    predictors`."""
    if record.mode == "compare":
        counts = sorted({r.get("predictors") for r in _comparison_rows(record) if isinstance(r.get("predictors"), int)})
        if not counts:
            return "nothing compared"
        return f"threads and processes at {', '.join(map(str, counts))} predictor{'s' if counts != [1] else ''}"
    if is_live(record):
        ticks = _live_ticks(record)
        live = record.extra.get("live") if isinstance(record.extra, dict) else None
        duration = live.get("duration_s") if isinstance(live, dict) else None
        if ticks is None:
            return "no predictor sweep"
        text = f"{ticks:,} sample{'s' if ticks != 1 else ''}"
        return text + (f" over {fmt(duration, 'duration_s')}" if finite(duration) and ticks else "")
    n = len(record.steps)
    return f"{n} step{'s' if n != 1 else ''}"


def _remedy(value: Any) -> str:
    """The remedy text, "" when there is none (a null remedy read back from run.json becomes "None")."""
    if not isinstance(value, str) or value.strip() in ("", "None", "null"):
        return ""
    return value


def _findings(record: "RunRecord") -> str:
    findings = sorted_findings(list(record.findings))
    if not findings:
        if _measured_nothing(record):
            body = "<p>No findings (nothing was measured).</p>"
        elif record.status != "complete":
            body = "<p>No findings in what was measured before the run stopped.</p>"
        else:
            body = "<p>No findings: nothing in this run needs attention.</p>"
        return f'<section id="findings"><h2>Findings</h2>{body}</section>'
    parts = ['<section id="findings"><h2>Findings <span class="muted">(most severe first)</span></h2>']
    for f in findings:
        sev = f.severity if f.severity in SEVERITY_ORDER else "info"
        at = f.at_predictors if isinstance(f.at_predictors, int) else fmt(f.at_predictors)
        where = f" at {esc(predictors(at))}" if f.at_predictors is not None else ""
        remedy = _remedy(f.remedy)
        parts.append(
            f'<article class="finding sev-{sev}"><h3><span class="badge b-{sev}">{esc(sev)}</span> '
            f"{_inline_code(redact_text(f.title))}</h3>"
            f'<div class="code">{esc(f.code)}{where}</div>'
            f"{_evidence(f.evidence)}"
            + (f'<p class="remedy"><strong>Remedy:</strong> {_inline_code(redact_text(remedy))}</p>'
               if remedy else "")
            + "</article>")
    parts.append("</section>")
    return "\n".join(parts)


def _layers_table(record: "RunRecord") -> str:
    if not record.steps:
        return ""
    keys = [k for k, _ in (GPU_LAYERS if record.gpu else CPU_LAYERS)]
    per_step = [step_layers(record, s) for s in record.steps]
    keys = [k for k in keys if any(k in layers for layers in per_step)]
    if not keys:
        return ""
    head = "".join(f'<th class="num">{e(s.predictors)}</th>' for s in record.steps)
    rows = []
    for key in keys:
        cells = "".join(f'<td class="num">{e(layers[key], key) if key in layers else "&mdash;"}</td>'
                        for layers in per_step)
        rows.append(f'<tr><td><span class="sw sw-{key}"></span>{esc(LAYER_LABELS.get(key, key))}</td>{cells}</tr>')
    totals = "".join(f'<td class="num"><strong>{e(sum(layers.values()), "_bytes") if layers else "&mdash;"}'
                     f"</strong></td>" for layers in per_step)
    rows.append(f"<tr><td><strong>total</strong></td>{totals}</tr>")
    return ('<div class="scroll"><table><thead><tr><th>layer at each step\'s peak \u2193 / predictors \u2192</th>'
            + head + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


def _comparison(record: "RunRecord", plots: list["Plot"]) -> str:
    """`gpuscope compare`: threads versus processes per N (record.extra["comparison"]), with compare.png."""
    comp = record.extra.get("comparison") if isinstance(record.extra, dict) else None
    if not isinstance(comp, dict) or not comp.get("rows"):
        return ""
    cols = [("throughput_rps", "req/s"), ("p50", "p50 (ms)"), ("p99", "p99 (ms)"), ("host_uss_bytes", "host USS"),
            ("host_pss_bytes", "host PSS"), ("device_bytes", "device")]
    rows = {(r.get("mode"), r.get("predictors")): r for r in comp["rows"] if isinstance(r, dict)}

    def cells(row: Any) -> str:
        if not isinstance(row, dict):
            return "".join("<td>&mdash;</td>" for _ in cols)
        if row.get("error"):
            return f'<td colspan="{len(cols)}" class="na">failed: {esc(redact_text(str(row["error"])))}</td>'
        lat = row.get("latency_ms") or {}
        return "".join(f'<td class="num">{_millis(lat.get(k)) if k in ("p50", "p99") else (_rate(row.get(k)) if k.endswith("_rps") else _na(row.get(k), k))}</td>'
                       for k, _l in cols)

    modes = (("threads", "N threads, 1 process"), ("processes", "N processes, 1 predictor each"))
    head = ('<tr><th rowspan="2" class="num">N</th>' + "".join(f'<th colspan="{len(cols)}">{esc(t)}</th>' for _m, t in modes)
            + "</tr><tr>" + "".join(f'<th class="num">{esc(label)}</th>' for _m in modes for _k, label in cols) + "</tr>")
    counts = sorted({n for _m, n in rows if isinstance(n, int)})
    body = [f'<tr><td class="num">{e(n)}</td>' + "".join(cells(rows.get((m, n))) for m, _t in modes) + "</tr>" for n in counts]
    extra = comp.get("per_extra_predictor") or {}
    body.append('<tr><td>per extra predictor</td>' + "".join(
        f'<td colspan="{len(cols)}">host USS {_na((extra.get(m) or {}).get("host_uss_bytes"), "_bytes")}, '
        f'device {_na((extra.get(m) or {}).get("device_bytes"), "_bytes")}</td>' for m, _t in modes) + "</tr>")
    parts = ['<section id="comparison"><h2>Threads versus processes</h2>',
             f"<p><strong>{esc(redact_text(str(comp.get('verdict') or '')))}</strong></p>",
             '<div class="scroll"><table><thead>' + head + "</thead><tbody>" + "".join(body) + "</tbody></table></div>",
             f'<p class="muted">Host memory: {esc(comp.get("host_memory", ""))}. Device memory: '
             f'{esc(comp.get("device_memory", ""))}.</p>']
    plot = next((p for p in plots if p.name == "compare.png"), None)
    if plot is None:
        try:  # the same figure as compare.png, drawn from run.json (also when re-rendered by `gpuscope report`)
            from gpuscope.reports.compare_plot import compare_png
            from gpuscope.reports.plots import Plot

            plot = Plot("compare.png", compare_png(comp), str(comp.get("verdict") or "threads versus processes"))
        except Exception:
            plot = None
    if plot is not None:
        parts.append(_figure(plot, "Host memory, device memory when measured, and throughput against N for both modes",
                             "plot-comparison"))
    parts.append("</section>")
    return "\n".join(parts)


def _live_plots(record: "RunRecord", by_name: dict[str, "Plot"]) -> str:
    """A watch or in-process profile: the memory over time, then the breakdown at its peak and at the end."""
    parts = ['<section id="plots"><h2>Memory over time</h2>']
    if "memory_timeline.png" in by_name:
        parts.append(_figure(by_name["memory_timeline.png"],
                             "The process's memory, decomposed into the same layers at every sample; dashed lines "
                             "mark when findings happened.", "plot-timeline"))
    if "throughput_latency.png" in by_name:
        parts.append("<h3>Throughput and latency per level of requests in flight</h3>")
        parts.append(_figure(by_name["throughput_latency.png"],
                             "Measured on the server's own requests (gpuscope.request), grouped by the most requests "
                             "in flight while each ran; throughput is requests in flight / mean latency (what a pool "
                             "of that size sustains). The gold band is the recommended pool size; a level with too "
                             "few requests is shown but not used.", "plot-throughput"))
        parts.append(_observed_table(record))
    if "memory_breakdown.png" in by_name:
        parts.append("<h3>At the peak and at the end</h3>")
        parts.append(_figure(by_name["memory_breakdown.png"],
                             "The layers at the sample where the process's memory peaked and at the last sample"
                             + ("; the dashed line, when it fits the scale, is the device's capacity."
                                if record.gpu else "."), "plot-breakdown"))
    parts.append("</section>")
    return "\n".join(parts)


def _observed_table(record: "RunRecord") -> str:
    """The observed levels: requests, errors, throughput, latency, stages, threads."""
    rec = (record.recommendation or {}).get("predictors")
    names = [n for n in ("preprocess", "model", "postprocess")
             if any(n in (s.stages_ms or {}) for s in record.steps)]
    names += sorted({n for s in record.steps for n in (s.stages_ms or {})} - set(names))
    head = ("<tr><th>in flight</th><th class=\"num\">requests</th><th class=\"num\">errors</th>"
            "<th class=\"num\">throughput (requests/s)</th><th class=\"num\">p50 (ms)</th><th class=\"num\">p99 (ms)</th>"
            + "".join(f'<th class="num">{esc(n)} p50 (ms)</th>' for n in names)
            + "<th class=\"num\">threads</th><th>notes</th></tr>")
    rows = []
    for s in record.steps:
        lat = s.latency_ms or {}
        star = " \u2605" if s.predictors == rec else ""
        notes = ["too few requests: not used"] if s.too_few_requests else []
        if s.error_messages:
            notes.append(redact_text("; ".join(str(m) for m in s.error_messages[:3])))
        rows.append(f"<tr><td>{esc(s.level or s.predictors)}{star}</td><td class=\"num\">{_count(s.requests)}</td>"
                    f'<td class="num">{_count(s.errors)}</td><td class="num">{_rate(s.throughput_rps)}</td>'
                    f'<td class="num">{_millis(lat.get("p50"))}</td><td class="num">{_millis(lat.get("p99"))}</td>'
                    + "".join(f'<td class="num">{_millis(((s.stages_ms or {}).get(n) or {}).get("p50"))}</td>'
                              for n in names)
                    + f'<td class="num">{_count(s.threads)}</td><td>{esc("; ".join(notes))}</td></tr>')
    return ('<div class="scroll"><table class="steps observed"><thead>' + head + "</thead><tbody>" + "".join(rows)
            + "</tbody></table></div>")


def _has_plots_section(record: "RunRecord") -> bool:
    return record.mode != "compare"  # a compare shows compare.png in its own section


def _plots(record: "RunRecord", plots: list["Plot"]) -> str:
    by_name = {p.name: p for p in plots}
    if not _has_plots_section(record):
        return ""
    if is_live(record):
        return _live_plots(record, by_name)
    parts = ['<section id="plots"><h2>Memory and throughput</h2>']
    if "memory_breakdown.png" in by_name:
        parts.append("<h3>Memory decomposition per predictor count</h3>")
        first = ("Stacked layers at the tick where this process's memory peaked in each step; " if record.steps
                 else "No step completed: the bars are the peak and the last reading in the samples; ")
        parts.append(_figure(by_name["memory_breakdown.png"], first
                             + ("the dashed line, when it fits the scale, is the device's capacity." if record.gpu
                                else "diamonds, when shown, mark USS (memory private to the process)."),
                             "plot-breakdown"))
        parts.append(_layers_table(record))
    if "memory_timeline.png" in by_name:
        parts.append("<h3>Memory over time</h3>")
        parts.append(_figure(by_name["memory_timeline.png"],
                             "The same layers at every tick; the grey bands at the top are the sweep's steps "
                             "(n = predictors), dashed lines mark when findings happened.", "plot-timeline"))
    if "throughput_latency.png" in by_name:
        parts.append("<h3>Throughput and latency per predictor count</h3>")
        parts.append(_figure(by_name["throughput_latency.png"],
                             "Throughput (left axis) and p50/p99 latency (right axis); the gold band is the "
                             "recommended count.", "plot-throughput"))
    parts.append("</section>")
    return "\n".join(parts)


def _steps(record: "RunRecord") -> str:
    if not _has_steps_section(record):
        return ""
    if not record.steps:
        return '<section id="steps"><h2>Steps</h2><p>No step completed.</p></section>'
    rec = (record.recommendation or {}).get("predictors")
    if record.gpu:
        mem_cols = [("process_gpu_bytes", "this process (GPU)"), ("torch_reserved_bytes", "torch reserved"),
                    ("torch_allocated_bytes", "torch allocated"), ("device_used_bytes", "device used"),
                    ("other_processes_bytes", "other processes")]
    else:
        mem_cols = [("rss_bytes", "RSS"), ("uss_bytes", "USS"), ("model_bytes", "model")]
    # open loop (--rate): what was offered, how much of the latency was queueing, what the backlog dropped
    open_loop = any(s.offered_rps for s in record.steps)
    head = ("<tr><th class=\"num\">predictors</th><th class=\"num\">requests</th><th class=\"num\">errors</th>"
            + ("<th class=\"num\">offered (requests/s)</th>" if open_loop else "")
            + "<th class=\"num\">throughput (requests/s)</th><th class=\"num\">p50 (ms)</th>"
            "<th class=\"num\">p90 (ms)</th><th class=\"num\">p99 (ms)</th><th class=\"num\">max (ms)</th>"
            + ("<th class=\"num\">queue p50 (ms)</th><th class=\"num\">compute p50 (ms)</th>"
               "<th class=\"num\">dropped arrivals</th>" if open_loop else "")
            + "".join(f'<th class="num">{esc(label)} peak</th>' for _k, label in mem_cols)
            + "<th class=\"num\">CPU (mean)</th><th>stable</th><th>notes</th></tr>")
    rows = []
    for s in record.steps:
        lat = s.latency_ms or {}
        notes = []
        if s.oom:
            notes.append("out of memory")
        if s.distinct_weight_sets != 1:
            notes.append(f"{s.distinct_weight_sets} weight sets")
        if s.dead_predictors:
            notes.append(f"{predictors(s.dead_predictors)} died")
        if s.grad_enabled_in_workers:
            notes.append("autograd on in workers")
        if s.error_messages:
            notes.append(redact_text("; ".join(str(m) for m in s.error_messages[:3])))
        errors = _count(s.errors) + (f" ({s.error_rate:.1%})" if s.errors else "")
        cls = ' class="rec"' if s.predictors == rec else ""
        star = " \u2605" if s.predictors == rec else ""
        rows.append(
            f"<tr{cls}><td class=\"num\">{e(s.predictors)}{star}</td>"
            f'<td class="num">{_count(s.requests)}</td><td class="num">{esc(errors)}</td>'
            + (f'<td class="num">{_rate(s.offered_rps) if s.offered_rps else "&mdash;"}</td>' if open_loop else "")
            + f'<td class="num">{_rate(s.throughput_rps)}</td>'
            + "".join(f'<td class="num">{_millis(lat.get(p))}</td>' for p in ("p50", "p90", "p99", "max"))
            + (f'<td class="num">{_millis((s.queue_ms or {}).get("p50"))}</td>'
               f'<td class="num">{_millis((s.compute_ms or {}).get("p50"))}</td>'
               f'<td class="num">{_count(s.dropped_arrivals)}</td>' if open_loop else "")
            + "".join(f'<td class="num">{_na((s.memory or {}).get(k), k)}</td>' for k, _l in mem_cols)
            + f'<td class="num">{_na(s.cpu_util_pct, "cpu_util_pct")}</td>'
            f"<td>{'yes' if s.stable else 'no'}</td><td>{esc('; '.join(notes))}</td></tr>")
    legend = '<p class="muted">\u2605 recommended predictor count.</p>' if isinstance(rec, int) else ""
    return ('<section id="steps"><h2>Steps</h2><div class="scroll"><table class="steps"><thead>' + head + "</thead><tbody>"
            + "".join(rows) + "</tbody></table></div>" + legend + "</section>")


def render_html(record: "RunRecord", plots: list["Plot"], notes: Iterable[str] = (),
                generated_at: str | None = None) -> str:
    """The whole report as one HTML string."""
    generated_at = generated_at or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    model = record.model.get("source") or record.config.get("model") or "model"
    title = f"gpuscope report: {fmt(model)} on {_device_label(record)}"
    toc = [("verdict", "Verdict"), ("check", "Check") if record.check else None, ("findings", "Findings"),
           ("comparison", "Threads vs processes") if (record.extra or {}).get("comparison") else None,
           ("tuning", "Tuning") if record.tuning else None,
           ("plots", "Plots") if _has_plots_section(record) else None,
           ("steps", "Steps") if _has_steps_section(record) else None,
           ("predictor", "The predictor") if _has_predictor_section(record) else None,
           ("processes", "Processes"), ("environment", "Environment"),
           ("configuration", "Configuration")]
    nav = " ".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in (x for x in toc if x))
    body = "\n".join([
        '<header class="top">',
        "<h1>gpuscope report</h1>",
        f'<p class="sub">Model <code>{e(model)}</code> on {esc(_device_label(record))}, '
        f"started {e(record.started_at)}, {esc(_extent(record))}, "
        f"status {e(record.status)}.</p>",
        f'<nav class="toc">{nav}</nav>',
        "</header>",
        _banner(record, notes),
        _verdict(record),
        _check(record),
        _findings(record),
        _comparison(record, plots),
        tuning_section(record, {p.name: _figure(p, p.title, "tuning-plot") for p in plots if p.name == "tuning.png"}),
        _plots(record, plots),
        _steps(record),
        _predictor(record),
        _processes(record),
        _environment(record),
        _configuration(record),
        f"<footer>Generated by gpuscope {e(record.tool_version)} at {esc(generated_at)} from run.json "
        f"(schema gpuscope.run/1). Self-contained: no scripts, no network requests.</footer>",
    ])
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{esc(csp(_CSS))}">\n'
            '<meta name="referrer" content="no-referrer">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n"
            "</body>\n</html>\n")
