"""The report's tuning section: the best configuration to paste, the default it beat, every configuration
ranked, and what the search skipped and why. Its own module so the tune report stays out of html.py's way;
every string is escaped here (labels carry environment values a user typed)."""
from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from gpuscope.probes.units import format_bytes

if TYPE_CHECKING:  # pragma: no cover
    from gpuscope.record.run import RunRecord


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _memory(row: dict[str, Any]) -> str:
    memory = row.get("memory") or {}
    value = memory.get("device_bytes") if memory.get("device_bytes") is not None else memory.get("host_bytes")
    return format_bytes(value) if isinstance(value, (int, float)) else "n/a"


def paste_lines(settings: dict[str, Any]) -> list[str]:
    """The best configuration as lines to paste into a server."""
    lines = [f"export {k}={v}" for k, v in (settings.get("env") or {}).items()]
    lines.append(f"torch.set_num_threads({settings.get('intra_op_threads')})")
    lines.append(f"predictors = {settings.get('predictors')}  # the pool size: threads sharing one model")
    if settings.get("streams"):
        lines.append("# one torch.cuda.Stream() per predictor thread")
    return lines


def tuning_section(record: "RunRecord", figures: dict[str, str]) -> str:
    """The section, or "" for a run without a tuning block. `figures` holds tuning.png's <figure>, ready made."""
    tuning = record.tuning
    if not isinstance(tuning, dict):
        return ""
    rows = [r for r in tuning.get("configurations") or [] if isinstance(r, dict)]
    best, default, closest = tuning.get("best"), tuning.get("default"), tuning.get("closest")
    parts = ['<section id="tuning"><h2>Tuning</h2>',
             f"<p>{_esc(tuning.get('measured', 0))} of {_esc(tuning.get('grid_size', len(rows)))} configurations "
             f"measured in {_esc(_num(tuning.get('elapsed_s'), 0))} s of a {_esc(tuning.get('budget_s'))} s budget"
             + (f"; stopped by {_esc(tuning['stopped_by'])}" if tuning.get("stopped_by") else "") + ".</p>"]
    if best:
        parts.append(f"<p><strong>Best:</strong> {_esc(best.get('reason'))}.</p>")
        parts.append("<pre><code>" + _esc("\n".join(paste_lines(best.get("settings") or {}))) + "</code></pre>")
    elif closest:
        parts.append(f"<p><strong>No configuration met every constraint.</strong> The closest: "
                     f"{_esc(closest.get('label'))}: {_esc(closest.get('reason'))}.</p>")
    if default:
        parts.append(f"<p>Default (what diagnose alone recommends): {_esc(default.get('label'))}, "
                     f"{_esc(_num(default.get('throughput_rps')))} req/s.</p>")
    parts += list(figures.values())
    order = {repr(sorted((s or {}).items())): i for i, s in enumerate(tuning.get("ranked") or [])}

    def rank_of(row: dict[str, Any]) -> int:
        return order.get(repr(sorted((row.get("settings") or {}).items())), len(order) + rows.index(row))

    parts.append('<div class="scroll"><table class="steps"><thead><tr><th>configuration</th><th>status</th>'
                 "<th>req/s</th><th>p50 ms</th><th>p99 ms</th><th>memory</th><th>why</th></tr></thead><tbody>")
    for row in sorted(rows, key=rank_of):
        latency = row.get("latency_ms") or {}
        parts.append(f"<tr><td>{_esc(row.get('label'))}</td><td>{_esc(row.get('status'))}</td>"
                     f"<td>{_esc(_num(row.get('throughput_rps')))}</td><td>{_esc(_num(latency.get('p50')))}</td>"
                     f"<td>{_esc(_num(latency.get('p99')))}</td><td>{_esc(_memory(row) if 'memory' in row else '')}</td>"
                     f"<td>{_esc(row.get('reason') or '')}</td></tr>")
    parts.append("</tbody></table></div></section>")
    return "\n".join(parts)
