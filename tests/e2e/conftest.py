"""Browser fixtures: the site under real gunicorn, Debian's headless Chromium driven by
Playwright with a fresh profile per test, and a full-page screenshot of every failure.

Without ``/usr/bin/chromium`` (or Playwright) the browser tests skip with one line;
under ``CI`` they fail instead, so CI can never pass without having run them. The same
goes for the Nu HTML Checker (Java and npm's vnu.jar) of the HTML validity tests and
for axe-core (npm's axe-core) of the accessibility tests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from flask import Flask

from tests.support.databases import Backend
from tests.support.gunicorn import Server, start_gunicorn, stop_gunicorn

from .accessibility import Axe, find_axe
from .html_checker import Checker, find_checker

CHROMIUM = Path("/usr/bin/chromium")
# Headless, no sandbox (CI runs as root), and nothing that phones home or updates itself.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
FAILURE_DIR = Path(os.environ.get("E2E_FAILURE_DIR", ROOT / "build" / "e2e-failures"))
DESKTOP = {"width": 1280, "height": 800}

# The app is loaded before gunicorn listens, so the first /healthz is not answered by a
# worker still importing it (start_gunicorn gives a read only one second).
SERVER_ENV = {"GUNICORN_PRELOAD": "true"}

_CALL_REPORT = pytest.StashKey[pytest.TestReport]()


def _missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep the outcome of the test body, so the ``browser`` fixture knows it failed."""
    report = yield
    if report.when == "call":
        item.stash[_CALL_REPORT] = report
    return report


def _skip_or_fail_in_ci(problem: str, what: str) -> NoReturn:
    """Skip here, but fail under CI: a CI run must never pass without these tests."""
    if os.environ.get("CI"):
        pytest.fail(f"{problem}: in CI the {what} must run", pytrace=False)
    pytest.skip(problem)


@pytest.fixture(scope="session")
def html_checker() -> Checker:
    """The Nu HTML Checker, found once per session (it is only run by the tests)."""
    found = find_checker()
    if isinstance(found, str):
        _skip_or_fail_in_ci(found, "HTML validity tests")
    return found


@pytest.fixture(scope="session")
def axe() -> Axe:
    """axe-core's script, read once per session."""
    found = find_axe()
    if isinstance(found, str):
        _skip_or_fail_in_ci(found, "accessibility tests")
    return found


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    """Playwright's driver, started once per module (and only when a browser exists)."""
    problem = _missing_browser()
    if problem:
        _skip_or_fail_in_ci(problem, "browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        yield driver


class Browser:
    """One headless Chromium on a fresh user-data dir, and the messages it logged."""

    def __init__(self, driver: Any, profile: Path) -> None:
        self.context = driver.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=DESKTOP,
        )
        self.context.set_default_timeout(15_000)
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda message: self.console.append(message.text))
        self.page.on("pageerror", lambda error: self.console.append(str(error)))

    def csp_violations(self) -> list[str]:
        return [line for line in self.console if "Content Security Policy" in line]


@pytest.fixture
def browser(playwright: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Browser]:
    """A browser of its own for each test; on failure, a screenshot of where it stood."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    running = Browser(playwright, profile)
    try:
        yield running
    finally:
        report = request.node.stash.get(_CALL_REPORT, None)
        try:
            if report is not None and report.failed:
                FAILURE_DIR.mkdir(parents=True, exist_ok=True)
                name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-120:]
                running.page.screenshot(path=FAILURE_DIR / f"{name}.png", full_page=True)
        finally:
            running.context.close()


@pytest.fixture
def page(browser: Browser) -> Any:
    return browser.page


@pytest.fixture
def site(playwright: Any, app: Flask, backend: Backend, tmp_path: Path) -> Iterator[Server]:
    """The app under gunicorn on a free loopback port, on the test's backend database.

    Depends on ``app`` (marked ``real_commits`` by the tests) so that every row the
    browser wrote is deleted afterwards, and on ``playwright`` so that a machine without
    a browser skips before any server starts.
    """
    logs = tmp_path / "site"
    logs.mkdir()
    running = start_gunicorn(backend.url.render_as_string(hide_password=False), logs, **SERVER_ENV)
    try:
        yield running
    finally:
        stop_gunicorn(running)
    assert "Traceback" not in running.log_text()
