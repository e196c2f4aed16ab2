"""Fixtures for the web app's tests: the built app and headless Chromium.

The browser is Debian's ``chromium`` (/usr/bin/chromium, installed by ``scripts/services.sh``),
driven by the Playwright Python package; nothing is downloaded. The app is built from
``clients/web`` when ``dist/`` is missing or older than its sources. Screenshots go to
``test-artifacts/webapp/``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from .webtools import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, Pages, build_web


@pytest.fixture(scope="session")
def web_dist() -> Path:
    return build_web()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(web_dist):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (scripts/services.sh)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest_asyncio.fixture(loop_scope="module")
async def pages_factory(browser) -> AsyncIterator:
    made: list[Pages] = []

    def make(base: str) -> Pages:
        pages = Pages(browser, base)
        made.append(pages)
        return pages

    yield make
    for pages in made:
        await pages.close()
        assert not pages.errors, f"uncaught errors in the page: {pages.errors}"
