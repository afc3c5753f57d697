"""The browser harness itself: a failing browser test leaves a full-page screenshot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import DESKTOP, ROOT

pytestmark = pytest.mark.e2e

DESKTOP_WIDTH, DESKTOP_HEIGHT = DESKTOP["width"], DESKTOP["height"]


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


_PROBE = """
def test_probe_passes(browser):
    browser.page.set_content("<h1>fine</h1>")


def test_probe_fails(browser):
    browser.page.set_content("<h1>where it stood</h1>" + "<p>a line of the page</p>" * 150)
    assert False, "deliberate failure"
"""


def test_failing_test_leaves_a_full_page_screenshot(playwright: Any, tmp_path: Path) -> None:
    """Run two browser tests in a child pytest: only the failing one leaves a screenshot,
    and it shows the whole page, not just the window."""
    (tmp_path / "test_probe.py").write_text(_PROBE)
    shots = tmp_path / "failures"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.e2e.conftest", "-p", "no:cacheprovider",
         "-q", str(tmp_path / "test_probe.py")],
        cwd=ROOT, env={**os.environ, "E2E_FAILURE_DIR": str(shots), "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and "1 failed, 1 passed" in result.stdout, result.stdout + result.stderr
    files = sorted(shots.iterdir())
    assert [path.name.endswith("test_probe_fails.png") for path in files] == [True], files
    width, height = _png_size(files[0])
    assert width == DESKTOP_WIDTH and height > 2 * DESKTOP_HEIGHT, (width, height)
