"""A real headless Chromium for the page tests, driven by Playwright for Python.

The browser is the system's (Debian's ``chromium``; ``TOKENBRIDGE_CHROMIUM`` names another
binary), launched with ``executable_path``: nothing is downloaded. One browser serves the whole
test session; each test gets a fresh context (cookies, storage) and page. When a test fails, a
screenshot of its page is written to ``test-results/screenshots/<test name>.png`` and the
failure report names the file.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Playwright, async_playwright, expect

SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-results" / "screenshots"
_FAILED = pytest.StashKey[bool]()
expect.set_options(timeout=20_000)  # a bound on each wait, on a loaded 2-core machine


def chromium_path() -> str | None:
    named = os.environ.get("TOKENBRIDGE_CHROMIUM")
    if named:
        return named
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[Any]:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture(scope="session")
async def playwright() -> AsyncIterator[Playwright]:
    async with async_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
async def browser(playwright: Playwright) -> AsyncIterator[Browser]:
    path = chromium_path()
    if path is None:
        message = "no Chromium: apt-get install chromium (or set TOKENBRIDGE_CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    launched = await playwright.chromium.launch(executable_path=path, headless=True)
    yield launched
    await launched.close()


@pytest.fixture
async def page(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(20_000)
    opened = await context.new_page()
    yield opened
    if request.node.stash.get(_FAILED, False):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
        target = SCREENSHOTS / f"{name}.png"
        await opened.screenshot(path=str(target), full_page=True)
        print(f"\npage screenshot: {target}")
    await context.close()
