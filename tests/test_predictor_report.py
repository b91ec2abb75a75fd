"""The report's predictor section: the stage breakdown per predictor count, the GIL bound, the thread check."""
from __future__ import annotations

import re

from gpuscope.reports.html import render_html
from tests import scenarios as S


def text_of(html: str, section: str) -> str:
    start = html.index(f'<section id="{section}">')
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html[start:html.index("</section>", start)]))


def test_the_stage_breakdown_per_predictor_count_with_the_bound_and_what_was_measured():
    record = S.gil_contention_run()
    record.thread_safety = S.thread_check(writes=[S.STATEFUL_WRITE])
    html = render_html(record, [])
    assert 'href="#predictor"' in html
    text = text_of(html, "predictor")
    assert "Translator PurePythonTranslator : preprocess yes, postprocess yes" in text
    # 1 predictor: preprocess 3.2 ms mean (95% of 3.352 ms); 2: the Amdahl bound 1.01x against 1.01x measured
    assert "1 3.04 / 5.12 / 3.20 95%" in text
    assert "1.01x 1.01x 17%" in text
    assert "the Python stages are 98% of a request" in text and "at most 1.03x" in text
    assert "a request writes Stateful.last (rebound)" in text


def test_no_predictor_section_for_a_plain_model_without_a_check():
    html = render_html(S.clean_cpu_run(), [])
    assert 'id="predictor"' not in html
