"""Browser fixtures: headless Chromium (Debian's ``chromium`` package) driven by Playwright, and the live API.

The browser is the system's, never one Playwright downloads (``playwright install`` needs the internet). Missing
Playwright or Chromium skips the browser tests with the reason; under ``CI=true`` it fails the run instead
(``make test`` installs Chromium where it can: root + apt).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import api_url  # noqa: F401 - `distillery serve` on PostgreSQL + Redis + a worker

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "var" / "console-screenshots"


def _chromium() -> str | None:
    for candidate in CHROMIUM_CANDIDATES:
        if found := shutil.which(candidate):
            return found
    return None


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    """A launched headless Chromium (a Playwright ``Browser``). Module-scoped on purpose: Playwright's sync API keeps
    an event loop running in the thread while it is open, and a later test of the same xdist worker that calls
    ``asyncio.run`` (the async SDK's tests) would fail; pytest closes it as soon as this module's tests are done."""
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        executable, why = None, "playwright is not installed (make install-dev)"
    else:
        why = "Chromium is not installed (apt-get install chromium; make test does it as root)"
    if executable is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the console's browser tests cannot run: {why}")
        pytest.skip(why)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def screenshots() -> Path:
    """Where the browser tests save their screenshots (printed; also copied to /tmp/console-shots)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots: {SCREENSHOTS}")
    return SCREENSHOTS
