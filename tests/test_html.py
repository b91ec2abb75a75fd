"""reports.html: a self-contained, escaped, redacted report with every section."""
from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import re
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import pytest

from gpuscope.probes.readings import NO_PERMISSION, Unavailable
from gpuscope.analysis.findings import conclude
from gpuscope.record.run import load_run
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


SEVERITY_RANK = {"fail": 0, "warn": 1, "info": 2}


@pytest.fixture(scope="module")
def gpu_record(tmp_path_factory: pytest.TempPathFactory):
    """The replayed H200 run (tests/fixtures/runs/gpu): a foreign process whose command line held markup,
    a stored check outcome with a pass, a fail and an unmeasured limit."""
    return rf.gpu_run(str(tmp_path_factory.mktemp("gpu")))[0]


@pytest.fixture(scope="module")
def gpu_html(gpu_record) -> str:
    return render_html(gpu_record, _fake_plots())


@pytest.fixture(scope="module")
def copies_record(tmp_path_factory: pytest.TempPathFactory):
    """The real --copy-model check sweep of a model file named with markup (DUPLICATE_MODEL fails)."""
    return rf.copies_run(str(tmp_path_factory.mktemp("copies")))[0]


@pytest.fixture(scope="module")
def copies_html(copies_record) -> str:
    return render_html(copies_record, _fake_plots())


def _unredacted(record):
    """The record as an older gpuscope or a hand-edited run.json may hold it: outside text not yet redacted
    (the neighbour's real command line plus a password in a URL, secrets in the environment and config)."""
    from tests.fixtures.runs.make_runs import FOREIGN_ARGV

    record = copy.deepcopy(record)
    neighbour = next(p for p in record.processes if not p["self"])
    neighbour["cmdline"] = " ".join(FOREIGN_ARGV) + " --db postgres://bob:s3cret@db:5432/x --token=hunter2"
    record.environment["memory_env"] = {"SECRET_TOKEN": "abc123", "HF_ENDPOINT": "https://u:pw@hub.example",
                                        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    record.config["auth_token"] = "do-not-show"
    return record


def test_model_name_with_markup_is_escaped(copies_record, copies_html: str) -> None:
    assert copies_record.config["model"] == rf.EVIL_NAME
    assert rf.EVIL_NAME not in copies_html
    assert "&lt;img src=x onerror=alert(1)&gt;.pt" in copies_html
    parsed = _parse(copies_html)
    assert rf.EVIL_NAME in "".join(parsed.text)  # it reads as text


@pytest.mark.parametrize("page", ["gpu_html", "copies_html"])
def test_no_injected_markup_only_known_tags_and_no_handlers(page: str, request: pytest.FixtureRequest) -> None:
    html = request.getfixturevalue(page)
    parsed = _parse(html)
    tags = {tag for tag, _ in parsed.tags}
    assert tags <= ALLOWED_TAGS, tags - ALLOWED_TAGS
    for _tag, attrs in parsed.tags:
        assert not any(name.startswith("on") for name in attrs), attrs
    assert "<script" not in html.lower()


def test_a_neighbours_command_line_is_shown_as_text(gpu_record, gpu_html: str) -> None:
    neighbour = next(p for p in gpu_record.processes if not p["self"])
    assert "<b>html</b>" in neighbour["cmdline"]  # the capture's foreign process really had it
    assert "<b>html" not in gpu_html and "&lt;b&gt;html&lt;/b&gt;" in gpu_html


def test_check_messages_are_escaped(gpu_record) -> None:
    record = copy.deepcopy(gpu_record)
    forbid = next(r for r in record.check["results"] if r["name"].startswith("forbid."))
    forbid["message"] += " <b>fired</b>"  # as a process name in a finding's title would put it there
    html = render_html(record, _fake_plots())
    assert "<b>fired" not in html and "&lt;b&gt;fired&lt;/b&gt;" in html


def test_secrets_are_redacted_at_render_time(gpu_record) -> None:
    html = render_html(_unredacted(gpu_record), _fake_plots())
    for secret in ("hunter2", "s3cret", "abc123", "do-not-show", ":pw@", "SECRET123"):
        assert secret not in html, secret
    assert "--token=***" in html and "--api-key=***" in html
    assert "postgres://bob:***@db" in html
    assert "SECRET_TOKEN=***" in html and "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in html


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


def _findings_section(html: str) -> str:
    start = html.index('id="findings"')
    return html[start:html.index('id="plots"')]


@pytest.mark.parametrize("record_name, keep_check, badge", [
    ("gpu_record", True, "problems found"),      # its stored gate failed (max-p99-ms, forbidden FOREIGN_PROCESS)
    ("gpu_record", False, "warnings"),           # without the gate: FOREIGN_PROCESS is a warning
    ("copies_record", True, "problems found"),   # DUPLICATE_MODEL is a fail
])
def test_verdict_and_findings_most_severe_first(record_name: str, keep_check: bool, badge: str,
                                                request: pytest.FixtureRequest) -> None:
    record = copy.deepcopy(request.getfixturevalue(record_name))
    if not keep_check:
        record.check = None
    worst = min(record.findings, key=lambda f: SEVERITY_RANK[f.severity])
    failed_gate = (record.check or {}).get("exit_code") == 1
    assert badge == ("problems found" if worst.severity == "fail" or failed_gate else "warnings")  # the fixture's
    html = render_html(record, _fake_plots())
    rec = record.recommendation["predictors"]
    verdict = html[html.index('id="verdict"'):html.index('id="findings"')]
    assert f"Run {rec} predictor{'s' if rec != 1 else ''}" in verdict and badge in verdict
    section = _findings_section(html)
    codes = re.findall(r'<div class="code">([A-Z_]+)', section)
    assert codes == [f.code for f in sorted(record.findings, key=lambda f: SEVERITY_RANK[f.severity])]
    assert "Remedy:" in section and escape(worst.remedy) in section


def test_environment_and_check_are_shown(gpu_record, gpu_html: str) -> None:
    env = gpu_record.environment
    for text in (env["driver"], env["torch"], env["cuda"], gpu_record.devices[0]["name"]):
        assert text in gpu_html, text
    check = gpu_html[gpu_html.index('id="check"'):gpu_html.index('id="findings"')]
    statuses = {r["status"] for r in gpu_record.check["results"]}
    assert statuses == {"pass", "fail", "unmeasured"}  # the stored outcome has one of each
    assert "failed" in check and "max_p99_ms" in check
    unmeasured = next(r for r in gpu_record.check["results"] if r["status"] == "unmeasured")
    assert escape(unmeasured["message"]) in check


def test_an_unavailable_sharing_figure_keeps_its_reason(gpu_record) -> None:
    """The sharing figure the rules could not compute (one count left) says why in the report, not 0."""
    from gpuscope.analysis.findings import conclude

    record = copy.deepcopy(gpu_record)
    record.steps = record.steps[-1:]
    conclude(record)
    text = render_html(record, _fake_plots())
    reason = record.sharing["bytes_per_extra_predictor"]
    assert isinstance(reason, Unavailable)
    at = text.index(f"unavailable ({reason.reason}: {reason.detail})")
    around = text[max(0, at - 300):at + 300]  # the sharing row, and what stands beside the reason
    assert not re.search(r"(?<![\d.])0(\.0+)? (B|KiB|MiB|GiB)\b", around), around


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
    record, run, _samples = rf.cpu_run(str(tmp_path / "cpu"))
    rec = record.recommendation["predictors"]
    cpu = render_html(load_run(run), _fake_plots())
    assert f"Run {rec} predictor{'s' if rec != 1 else ''}" in cpu and "RSS peak" in cpu and "No GPU was used" in cpu
    record, run, _samples = rf.interrupted_run(str(tmp_path / "int"))
    assert record.status == "interrupted" and not record.steps
    interrupted = render_html(load_run(run), _fake_plots(), notes=["1 unreadable line in the samples file"])
    assert "Interrupted run." in interrupted and "No step completed." in interrupted
    assert "1 unreadable line" in interrupted


def test_finding_titles_and_evidence_from_outside_are_escaped(gpu_record) -> None:
    """A neighbour's name and command line are outside text: planted in the record, they reach the finding
    the rules derive (its title and evidence), escaped and redacted when rendered."""
    from gpuscope.analysis.findings import conclude

    record = copy.deepcopy(gpu_record)
    neighbour = next(p for p in record.processes if not p["self"])
    neighbour["name"] = 'srv "<svg onload=x>"'
    neighbour["cmdline"] = "srv --password=pw123 <x> --api_key=k-999"
    conclude(record)
    finding = next(f for f in record.findings if f.code == "FOREIGN_PROCESS")
    assert "<svg onload=x>" in finding.title
    record.findings = [dataclasses.replace(f, remedy="kill `<b>`") if f is finding else f for f in record.findings]
    text = render_html(record, _fake_plots())
    assert "<svg" not in text and "&lt;svg onload=x&gt;" in text
    assert "k-999" not in text and "pw123" not in text
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
    _record, run, _samples = rf.cpu_run(str(tmp_path))
    record = load_run(run)
    # plant the cause: the 1-predictor step ran out of memory, and a predictor died at the next count
    record.steps[0].oom = True
    record.steps[0].error_messages = ["OutOfMemoryError: DefaultCPUAllocator: can't allocate memory"]
    record.steps[1].dead_predictors = 1
    conclude(record)
    record.recommendation["predictors"] = 1
    oom = next(f for f in record.findings if f.code == "OOM")
    assert oom.at_predictors == 1
    record.findings = [dataclasses.replace(oom, remedy="None")]  # a remedy the JSON held as null
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
    record.steps[-1].memory["rss_bytes"] = float("-inf")
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
    ("p99_ms_at_knee", 10.6, "10.6 ms"),         # the digits the finding's title gives it (format_ms)
    ("p50_ms", 0.045, "45 us"),                  # a sub-millisecond model: never "0.05 ms" or "0.00 ms"
    ("process_gpu_bytes_by_predictors", {"1": 1_835_008_000, "2": 1_900_000_000}, "1: 1.71 GiB; 2: 1.77 GiB"),
    ("knee_predictors", 4, "4"),
])
def test_evidence_values_are_shown_in_their_units(key, value, shown):
    assert fmt(value, key) == shown


def test_an_open_loop_run_shows_the_offered_rate_queueing_and_drops_per_step(tmp_path: Path) -> None:
    """--rate: the latency of an overloaded step is mostly queueing; the steps table says so, as the
    terminal summary does (it showed neither the offered rate nor the queue/compute split)."""
    _record, run, _samples = rf.cpu_run(str(tmp_path))
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
