"""report.html in a real browser: headless Chromium driven by Playwright.

Needs Debian's `chromium` (apt-get install chromium; .ci/run installs it) and the
`playwright` Python package; never `playwright install`. Skips with the reason
only when no Chromium (or no Playwright) can be found; with GPUSCOPE_REQUIRE_BROWSER=1
(as .ci/run sets) that is a failure instead, so CI cannot pass without running it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from gpuscope.reports.render import render_report
from tests import report_fixtures as rf

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    for candidate in (os.environ.get("GPUSCOPE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _browser_required() -> bool:
    return os.environ.get("GPUSCOPE_REQUIRE_BROWSER", "") not in ("", "0")


def _cannot_run(reason: str) -> None:
    """Skip locally; fail where the browser test is required (CI)."""
    if _browser_required():
        pytest.fail(f"GPUSCOPE_REQUIRE_BROWSER is set but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory):
    executable = _chromium()
    if executable is None:
        _cannot_run("no Chromium found (apt-get install chromium, or set GPUSCOPE_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _cannot_run(f"playwright is not installed ({exc}); pip install '.[test]'")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1366, "height": 900}, offline=True)
        try:
            yield context
        finally:
            context.close()


def _open(context, html_path: str):
    page = context.new_page()
    console_errors: list[str] = []
    page_errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.on("request", lambda req: requests.append(req.url))
    page.goto(Path(html_path).as_uri(), wait_until="load")
    return page, console_errors, page_errors, requests


def _check_page(page, console_errors, page_errors, requests, html_path: str) -> None:
    assert console_errors == [], console_errors
    assert page_errors == [], page_errors
    foreign = [u for u in requests if not (u.startswith("data:") or u == Path(html_path).as_uri())]
    assert foreign == [], f"the report made network requests: {foreign}"
    images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(images) == 3
    assert all(complete and width > 0 and height > 0 for complete, width, height in images), images
    assert page.locator("#verdict").is_visible()
    assert page.locator("#findings").is_visible()
    # no script may run, and nothing injected became markup
    assert page.evaluate("document.scripts.length") == 0
    assert page.evaluate("document.querySelectorAll('img[onerror], [onerror]').length") == 0


def test_gpu_report_in_chromium(browser_context, tmp_path: Path) -> None:
    record, _run, samples = rf.gpu_run(str(tmp_path / "run"))
    paths = render_report(record, str(tmp_path / "out"), samples)
    page, console_errors, page_errors, requests = _open(browser_context, paths["html"])
    _check_page(page, console_errors, page_errors, requests, paths["html"])
    verdict = page.locator("#verdict").inner_text()
    assert f"Run {record.recommendation['predictors']} predictors" in verdict
    findings = page.locator("article.finding")
    assert findings.count() == len(record.findings)
    assert findings.first.is_visible()
    most_severe = min(record.findings, key=lambda f: ("fail", "warn", "info").index(f.severity))
    assert most_severe.code in findings.first.inner_text()  # most severe first
    body = page.locator("body").inner_text()
    neighbour = next(p for p in record.processes if not p["self"])
    assert "<b>html</b>" in neighbour["cmdline"] and "<b>html</b>" in body  # its command line, shown as text
    assert "SECRET123" not in body and "--api-key=***" in body
    shot = tmp_path / "report-screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    # prints cleanly: the print stylesheet applies and every image is still there
    page.emulate_media(media="print")
    assert page.locator("nav.toc").is_hidden()
    pdf_images = page.evaluate("Array.from(document.images).filter(i => i.naturalWidth > 0).length")
    assert pdf_images == 3
    page.close()


def test_interrupted_cpu_report_in_chromium(browser_context, tmp_path: Path) -> None:
    record, _run, samples = rf.interrupted_run(str(tmp_path / "run"))
    paths = render_report(record, str(tmp_path / "out"), samples)
    page, console_errors, page_errors, requests = _open(browser_context, paths["html"])
    _check_page(page, console_errors, page_errors, requests, paths["html"])
    assert "interrupted" in page.locator("#verdict").inner_text()
    page.screenshot(path=str(tmp_path / "interrupted.png"), full_page=True)
    page.close()
