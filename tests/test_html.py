"""reports.html: a self-contained, escaped, redacted report with every section."""
from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from gpuscope.probes.readings import NO_PERMISSION, Unavailable
from gpuscope.record.run import Finding, load_run
from gpuscope.reports.html import _CSS, render_html
from gpuscope.reports.html_format import csp, fmt
from gpuscope.reports.plots import Plot
from gpuscope.reports.render import render_report
from tests import report_fixtures as rf

ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "main", "header", "h1", "h2", "h3", "p", "nav",
                "a", "section", "span", "code", "ul", "li", "strong", "article", "div", "dl", "dt", "dd", "figure",
                "img", "figcaption", "table", "thead", "tbody", "tr", "th", "td", "br", "footer"}


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(text: str) -> _Collector:
    parser = _Collector()
    parser.feed(text)
    return parser


def _fake_plots() -> list[Plot]:
    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=")
    return [Plot(name, png, f"title of {name}") for name in
            ("memory_breakdown.png", "memory_timeline.png", "throughput_latency.png")]


@pytest.fixture(scope="module")
def gpu_html(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("gpu")
    _record, run, _samples = rf.gpu_run(str(directory))
    return render_html(load_run(run), _fake_plots())


def test_model_name_with_markup_is_escaped(gpu_html: str) -> None:
    assert rf.EVIL_NAME not in gpu_html
    assert "&lt;img src=x onerror=alert(1)&gt;.pt" in gpu_html
    parsed = _parse(gpu_html)
    assert rf.EVIL_NAME in "".join(parsed.text)  # it reads as text


def test_no_injected_markup_only_known_tags_and_no_handlers(gpu_html: str) -> None:
    parsed = _parse(gpu_html)
    tags = {tag for tag, _ in parsed.tags}
    assert tags <= ALLOWED_TAGS, tags - ALLOWED_TAGS
    for _tag, attrs in parsed.tags:
        assert not any(name.startswith("on") for name in attrs), attrs
    assert "<script" not in gpu_html.lower()
    assert "&lt;script&gt;alert(&#x27;proc&#x27;)&lt;/script&gt;" in gpu_html
    assert "FOREIGN_PROCESS &lt;b&gt;fired&lt;/b&gt;" in gpu_html  # check messages are escaped too


def test_secrets_are_redacted_at_render_time(gpu_html: str) -> None:
    for secret in ("hunter2", "s3cret", "abc123", "do-not-show", ":pw@"):
        assert secret not in gpu_html, secret
    assert "--token=***" in gpu_html
    assert "postgres://bob:***@db" in gpu_html


def test_self_contained_with_a_strict_csp(gpu_html: str) -> None:
    parsed = _parse(gpu_html)
    metas = [attrs for tag, attrs in parsed.tags if tag == "meta" and attrs.get("http-equiv")]
    assert len(metas) == 1 and metas[0]["http-equiv"] == "Content-Security-Policy"
    policy = metas[0]["content"]
    digest = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
    assert policy == csp(_CSS)
    assert "default-src 'none'" in policy and "img-src data:" in policy and f"'sha256-{digest}'" in policy
    assert "unsafe-inline" not in policy and "script-src" not in policy  # default-src 'none' forbids scripts
    style = re.search(r"<style>(.*?)</style>", gpu_html, re.S).group(1)
    assert style == _CSS  # the hash pins exactly this stylesheet
    for tag, attrs in parsed.tags:
        assert "style" not in attrs  # inline style attributes would be blocked by the CSP
        for name in ("src", "href"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith(("data:", "#")), (tag, name, value)
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == 3 and all(a["src"].startswith("data:image/png;base64,") for a in images)
    assert "@media print" in gpu_html


def test_sections_in_order(gpu_html: str) -> None:
    ids = [attrs.get("id") for tag, attrs in _parse(gpu_html).tags if tag == "section"]
    assert ids == ["verdict", "check", "findings", "plots", "steps", "processes", "environment", "configuration"]


def test_verdict_and_findings_most_severe_first(gpu_html: str) -> None:
    verdict = gpu_html[gpu_html.index('id="verdict"'):gpu_html.index('id="check"')]
    assert "Run 4 predictors" in verdict and "problems found" in verdict
    start = gpu_html.index('id="findings"')
    section = gpu_html[start:gpu_html.index('id="plots"')]
    codes = re.findall(r'<div class="code">([A-Z_]+)', section)
    assert codes == ["DUPLICATE_MODEL", "FOREIGN_PROCESS", "PER_PREDICTOR_GROWTH", "OUTSIDE_ALLOCATOR",
                     "THROUGHPUT_PLATEAU"]
    assert "Remedy:" in section and "Load the model once" in section
    assert "unavailable (not_supported: one step only)" in section  # evidence readings keep their reason


def test_environment_and_check_are_shown(gpu_html: str) -> None:
    for text in ("550.54.15", "2.5.1+cu124", "12.4", "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
                 "CUDA_MODULE_LOADING=LAZY", "SECRET_TOKEN=***", "NVIDIA H100 80GB HBM3"):
        assert text in gpu_html, text
    check = gpu_html[gpu_html.index('id="check"'):gpu_html.index('id="findings"')]
    assert "failed" in check and "max-p99-ms" in check and "unavailable (error: no steps)" in check


def test_unavailable_reads_as_unavailable_never_zero(tmp_path: Path) -> None:
    _record, run, _samples = rf.unavailable_run(str(tmp_path))
    text = render_html(load_run(run), _fake_plots())
    steps = text[text.index('id="steps"'):text.index('id="processes"')]
    assert "unavailable (no_permission: NVML: insufficient permissions)" in steps
    assert "0 B" not in steps and ">0.00<" not in steps


def test_dataclass_dict_unavailable_shape_is_tolerated() -> None:
    assert fmt({"reason": "no_permission", "detail": "x"}) == "unavailable (no_permission: x)"
    assert fmt(Unavailable(NO_PERMISSION)) == "unavailable (no_permission)"
    assert fmt(3 * 1024**3, "used_bytes") == "3.00 GiB"
    assert fmt(None) == "\u2014"


def test_cpu_and_interrupted_runs_render(tmp_path: Path) -> None:
    _record, run, _samples = rf.cpu_run(str(tmp_path / "cpu"))
    cpu = render_html(load_run(run), _fake_plots())
    assert "Run 2 predictors" in cpu and "RSS peak" in cpu and "No GPU was used" in cpu
    _record, run, _samples = rf.interrupted_run(str(tmp_path / "int"))
    interrupted = render_html(load_run(run), _fake_plots(), notes=["1 unreadable line in the samples file"])
    assert "Interrupted run." in interrupted and "No step completed." in interrupted
    assert "1 unreadable line" in interrupted


def test_finding_titles_and_evidence_from_outside_are_escaped(tmp_path: Path) -> None:
    _record, run, _samples = rf.gpu_run(str(tmp_path))
    record = load_run(run)
    record.findings.append(Finding("FOREIGN_PROCESS", "warn", 'pid 9 "<svg onload=x>" holds 1 GiB',
                                   {"cmdline": "srv --password=pw123 <x>", "api_key": "k-999"},
                                   "kill `<b>`"))
    text = render_html(record, _fake_plots())
    assert "<svg" not in text and "&lt;svg onload=x&gt;" in text
    assert "k-999" not in text
    assert "<code>&lt;b&gt;</code>" in text  # backticks become code, after escaping


def test_render_report_writes_the_four_files(tmp_path: Path) -> None:
    record, _run, samples = rf.gpu_run(str(tmp_path / "run"))
    paths = render_report(record, str(tmp_path / "out"), samples)
    assert set(paths) == {"html", "memory_breakdown", "memory_timeline", "throughput_latency"}
    for path in paths.values():
        assert Path(path).parent == tmp_path / "out" and Path(path).stat().st_size > 1000
    assert Path(paths["html"]).name == "report.html"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "memory_breakdown.png", "memory_timeline.png", "report.html", "throughput_latency.png"]


# ---------------------------------------------------------------- sections follow the run's mode


def _section_ids(text: str) -> list[str | None]:
    return [attrs.get("id") for tag, attrs in _parse(text).tags if tag == "section"]


def _live_plots() -> list[Plot]:
    return [p for p in _fake_plots() if p.name != "throughput_latency.png"]


def test_a_watch_report_is_its_memory_over_time_not_an_empty_sweep(tmp_path: Path) -> None:
    _record, run, _samples = rf.long_watch_run(str(tmp_path), hours=0.01)
    record = load_run(run)
    record.extra = {"live": {"ticks": 36, "duration_s": 35.0}}
    text = render_html(record, _live_plots())
    assert _section_ids(text) == ["verdict", "findings", "plots", "processes", "environment", "configuration"]
    assert "0 steps" not in text and "36 samples over 35.0 s" in text
    assert "no step of the sweep" not in text.lower() and "predictor count was measured" not in text
    assert 'id="plot-timeline"' in text and "sweep&#x27;s steps" not in text
    assert 'href="#steps"' not in text
    # samples were taken and no rule fired: that is a finding of its own, not "nothing was measured"
    record.findings = []
    text = render_html(record, _live_plots())
    assert "No findings: nothing in this run needs attention." in text
    record.extra = {"live": {"ticks": 0}}
    assert "No findings (nothing was measured)." in render_html(record, [])


def test_a_compare_report_has_its_comparison_and_no_empty_sweep_sections(tmp_path: Path) -> None:
    _record, run, _samples = rf.cpu_run(str(tmp_path))
    record = load_run(run)
    record.mode, record.steps, record.findings = "compare", [], []
    record.extra = {"comparison": {"verdict": "threads win", "rows": [
        {"mode": m, "predictors": n, "throughput_rps": 10.0 * n, "host_uss_bytes": 100 * 2**20 * n}
        for m in ("threads", "processes") for n in (1, 2)]}}
    png = _fake_plots()[0].png
    text = render_html(record, [Plot("compare.png", png, "threads win")])
    assert _section_ids(text) == ["verdict", "findings", "comparison", "processes", "environment", "configuration"]
    assert "0 steps" not in text and "threads and processes at 1, 2 predictors" in text
    assert "No step completed" not in text and 'id="plot-comparison"' in text
    assert "No findings: nothing in this run needs attention." in text


def test_a_null_remedy_is_omitted_and_one_predictor_is_singular(tmp_path: Path) -> None:
    _record, run, _samples = rf.cpu_run(str(tmp_path), counts=(1, 2))
    record = load_run(run)
    record.recommendation["predictors"] = 1
    record.steps[1].dead_predictors = 1
    record.findings = [Finding("OOM", "warn", "no remedy here", {}, "None", at_predictors=1)]
    text = render_html(record, _fake_plots())
    assert "Remedy:" not in text
    assert "Figures at 1 predictor." in text and "OOM at 1 predictor<" in text and "1 predictor died" in text
    assert "1 predictors" not in text


def test_non_finite_numbers_read_n_a(tmp_path: Path) -> None:
    _record, run, _samples = rf.cpu_run(str(tmp_path))
    record = load_run(run)
    record.steps[0].throughput_rps = float("nan")
    record.steps[1].throughput_rps = float("inf")
    record.steps[1].latency_ms["p99"] = float("inf")
    record.steps[2].memory["rss_bytes"] = float("-inf")
    text = render_html(record, _fake_plots())
    steps = text[text.index('id="steps"'):text.index('id="processes"')]
    assert "nan" not in steps.lower() and "inf" not in steps.lower() and steps.count("n/a") >= 4
    verdict = text[text.index('id="verdict"'):text.index('id="findings"')]
    assert "inf requests/s" not in verdict and "n/a" in verdict  # the recommended step's throughput
    assert fmt(float("nan"), "throughput_rps") == "n/a" and fmt(float("inf"), "rss_bytes") == "n/a"


def test_host_process_table_labels_its_gpu_column(gpu_html: str) -> None:
    assert "peak GPU memory" in gpu_html and ">peak memory<" not in gpu_html


def _badge(html: str) -> tuple[str, str]:
    """The verdict section's class and its badge text."""
    verdict = re.search(r'<section id="verdict" class="verdict v-(\w+)">.*?<span class="badge b-\w+">([^<]*)</span>',
                        html, re.S)
    assert verdict, "no verdict badge"
    return verdict.group(1), verdict.group(2)


def test_a_sweep_that_could_recommend_nothing_is_not_called_healthy(tmp_path: Path) -> None:
    """No count met the p99 limit and no finding warned: the badge says so instead of 'healthy'."""
    _record, run, _samples = rf.cpu_run(str(tmp_path))
    clean = load_run(run)
    assert _badge(render_html(clean, _fake_plots())) == ("ok", "healthy")
    clean.recommendation = {"predictors": None, "reason": "no predictor count met p99 <= 1 ms"}
    html = render_html(clean, _fake_plots())
    assert _badge(html) == ("warn", "no recommendation")
    assert "No recommendation could be made" in html and "no predictor count met p99 &lt;= 1 ms" in html


@pytest.mark.parametrize("key, value, shown", [
    ("t_s", 9973.2, "9,973 s (2.8 h)"),          # a watch's finding time: never 9.97e+03 s
    ("t_s", 95.04, "95.0 s"),
    ("duration_s", 3.214, "3.21 s"),
    ("cached_share", 0.9191, "91.9%"),           # as the finding's title says it
    ("p99_ms_at_knee", 10.6, "10.60 ms"),
    ("process_gpu_bytes_by_predictors", {"1": 1_835_008_000, "2": 1_900_000_000}, "1: 1.71 GiB; 2: 1.77 GiB"),
    ("knee_predictors", 4, "4"),
])
def test_evidence_values_are_shown_in_their_units(key, value, shown):
    assert fmt(value, key) == shown


def test_an_open_loop_run_shows_the_offered_rate_queueing_and_drops_per_step(tmp_path: Path) -> None:
    """--rate: the latency of an overloaded step is mostly queueing; the steps table says so, as the
    terminal summary does (it showed neither the offered rate nor the queue/compute split)."""
    _record, run, _samples = rf.cpu_run(str(tmp_path), counts=(1, 2))
    record = load_run(run)
    for step, served, dropped in zip(record.steps, (20.0, 40.0), (0, 12)):
        step.offered_rps, step.throughput_rps, step.dropped_arrivals = 50.0, served, dropped
        step.queue_ms, step.compute_ms = {"p50": 397.0}, {"p50": 50.2}
    html = render_html(record, _fake_plots())
    steps = html[html.index('<section id="steps">'):]
    steps = steps[:steps.index("</section>")]
    for header in ("offered (requests/s)", "queue p50 (ms)", "compute p50 (ms)", "dropped arrivals"):
        assert header in steps
    assert ">50.0<" in steps and ">397" in steps and ">12<" in steps
    closed = render_html(load_run(rf.cpu_run(str(tmp_path / "closed"))[1]), _fake_plots())
    assert "queue p50" not in closed  # closed loop: no such columns
