"""The audit console in a real browser: Debian's chromium driven by Playwright (browser builds
cannot be downloaded here, so never `playwright install`). Screenshots of every page at desktop and
phone sizes go to tests/browser/screenshots/ (git-ignored)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright
from playwright.async_api import Page as PlaywrightPage

from tests.api.conftest import client, service, service_env, start_module_service, start_service  # noqa: F401

SCREENSHOTS = Path(__file__).parent / "screenshots"
AXE = Path(__file__).parent / "vendor" / "axe-4.14.1.min.js"
SIZES = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """Playwright's async API on the tests' own event loop (its sync API would hold the loop that
    the database fixtures need)."""
    chromium = shutil.which("chromium")
    assert chromium, "needs Debian's chromium (apt-get install -y chromium; .ci/run installs it)"
    async with async_playwright() as playwright:
        # Root needs no sandbox; the Debian wrapper's /dev/shm check misfires in containers.
        launched = await playwright.chromium.launch(executable_path=chromium,
                                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield launched
        await launched.close()


class Page:
    """A fresh browser context and page, with every console error, uncaught exception and dialog
    it saw (a test asserts there were none)."""

    def __init__(self, page: PlaywrightPage) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda message: self.errors.append(f"{message.text} ({message.location.get('url')})")
                if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("dialog", self._dialog)
        page.on("response", lambda r: self.errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    async def _dialog(self, dialog) -> None:
        self.errors.append(f"dialog: {dialog.message}")
        await dialog.dismiss()


@pytest.fixture
async def browsing(browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport=SIZES["desktop"])
    try:
        yield Page(await context.new_page())
    finally:
        await context.close()


async def serious_accessibility_violations(page: PlaywrightPage) -> list[str]:
    # Evaluated over the DevTools protocol, which the page's CSP (no inline script) does not govern.
    await page.evaluate(AXE.read_text() + "\n;undefined")
    result = await page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return [f"{v['id']}: {v['help']} ({len(v['nodes'])} nodes)" for v in result["violations"]
            if v["impact"] in ("serious", "critical")]


async def screenshots(page: PlaywrightPage, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    for size, viewport in SIZES.items():
        await page.set_viewport_size(viewport)
        await page.screenshot(path=str(SCREENSHOTS / f"{name}-{size}.png"), full_page=True)
    await page.set_viewport_size(SIZES["desktop"])
