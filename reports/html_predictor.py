"""The report's predictor section: stage times per predictor count, the GIL estimate, the thread-safety check."""
from __future__ import annotations

from typing import TYPE_CHECKING

from gpuscope.reports.html_format import _cores, _has_steps_section, _millis, _seconds, _share, _times, e, esc
from gpuscope.reports.plotdata import (  # imported lazily
    finite,
)

if TYPE_CHECKING:  # pragma: no cover
    from gpuscope.record.run import RunRecord


def _has_predictor_section(record: "RunRecord") -> bool:
    return _has_steps_section(record) and (any(s.stages_ms for s in record.steps)
                                           or isinstance(record.thread_safety, dict))


def _predictor(record: "RunRecord") -> str:
    """Where each request's time goes per predictor count, the GIL's Amdahl bound against what was measured,
    and what the thread-safety check saw. Kept in one section so the steps table stays as it is."""
    if not _has_predictor_section(record):
        return ""
    from gpuscope.analysis.gil import estimate, stage_shares
    from gpuscope.measure.translator import STAGES

    parts = ['<section id="predictor"><h2>The predictor</h2>']
    translator = (record.model or {}).get("translator")
    if isinstance(translator, dict):
        parts.append(f"<p>Translator <code>{e(translator.get('type'))}</code>: preprocess "
                     f"{'yes' if translator.get('preprocess') else 'no'}, postprocess "
                     f"{'yes' if translator.get('postprocess') else 'no'}; requests from "
                     f"{e((record.model or {}).get('requests_source'))}.</p>")
    staged = [s for s in record.steps if s.stages_ms]
    if staged:
        present = [stage for stage in STAGES if any(stage in (s.stages_ms or {}) for s in staged)]
        found = estimate(record) or {}
        by_n = found.get("by_predictors", {})
        head = ("<tr><th class=\"num\">predictors</th>"
                + "".join(f'<th class="num">{esc(stage)} p50 / p99 / mean (ms)</th><th class="num">share</th>'
                          for stage in present)
                + '<th class="num">Amdahl bound</th><th class="num">measured scaling</th>'
                  '<th class="num">blocked (GIL) share</th><th class="num">CPU (cores)</th></tr>')
        rows = []
        for s in staged:
            shares = stage_shares(s)
            row = by_n.get(str(s.predictors), {})
            cells = ""
            for stage in present:
                fig = (s.stages_ms or {}).get(stage) or {}
                cells += (f'<td class="num">{_millis(fig.get("p50"))} / {_millis(fig.get("p99"))} / '
                          f'{_millis(fig.get("mean"))}</td>'
                          f'<td class="num">{_share(shares.get(stage))}</td>')
            rows.append(f'<tr><td class="num">{e(s.predictors)}</td>{cells}'
                        f'<td class="num">{_times(row.get("bound"))}</td>'
                        f'<td class="num">{_times(row.get("measured"))}</td>'
                        f'<td class="num">{_share(row.get("gil_wait_share"))}</td>'
                        f'<td class="num">{_cores(row.get("cpu_cores"))}</td></tr>')
        parts.append('<div class="scroll"><table class="steps"><thead>' + head + "</thead><tbody>"
                     + "".join(rows) + "</tbody></table></div>")
        if found:
            limit = found.get("amdahl_limit")
            parts.append(f'<p class="muted">At 1 predictor the Python stages are {_share(found["python_share"])} '
                         "of a request; if they hold the GIL throughout, threads reach at most "
                         + (f"{limit:.2f}x" if finite(limit) else "any multiple")
                         + " of one predictor's throughput (Amdahl). Blocked share: the part of the predictor "
                         "threads' time, not counting waits for a core, that was spent blocked beyond what it "
                         "was at 1 predictor.</p>")
    parts.append(_thread_safety_text(record))
    parts.append("</section>")
    return "".join(parts)


def _thread_safety_text(record: "RunRecord") -> str:
    check = record.thread_safety
    if not isinstance(check, dict):
        return ""
    if not check.get("checked"):
        return f"<p>Thread safety was not checked: {e(check.get('error'))}.</p>"
    writes = check.get("writes") or []
    said = (f"{check.get('requests')} requests one at a time, twice, then from {check.get('concurrent_predictors')} "
            f"concurrent predictors ({check.get('rounds')} rounds) in {_seconds(check.get('duration_s') or 0.0)}")
    if writes:
        said += "; a request writes " + ", ".join(f"<code>{e(w.get('attribute'))}</code> ({e(w.get('kind'))})"
                                                  for w in writes[:5])
    if check.get("sequential_mismatch_count"):
        said += f"; {e(check.get('sequential_mismatch_count'))} responses differ between the sequential passes"
    if check.get("concurrent_mismatch_count"):
        said += f"; {e(check.get('concurrent_mismatch_count'))} concurrent responses differ from the sequential ones"
    if not writes and not check.get("sequential_mismatch_count") and not check.get("concurrent_mismatch_count"):
        said += "; no write seen, every response matched"
    tolerance = check.get("tolerance")
    said += f" ({'exact comparison' if not tolerance else 'tolerance ' + e(tolerance)})."
    return f"<p>Thread safety: {said}</p>"
